"""Every button refuses, privately and changing nothing, a click it must not act on: from a person or a channel outside
the allow lists, with a value that names nothing, or on the card of a run (or deploy request) that no longer exists.
Real HTTP with signed block_actions payloads; the store is compared before and after each click."""

from __future__ import annotations

import asyncio
import json

import pytest

from bot.blocks import (
    APPROVE_ACTION,
    CANCEL_ACTION,
    DEPLOY_ACTION,
    LOGS_ACTION,
    REJECT_ACTION,
    RESUME_ACTION,
)
from jobs.core import store
from jobs.core.domain import RunState
from jobs.deploys import approval
from jobs.runs import service

# Keys that move by themselves while the bot idles: its notifier's heartbeat and ownership of runs, the delivery
# claims, and the event stream (read by the notifier's consumer group; compared by its entries instead).
VOLATILE = (f"{store.PREFIX}:notifier:", store.DELIVERY_KEY.format(""), store.EVENT_STREAM)


@pytest.fixture
def bot_env(bot_env):
    bot_env.update(TUNEOPS_ALLOWED_CHANNELS="C0TRAIN", TUNEOPS_ALLOWED_USERS="U0ALICE,U0BOB",
                   TUNEOPS_APPROVERS="U0BOB")
    return bot_env


def snapshot(settings) -> dict[str, object]:
    conn = store.connect_bytes(settings)
    keys = sorted(k.decode() for k in conn.scan_iter("*"))
    state: dict[str, object] = {k: conn.dump(k) for k in keys if not k.startswith(VOLATILE)}
    state["events"] = [(i, f) for i, f in conn.xrange(store.EVENT_STREAM)]
    return state


async def quiet_snapshot(settings) -> dict[str, object]:
    """The store once the bot has stopped writing to it (the notifier records the cards it posts)."""
    before = snapshot(settings)
    for _ in range(40):
        await asyncio.sleep(0.5)
        now = snapshot(settings)
        if now == before:
            return now
        before = now
    raise AssertionError("the store kept changing")


@pytest.fixture
async def world(bot, slack):
    """ft-0001 queued (Alice's); ft-0002 succeeded with a deploy request dp-0001 (Alice's) waiting for Bob."""
    settings = bot.settings.jobs
    for _ in range(2):
        service.submit_run(settings, requester="U0ALICE", channel="C0TRAIN", dataset="datasets/chat.jsonl",
                           max_steps=2)
    conn = store.connect(settings)

    def succeed(run):
        run.state = RunState.SUCCEEDED
        run.adapter_path = "runs/ft-0002/adapter"
        return []

    store.update_run(conn, "ft-0002", succeed)
    approval.request_deploy(settings, "ft-0002", "U0ALICE", "C0TRAIN")
    assert await slack.until(lambda: len(slack.root_messages("C0TRAIN")) >= 2, 30)
    assert await slack.until(lambda: [c for c in slack.calls_to("chat.postMessage")
                                      if c.params.get("text", "").startswith("Deploy request dp-0001")], 30)
    return bot


def delete_run(settings, run_id: str) -> None:
    """As if the run were gone from Redis: its record and its places in the indexes."""
    conn = store.connect(settings)
    with conn.pipeline() as pipe:
        pipe.delete(store.run_key(run_id))
        pipe.zrem(store.ALL_RUNS, run_id)
        pipe.zrem(store.QUEUED, run_id)
        pipe.srem(store.ACTIVE, run_id)
        pipe.hdel(store.POSITIONS, run_id)
        pipe.execute()


# (action, a value it acts on, the run behind that value)
BUTTONS = {
    "cancel": (CANCEL_ACTION, "ft-0001", "ft-0001"),
    "resume": (RESUME_ACTION, "ft-0001", "ft-0001"),
    "deploy": (DEPLOY_ACTION, "ft-0002", "ft-0002"),
    "logs": (LOGS_ACTION, "ft-0001", "ft-0001"),
    "approve": (APPROVE_ACTION, "dp-0001", "ft-0002"),
    "reject": (REJECT_ACTION, "dp-0001", "ft-0002"),
}


async def refused(bot, slack, action: str, value: str, *, user: str = "U0BOB", channel: str = "C0TRAIN",
                  before: dict[str, object]) -> str:
    """Clicks, and returns the private answer, after checking that it is one and that the store did not change."""
    status, _, key = await bot.click(action, value, user=user, channel=channel)
    assert status == 200
    got = await slack.until(lambda: slack.responses[key], 30)
    assert got, f"no answer to {action}={value!r} by {user} in {channel}"
    [payload] = got
    assert payload.get("response_type", "ephemeral") == "ephemeral" and not payload.get("replace_original")
    assert snapshot(bot.settings.jobs) == before, f"{action}={value!r} by {user} in {channel} changed the store"
    return json.dumps(payload, ensure_ascii=False)


@pytest.mark.parametrize("button", sorted(BUTTONS))
async def test_a_button_refuses_what_it_must_not_act_on(world, slack, button):
    bot = world
    action, value, run_id = BUTTONS[button]
    before = await quiet_snapshot(bot.settings.jobs)
    posted = len(slack.calls)

    said = await refused(bot, slack, action, value, user="U0MALLORY", before=before)
    assert "not on the list of people" in said and "TUNEOPS_ALLOWED_USERS" in said

    said = await refused(bot, slack, action, value, channel="C0RANDOM", before=before)
    assert "TUNEOPS_ALLOWED_CHANNELS" in said and "<#C0TRAIN>" in said

    usage = "/finetune deploy RUN" if action in (APPROVE_ACTION, REJECT_ACTION) else f"/finetune {button} RUN"
    for garbage in ("", "../x", "ft-0001; rm -rf /", "dp-0001" if value.startswith("ft-") else "ft-0001"):
        said = await refused(bot, slack, action, garbage, before=before)
        assert "names nothing tuneops knows" in said and usage in said, said

    unknown = "dp-9999" if value.startswith("dp-") else "ft-9999"
    said = await refused(bot, slack, action, unknown, before=before)
    assert unknown in said and ("/finetune list" in said or "/finetune deploy RUN" in said), said

    delete_run(bot.settings.jobs, run_id)
    before = await quiet_snapshot(bot.settings.jobs)
    said = await refused(bot, slack, action, value, before=before)
    assert run_id in said and ("/finetune list" in said or "/finetune deploy RUN" in said), said

    # nothing went to the channel either: every answer above was private
    assert not [c for c in slack.calls[posted:] if c.method in ("chat.postMessage", "chat.update")]
