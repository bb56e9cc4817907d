"""What a monitor tick makes of what the execution reported: pure functions from payload events, log lines and the
execution's status to an updated Run and the RunEvents that tell the bot about it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobs.backends.protocol import ExecStatus, ExecutionInfo
from jobs.core import cost
from jobs.core.domain import Run, RunEvent, RunState

# A log event carries the lines of one tick (at most 256 KB read); beyond this many only the newest are kept and
# the rest counted. The bot batches them into thread excerpts (bot.logbatch) and must see every error line.
LOG_EVENT_LINES = 2000
FAILED_LOG_TAIL = 20


def state_event(run: Run, previous: RunState, **extra: Any) -> RunEvent:
    return RunEvent(run.id, "state", {"state": str(run.state), "previous": str(previous), **extra})


def move(run: Run, dst: RunState) -> RunEvent:
    """Transition the run (or raise IllegalTransition) and return the "state" event that reports it."""
    previous = run.state
    run.transition(dst)
    return state_event(run, previous)


def apply_progress(run: Run, payload_events: list[dict[str, Any]], log_lines: list[str]) -> list[RunEvent]:
    """Fold the trainer's events into the record. Many steps in one tick become one progress event (the card shows
    the latest); evals and checkpoints are each reported, after the progress that led to them."""
    out: list[RunEvent] = []
    pending: dict[str, Any] | None = None

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            out.append(RunEvent(run.id, "progress", pending))
            pending = None

    for ev in payload_events:
        kind = ev["type"]
        if kind == "start":
            run.total_steps = int(ev["total_steps"])
            pending = _progress(run, {})
        elif kind == "step":
            run.step = int(ev["step"])
            run.total_steps = int(ev["total_steps"])
            run.loss = _num(ev.get("loss"))
            run.eta_s = _num(ev.get("eta_s"))
            pending = _progress(run, ev)
        elif kind == "eval":
            flush()
            eval_loss = _num(ev.get("eval_loss"))
            run.metrics = {**run.metrics, "eval_loss": eval_loss}
            out.append(RunEvent(run.id, "eval", {"step": int(ev["step"]), "eval_loss": eval_loss}))
        elif kind == "checkpoint":
            flush()
            run.last_checkpoint_step = int(ev["step"])
            out.append(RunEvent(run.id, "checkpoint", {"step": run.last_checkpoint_step}))
        elif kind == "done":
            if isinstance(ev.get("metrics"), dict):
                run.metrics = {**run.metrics, **ev["metrics"]}
            run.adapter_path = str(ev.get("adapter") or run.adapter_path)
        elif kind == "error":
            run.error = str(ev.get("message") or "")
        elif kind == "link" and _plain_url(ev.get("url")):
            run.links = {**run.links, str(ev["name"]): ev["url"]}
            pending = pending or _progress(run, {})     # the card shows the links: have it redrawn
    flush()
    if log_lines:
        data: dict[str, Any] = {"lines": log_lines[-LOG_EVENT_LINES:]}
        if len(log_lines) > LOG_EVENT_LINES:
            data["skipped"] = len(log_lines) - LOG_EVENT_LINES
        out.append(RunEvent(run.id, "log", data))
    return out


def _progress(run: Run, ev: dict[str, Any]) -> dict[str, Any]:
    return {"step": run.step, "total_steps": run.total_steps, "loss": run.loss, "eta_s": run.eta_s,
            "epoch": _num(ev.get("epoch")), "tokens_per_s": _num(ev.get("tokens_per_s"))}


def _plain_url(value: Any) -> bool:
    """An http(s) address that goes into a Slack link as it is (`<url|name>`): nothing that would end it early."""
    return isinstance(value, str) and value.startswith(("https://", "http://")) and len(value) <= 2000 \
        and not any(c.isspace() or c in "<>|" for c in value)


def _num(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def overrun(run: Run, now: float) -> list[RunEvent]:
    """The one "overrun" event of a running run that went past OVERRUN_FACTOR times its estimated time."""
    estimated = run.estimate.get("seconds")
    if run.overrun_warned or run.state is not RunState.RUNNING or not cost.overran(estimated, run.running_s(now)):
        return []
    run.overrun_warned = True
    return [RunEvent(run.id, "overrun", {"running_s": round(run.running_s(now), 1), "estimate_s": estimated,
                                         "factor": cost.OVERRUN_FACTOR})]


def finish(run: Run, info: ExecutionInfo, outputs: Callable[[], dict[str, Any]],
           log_tail: Callable[[int], list[str]]) -> list[RunEvent]:
    """End the run the way its execution ended. A stop that was asked for is a cancellation; an execution that
    finished with an adapter before the stop got to it still succeeded."""
    if info.status is ExecStatus.SUCCEEDED:
        out = outputs()
        run.metrics = {**run.metrics, **(out.get("metrics") or {})}
        run.adapter_path = out.get("adapter") or run.adapter_path
        return [move(run, RunState.SUCCEEDED),
                RunEvent(run.id, "succeeded", {"metrics": run.metrics, "adapter": run.adapter_path})]
    if run.cancelled_by and info.status in (ExecStatus.STOPPED, ExecStatus.FAILED):
        return [move(run, RunState.CANCELLED), RunEvent(run.id, "cancelled", {"by": run.cancelled_by})]
    if info.status is ExecStatus.TIMED_OUT:
        run.error = run.error or info.detail or "the execution ran out of time"
        return [move(run, RunState.TIMED_OUT),
                RunEvent(run.id, "timed_out", {"checkpoint_step": run.last_checkpoint_step})]
    detail = info.detail or str(info.status)
    run.error = f"{run.error} ({detail})" if run.error and detail not in run.error else (run.error or detail)
    return [move(run, RunState.FAILED),
            RunEvent(run.id, "failed", {"error": run.error, "log_tail": log_tail(FAILED_LOG_TAIL)})]
