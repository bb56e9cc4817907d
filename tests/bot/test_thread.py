"""The run's thread as Slack shows it: the bot over signed HTTP, a real RQ worker, real Redis, and the payload stand-in
that tells a story on cue (tests/standins/story_train.py): log excerpts, the completion with its loss curve and
buttons, a failure with its excerpt (and secrets that never reach Slack), a timeout resumed with one click."""

from __future__ import annotations

import json

import pytest

from bot.blocks import DEPLOY_ACTION, LOGS_ACTION, RESUME_ACTION
from jobs.runs import service
from tests.conftest import ROOT, shown

pytestmark = pytest.mark.timeout(240)

CANARY_PATTERN = "hf_" + "Zq9" * 12          # secret-shaped, known to nobody: the bot's patterns must catch it
CANARY_KNOWN = "s3cr3t-canary-value-77"      # a value of the worker's environment: jobs/ masks it before Redis
CANARY_SAS = "sig=Xk29fLq0w%2Bz8" + "Q" * 20  # a SAS signature in a URL


@pytest.fixture
def story(request, bot_env):
    """Runs train with the story stand-in and the test's cues (its parameter); listed before `bot` and `worker`,
    so that both start with them."""
    bot_env.update(TUNEOPS_TRAIN_MODULE="tests.standins.story_train", TUNEOPS_LOG_INTERVAL="2",
                   STORY_STEP_S="0.05", PYTHONPATH=str(ROOT), **getattr(request, "param", {}))
    return bot_env


def cues(**env: str):
    return pytest.mark.parametrize("story", [env], indirect=True, ids=["story"])


def texts(msgs) -> list[str]:
    return [m.text for m in msgs]


def body(msg) -> str:
    return json.dumps(msg.blocks, ensure_ascii=False)


def buttons(msg) -> dict[str, str]:
    return {e["action_id"]: e["value"] for b in msg.blocks if b.get("type") == "actions" for e in b["elements"]}


async def run_to_end(bot, slack, text: str, run_id: str = "ft-0001", timeout: float = 120):
    _, _, key = await bot.command(text)
    assert await slack.until(lambda: slack.responses[key], 60), "the run was not queued"
    run = await slack.until(lambda: (r := shown(bot.settings.jobs, service.get_run(bot.settings.jobs, run_id))) and r.state.terminal and r,
                            timeout)
    assert run, service.get_run(bot.settings.jobs, run_id)
    return run


async def thread_until(slack, run, predicate, timeout: float = 30):
    got = await slack.until(lambda: (msgs := slack.thread(run.channel, run.thread_ts)) and predicate(msgs) and msgs,
                            timeout)
    assert got, texts(slack.thread(run.channel, run.thread_ts))
    return got


@cues(STORY_LINES="3")
async def test_the_thread_of_a_successful_run(story, bot, worker, slack):
    run = await run_to_end(bot, slack, "run --dataset datasets/chat.jsonl --max-steps 30")
    assert run.state == "succeeded", run.error

    def complete(msgs):
        return any("finished" in m.text for m in msgs) and any(
            f.get("thread_ts") == run.thread_ts for f in slack.files.values())

    thread = await thread_until(slack, run, complete)
    said = texts(thread)
    assert "started" in said[0]
    excerpts = [m for m in thread if m.text == f"{run.id}: log"]
    assert excerpts, said
    lines = [line for m in excerpts for line in body(m).split("\\n")]
    # the excerpts follow the log in order, each a code block of at most 40 lines, with what was left out counted
    steps = [int(line.split()[1]) for line in lines if line.startswith("step ") and " line " in line]
    assert steps == sorted(steps) and steps[-1] == 30
    for m in excerpts:
        text = m.blocks[0]["text"]["text"]
        assert text.startswith("```") and text.endswith("```") and len(text) <= 3000
        assert text.count("\n") <= 41

    done = next(m for m in thread if "finished" in m.text)
    assert thread.index(done) > thread.index(excerpts[-1])  # the last lines come before the end of the story
    assert done.text.startswith(f"<@U0ALICE> {run.id} finished: final loss")
    shown = body(done)
    assert "2.5000 (base model 3.9000)" in shown and "Eval loss on 8 held-out examples" in shown
    assert "A way to fine-tune a 4-bit model" in shown and "QLoRA QLoRA" in shown  # fine-tuned vs base sample
    assert run.adapter_path in shown
    assert buttons(done) == {DEPLOY_ACTION: run.id, LOGS_ACTION: run.id}  # nothing to resume

    [chart] = [f for f in slack.files.values() if f.get("thread_ts") == run.thread_ts]
    assert chart["content"][:8] == b"\x89PNG\r\n\x1a\n" and chart["title"] == f"{run.id}: loss curve"
    assert [c.method for c in slack.calls if c.method.startswith("files.")] == [
        "files.getUploadURLExternal", "files.completeUploadExternal"]

    # Logs: the tail, privately
    status, _, key = await bot.click(LOGS_ACTION, run.id, user="U0BOB", message_ts=done.ts)
    assert status == 200
    [answer] = await slack.until(lambda: slack.responses[key], 30)
    assert answer["response_type"] == "ephemeral" and "step 30 line 2" in json.dumps(answer)
    assert all(c.ok for c in slack.calls if c.method.startswith("chat."))


@cues(STORY_FAIL_AT="5", STORY_LINES="1", STORY_LEAK_TOKEN=CANARY_KNOWN,
      STORY_SAY=f"loading with HF_TOKEN {CANARY_PATTERN}|download https://acct.blob/x?sv=1&{CANARY_SAS}"
                f"|token from the env: {CANARY_KNOWN}")
async def test_a_failed_run_shows_its_error_excerpt_and_no_secret_reaches_slack(story, bot, worker, slack,
                                                                               monkeypatch):
    # The bot shares the worker's environment, as it does when both read the same .env (`/finetune logs` reads the
    # log file in the bot's process and masks the secrets of its environment).
    monkeypatch.setenv("STORY_LEAK_TOKEN", CANARY_KNOWN)
    run = await run_to_end(bot, slack, "run --dataset datasets/chat.jsonl --max-steps 30")
    assert run.state == "failed"

    thread = await thread_until(slack, run, lambda msgs: any("failed" in m.text for m in msgs))
    failed = next(m for m in thread if " failed: " in m.text)
    assert failed.reply_broadcast and failed.text.startswith(f"<@U0ALICE> {run.id} failed")
    excerpts = [m for m in thread if m.text == f"{run.id}: log"]
    assert excerpts and thread.index(excerpts[-1]) < thread.index(failed)
    logged = "".join(body(m) for m in excerpts)
    assert "Traceback (most recent call last):" in logged and "RuntimeError: the story fails at step 5" in logged
    assert "RuntimeError: the story fails at step 5" in body(failed)  # the failure's own excerpt
    # it saved checkpoints at steps 2 and 4: Resume is offered, with the step
    assert buttons(failed) == {RESUME_ACTION: run.id, LOGS_ACTION: run.id}
    assert "checkpoint of step 4" in body(failed)

    # the canaries: masked everywhere Slack was called, uploads and private answers included
    _, _, key = await bot.command(f"logs {run.id} --tail 50")
    assert await slack.until(lambda: slack.responses[key], 30)
    recorded = json.dumps([[c.method, c.params, c.response] for c in slack.calls], ensure_ascii=False)
    recorded += json.dumps(slack.responses) + "".join(str(f.get("content")) for f in slack.files.values())
    for canary in (CANARY_PATTERN, CANARY_KNOWN, CANARY_SAS.split("=", 1)[1]):
        i = recorded.find(canary)
        assert i < 0, recorded[max(0, i - 300): i + 50]
    assert "HF_TOKEN ***" in logged or "HF_TOKEN ***" in recorded
    assert "loading with HF_TOKEN" in recorded  # the line itself did reach the thread


@cues(TUNEOPS_RUN_TIMEOUT_S="3", STORY_HANG_AFTER="4")
async def test_a_timed_out_run_resumed_with_its_button(story, bot, worker, slack):
    run = await run_to_end(bot, slack, "run --dataset datasets/chat.jsonl --max-steps 8")
    assert run.state == "timed_out" and run.last_checkpoint_step == 4

    thread = await thread_until(slack, run, lambda msgs: any("ran out of time" in m.text for m in msgs))
    timed_out = next(m for m in thread if "ran out of time" in m.text)
    assert timed_out.text.startswith(f":alarm_clock: <@U0ALICE> {run.id} ran out of time")
    assert "run time limit of 3s" in timed_out.text and "The last checkpoint is at step 4." in timed_out.text
    assert buttons(timed_out) == {RESUME_ACTION: run.id, LOGS_ACTION: run.id}
    assert "the run time limit of 3s is reached" in "".join(body(m) for m in thread)  # the launcher's line

    status, _, key = await bot.click(RESUME_ACTION, run.id, user="U0BOB", message_ts=timed_out.ts)
    assert "only they or an admin" in json.dumps(await slack.until(lambda: slack.responses[key], 30))
    status, _, key = await bot.click(RESUME_ACTION, run.id, message_ts=timed_out.ts)
    assert status == 200
    note = await slack.until(lambda: slack.responses[key], 30)
    assert "Resuming ft-0001 from the checkpoint of step 4" in json.dumps(note)

    done = await slack.until(lambda: (r := shown(bot.settings.jobs, service.get_run(bot.settings.jobs, run.id))) and r.state == "succeeded"
                             and r, 90)
    assert done and done.attempts == 2
    thread = await thread_until(slack, run, lambda msgs: any("finished" in m.text for m in msgs))
    said = texts(thread)
    resumed = next(i for i, t in enumerate(said) if "Resumed by <@U0ALICE>" in t)
    assert said.index(timed_out.text) < resumed < next(i for i, t in enumerate(said) if "finished" in t)
    assert "from the checkpoint of step 4" in said[resumed]
    assert "resuming after step 4" in "".join(body(m) for m in thread[resumed:])  # the trainer went on from there
    [card] = slack.root_messages("C0TRAIN")
    assert card.ts == run.card_ts and "succeeded" in card.text
    assert any("timed out" in e["text"] for e in card.edits)
