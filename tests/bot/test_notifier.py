"""The notifier against a real Redis event stream and the Slack stand-in: card, thread, throttling, at-least-once."""

from __future__ import annotations

import json
import sys

import pytest
import redis.asyncio as aioredis
from slack_sdk.web.async_client import AsyncWebClient

from bot.notifier import GROUP, Notifier, Transient
from bot.ratelimit import ChannelBudget
from bot.slack import SlackGateway
from bot.standin.slack import SlackStandIn
from jobs.core import store
from jobs.core.domain import Run, RunEvent, RunState
from jobs.core.settings import JobSettings
from jobs.runs import service
from tests.conftest import dead_port, shown

TOKEN = "xoxb-notifier-test"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def slack():
    with SlackStandIn(token=TOKEN) as s:
        yield s


@pytest.fixture
async def setup(redis_url, slack, tmp_path):
    settings = JobSettings.from_env({"REDIS_URL": redis_url, "TUNEOPS_WORKSPACE": str(tmp_path),
                                     "TUNEOPS_PYTHON": sys.executable})
    r = aioredis.from_url(redis_url)
    client = AsyncWebClient(token=TOKEN, base_url=slack.api_url)
    gateway = SlackGateway(client, ChannelBudget(r, rate_per_s=100))
    clock = Clock()
    notifier = Notifier(settings, gateway, progress_interval_s=5.0, block_ms=50, clock=clock)
    yield settings, notifier, clock, client
    await r.aclose()


def new_run(settings, **kw) -> Run:
    conn = store.connect(settings)
    run = Run(id=store.new_run_id(conn), requester="U0ALICE", channel="C0TRAIN", model="model-cache/tiny",
              dataset="datasets/chat.jsonl", params={"max_steps": 10}, **kw)
    store.create_run(conn, run, lambda pos: [RunEvent(run.id, "queued", {"position": pos})])
    return run


def change(settings, run_id: str, fn, *events) -> None:
    def step(run: Run):
        fn(run)
        return [RunEvent(run_id, kind, data) for kind, data in events]

    store.update_run(store.connect(settings), run_id, step)


def pending(settings) -> int:
    return store.connect(settings).xpending(store.EVENT_STREAM, GROUP)["pending"]


async def test_card_then_throttled_progress_then_thread_messages(setup, slack):
    settings, notifier, clock, _ = setup
    run = new_run(settings)
    assert await notifier.step() == 1
    [card] = slack.root_messages("C0TRAIN")
    assert "number 1 in line" in json.dumps(card.blocks)
    recorded = shown(settings, service.get_run(settings, run.id))
    assert recorded.thread_ts == recorded.card_ts == card.ts

    change(settings, run.id, lambda r: r.transition(RunState.PREPARING), ("state", {"state": "preparing"}))
    change(settings, run.id, lambda r: r.transition(RunState.RUNNING), ("state", {"state": "running"}),
           ("started", {"execution_id": "ft-0001/attempt-1", "links": {}}))
    await notifier.step()
    assert len(card.edits) == 1 and "running" in card.text  # three events, one card: one edit
    [started] = slack.thread("C0TRAIN", card.ts)
    assert "started" in started.text and "ft-0001/attempt-1" in started.text

    # progress: the first edit goes out at once only when its interval has passed; the rest wait for the flush
    edits = len(card.edits)
    for step in (1, 2, 3):
        change(settings, run.id, lambda r, s=step: setattr(r, "step", s) or setattr(r, "total_steps", 10),
               ("progress", {"step": step, "total_steps": 10}))
    await notifier.step()
    assert len(card.edits) == edits  # within 5 s of the last edit: held back
    clock.now += 5.1
    await notifier.step()
    assert len(card.edits) == edits + 1 and "step 3/10" in card.text  # one edit with the latest numbers

    lines = [f"log line {i}" for i in range(40)]
    change(settings, run.id, lambda r: (r.transition(RunState.FAILED), setattr(r, "error", "exit code 1")),
           ("state", {"state": "failed"}), ("failed", {"error": "exit code 1", "log_tail": lines}))
    await notifier.step()
    assert "failed" in card.text and "run_cancel" not in json.dumps(card.blocks)
    failed = slack.thread("C0TRAIN", card.ts)[-1]
    assert failed.reply_broadcast and "<@U0ALICE>" in failed.text
    body = json.dumps(failed.blocks)
    assert "log line 39" in body and "log line 20" in body and "log line 19" not in body
    assert pending(settings) == 0


async def test_an_event_stays_pending_until_slack_accepts_it(setup, slack):
    settings, notifier, clock, client = setup
    real = client.base_url
    client.base_url = f"http://127.0.0.1:{dead_port()}/api/"  # nothing listens there
    run = new_run(settings)
    with pytest.raises(Transient):
        await notifier.step()
    assert pending(settings) == 1 and slack.calls_to("chat.postMessage") == []
    assert shown(settings, service.get_run(settings, run.id)).card_ts == ""
    client.base_url = real
    assert await notifier.step() == 0  # nothing new: the run's lane tries its held event again
    assert pending(settings) == 0 and len(slack.root_messages("C0TRAIN")) == 1


async def test_a_refusal_by_slack_is_logged_and_does_not_block_later_events(setup, slack, caplog):
    settings, notifier, _, client = setup
    client.token = "xoxb-revoked"
    new_run(settings)
    assert await notifier.step() == 1  # dropped: trying again would be refused again
    assert "invalid_auth" in caplog.text
    client.token = TOKEN
    new_run(settings)
    assert await notifier.step() == 1
    assert pending(settings) == 0 and len(slack.root_messages("C0TRAIN")) == 1


async def test_a_requeued_run_keeps_its_card(setup, slack):
    settings, notifier, _, _ = setup
    run = new_run(settings)
    await notifier.step()
    change(settings, run.id, lambda r: (r.transition(RunState.CANCELLED), setattr(r, "cancelled_by", "U0BOB")),
           ("state", {"state": "cancelled"}), ("cancelled", {"by": "U0BOB"}))
    change(settings, run.id, lambda r: r.transition(RunState.QUEUED), ("queued", {"position": 1}),
           ("resumed", {"by": "U0ALICE", "checkpoint_step": 0, "auto": False}))
    await notifier.step()
    [card] = slack.root_messages("C0TRAIN")
    texts = [m.text for m in slack.thread("C0TRAIN", card.ts)]
    assert texts[0].endswith("cancelled by <@U0BOB>.") and "Resumed by <@U0ALICE>" in texts[1]
    assert "queued" in card.text and "run_cancel" in json.dumps(card.blocks)


def log_event(settings, run_id: str, *lines: str) -> None:
    store.append_event(store.connect(settings), RunEvent(run_id, "log", {"lines": list(lines)}))


def excerpts(slack, run) -> list[str]:
    return [m.blocks[0]["text"]["text"] for m in slack.thread("C0TRAIN", run.thread_ts) if m.text.endswith(": log")]


async def test_log_lines_become_excerpts_one_per_interval_errors_at_once_and_stay_pending_until_posted(setup, slack):
    settings, notifier, clock, _ = setup
    notifier.log_interval_s = 20.0
    notifier.lanes.clear()
    run = new_run(settings)
    await notifier.step()
    run = shown(settings, service.get_run(settings, run.id))

    log_event(settings, run.id, "loading shards", "shard 1 of 2")
    await notifier.step()
    assert excerpts(slack, run) == ["```\nloading shards\nshard 1 of 2\n```"]  # the first lines go at once
    assert pending(settings) == 0

    clock.now += 1
    log_event(settings, run.id, "step 1 loss 2.0 <not a mention> & co")
    await notifier.step()
    assert len(excerpts(slack, run)) == 1 and pending(settings) == 1  # held in the batcher: not acked yet

    clock.now += 1
    log_event(settings, run.id, "RuntimeError: CUDA error: out of memory", "step 2 loss 1.9")
    await notifier.step()
    got = excerpts(slack, run)
    assert len(got) == 2 and "RuntimeError: CUDA error: out of memory" in got[1]  # an error goes at once
    assert "step 1 loss 2.0 &lt;not a mention&gt; &amp; co" in got[1]  # with what came before it, escaped
    clock.now += 5
    log_event(settings, run.id, "step 3 loss 1.8")
    await notifier.step()
    assert len(excerpts(slack, run)) == 2 and pending(settings) >= 1
    clock.now += 20  # the interval is over: the next tick posts what waited
    await notifier.step()
    got = excerpts(slack, run)
    assert len(got) == 3 and "step 3 loss 1.8" in got[2] and pending(settings) == 0


async def test_a_finished_run_posts_its_last_lines_before_the_completion_and_a_loss_curve(setup, slack):
    settings, notifier, clock, _ = setup
    run = new_run(settings)
    await notifier.step()
    log_event(settings, run.id, "first line")
    await notifier.step()
    clock.now += 1
    log_event(settings, run.id, "the last line, held by the batcher")
    metrics = {"last_loss": 1.0, "first_loss": 3.0, "loss_history": [[1, 3.0], [2, 2.0], [3, 1.0]],
               "eval_loss": 1.5, "base_eval_loss": 2.5, "generations": [{"prompt": "Hi <@U0EVIL>", "base": "x",
                                                                         "fine_tuned": "Hello!"}]}
    change(settings, run.id, lambda r: (r.transition(RunState.PREPARING), r.transition(RunState.RUNNING),
                                        r.transition(RunState.SUCCEEDED), setattr(r, "adapter_path", "runs/a")),
           ("state", {"state": "succeeded"}), ("succeeded", {"metrics": metrics, "adapter": "runs/a"}))
    await notifier.step()
    run = shown(settings, service.get_run(settings, run.id))
    thread = slack.thread("C0TRAIN", run.thread_ts)
    assert [m.text.split(":")[0] for m in thread][-2:] == [f"{run.id}", f"<@U0ALICE> {run.id} finished"]
    assert "the last line, held by the batcher" in thread[-2].blocks[0]["text"]["text"]
    done = json.dumps(thread[-1].blocks)
    assert "1.5000 (base model 2.5000)" in done and "Hi &lt;@U0EVIL&gt;" in done and "<@U0EVIL>" not in done
    [chart] = slack.files.values()
    assert chart["thread_ts"] == run.thread_ts and chart["content"].startswith(b"\x89PNG")
    assert pending(settings) == 0


async def test_an_error_goes_ahead_of_a_card_edit_waiting_in_its_lane(setup, slack):
    settings, notifier, clock, _ = setup
    run = new_run(settings)
    change(settings, run.id, lambda r: (r.transition(RunState.PREPARING), r.transition(RunState.RUNNING)),
           ("state", {"state": "running"}), ("started", {"execution_id": "ft-0001/attempt-1", "links": {}}))
    await notifier.step()
    run = shown(settings, service.get_run(settings, run.id))
    # The channel is busy for a while (another run's errors, say): a progress edit of the card waits routinely.
    await notifier.gateway.budget.penalize("C0TRAIN", 1.5)
    clock.now += 10
    change(settings, run.id, lambda r: setattr(r, "step", 5) or setattr(r, "total_steps", 10),
           ("progress", {"step": 5, "total_steps": 10}))
    notifier.start()
    try:
        lane = await slack.until(lambda: (lane := notifier.lanes.get(run.id)) and lane.busy and lane.items
                                 and lane.items[0].kind == "card" and lane)
        assert lane, "the card edit should be waiting for the channel"
        log_event(settings, run.id, "step 5 loss 1.2", "ERROR shard 3 failed to load")
        log_event(settings, run.id, "Traceback (most recent call last):", '  File "train.py", line 9, in step',
                  "RuntimeError: CUDA error")
        edited = await slack.until(lambda: any(c.method == "chat.update" and "5/10" in json.dumps(c.params)
                                               for c in slack.calls), 15)
    finally:
        await notifier.stop()
    assert edited, "the card should be edited once the errors are out"
    methods = [c.method for c in slack.calls if c.method in ("chat.postMessage", "chat.update")]
    # The errors (both events, in one excerpt: they came while the lane waited) went first, then the card.
    assert methods[-2:] == ["chat.postMessage", "chat.update"], methods
    [excerpt] = [e for e in excerpts(slack, run) if "ERROR shard 3" in e]
    assert excerpt.index("ERROR shard 3") < excerpt.index("RuntimeError: CUDA error")


async def test_error_lines_behind_a_started_message_go_out_in_the_same_post(setup, slack):
    # In a busy channel a thread gets one post a turn: the run's first errors join its "started" message instead of
    # waiting a turn behind it. Lines of the next events stay in order after the message's own blocks.
    settings, notifier, _, _ = setup
    run = new_run(settings)
    await notifier.step()
    change(settings, run.id, lambda r: (r.transition(RunState.PREPARING), r.transition(RunState.RUNNING)),
           ("state", {"state": "running"}), ("started", {"execution_id": "ft-0001/attempt-1", "links": {}}))
    log_event(settings, run.id, "step 1 loss 2.5", "ERROR shard 3 failed to load")
    assert await notifier.step() == 3
    run = shown(settings, service.get_run(settings, run.id))
    [post] = slack.thread("C0TRAIN", run.card_ts)
    body = json.dumps(post.blocks)
    assert post.text.startswith(":rocket:") and "ft-0001/attempt-1" in body
    assert body.index("started") < body.index("ERROR shard 3 failed to load")
    assert pending(settings) == 0
    # Without log lines behind it, the message goes alone.
    change(settings, run.id, lambda r: None, ("notice", {"text": "tuneops lost track of nothing"}))
    await notifier.step()
    [_, notice] = slack.thread("C0TRAIN", run.card_ts)
    assert "lost track of nothing" in notice.text and "ERROR" not in json.dumps(notice.blocks)


async def test_slack_failing_with_5xx_is_tried_again_not_taken_for_a_refusal(setup, slack):
    settings, notifier, _, _ = setup
    slack.fail_for(30, 503, methods={"chat.postMessage"})
    new_run(settings)
    with pytest.raises(Transient, match="503"):
        await notifier.step()
    assert pending(settings) == 1 and slack.root_messages("C0TRAIN") == []
    slack.clear_faults()
    await notifier.step()
    assert pending(settings) == 0 and len(slack.root_messages("C0TRAIN")) == 1


async def test_a_result_posted_by_a_process_that_died_before_acking_is_not_posted_again(setup, slack):
    """The result's post is recorded under its stream entry; the process taking over the entry skips it."""
    from bot.stream import ALIVE

    settings, first, _, _ = setup
    run = new_run(settings)
    await first.step()
    change(settings, run.id, lambda r: (r.transition(RunState.PREPARING), r.transition(RunState.RUNNING),
                                        r.transition(RunState.FAILED), setattr(r, "error", "exit code 1")),
           ("state", {"state": "failed"}), ("failed", {"error": "exit code 1", "log_tail": ["boom"]}))
    acks = first.stream.ack
    first.stream.ack = lambda entry_ids: None  # it dies after posting, before its acks reach Redis
    await first.step()
    first.stream.ack = acks
    card = slack.root_messages("C0TRAIN")[0]
    told = [m for m in slack.thread("C0TRAIN", card.ts) if "failed" in m.text]
    assert len(told) == 1 and pending(settings) > 0
    store.connect(settings).delete(ALIVE.format(first.consumer))  # its heartbeat lapsed

    second = Notifier(settings, first.gateway, consumer="bot-b", block_ms=50, clock=first.clock)
    second.stream._last_reap = -1e9
    await second.step()
    assert pending(settings) == 0  # taken over and done
    assert [m for m in slack.thread("C0TRAIN", card.ts) if "failed" in m.text] == told
