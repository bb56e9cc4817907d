"""The Home tab's view: pure functions from what a person's Home shows (their runs, the line, the running runs, deploy
requests waiting for them, live deployments, the month's spend) to a Block Kit home view, within its 100 blocks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from bot.blocks import (
    STATE_EMOJI,
    approval_buttons,
    context,
    deployment_line,
    format_actual,
    format_duration,
    format_estimate,
    format_loss,
    line_sections,
    progress_bar,
    section,
    slack_date,
    truncate,
    why_held,
)
from bot.words import escape
from bot.words import person as mention
from jobs.core.domain import Run, RunState

# A home view holds at most 100 blocks (https://docs.slack.dev/reference/views/home-tab-views: "Max of 100 blocks").
# The lists below are cut well inside it: at most about 50 blocks in all, however long each list is.
MAX_HOME_BLOCKS = 100
CALLBACK_ID = "tuneops_home"
UPDATED_BLOCK = "home_updated"   # the "updated at" line, left out of the view's digest
MINE_SHOWN = 10
QUEUE_SHOWN = 15
RUNNING_SHOWN = 10
REQUESTS_SHOWN = 8               # two blocks each: the request and its buttons
DEPLOYED_SHOWN = 10
LINE_CHARS = 400                 # a line of a list; eight of them fill a section at most
WARN_SHARE = 0.8                 # the spend line warns past this share of the monthly budget


@dataclass(frozen=True)
class MonthSpend:
    """The team's spend this calendar month: GPU time, and what it cost and the budget where they are known."""
    gpu_s: float
    usd: float | None = None
    budget_usd: float | None = None


@dataclass
class HomeContent:
    """Everything a person's Home view shows, read from the store (bot.home)."""
    user: str
    mine: list[Run] = field(default_factory=list)                  # newest first
    queued: list[tuple[int, Run]] = field(default_factory=list)    # (place in line, run), in line order
    running: list[Run] = field(default_factory=list)
    requests: list[tuple[Any, Run]] | None = None  # (jobs.deploys.approval.Approval, run); None: not an approver
    deployed: list | None = field(default_factory=list)  # jobs.deploys.deploy.Deployment rows, newest first;
                                                         # None: the backend cannot say now
    spend: MonthSpend | None = None
    notice: str = ""                               # the answer to the person's last click on the Home tab
    refusal: str = ""                              # why this person may not use tuneops (then nothing else shows)
    updated_at: float | None = None


def run_cost(run: Run) -> str:
    """The run's cost for its line: the actual GPU time and cost once it ended, else its estimate."""
    if run.actual:
        return format_actual(run)
    return format_estimate(run.estimate) if run.estimate else ""


def _progress(run: Run) -> str:
    if run.state is RunState.QUEUED or not (run.total_steps or run.step):
        return ""
    bits = [f"`{progress_bar(run.step, run.total_steps, width=10)}` step {run.step}/{run.total_steps or '?'}"]
    if run.loss is not None:
        bits.append(f"loss {format_loss(run.loss)}")
    if run.eta_s and not run.state.terminal:
        bits.append(f"~{format_duration(run.eta_s)} left")
    return " · ".join(bits)


def _state(run: Run) -> str:
    return f"{STATE_EMOJI.get(run.state, '')} {run.state.value.replace('_', ' ')}"


def my_run_line(run: Run, position: int | None) -> str:
    bits = [f"*{escape(run.display_name)}*", _state(run)]
    if position:
        bits.append(f"#{position} in line")
    bits += [f"`{escape(run.model)}`", _progress(run), run_cost(run)]
    return " · ".join(b for b in bits if b)


def queued_line(position: int, run: Run) -> str:
    return f"#{position} *{escape(run.display_name)}* · {mention(run.requester)} · `{escape(run.model)}`"


def running_line(run: Run) -> str:
    bits = [f"*{escape(run.display_name)}*", mention(run.requester), _state(run), _progress(run), run_cost(run)]
    return " · ".join(b for b in bits if b)


def request_line(approval, run: Run) -> str:
    eval_loss = (run.metrics or {}).get("eval_loss")
    loss = f" · eval loss {format_loss(float(eval_loss))}" if isinstance(eval_loss, (int, float)) else ""
    if getattr(approval, "kind", "deploy") == "run":  # a run over budget (jobs.deploys.approval.RUN_KIND)
        return (f":shield: *{escape(approval.id)}*: {mention(approval.requested_by)}'s run "
                f"*{escape(run.display_name)}* is over budget ({why_held(run)}) · `{escape(run.model)}` · "
                f"{format_estimate(run.estimate)} · expires {slack_date(approval.expires_at)}")
    return (f":shield: *{escape(approval.id)}*: {mention(approval.requested_by)} asks to deploy "
            f"*{escape(run.display_name)}* ({mention(run.requester)}'s run) · `{escape(run.model)}`{loss} · "
            f"expires {slack_date(approval.expires_at)}")


def spend_line(spend: MonthSpend | None) -> str:
    if spend is None:
        return "Nothing is known about this month's spend."
    # In tenths of an hour: a running run's minutes would make every refresh a new view.
    gpu = f"{spend.gpu_s / 3600:,.1f} GPU-hours"
    if spend.usd is None:
        return f"{gpu} this month; no prices are configured, so no cost is shown."
    if not spend.budget_usd:
        return f"${spend.usd:,.2f} this month ({gpu}); no monthly budget is set."
    share = spend.usd / spend.budget_usd
    flag = ":rotating_light: " if share >= 1 else ":warning: " if share >= WARN_SHARE else ""
    return f"{flag}${spend.usd:,.2f} of ${spend.budget_usd:,.2f} this month ({share:.0%}; {gpu})."


def _group(title: str, lines: list[str], shown: int, empty: str, more: str = "") -> list[dict[str, Any]]:
    """A titled list, its first `shown` lines and "and N more" for the rest."""
    head = section(f"*{title}* ({len(lines)})" if lines else f"*{title}*")
    if not lines:
        return [{"type": "divider"}, head, context(empty)]
    out = [{"type": "divider"}, head, *line_sections([truncate(line, LINE_CHARS) for line in lines[:shown]])]
    if len(lines) > shown:
        out.append(context(f"and {len(lines) - shown} more{more}"))
    return out


def _requests(requests: list[tuple[Any, Run]]) -> list[dict[str, Any]]:
    title = "Deploy and budget requests waiting for you"
    if not requests:
        return [{"type": "divider"}, section(f"*{title}*"), context("None: nothing waits for an approver.")]
    out = [{"type": "divider"}, section(f"*{title}* ({len(requests)})")]
    for approval, run in requests[:REQUESTS_SHOWN]:
        out += [section(truncate(request_line(approval, run), LINE_CHARS)), approval_buttons(approval, run)]
    if len(requests) > REQUESTS_SHOWN:
        out.append(context(f"and {len(requests) - REQUESTS_SHOWN} more: each has its card, with the same buttons, "
                           "in its run's thread"))
    return out


def render_home(home: HomeContent) -> dict[str, Any]:
    """The person's Home view (views.publish's `view`)."""
    out: list[dict[str, Any]] = [{"type": "header", "text": {"type": "plain_text", "text": "tuneops"}}]
    if home.refusal:
        out.append(section(f":no_entry: {home.refusal}"))
        return {"type": "home", "callback_id": CALLBACK_ID, "blocks": out}
    if home.notice:
        out.append(section(home.notice))
    places = {run.id: position for position, run in home.queued}
    out += _group("Your runs", [my_run_line(r, places.get(r.id)) for r in home.mine], MINE_SHOWN,
                  "You have no runs yet: `/finetune run --dataset datasets/train.jsonl` in a channel starts one.",
                  ": `/finetune list` shows the latest runs")
    out += _group("In line", [queued_line(p, r) for p, r in home.queued], QUEUE_SHOWN,
                  "Nobody is waiting for a GPU.", ": `/finetune status` shows the whole line")
    out += _group("Running", [running_line(r) for r in home.running], RUNNING_SHOWN, "Nothing is running.",
                  ": `/finetune status` shows them all")
    if home.requests is not None:
        out += _requests(home.requests)
    out += _group("Deployed", [deployment_line(d) for d in home.deployed or []], DEPLOYED_SHOWN,
                  "Nothing is deployed." if home.deployed is not None else
                  "What is deployed cannot be read now; `/finetune deployments` says why.",
                  ": `/finetune deployments` lists them all")
    out += [{"type": "divider"}, section(f"*This month*\n{spend_line(home.spend)}")]
    if home.updated_at is not None:
        out.append({**context(f"Updated {slack_date(home.updated_at)}"), "block_id": UPDATED_BLOCK})
    return {"type": "home", "callback_id": CALLBACK_ID, "blocks": out[:MAX_HOME_BLOCKS]}


def view_digest(view: dict[str, Any]) -> str:
    """What the view shows, as a digest, leaving out when it was made: equal digests need no new publish."""
    shown = [b for b in view.get("blocks", []) if b.get("block_id") != UPDATED_BLOCK]
    return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()
