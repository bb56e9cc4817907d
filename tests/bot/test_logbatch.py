"""Log batching: few messages, errors at once and never dropped, Slack's limits always kept, order kept."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.logbatch import SECTION_LIMIT, LogBatcher, clean_line, is_error_line
from bot.redact import Redactor

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ID_RE = re.compile(r"^\s*L(\d+)\b")
OMITTED_RE = re.compile(r"^\.\.\. (\d+) lines? omitted$")


def body(message: str) -> list[str]:
    assert message.startswith("```\n") and message.endswith("\n```"), message[:80]
    return message[4:-4].split("\n")


def check_limits(message: str, batcher: LogBatcher) -> None:
    assert len(message) <= batcher.max_chars <= SECTION_LIMIT
    lines = body(message)
    assert 1 <= len(lines) <= batcher.max_lines
    assert all(len(line) <= batcher.max_line_chars for line in lines)


def shown(messages: list[str]) -> tuple[list[int], int]:
    """The line ids shown, in order, and the number of lines said to be omitted."""
    ids, omitted = [], 0
    for m in messages:
        for line in body(m):
            if (o := OMITTED_RE.match(line)):
                omitted += int(o.group(1))
            elif (i := ID_RE.match(line)):
                ids.append(int(i.group(1)))
            else:
                raise AssertionError(f"a line that is neither a log line nor a note: {line!r}")
    return ids, omitted


# -- generated log streams ---------------------------------------------------------------------------------------

noise = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")), max_size=400)
kinds = st.sampled_from(["info"] * 8 + ["error", "traceback"])


@st.composite
def log_stream(draw):
    """A list of feeds (time step, lines); each line starts with its id; which ids are errors."""
    lines: list[str] = []
    errors: set[int] = set()

    def add(text: str, error: bool, indent: str = "") -> None:
        n = len(lines)
        lines.append(f"{indent}L{n} {text}")
        if error:
            errors.add(n)

    for kind in draw(st.lists(kinds, min_size=1, max_size=120)):
        if kind == "info":
            add(f"step {len(lines)} loss 1.23 " + draw(noise), False)
        elif kind == "error":
            add("ERROR " + draw(noise), True)
        else:
            add("Traceback (most recent call last):", True)
            for _ in range(draw(st.integers(1, 60))):
                add('File "/app/payload/train.py", line 12, in main ' + draw(noise), True, indent="  ")
            add("RuntimeError: CUDA out of memory " + draw(noise), True)
    # Cut the lines into feeds at random points (a traceback may arrive in pieces), at random times.
    cuts = sorted(set(draw(st.lists(st.integers(0, len(lines)), max_size=12))) | {0, len(lines)})
    steps = draw(st.lists(st.floats(0, 30), min_size=len(cuts) - 1, max_size=len(cuts) - 1))
    feeds = [(steps[k], lines[a:b]) for k, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    return feeds, errors, len(lines)


batcher_args = st.fixed_dictionaries({
    "interval_s": st.sampled_from([5.0, 20.0]),
    "max_lines": st.integers(2, 40),
    "max_line_chars": st.integers(20, 400),
})


@SETTINGS
@given(stream=log_stream(), args=batcher_args,
       ticks=st.lists(st.tuples(st.floats(0, 10), st.sampled_from([False] * 5 + [True])), max_size=4))
def test_properties(stream, args, ticks):
    feeds, errors, total = stream
    b = LogBatcher(**args)
    now = 1000.0
    calls: list[tuple[float, bool, list[str]]] = []  # (time, forced, messages)
    arrival: dict[int, int] = {}  # line id -> index of the call that fed it
    for step, lines in feeds:
        now += step
        for line in lines:
            arrival[int(ID_RE.match(line).group(1))] = len(calls)
        calls.append((now, False, b.feed(lines, now)))
        for t, force in ticks:  # the caller's clock ticks between feeds; a forced flush now and then
            now += t
            calls.append((now, force, b.flush(now, force=force)))
    calls.append((now + 100, True, b.flush(now + 100, force=True)))

    every = [m for _, _, ms in calls for m in ms]
    for m in every:
        check_limits(m, b)
    ids, omitted = shown(every)
    assert ids == sorted(set(ids)), "order kept, nothing twice"
    assert errors <= set(ids), f"error lines dropped: {sorted(errors - set(ids))[:10]}"
    assert len(ids) + omitted == total, "every line is shown or counted as omitted"
    assert b.pending == 0

    # Errors go out at once: by the first call at or after their arrival plus the traceback grace.
    delivered_at = {}
    for k, (_, _, ms) in enumerate(calls):
        for i in shown(ms)[0]:
            delivered_at[i] = k
    for i in errors:
        fed = arrival[i]
        deadline = calls[fed][0] + b.error_grace_s
        first_due = next(k for k in range(fed, len(calls)) if calls[k][0] >= deadline)
        assert fed <= delivered_at[i] <= first_due

    # Ordinary lines alone: at most one batch every interval.
    last = None
    for t, forced, ms in calls:
        if not ms:
            continue
        if last is not None and not forced and not errors & set(shown(ms)[0]):
            assert t - last >= b.interval_s
        last = t


# -- behaviour, case by case -------------------------------------------------------------------------------------

def test_ordinary_lines_wait_for_the_interval():
    b = LogBatcher(interval_s=20)
    first = b.feed(["L0 starting"], now=0)
    assert [shown(first)[0]] == [[0]]
    assert b.feed(["L1 step 1"], now=5) == []
    assert b.feed(["L2 step 2"], now=19) == []
    assert b.flush(19.9) == []
    out = b.flush(20.0)
    assert shown(out) == ([1, 2], 0)
    assert b.flush(60) == []


def test_a_flood_becomes_one_message_with_the_newest_lines():
    b = LogBatcher(interval_s=20, max_lines=40)
    b.feed(["L0 start"], now=0)
    out = b.feed([f"L{i} step {i}" for i in range(1, 10_001)], now=21)
    assert len(out) == 1
    lines = body(out[0])
    assert lines[0] == "... 9961 lines omitted"
    assert len(lines) == 40
    assert shown(out) == (list(range(9962, 10_001)), 9961)


def test_an_error_goes_out_at_once_with_the_lines_before_it():
    b = LogBatcher(interval_s=20, max_lines=10)
    b.feed(["L0 start"], now=0)
    assert b.feed([f"L{i} step" for i in range(1, 100)], now=1) == []
    out = b.feed(["L100 ERROR loader: file not found", "L101 exiting"], now=2)
    ids, omitted = shown(out)
    assert 100 in ids and {97, 98, 99, 101} <= set(ids)
    assert len(ids) + omitted == 101


def test_a_traceback_is_held_until_it_ends_then_sent_whole():
    b = LogBatcher(interval_s=20)
    b.feed(["L0 start"], now=0)
    assert b.feed(["L1 Traceback (most recent call last):", '  L2 File "train.py", line 3, in <module>'], now=30) == []
    assert b.flush(31) == []
    out = b.feed(["    L3 main()", "L4 ValueError: bad dataset row 12"], now=31.5)
    assert shown(out) == ([1, 2, 3, 4], 0)


def test_what_is_due_is_told_before_feeding_so_a_lane_waits_for_a_turn_only_when_it_will_post():
    b = LogBatcher(interval_s=20)
    assert not b.due(0) and b.due(0, lines=True)  # nothing yet; the first lines go at once
    b.feed(["L0 start"], now=0)
    assert not b.due(5, lines=True) and b.due(5, lines=True, errors=True) and b.due(20, lines=True)
    assert not b.due(20)  # nothing pending, nothing coming: no message
    assert b.any_error(["L1 step", "L2 RuntimeError: CUDA error"]) and not b.any_error(["L1 step\nL2 step"])
    # A traceback still arriving is held back by flush, but counts as urgent and due: its lane waits urgently.
    assert b.feed(["L1 Traceback (most recent call last):", '  L2 File "x"'], now=6) == []
    assert b.has_errors and b.due(6)
    # Error lines that came while waiting for the turn go out together, in one message.
    out = b.feed(["L3 KeyError: 'a'", "L4 step", "L5 ERROR shard 2 failed"], now=7)
    assert shown(out) == ([1, 2, 3, 4, 5], 0) and not b.has_errors


def test_a_traceback_that_never_ends_goes_out_after_the_grace():
    b = LogBatcher(interval_s=20, error_grace_s=2)
    assert shown(b.feed(["L0 Traceback (most recent call last):", "  L1 File x"], now=0)) == ([], 0)
    assert b.flush(1.9) == []
    assert shown(b.flush(2.0)) == ([0, 1], 0)


def test_a_finished_traceback_is_not_held_behind_the_next_one():
    b = LogBatcher(interval_s=20, error_grace_s=2)
    assert b.feed(["L0 Traceback (most recent call last):"], now=0) == []
    out = b.feed(["  L1 File x", "L2 KeyError: 'a'", "L3 step", "L4 Traceback (most recent call last):"], now=2)
    assert shown(out) == ([0, 1, 2, 3], 0)
    assert shown(b.feed(["  L5 File y", "L6 KeyError: 'b'"], now=2.5)) == ([4, 5, 6], 0)


def test_a_forced_flush_in_the_middle_of_a_traceback():
    b = LogBatcher(interval_s=20, error_grace_s=2)
    b.feed(["L0 Traceback (most recent call last):", "  L1 File x"], now=0)
    assert shown(b.flush(0.5, force=True)) == ([0, 1], 0)
    assert b.flush(0.6) == []
    assert shown(b.feed(["  L2 File y", "L3 KeyError: 'a'"], now=0.7)) == ([2, 3], 0)


def test_more_error_lines_than_a_message_holds_are_split_not_dropped():
    b = LogBatcher(max_lines=40)
    tb = ["L0 Traceback (most recent call last):"] + [f'  L{i} File "f.py", line {i}' for i in range(1, 120)]
    out = b.feed(tb + ["L120 RecursionError: maximum recursion depth exceeded"], now=0)
    assert len(out) == 4
    for m in out:
        check_limits(m, b)
    assert shown(out) == (list(range(121)), 0)


def test_a_traceback_starts_a_new_message_rather_than_straddling_two():
    b = LogBatcher(max_lines=40)
    errors = [f"L{i} ERROR shard {i} failed" for i in range(30)]
    tb = ["L30 Traceback (most recent call last):"] + [f"  L{i} frame" for i in range(31, 50)] + ["L50 OSError: x"]
    out = b.feed(errors + tb, now=0)
    assert [shown([m])[0] for m in out] == [list(range(30)), list(range(30, 51))]


def test_character_limit_and_cut_lines():
    b = LogBatcher(max_lines=40, max_line_chars=300)
    out = b.feed([f"L{i} " + "x" * 1000 for i in range(40)], now=0)
    assert len(out) == 1
    check_limits(out[0], b)
    lines = body(out[0])
    assert lines[0].startswith("... ") and lines[-1].endswith("…") and len(lines[-1]) == 300
    ids, omitted = shown(out)
    assert ids[-1] == 39 and len(ids) + omitted == 40 and len(ids) == (3000 - 8) // 301


def test_lines_are_escaped_for_mrkdwn_and_cannot_close_the_code_block():
    line = clean_line("L1 <!channel> a && b > c ```end``` \x1b[31mred\x1b[0m", 300)
    assert "<" not in line and ">" not in line and "```" not in line and "\x1b" not in line
    assert "&lt;!channel&gt; a &amp;&amp; b &gt; c" in line and "red" in line
    # A cut never leaves half an entity.
    assert clean_line("&" * 50, 20) == "&amp;&amp;&amp;…"
    assert clean_line("loading  10%\rloading  55%\rloading 100%\n", 300) == "loading 100%"


def test_redaction_happens_before_the_cut():
    token = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
    b = LogBatcher(max_line_chars=40, redact=Redactor())
    out = b.feed([f"L0 {'.' * 30} export HF_TOKEN={token} and more"], now=0)
    assert "hf_" not in out[0] and "AbCd" not in out[0]


def test_error_lines_are_recognised():
    for line in ["ERROR:root:failed", "2024-01-01 12:00:00 ERROR train: boom", "ValueError: bad", "error: no such file",
                 "torch.OutOfMemoryError: CUDA out of memory.", "Killed", "KeyboardInterrupt",
                 "Traceback (most recent call last):", "Exception: x", "Segmentation fault (core dumped)"]:
        assert is_error_line(line), line
    for line in ["step 10 loss 0.5", "error rate 0.01 in eval", "{'loss': 2.1, 'grad_norm': 0.3}",
                 "Saving checkpoint-100", "INFO errors=0", "no errors found", "using ErrorHandler"]:
        assert not is_error_line(line), line


def test_bad_settings_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="max_lines"):
        LogBatcher(max_lines=1)
    with pytest.raises(ValueError, match="max_line_chars"):
        LogBatcher(max_line_chars=5000)

