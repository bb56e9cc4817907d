"""The Home tab against the Slack stand-in over signed HTTP: the view published on app_home_opened (for an approver
with the deploy requests waiting for them and their buttons, for others without), Approve and Reject clicked on the
Home tab going through the same listener and four-eyes checks as on the thread's card, the refresh when runs change
and its throttle, and long lists cut within a home view's 100 blocks. Every published view passes slack_sdk's own
models."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from slack_sdk.models.blocks import Block
from slack_sdk.models.views import View

from bot.blocks import APPROVE_ACTION, REJECT_ACTION
from bot.home_view import MAX_HOME_BLOCKS, HomeContent, MonthSpend, render_home
from bot.ratelimit import TIER4_PER_S
from bot.standin.slack import (
    app_home_opened_body,
    home_block_actions_body,
    signed_headers,
)
from jobs.core import store
from jobs.core.domain import Run, RunEvent, RunState
from jobs.deploys import approval
from jobs.deploys.deploy import Deployment
from jobs.runs import service
from tests.bot.conftest import SIGNING_SECRET

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def bot_env(bot_env):
    bot_env.update(TUNEOPS_APPROVERS="U0BOB,U0CAROL", TUNEOPS_ALLOWED_USERS="U0ALICE,U0BOB,U0CAROL",
                   TUNEOPS_HOME_REFRESH="2")
    return bot_env


def valid(view: dict) -> dict:
    """`view` as Slack's own models check it: the view, and each block on its own."""
    assert len(view["blocks"]) <= MAX_HOME_BLOCKS
    View(**{k: v for k, v in view.items() if k in ("type", "callback_id", "blocks")}).validate_json()
    for b in view["blocks"]:
        Block.parse(b).validate_json()
    return view


def text_of(view: dict) -> str:
    return json.dumps(view["blocks"], ensure_ascii=False)


def buttons(view: dict) -> list[tuple[str, str]]:
    return [(e["action_id"], e["value"]) for b in view["blocks"] if b["type"] == "actions" for e in b["elements"]]


def publishes(slack, user: str) -> list:
    return [c for c in slack.calls_to("views.publish") if c.params.get("user_id") == user and c.ok]


async def open_home(bot, user: str, *, tab: str = "home") -> None:
    body = app_home_opened_body(user_id=user, tab=tab, view=bot.slack.home.get(user))
    status, _ = await bot.post(body, signed_headers(SIGNING_SECRET, body, content_type="application/json"))
    assert status == 200


async def home_of(slack, user: str, predicate=lambda view: True, timeout: float = 20) -> dict:
    view = await slack.until(lambda: (v := slack.home.get(user)) and predicate(v) and v, timeout)
    assert view, (user, slack.home.get(user) and text_of(slack.home[user]))
    return valid(view)


async def click_home(bot, user: str, action_id: str, value: str) -> int:
    body = home_block_actions_body(action_id=action_id, value=value, user_id=user, view=bot.slack.home[user])
    status, _ = await bot.post(body, signed_headers(SIGNING_SECRET, body))
    return status


def succeeded(settings, run_id: str) -> None:
    def step(run: Run):
        run.state = RunState.SUCCEEDED
        run.adapter_path = f"runs/{run_id}/adapter"
        run.metrics = {"eval_loss": 1.25}
        return []

    store.update_run(store.connect(settings), run_id, step)


def progress(settings, run_id: str, step_no: int, total: int = 10) -> None:
    def step(run: Run):
        if run.state is RunState.QUEUED:
            run.transition(RunState.PREPARING)
            run.transition(RunState.RUNNING)
        run.step, run.total_steps, run.loss = step_no, total, 2.0 / (step_no + 1)
        return [RunEvent(run.id, "progress", {"step": step_no, "total_steps": total, "loss": run.loss})]

    store.update_run(store.connect(settings), run_id, step)


def submit(settings, user: str, n: int = 1) -> list[str]:
    return [service.submit_run(settings, requester=user, channel="C0TRAIN", dataset="datasets/chat.jsonl",
                               max_steps=2).id for _ in range(n)]


async def test_the_home_view_on_open_for_an_approver_and_for_others(bot, slack):
    settings = bot.settings.jobs
    submit(settings, "U0ALICE", 3)          # ft-0001..3, Alice's
    submit(settings, "U0BOB")               # ft-0004, Bob's
    progress(settings, "ft-0003", 3)        # running, out of the line
    succeeded(settings, "ft-0004")
    approval.request_deploy(settings, "ft-0004", "U0BOB", "C0TRAIN")  # dp-0001, asked by Bob

    await open_home(bot, "U0ALICE")
    alice = text_of(await home_of(slack, "U0ALICE"))
    assert "*Your runs* (3)" in alice and "ft-0001" in alice and "#1 in line" in alice
    assert "#2 *ft-0002* · <@U0ALICE>" in alice, alice
    assert "*Running* (1)" in alice and "step 3/10" in alice
    assert "Deploy requests" not in alice and APPROVE_ACTION not in alice  # not an approver
    assert "This month" in alice

    # Carol approves: dp-0001 waits for her, with the very buttons of the thread's card
    await open_home(bot, "U0CAROL")
    carol = await home_of(slack, "U0CAROL")
    assert "*Deploy and budget requests waiting for you* (1)" in text_of(carol)
    assert buttons(carol) == [(APPROVE_ACTION, "dp-0001"), (REJECT_ACTION, "dp-0001")]
    assert "<@U0BOB> asks to deploy *ft-0004*" in text_of(carol) and "eval loss 1.2500" in text_of(carol)
    # Bob approves too, but his own request does not wait for him
    await open_home(bot, "U0BOB")
    bob = await home_of(slack, "U0BOB")
    assert "*Deploy and budget requests waiting for you*" in text_of(bob) and buttons(bob) == []

    # the Messages tab shows no view; someone outside TUNEOPS_ALLOWED_USERS is told why, and nothing else
    calls = len(slack.calls_to("views.publish"))
    await open_home(bot, "U0ALICE", tab="messages")
    await open_home(bot, "U0MALLORY")
    mallory = text_of(await home_of(slack, "U0MALLORY"))
    assert "not on the list of people who may use tuneops" in mallory and "ft-0001" not in mallory
    assert len(slack.calls_to("views.publish")) == calls + 1


async def test_approve_and_reject_on_the_home_tab_are_the_thread_buttons(bot, slack):
    settings = bot.settings.jobs
    submit(settings, "U0ALICE", 2)
    for run_id in ("ft-0001", "ft-0002"):
        succeeded(settings, run_id)
    approval.request_deploy(settings, "ft-0001", "U0BOB", "C0TRAIN")    # dp-0001: Bob asks
    approval.request_deploy(settings, "ft-0002", "U0ALICE", "C0TRAIN")  # dp-0002: Alice asks
    for user in ("U0BOB", "U0ALICE", "U0CAROL"):
        await open_home(bot, user)
        await home_of(slack, user)

    # Bob clicks Approve on his own request (a view from before he asked, say): four eyes refuse it
    assert await click_home(bot, "U0BOB", APPROVE_ACTION, "dp-0001") == 200
    await home_of(slack, "U0BOB", lambda v: "four eyes" in text_of(v))
    # Alice is no approver: the same refusal as on the card
    assert await click_home(bot, "U0ALICE", APPROVE_ACTION, "dp-0002") == 200
    await home_of(slack, "U0ALICE", lambda v: "Only approvers may approve" in text_of(v))
    assert approval.get_approval(settings, "dp-0001").state == "pending"
    assert approval.get_approval(settings, "dp-0002").state == "pending"

    # Carol approves dp-0001 and rejects dp-0002 from her Home tab
    carol = await home_of(slack, "U0CAROL")
    assert buttons(carol) == [(APPROVE_ACTION, "dp-0001"), (REJECT_ACTION, "dp-0001"),
                              (APPROVE_ACTION, "dp-0002"), (REJECT_ACTION, "dp-0002")]
    assert await click_home(bot, "U0CAROL", APPROVE_ACTION, "dp-0001") == 200
    carol = await home_of(slack, "U0CAROL", lambda v: "You approved dp-0001" in text_of(v))
    assert (APPROVE_ACTION, "dp-0001") not in buttons(carol)
    assert await click_home(bot, "U0CAROL", REJECT_ACTION, "dp-0002") == 200
    carol = await home_of(slack, "U0CAROL", lambda v: "You rejected dp-0002" in text_of(v))
    assert buttons(carol) == [] and "None: nothing waits for an approver." in text_of(carol)
    one, two = approval.get_approval(settings, "dp-0001"), approval.get_approval(settings, "dp-0002")
    assert (one.state, one.decided_by, two.state, two.decided_by) == ("approved", "U0CAROL", "rejected", "U0CAROL")
    # the decision reaches the request's card in the thread, as a click there would
    assert await slack.until(lambda: [c for c in slack.calls_to("chat.update")
                                      if "dp-0001" in c.params.get("text", "") and "approved" in c.params["text"]],
                             20)
    # a click on the Home tab has no response_url: nothing went to one
    assert not slack.calls_to("response_url")


async def test_the_home_refreshes_while_runs_change_at_most_every_interval(bot, slack):
    settings = bot.settings.jobs
    [run_id] = submit(settings, "U0ALICE")
    await open_home(bot, "U0ALICE")
    await home_of(slack, "U0ALICE")
    opened_at = publishes(slack, "U0ALICE")[0].time

    for n in range(1, 41):  # a change every 0.1 s for 4 s
        progress(settings, run_id, n, total=40)
        await asyncio.sleep(0.1)
    view = await home_of(slack, "U0ALICE", lambda v: "step 40/40" in text_of(v), timeout=10)
    times = [c.time for c in publishes(slack, "U0ALICE")]
    assert times[0] == opened_at and 2 <= len(times) <= 4, times   # 4 s of changes, one refresh in 2 s at most
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 2 - 0.05, gaps
    assert "*Running* (1)" in text_of(view)

    # with nothing changing, nothing is published; a change that shows nothing new is not published either
    await asyncio.sleep(3)
    count = len(publishes(slack, "U0ALICE"))
    store.append_event(store.connect(settings), RunEvent(run_id, "log", {"lines": ["a line"]}))
    await asyncio.sleep(3)
    assert len(publishes(slack, "U0ALICE")) == count


async def test_a_rate_limited_publish_waits_and_goes_out(bot, slack):
    slack.fail_for(1.5, 429, retry_after=1, methods={"views.publish"})
    t0 = time.time()
    await open_home(bot, "U0ALICE")
    await home_of(slack, "U0ALICE")
    assert slack.calls_to("views.publish")[0].status == 429 and time.time() - t0 >= 1


async def test_publishes_keep_to_the_tier_4_budget_of_views_publish(bot, slack):
    """Home tabs opened at once go out spaced by views.publish's budget (bot.ratelimit.TIER4_PER_S), not at once."""
    users = ["U0ALICE", "U0BOB", "U0CAROL", "U0DAVE"]
    await asyncio.gather(*(open_home(bot, user) for user in users))
    for user in users:
        await home_of(slack, user)
    times = sorted(c.time for c in slack.calls_to("views.publish"))
    assert len(times) == 4 and min(b - a for a, b in zip(times, times[1:])) >= 1 / TIER4_PER_S - 0.05, times


async def test_a_long_line_is_cut_within_a_home_view(bot, slack):
    settings = bot.settings.jobs
    conn = store.connect(settings)
    for _ in range(130):
        run = Run(id=store.new_run_id(conn), requester="U0BOB", channel="C0TRAIN", model="model-cache/tiny",
                  dataset="datasets/chat.jsonl", name="a-rather-long-run-name-" + "x" * 40)
        store.create_run(conn, run, lambda position: [])
    await open_home(bot, "U0BOB")
    view = text_of(await home_of(slack, "U0BOB"))
    assert "*In line* (130)" in view and "and 115 more" in view and "and 120 more" in view  # line, Bob's runs


def test_every_list_at_its_longest_stays_within_100_blocks():
    now = time.time()

    def run(i: int, state: RunState = RunState.QUEUED, **kw) -> Run:
        return Run(id=f"ft-{i:04d}", requester="U0ALICE", channel="C0TRAIN", model="m" * 200, dataset="d",
                   name="n" * 64, state=state, step=5, total_steps=10, loss=1.0, eta_s=60, **kw)

    requests = [(approval.Approval(id=f"dp-{i:04d}", run_id=f"ft-{i:04d}", requested_by="U0BOB", channel="C0TRAIN",
                                   target="t" * 700, backend="local", created_at=now, expires_at=now + 60),
                 run(i, RunState.SUCCEEDED)) for i in range(40)]
    deployed = [Deployment(f"ft-{i:04d}", "n" * 64, "m" * 200, "http://127.0.0.1:1", now, "U0BOB", "U0ALICE",
                           f"dp-{i:04d}", 3) for i in range(60)]
    home = HomeContent(user="U0ALICE", mine=[run(i, RunState.RUNNING) for i in range(300)],
                       queued=[(i + 1, run(i)) for i in range(500)],
                       running=[run(i, RunState.RUNNING) for i in range(50)], requests=requests, deployed=deployed,
                       spend=MonthSpend(gpu_s=7200, usd=450.0, budget_usd=500.0), notice=":white_check_mark: done",
                       updated_at=now)
    view = valid(render_home(home))
    shown = text_of(view)
    for more in ("and 290 more", "and 485 more", "and 40 more", "and 32 more", "and 50 more"):
        assert more in shown, more
    assert ":warning: $450.00 of $500.00 this month (90%" in shown
    assert len(view["blocks"]) <= 60


def test_the_stand_in_refuses_views_slack_would_refuse(slack):
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError

    from tests.bot.conftest import BOT_TOKEN

    client = WebClient(token=BOT_TOKEN, base_url=slack.api_url)
    section = {"type": "section", "text": {"type": "mrkdwn", "text": "x"}}
    ok = client.views_publish(user_id="U0ALICE", view={"type": "home", "blocks": [section] * 100})
    assert ok["view"]["id"].startswith("V") and slack.home["U0ALICE"]["blocks"] == [section] * 100
    for view, error in (({"type": "home", "blocks": [section] * 101}, "invalid_arguments"),
                        ({"type": "modal", "blocks": [section]}, "invalid_arguments"),
                        ({"type": "home", "blocks": [{**section, "text": {"type": "mrkdwn", "text": "x" * 3001}}]},
                         "invalid_arguments"),
                        ({"type": "home", "blocks": [section] * 100, "private_metadata": "x" * 250_000},
                         "view_too_large")):
        with pytest.raises(SlackApiError) as e:
            client.views_publish(user_id="U0ALICE", view=view)
        assert e.value.response["error"] == error
    assert client.views_publish(user_id="U0ALICE", view={"type": "home", "blocks": []})["view"]["id"] == \
        ok["view"]["id"]  # one Home view per person, published over


def test_the_home_spend_is_the_months_spend_and_a_run_shows_its_estimate_then_its_actual(redis_url, workspace):
    """The Home tab's spend line is what `/finetune cost` counts (jobs.runs.costs), against the monthly budget; a
    run's line shows its estimate, then its actual."""
    from dataclasses import replace

    from bot.home import month_spend
    from bot.home_view import run_cost, spend_line
    from jobs.core.settings import JobSettings
    from tests.jobs.test_jobs_cost import ended_run

    jobs_settings = JobSettings(redis_url=redis_url, workspace=workspace)
    ended_run(jobs_settings, run_s=3600)  # an hour at $3.60 per GPU-hour
    spend = month_spend(replace(jobs_settings, monthly_budget_usd=4.0), time.time())
    assert spend.usd == pytest.approx(3.6, abs=0.01) and spend.budget_usd == 4.0 and spend.gpu_s >= 3600
    assert spend_line(spend).startswith(":warning: $3.60 of $4.00 this month (90%; 1.0 GPU-hours)")
    assert "no monthly budget is set" in spend_line(month_spend(jobs_settings, time.time()))

    run = Run(id="ft-0001", requester="U0ALICE", channel="C0TRAIN", model="m", dataset="d",
              estimate={"seconds": 4800, "usd": 4.9, "profile": "Consumption-GPU-NC24-A100"})
    assert run_cost(run) == "~1 h 20 min, ~$4.90"
    run.actual = {"gpu_s": 5400, "usd": 5.6, "error": 0.125}
    assert run_cost(run).startswith("1 h 30 min, $5.60 (") and "over the estimate" in run_cost(run)
    assert run_cost(Run(id="ft-0002", requester="U0ALICE", channel="C0TRAIN", model="m", dataset="d")) == ""


def test_the_refresh_interval_is_a_checked_setting(bot_env):
    from bot.settings import BotSettings
    from jobs.core.settings import SettingsError

    assert BotSettings.from_env({**bot_env, "TUNEOPS_HOME_REFRESH": "1m"}).home_refresh_s == 60
    assert BotSettings.from_env({k: v for k, v in bot_env.items() if k != "TUNEOPS_HOME_REFRESH"}).home_refresh_s == 30
    with pytest.raises(SettingsError, match="TUNEOPS_HOME_REFRESH"):
        BotSettings.from_env({**bot_env, "TUNEOPS_HOME_REFRESH": "0"})


def test_a_budget_request_waits_on_the_home_tab_with_the_same_buttons_as_its_card():
    from slack_sdk.models.blocks import Block

    from bot.blocks import APPROVE_ACTION, approval_buttons, render_budget_card
    from bot.home_view import request_line
    from jobs.deploys.approval import RUN_KIND, Approval

    a = Approval(id="dp-0007", run_id="ft-0001", requested_by="U0ALICE", channel="C0TRAIN", target="the line",
                 backend="local", created_at=0.0, expires_at=2e9, kind=RUN_KIND, reason="run_budget")
    run = Run(id="ft-0001", requester="U0ALICE", channel="C0TRAIN", model="m", dataset="d",
              estimate={"seconds": 4800, "usd": 4.9, "profile": "Consumption-GPU-NC24-A100", "run_budget_usd": 2.0},
              budget_approval={"state": "pending", "reason": "run_budget"})
    line = request_line(a, run)
    assert "over budget" in line and "~1 h 20 min, ~$4.90" in line and "asks to deploy" not in line
    buttons_block = approval_buttons(a, run)
    Block.parse(buttons_block).validate_json()
    assert "Let ft-0001 run?" in json.dumps(buttons_block)
    card_buttons = [b for b in render_budget_card(a, run)["blocks"] if b["type"] == "actions"]
    assert card_buttons == [buttons_block] and buttons_block["elements"][0]["action_id"] == APPROVE_ACTION
