"""Block Kit builders: pure functions from runs and events to Slack message dicts ({"text", "blocks"}).

Every builder keeps within Slack's limits: at most 50 blocks, 3,000 characters of section text, 40,000 of text.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from bot import words
from bot.grammar import GENERAL_USAGE, USAGE, ParseError
from bot.words import escape
from bot.words import person as mention
from jobs.core import cost
from jobs.core.domain import Run, RunState
from jobs.deploys import approval as approvals
from jobs.deploys.approval import when
from jobs.runs.service import can_resume

MAX_BLOCKS = 50
MAX_SECTION = 3000
MAX_TEXT = 40000
CANCEL_ACTION = "run_cancel"
DEPLOY_ACTION = "run_deploy"
RESUME_ACTION = "run_resume"
LOGS_ACTION = "run_logs"
APPROVE_ACTION = "deploy_approve"
REJECT_ACTION = "deploy_reject"
SAMPLES_SHOWN = 2
BAR_WIDTH = 20
LOG_LINES = 20

STATE_EMOJI = {
    RunState.QUEUED: ":hourglass_flowing_sand:",
    RunState.PREPARING: ":package:",
    RunState.RUNNING: ":arrows_counterclockwise:",
    RunState.SUCCEEDED: ":white_check_mark:",
    RunState.FAILED: ":x:",
    RunState.CANCELLED: ":no_entry_sign:",
    RunState.TIMED_OUT: ":alarm_clock:",
}

Message = dict[str, Any]


# ---- small pieces ------------------------------------------------------------------------------------------------

def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": truncate(text, MAX_SECTION)}}


def fields(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    # Slack allows 10 fields of 2,000 characters each.
    items = [{"type": "mrkdwn", "text": truncate(f"*{k}*\n{v}", 2000)} for k, v in pairs][:10]
    return {"type": "section", "fields": items}


def context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": truncate(text, MAX_SECTION)}]}


def code_block(lines: list[str], limit: int = MAX_SECTION) -> str:
    """The last lines that fit in one section as a code block; earlier ones are dropped, not the newest."""
    fence = "```"
    budget = limit - 2 * len(fence) - 2
    kept: list[str] = []
    used = 0
    for line in reversed(lines):
        line = line.replace(fence, "`\u200b``")  # a fence inside the log would end the block early
        line = truncate(line, 500)
        if used + len(line) + 1 > budget:
            break
        kept.append(line)
        used += len(line) + 1
    kept.reverse()
    return f"{fence}\n" + ("\n".join(kept) or "(no log lines)") + f"\n{fence}"


def message(text: str, blocks: list[dict[str, Any]]) -> Message:
    return {"text": truncate(text, MAX_TEXT), "blocks": blocks[:MAX_BLOCKS]}


def progress_bar(step: int, total: int, width: int = BAR_WIDTH) -> str:
    if total <= 0:
        return "░" * width
    frac = min(max(step / total, 0.0), 1.0)
    filled = int(round(frac * width))
    return "█" * filled + "░" * (width - filled) + f" {frac:.0%}"


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def format_loss(loss: float | None) -> str:
    return "—" if loss is None else f"{loss:.4f}"


def format_span(seconds: float | None) -> str:
    """A duration as people say it: '1 h 20 min', '12 min', '40 s'."""
    if seconds is None or seconds < 0:
        return "—"
    if seconds < 59.5:
        return f"{int(round(seconds))} s"
    minutes = int(round(seconds / 60))
    h, m = divmod(minutes, 60)
    if not h:
        return f"{m} min"
    return f"{h} h {m} min" if m else f"{h} h"


def format_usd(usd: float | None) -> str:
    if usd is None:
        return "price unknown"
    if 0 < usd < 0.01:
        return "<$0.01"
    return f"${usd:,.2f}"


def format_estimate(estimate: dict[str, Any]) -> str:
    """'~1 h 20 min, ~$4.90'; a local run costs nothing, a profile with no price says so."""
    usd = estimate.get("usd")
    if estimate.get("profile") == "local" and not usd:
        money = "no GPU bill (local)"
    elif usd is None:
        money = f"no price for {estimate.get('profile', '?')} (TUNEOPS_GPU_PRICES)"
    else:
        money = "~" + format_usd(usd)
    return f"~{format_span(estimate.get('seconds'))}, {money}"


def format_actual(run: Run) -> str:
    """'1 h 32 min, $5.60 (15% over the estimate)'."""
    spent = run.actual
    money = "no GPU bill" if run.estimate.get("profile") == "local" and not spent.get("usd") else \
        format_usd(spent.get("usd"))
    error = spent.get("error")
    versus = ""
    if error is not None:
        versus = " (as estimated)" if abs(error) < 0.005 else \
            f" ({abs(error):.0%} {'over' if error > 0 else 'under'} the estimate)"
    return f"{format_span(spent.get('gpu_s'))}, {money}{versus}"


def why_held(run: Run) -> str:
    """Which budget a held run is over, in words."""
    est = run.estimate
    if run.budget_approval.get("reason") == cost.MONTHLY_BUDGET:
        return (f"this month's GPU spend ({format_usd(est.get('month_spent_usd'))}) is past the monthly budget "
                f"of {format_usd(est.get('monthly_budget_usd'))} (TUNEOPS_MONTHLY_BUDGET_USD)")
    return (f"its estimate ({format_estimate(est)}) is above the run budget of "
            f"{format_usd(est.get('run_budget_usd'))} (TUNEOPS_RUN_BUDGET_USD)")


def budget_lines(run: Run) -> list[str]:
    """What the card says about budgets: the run waits for an approver, or the month's spend is past WARN_SHARE of
    the monthly budget (as it was when the run was queued)."""
    est = run.estimate
    out = []
    if run.held and run.state is RunState.QUEUED:
        out.append(f":shield: Waiting for an approver: {why_held(run)}. The approval card is in the thread.")
    share = cost.month_share(float(est.get("month_spent_usd") or 0), est.get("monthly_budget_usd"))
    held_for_month = run.held and run.budget_approval.get("reason") == cost.MONTHLY_BUDGET  # said above already
    if share is not None and share >= cost.WARN_SHARE and not held_for_month:
        out.append(f":warning: This month's GPU spend was {format_usd(est.get('month_spent_usd'))} of the "
                   f"{format_usd(est.get('monthly_budget_usd'))} monthly budget ({share:.0%}) when this run was "
                   "queued" + ("; past it, new runs need an approver." if share >= 1 else "."))
    return out


def _params(run: Run) -> str:
    names = {"epochs": "epochs", "lr": "lr", "max_steps": "max steps"}
    parts = [f"{names.get(k, k)} {v:g}" if isinstance(v, float) else f"{names.get(k, k)} {v}"
             for k, v in sorted(run.params.items()) if v is not None]
    return ", ".join(parts) or "defaults"


def _dataset(run: Run) -> str:
    """The dataset's path, a link to the message it came from (when it came from chat) and its checksum's start."""
    text = f"`{escape(run.dataset)}`"
    more = []
    if run.dataset_source.startswith("https://"):
        more.append(f"<{run.dataset_source}|source message>")
    if run.dataset_sha256:
        more.append(f"sha256 `{escape(run.dataset_sha256[:12])}`")
    return text + ("\n" + " · ".join(more) if more else "")


def _state_line(run: Run) -> str:
    return f"{STATE_EMOJI.get(run.state, '')} {run.state.value.replace('_', ' ')}"


# ---- the run card (the thread's root message, edited in place) -------------------------------------------------

def render_run_card(run: Run, position: int | None = None) -> Message:
    """The run's card. `position` is its 1-based place in line while queued (None otherwise)."""
    title = f"*{escape(run.display_name)}*: fine-tuning requested by {mention(run.requester)}"
    blocks: list[dict[str, Any]] = [
        section(title),
        fields([
            ("Model", f"`{escape(run.model)}`"),
            ("Dataset", _dataset(run)),
            ("State", _state_line(run)),
            ("Settings", escape(_params(run))),
            *([("Estimate", format_estimate(run.estimate))] if run.estimate else []),
            *([("GPU time", format_actual(run))] if run.state.terminal and run.actual else []),
        ]),
    ]
    for line in budget_lines(run) if run.estimate else []:
        blocks.append(context(line))
    if run.state is RunState.QUEUED and not run.held:
        place = f"number {position} in line" if position else "waiting for a free GPU slot"
        blocks.append(context(f":busts_in_silhouette: Queued: {place}."))
    if run.total_steps or run.step:
        line = (f"`{progress_bar(run.step, run.total_steps)}`  step {run.step}/{run.total_steps or '?'}"
                f"  ·  loss {format_loss(run.loss)}")
        if not run.state.terminal:
            line += f"  ·  ETA {format_duration(run.eta_s)}"
        blocks.append(section(line))
    if run.state is RunState.SUCCEEDED and run.adapter_path:
        blocks.append(context(f"Adapter: `{escape(run.adapter_path)}`"))
    if run.links:
        blocks.append(context(render_links(run.links)))
    if run.state in (RunState.FAILED, RunState.TIMED_OUT) and run.error:
        blocks.append(context(f"Error: {words.with_hint(escape(truncate(run.error, 500)), run.error_hint)}"))
    if run.state is RunState.CANCELLED and run.cancelled_by:
        blocks.append(context(f"Cancelled by {mention(run.cancelled_by)}."))
    if not run.state.terminal:
        blocks.append({
            "type": "actions",
            "block_id": f"run_actions:{run.id}",
            "elements": [{
                "type": "button",
                "action_id": CANCEL_ACTION,
                "text": {"type": "plain_text", "text": "Cancel"},
                "style": "danger",
                "value": run.id,
                "confirm": {
                    "title": {"type": "plain_text", "text": f"Cancel {run.id}?"},
                    "text": {"type": "mrkdwn", "text": "The training stops; checkpoints stay, and "
                                                       f"`/finetune resume {run.id}` continues from the last one."},
                    "confirm": {"type": "plain_text", "text": "Cancel the run"},
                    "deny": {"type": "plain_text", "text": "Keep it"},
                },
            }],
        })
    step = f", step {run.step}/{run.total_steps}" if run.total_steps else ""
    text = f"{run.id}: {run.state.value.replace('_', ' ')}{step} (requested by {mention(run.requester)})"
    return message(text, blocks)


# ---- thread messages ---------------------------------------------------------------------------------------------

LINK_NAMES = {"job": "ACA job", "execution": "execution", "logs": "logs (Log Analytics)", "wandb": "W&B run"}


def render_links(links: dict[str, str]) -> str:
    """Portal links as one mrkdwn line: `job · execution · logs`."""
    return ":link: " + "  ·  ".join(f"<{url}|{escape(LINK_NAMES.get(name, name))}>" for name, url in links.items())


def render_started(run: Run, execution_id: str = "", links: dict[str, str] | None = None) -> Message:
    text = f":rocket: {run.id} started" + (f" (execution `{escape(execution_id)}`)" if execution_id else "") + "."
    blocks = [section(text)]
    if links:
        blocks.append(context(render_links(links)))
    return message(text, blocks)


def render_succeeded(run: Run, metrics: dict[str, Any], adapter: str) -> Message:
    """The completion message: final loss, the eval numbers (and the base model's, to compare), the adapter."""
    final = _num(metrics.get("last_loss", metrics.get("train_loss", run.loss)))
    head = f":white_check_mark: {mention(run.requester)} {run.id} finished: final loss {format_loss(final)}."
    steps = metrics.get("steps", run.step)
    total = metrics.get("total_steps", run.total_steps)
    pairs = [("Steps", f"{steps}/{total}" if total else str(steps))]
    first = _num(metrics.get("first_loss"))
    if first is not None and final is not None:
        pairs.append(("Training loss", f"{first:.4f} → {final:.4f}"))
    eval_loss, base = _num(metrics.get("eval_loss")), _num(metrics.get("base_eval_loss"))
    if eval_loss is not None:
        text = f"{eval_loss:.4f}" + (f" (base model {base:.4f})" if base is not None else "")
        examples = metrics.get("eval_examples")
        pairs.append((f"Eval loss{f' on {examples} held-out examples' if examples else ''}", text))
    took = _num(metrics.get("duration_s"))
    if took is None and run.started_at is not None and run.finished_at is not None:
        took = run.finished_at - run.started_at
    if took is not None:
        pairs.append(("Took", format_duration(took)))
    tps = _num(metrics.get("tokens_per_s"))
    if tps is not None:
        pairs.append(("Speed", f"{tps:,.0f} tokens/s"))
    blocks = [section(head), fields(pairs)]
    blocks += render_samples(metrics.get("generations"))
    if adapter:
        blocks.append(section(f"Adapter: `{escape(adapter)}`"))
    blocks.append(run_actions(run))
    text = f"{run.id} finished: final loss {format_loss(final)}; adapter {adapter or '(none)'}"
    return message(f"{mention(run.requester)} {text}", blocks)


def render_samples(generations: Any, limit: int = SAMPLES_SHOWN) -> list[dict[str, Any]]:
    """Held-out prompts with the base model's and the fine-tuned model's answers (metrics.json `generations`)."""
    out = []
    for i, g in enumerate([g for g in generations or [] if isinstance(g, dict)][:limit], start=1):
        def quoted(value: Any, n: int) -> str:
            text = escape(truncate(" ".join(str(value or "").split()) or "(empty)", n))
            return "> " + text

        out.append(section(f"*Sample {i}* (held-out prompt)\n{quoted(g.get('prompt'), 600)}\n"
                           f"*Base model*\n{quoted(g.get('base'), 700)}\n"
                           f"*Fine-tuned*\n{quoted(g.get('fine_tuned'), 700)}"))
    return out


def button(text: str, action_id: str, value: str, *, style: str | None = None,
           confirm: dict[str, Any] | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {"type": "button", "action_id": action_id, "value": value,
                         "text": {"type": "plain_text", "text": text}}
    if style:
        b["style"] = style
    if confirm:
        b["confirm"] = confirm
    return b


def resumable(run: Run) -> bool:
    """Resume is offered by the rule the service enforces (jobs.runs.transitions.can_resume)."""
    return can_resume(run)


def run_actions(run: Run) -> dict[str, Any]:
    """The buttons of a finished run's thread message: Deploy (succeeded), Resume (see `resumable`), Logs."""
    elements = []
    if run.state is RunState.SUCCEEDED and run.adapter_path:
        elements.append(button("Deploy", DEPLOY_ACTION, run.id, style="primary"))
    if resumable(run):
        elements.append(button("Resume", RESUME_ACTION, run.id, style="primary" if not elements else None))
    elements.append(button("Logs", LOGS_ACTION, run.id))
    return {"type": "actions", "block_id": f"run_done:{run.id}", "elements": elements}


def render_failed(run: Run, error: str, log_tail: list[str], hint: dict[str, Any] | None = None) -> Message:
    said = words.with_hint(escape(truncate(error or 'no reason given', 1500)), hint)
    head = f":x: {mention(run.requester)} {run.id} failed: {said}"
    blocks = [section(head)]
    tail = list(log_tail)[-LOG_LINES:]
    if tail:
        blocks.append(section(f"Last {len(tail)} log lines:\n" + code_block(tail, MAX_SECTION - 30)))
    where = (f"continues from the checkpoint of step {run.last_checkpoint_step}" if run.last_checkpoint_step
             else "starts it again (no checkpoint was saved)")
    blocks.append(context(f"`/finetune logs {run.id} --tail 100` shows more; "
                          f"`/finetune resume {run.id}` {where}."))
    blocks.append(run_actions(run))
    return message(f"{mention(run.requester)} {run.id} failed: {truncate(error or 'no reason given', 1500)}", blocks)


def render_cancelled(run: Run, by: str) -> Message:
    who = mention(by)
    text = f":no_entry_sign: {run.id} was cancelled by {who}."
    blocks = [section(text), context(f"`/finetune resume {run.id}` continues from the last checkpoint.")]
    if resumable(run):
        blocks.append(run_actions(run))
    return message(text, blocks)


def render_timed_out(run: Run, checkpoint_step: int | None) -> Message:
    ck = (f" The last checkpoint is at step {checkpoint_step}." if checkpoint_step
          else " It saved no checkpoint, so a resume starts from the beginning.")
    why = f" ({escape(truncate(run.error, 300))})" if run.error else ""
    text = f":alarm_clock: {mention(run.requester)} {run.id} ran out of time{why}.{ck}"
    blocks = [section(text), context(f"Resume, or `/finetune resume {run.id}`, continues from there."),
              run_actions(run)]
    return message(text, blocks)


def render_log_excerpt(run: Run, excerpt: str) -> Message:
    """A batch of log lines (bot.logbatch: a code block, escaped and cut to fit one section) for the thread."""
    return message(f"{run.id}: log", [section(excerpt)])


def render_cancelling(run: Run, by: str) -> Message:
    text = f"Cancelling, asked by {mention(by)}"
    return message(f"{run.id}: {text}", [section(f":information_source: {text}")])


def render_resumed(run: Run, data: dict[str, Any]) -> Message:
    """A run back in line: resumed by a person, or by itself after a timeout (TUNEOPS_AUTO_RESUME)."""
    step = int(data.get("checkpoint_step") or 0)
    if data.get("auto"):
        where = f"from the checkpoint of step {step}" if step else "from the start (no checkpoint)"
        text = (f"{run.id} ran out of time; resuming it by itself ({data.get('done', '?')} of "
                f"{data.get('allowed', '?')}, TUNEOPS_AUTO_RESUME) {where}")
    else:
        where = f"from the checkpoint of step {step}" if step else "from the start (no checkpoint was saved)"
        text = f"Resumed by {mention(str(data.get('by', '')))}; training goes on {where}"
    return message(f"{run.id}: {text}", [section(f":information_source: {text}")])


def render_notice(run: Run, text: str) -> Message:
    """A notice from jobs/ may mention people (`<@U…>`) but never the whole channel."""
    text = re.sub(r"<!(channel|here|everyone)[^>]*>", r"@\1", str(text))
    return message(f"{run.id}: {truncate(text, 2000)}", [section(f":information_source: {text}")])


# ---- ephemeral replies -------------------------------------------------------------------------------------------

HELP_LINES = {
    "help": "this help; `/finetune help SUBCOMMAND` for one subcommand",
    "run": "queue a QLoRA fine-tuning run; the dataset is checked before anything is queued",
    "status": "one run in detail, or the runs queued and running",
    "list": "the latest runs",
    "logs": "the last log lines of a run",
    "cancel": "stop a run (its requester or an admin)",
    "resume": "continue a failed, cancelled or timed-out run from its last checkpoint",
    "deploy": "deploy a finished run's adapter to its base model's inference endpoint (after approval)",
    "undeploy": "take a run's adapter off its endpoint (approvers, admins, or who asked for that deploy)",
    "deployments": "what is deployed: adapter, base model, endpoint, since when, approved by, requests served",
    "cost": "the GPU spend of this month by person and by model, the biggest runs, how good the estimates are",
    "secret": "store a secret for the training job in Key Vault (admins)",
    "provision": "create the Azure fine-tuning job and/or the inference app, or `check` the set-up with one short CPU run "
                 "(admins)",
}


def render_help(topic: str | None = None) -> Message:
    if topic:
        text = f"`{USAGE[topic]}`\n{HELP_LINES[topic]}."
        return message(text, [section(text)])
    lines = "\n".join(f"• `{USAGE[k]}`: {v}" for k, v in HELP_LINES.items())
    text = f"*tuneops* fine-tunes models for this team.\n{lines}"
    return message("tuneops help: " + GENERAL_USAGE, [section(text)])


def render_parse_error(err: ParseError) -> Message:
    text = f":warning: {err.message}\nUsage: `{err.usage}`"
    return message(text, [section(text)])


def render_refusal(reason: str) -> Message:
    text = f":no_entry: {reason}"
    return message(text, [section(text)])


def render_problem(text: str) -> Message:
    """A user-facing problem (a rejected run, an unknown run id): what was wrong and what to do."""
    body = f":warning: {text}"
    return message(body, [section(body)])


def render_info(text: str) -> Message:
    return message(text, [section(text)])


def render_queued_reply(run: Run, position: int | None) -> Message:
    estimate = f" Estimate: {format_estimate(run.estimate)}." if run.estimate else ""
    if run.held:
        text = (f":shield: *{run.id}* waits for an approver before it joins the line: {why_held(run)}. Its card is in "
                "the channel, the approval card in its thread.")
        return message(text, [section(text)])
    place = f", number {position} in line" if position else ""
    text = (f":inbox_tray: Queued *{run.id}*{place}. Its card is in the channel; progress goes into its thread."
            f"{estimate}")
    return message(text, [section(text)])


def render_status(run: Run, position: int | None = None, now: float | None = None) -> Message:
    """`now` (default: the run's last update) is when a still-running run's running time is measured to."""
    card = render_run_card(run, position)
    blocks = [b for b in card["blocks"] if b.get("type") != "actions"]  # buttons do not belong in a private reply
    extra = []
    if run.started_at is not None:
        end = run.finished_at if run.finished_at is not None else (now if now is not None else run.updated_at)
        extra.append(f"running time {format_duration(end - run.started_at)}")
    if run.last_checkpoint_step:
        extra.append(f"last checkpoint at step {run.last_checkpoint_step}")
    if run.execution_id:
        extra.append(f"execution `{escape(run.execution_id)}`")
    if extra:
        blocks.append(context(" · ".join(extra)))
    return message(card["text"], blocks)


def run_line(run: Run, position: int | None = None) -> str:
    bits = [f"*{escape(run.display_name)}*", _state_line(run), f"{mention(run.requester)}", f"`{escape(run.model)}`"]
    if run.state is RunState.QUEUED and position:
        bits.append(f"#{position} in line")
    elif run.total_steps:
        bits.append(f"step {run.step}/{run.total_steps}, loss {format_loss(run.loss)}")
    return " · ".join(bits)


def line_sections(lines: list[str]) -> list[dict[str, Any]]:
    """Lines of a list as few sections as fit: several lines a section keeps long lists under the 50-block limit."""
    out: list[dict[str, Any]] = []
    chunk: list[str] = []
    for line in lines:
        if chunk and len("\n".join(chunk + [line])) > MAX_SECTION:
            out.append(section("\n".join(chunk)))
            chunk = []
        chunk.append(line)
    if chunk:
        out.append(section("\n".join(chunk)))
    return out


def render_run_list(runs: list[Run], positions: dict[str, int] | None = None, title: str = "Latest runs",
                    empty: str = "No runs yet. `/finetune run --dataset datasets/train.jsonl` starts one.") -> Message:
    positions = positions or {}
    if not runs:
        return message(empty, [section(empty)])
    lines = [run_line(r, positions.get(r.id)) for r in runs]
    blocks = [section(f"*{escape(title)}*")] + line_sections(lines)
    text = f"{title}: " + ", ".join(f"{r.id} {r.state.value}" for r in runs)
    return message(text, blocks)


def render_logs(run: Run, lines: list[str], *, source: str = "", note: str = "", grep: str | None = None) -> Message:
    """`source` says where the lines came from (Log Analytics, a file), `note` anything the reader should know, and
    `grep` the text every line holds."""
    holding = f" holding `{escape(grep).replace('`', chr(39))}`" if grep else ""
    extra = [context(escape(note))] if note else []
    if not lines:
        text = f"No log lines of {run.id}{holding}." if grep else f"{run.id} has no log lines yet."
        return message(text, [section(text)] + extra)
    where = f" from {escape(source)}" if source else ""
    code = code_block(lines)
    shown = code.count("\n") - 1  # code_block keeps the newest lines that fit in one section
    count = f"Last {shown}" if shown == len(lines) else f"The last {shown} (all that fit) of {len(lines)}"
    head = f"{count} log lines of *{run.id}*{holding} ({run.state.value.replace('_', ' ')}){where}:"
    return message(f"Logs of {run.id}", [section(head), section(code)] + extra)


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---- deploy requests: the approval card and the deploy's result ----------------------------------------------------

def slack_date(ts: float | None, fallback: str = "") -> str:
    """A moment Slack shows in each reader's own time zone."""
    if ts is None:
        return "—"

    return f"<!date^{int(ts)}^{{date_short_pretty}} at {{time}}|{fallback or when(ts)}>"


def _decision_line(approval) -> str:
    """Where a deploy or budget request stands: waiting (for whom, until when), or who decided what and when."""
    state = str(approval.state)
    budget = getattr(approval, "kind", "deploy") == "run"  # a run over budget (jobs.deploys.approval.RUN_KIND)
    by = f" by {mention(approval.decided_by)}" if approval.decided_by else ""
    at = f" {slack_date(approval.decided_at)}" if approval.decided_at else ""
    if state == "pending":
        return (f":hourglass_flowing_sand: Waiting for an approver other than {mention(approval.requested_by)} "
                f"(TUNEOPS_APPROVERS); expires {slack_date(approval.expires_at)}.")
    if state == "rejected":
        return f":no_entry: Rejected{by}{at}. " + (
            "The run was cancelled without running." if budget else "Nothing was deployed.")
    if state == "expired":
        return f":hourglass: Expired {slack_date(approval.finished_at or approval.expires_at)} with no decision" + (
            "; the run did not run. Start it again to ask anew." if budget else
            f". `/finetune deploy {approval.run_id}` asks again.")
    line = f":white_check_mark: Approved{by}{at}."
    if budget:
        return line + " The run joined the line."
    if state == "approved":
        return line + " The deploy is queued."
    if state == "deploying":
        op = f" ({escape(approval.op_id)} on Azure)" if approval.op_id else ""
        return line + f" :arrows_counterclockwise: Deploying{op}…"
    if state == "deployed":
        return line + f" :rocket: Deployed {slack_date(approval.finished_at)}: {_endpoint_links(approval)}"
    if state == "undeployed":
        return line + (f" :wastebasket: Taken off its endpoint by {mention(approval.undeployed_by)} "
                       f"{slack_date(approval.undeployed_at)}.")
    failed = words.with_hint(escape(truncate(approval.error or 'no reason given', 800)), approval.error_hint)
    return line + f" :x: The deploy failed: {failed}"


def _endpoint_links(approval) -> str:
    if not approval.url:
        return "(no endpoint reported)"
    api = f" · API <{approval.api_url}/chat/completions|{escape(approval.api_url)}>" if approval.api_url else ""
    return f"<{approval.url}|chat UI>{api}"


def render_approval_card(approval, run: Run) -> Message:
    """The deploy request in the run's thread: what would be deployed where, the evidence, and the decision (with
    Approve / Reject while it is pending). `approval` is a jobs.deploys.approval.Approval; a run's budget approval
    has a card of its own (`render_budget_card`)."""
    if approval.kind == approvals.RUN_KIND:
        return render_budget_card(approval, run)
    metrics = run.metrics or {}
    head = (f":shield: *Deploy request {escape(approval.id)}*: {mention(approval.requested_by)} asks to deploy "
            f"*{escape(run.display_name)}* (requested by {mention(run.requester)}).")
    final = _num(metrics.get("last_loss", run.loss))
    first = _num(metrics.get("first_loss"))
    eval_loss, base = _num(metrics.get("eval_loss")), _num(metrics.get("base_eval_loss"))
    pairs = [
        ("Model", f"`{escape(run.model)}` + adapter `{escape(run.adapter_path or '?')}`"),
        ("Target", escape(truncate(approval.target, 600))),
        ("Training loss", f"{first:.4f} → {final:.4f}" if first is not None and final is not None
         else format_loss(final)),
        ("Eval loss", "—" if eval_loss is None else
         f"{eval_loss:.4f}" + (f" (base model {base:.4f})" if base is not None else "")),
        ("Steps", f"{metrics.get('steps', run.step)}/{metrics.get('total_steps', run.total_steps) or '?'}"),
        ("Dataset", f"`{escape(run.dataset)}`"),
    ]
    blocks = [section(head), fields(pairs)]
    blocks += render_samples(metrics.get("generations"))
    blocks.append(section(_decision_line(approval)))
    if str(approval.state) == "pending":
        blocks.append(approval_buttons(approval, run))
    text = f"Deploy request {approval.id} for {run.id}: {approval.state} (asked by {mention(approval.requested_by)})"
    return message(text, blocks)


def approval_buttons(approval, run: Run) -> dict[str, Any]:
    """Approve (with its confirmation) and Reject of a pending deploy or budget request: on its card in the run's
    thread and on approvers' Home tabs alike, so that all go to the same listener
    (bot.listeners.actions.deploy_decision)."""
    if getattr(approval, "kind", "deploy") == "run":  # a run over budget (jobs.deploys.approval.RUN_KIND)
        confirm = {
            "title": {"type": "plain_text", "text": f"Let {run.id} run?"},
            "text": {"type": "mrkdwn", "text": f"It is estimated at {format_estimate(run.estimate)}."},
            "confirm": {"type": "plain_text", "text": "Approve the run"},
            "deny": {"type": "plain_text", "text": "Not yet"},
        }
    else:
        confirm = {
            "title": {"type": "plain_text", "text": f"Deploy {run.id}?"},
            "text": {"type": "mrkdwn", "text": f"It will serve on {escape(truncate(approval.target, 200))}."},
            "confirm": {"type": "plain_text", "text": "Approve and deploy"},
            "deny": {"type": "plain_text", "text": "Not yet"},
        }
    return {"type": "actions", "block_id": f"approval:{approval.id}", "elements": [
        button("Approve", APPROVE_ACTION, approval.id, style="primary", confirm=confirm),
        button("Reject", REJECT_ACTION, approval.id, style="danger"),
    ]}


DEPLOYMENTS_SHOWN = 40  # a line each; with the title, well inside 50 blocks even one line a section


def render_deployments(rows: list, limit: int = DEPLOYMENTS_SHOWN) -> Message:
    """`/finetune deployments`: each adapter live, newest first (jobs.deploys.deploy.Deployment rows)."""
    if not rows:
        text = "Nothing is deployed. `/finetune deploy RUN` asks to deploy a finished run."
        return message(text, [section(text)])
    lines = [deployment_line(d) for d in rows[:limit]]
    more = len(rows) - limit
    blocks = [section(f"*Deployed* ({len(rows)})")] + line_sections(lines)
    if more > 0:
        blocks.append(context(f"and {more} more"))
    blocks.append(context("Clients pick an adapter by its run id (or name) in the `model` field. "
                          "`/finetune undeploy RUN` takes one off."))
    text = "Deployed: " + ", ".join(f"{d.run_id} on {d.base}" for d in rows[:limit]) + (
        f" and {more} more" if more > 0 else "")
    return message(text, blocks)


def render_budget_card(approval, run: Run) -> Message:
    """A run over budget, in its thread: what it is estimated to cost, the budget it is over, and the decision (with
    Approve / Reject while it is pending, the same buttons as a deploy request's)."""
    est = run.estimate
    over = ("the monthly budget" if approval.reason == cost.MONTHLY_BUDGET else "the run budget")
    head = (f":shield: *Budget approval {escape(approval.id)}*: *{escape(run.display_name)}*, requested by "
            f"{mention(run.requester)}, is over {over} and waits for an approver's click before it joins the line.")
    throughput = (f"{est.get('tokens_per_s', 0):,.0f} tokens/s, " +
                  (f"the median of this team's {est.get('team_runs')} finished runs"
                   if est.get("throughput_from") == "team" else "a shipped default") +
                  f" for a {est.get('size', '?')} model on {est.get('profile', '?')}")
    price = est.get("usd_per_gpu_hour")
    pairs = [
        ("Estimate", format_estimate(est)),
        ("Run budget", format_usd(est.get("run_budget_usd")) if est.get("run_budget_usd") is not None else "none"),
        ("Spent this month", format_usd(est.get("month_spent_usd") or 0.0) +
         (f" of {format_usd(est.get('monthly_budget_usd'))}" if est.get("monthly_budget_usd") is not None else "")),
        ("Model", f"`{escape(run.model)}`"),
        ("Dataset", f"`{escape(run.dataset)}`, about {int(est.get('tokens') or 0):,} tokens to train on"),
        ("How", f"{throughput}; " + (f"${price:g} per GPU-hour x {est.get('gpus', 1)} GPU"
                                      if price is not None else "no price known")),
    ]
    blocks = [section(head), fields(pairs), section(_decision_line(approval))]
    if str(approval.state) == "pending":
        blocks.append(approval_buttons(approval, run))
    text = f"Budget approval {approval.id} for {run.id}: {approval.state} (asked by {mention(approval.requested_by)})"
    return message(text, blocks)


def render_overrun(run: Run, data: dict[str, Any]) -> Message:
    """Once a run: it has run twice as long as estimated. Mentions the requester, who may want to look or cancel."""
    ran = format_span(_num(data.get("running_s")))
    estimated = format_span(_num(data.get("estimate_s")))
    text = (f"{mention(run.requester)} {run.id} has been running for {ran}, more than "
            f"{_num(data.get('factor')) or cost.OVERRUN_FACTOR:g}x its estimate of ~{estimated}.")
    spent = cost.cost_usd(_num(data.get("running_s")) or 0.0, run.estimate.get("usd_per_gpu_hour"),
                          int(run.estimate.get("gpus") or 1))
    so_far = f" So far about {format_usd(spent)} of GPU time." if spent else ""
    blocks = [section(f":hourglass: {text}"), context(f"{so_far} `/finetune logs {run.id}` shows what it is doing; "
                                     f"`/finetune cancel {run.id}` stops it (checkpoints stay).".strip())]
    return message(text, blocks)


def render_cost_report(report: cost.MonthReport) -> Message:
    """`/finetune cost`: the month so far by person and by model, the three biggest runs, the estimates' error."""
    budget = ""
    share = cost.month_share(report.total_usd, report.monthly_budget_usd)
    if share is not None:
        budget = f" of the {format_usd(report.monthly_budget_usd)} monthly budget ({share:.0%})"
    head = (f":moneybag: *GPU spend in {report.month}* (UTC) so far: {format_usd(report.total_usd)}{budget}, "
            f"{format_span(report.total_gpu_s)} of GPU time over {report.runs} run{'s' if report.runs != 1 else ''}.")
    if not report.runs and not report.total_gpu_s:
        text = f"No GPU time spent in {report.month} yet. `/finetune run` starts a run; its card shows the estimate."
        return message(text, [section(text)])

    def table(title: str, rows: list[tuple[str, float, float]], name) -> str:
        lines = [f"• {name(who)}: {format_usd(usd)} ({format_span(secs)})" for who, usd, secs in rows[:15]]
        more = f"\n…and {len(rows) - 15} more" if len(rows) > 15 else ""
        return f"*{title}*\n" + "\n".join(lines) + more

    blocks = [section(head),
              section(table("By person", report.by_person, mention)),
              section(table("By model", report.by_model, lambda m: f"`{escape(m)}`"))]
    biggest = [f"• *{escape(r['run'])}* ({mention(str(r.get('requester', '')))}, "
               f"`{escape(str(r.get('model', '')))}`): {format_usd(float(r.get('usd') or 0))}, "
               f"{format_span(float(r.get('gpu_s') or 0))}" + (" (still running)" if r.get("running") else "")
               for r in report.biggest]
    if biggest:
        blocks.append(section("*The biggest runs*\n" + "\n".join(biggest)))
    if report.median_error is None:
        blocks.append(context("No run of this month has both an estimate and an end yet, so there is no estimate "
                              "error to show."))
    else:
        e = report.median_error
        blocks.append(context(f"Estimates vs actual GPU time: median error {e:+.0%} over {report.errors_counted} "
                              f"run{'s' if report.errors_counted != 1 else ''} (+ took longer than estimated)."))
    text = f"GPU spend in {report.month}: {format_usd(report.total_usd)}{budget}"
    return message(text, blocks)


def deployment_line(d) -> str:
    """One live adapter (a jobs.deploys.deploy.Deployment): where, since when, who approved it for whom, its use."""
    name = f" ({escape(d.run_name)})" if d.run_name and d.run_name != d.run_id else ""
    where = f"<{d.endpoint}|endpoint>" if d.endpoint else "endpoint not recorded"
    served = ("requests served: unknown" if d.requests is None else
              f"{d.requests} request{'s' if d.requests != 1 else ''} served")
    return (f"• *{escape(d.run_id)}*{name} on `{escape(d.base)}` · {where} · since {slack_date(d.since)} · "
            f"approved by {mention(d.approved_by)} for {mention(d.requested_by)} · {served}")


def render_deploy_result(approval, run: Run) -> Message:
    """The thread message when a deploy ended: where it serves now, or why it failed. Mentions who asked for it and
    who approved it."""
    who = {approval.requested_by, run.requester, approval.decided_by} - {""}
    people = " ".join(mention(u) for u in sorted(who))
    if str(approval.state) == "deployed":
        model = f" (model `{escape(run.id)}`)"
        text = (f":rocket: {people} {run.id} is deployed: chat UI {approval.url}"
                + (f", OpenAI-compatible API {approval.api_url}{model}" if approval.api_url else "") + ".")
        blocks = [section(f":rocket: {people} *{escape(run.id)}* is deployed: {_endpoint_links(approval)}{model}")]
        if approval.api_url:
            blocks.append(context(f"`curl {escape(approval.api_url)}/chat/completions -H 'Content-Type: "
                                  f"application/json' -d '{{\"model\": \"{escape(run.id)}\", \"messages\": "
                                  f"[{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'`"))
        return message(text, blocks)
    if str(approval.state) == "undeployed":
        text = (f":wastebasket: {run.id} is off its endpoint ({approval.id}), taken down by "
                f"{mention(approval.undeployed_by)}. `/finetune deploy {run.id}` serves it again once approved.")
        return message(text, [section(text)])
    error = approval.error or "no reason given"
    text = f":x: {people} the deploy of {run.id} failed: {words.with_hint(escape(truncate(error, 2000)), approval.error_hint)}"
    return message(text, [section(text), context(f"`/finetune deploy {run.id}` asks for a new deploy once the "
                                                 "cause is fixed.")])
