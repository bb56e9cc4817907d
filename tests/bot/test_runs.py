"""Whole runs through the local backend: the bot over signed HTTP, a real RQ worker subprocess, the real trainer on the
tiny model, and the Slack stand-in showing what Slack would: the card's edits and the thread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.blocks import CANCEL_ACTION
from jobs.runs import service
from tests.bot.conftest import workspace_processes
from tests.conftest import shown

pytestmark = pytest.mark.timeout(420)


def card_versions(card) -> list[str]:
    return [e["text"] for e in card.edits] + [card.text]


async def wait_run(bot, slack, run_id: str, predicate, timeout: float):
    return await slack.until(lambda: (r := shown(bot.settings.jobs, service.get_run(bot.settings.jobs, run_id))) and predicate(r) and r,
                             timeout)


def trainer_processes(workspace: Path, run_id: str) -> list[int]:
    return workspace_processes(workspace, f"runs/{run_id}")


async def test_a_run_goes_from_the_command_to_succeeded_in_its_thread(bot, slack, worker, workspace):
    status, ack, key = await bot.command("run --dataset datasets/chat.jsonl --max-steps 4 --name demo")
    assert status == 200 and "Checking" in ack
    reply = await slack.until(lambda: slack.responses[key], 60)
    assert reply and "Queued *ft-0001*" in json.dumps(reply)

    run = await wait_run(bot, slack, "ft-0001", lambda r: r.state.terminal, 300)
    assert run, f"the run did not finish: {service.get_run(bot.settings.jobs, 'ft-0001')}"
    assert run.state == "succeeded", f"{run.state}: {run.error}"

    # the thread: started, then the completion message mentioning the requester, with loss and adapter
    def complete():
        msgs = slack.thread("C0TRAIN", run.thread_ts)
        return msgs if any("finished" in m.text for m in msgs) else None

    thread = await slack.until(complete, 30)
    assert thread, [m.text for m in slack.thread("C0TRAIN", run.thread_ts)]
    texts = [m.text for m in thread]
    assert "started" in texts[0]
    done = thread[-1]
    assert done.text.startswith("<@U0ALICE> ft-0001 finished: final loss")
    body = json.dumps(done.blocks)
    assert "Adapter" in body and run.adapter_path in body
    assert (workspace / run.adapter_path).is_dir() or Path(run.adapter_path).is_dir()
    assert not any("failed" in t for t in texts)

    # the card: posted once as the thread's root, edited in place from queued through running to succeeded
    [card] = slack.root_messages("C0TRAIN")
    assert card.ts == run.card_ts == run.thread_ts
    versions = card_versions(card)
    assert "queued" in versions[0]
    assert any("running" in v for v in versions)
    assert "succeeded" in versions[-1] and "step 4/4" in versions[-1]
    assert any("step" in v and "running" in v for v in versions)  # progress shown while it ran
    assert CANCEL_ACTION not in json.dumps(card.blocks)
    assert slack.calls_to("chat.update") and all(c.ok for c in slack.calls_to("chat.update"))

    # status from the records afterwards, answered in the ack
    _, ack, _ = await bot.command("status ft-0001")
    assert "succeeded" in ack and json.loads(ack)["response_type"] == "ephemeral"


async def test_cancel_mid_run_with_the_button(bot, slack, worker, workspace):
    _, _, key = await bot.command("run --dataset datasets/chat.jsonl --max-steps 400")
    assert await slack.until(lambda: slack.responses[key], 60)
    run = await wait_run(bot, slack, "ft-0001", lambda r: r.state == "running" and r.step >= 1 and r.card_ts, 240)
    assert run, service.get_run(bot.settings.jobs, "ft-0001")
    assert trainer_processes(workspace, "ft-0001"), "the trainer should be running"

    # someone else may not cancel it
    status, _, key = await bot.click(CANCEL_ACTION, "ft-0001", user="U0BOB", message_ts=run.card_ts)
    assert status == 200
    refusal = await slack.until(lambda: slack.responses[key], 30)
    assert "only they or an admin" in json.dumps(refusal)

    status, _, key = await bot.click(CANCEL_ACTION, "ft-0001", message_ts=run.card_ts)
    assert status == 200
    note = await slack.until(lambda: slack.responses[key], 30)
    assert "Cancelling ft-0001" in json.dumps(note)

    run = await wait_run(bot, slack, "ft-0001", lambda r: r.state.terminal, 120)
    assert run and run.state == "cancelled" and run.cancelled_by == "U0ALICE"
    said = await slack.until(lambda: [m for m in slack.thread("C0TRAIN", run.thread_ts)
                                      if "cancelled by <@U0ALICE>" in m.text], 30)
    assert said
    card = slack.messages["C0TRAIN"][run.card_ts]
    assert "cancelled" in card.text and CANCEL_ACTION not in json.dumps(card.blocks)
    assert await slack.until(lambda: not trainer_processes(workspace, "ft-0001"), 30), "a process was left"
