"""`/finetune logs RUN [--tail N] [--grep TEXT]`: the last log lines of a run, answered privately. On the ACA backend
they come from Log Analytics (the share's train.log while ingestion lags); on the local backend from the run's
log file."""

from __future__ import annotations

from typing import Any

from bot import blocks
from bot.grammar import Logs
from bot.listeners.commands.status import unknown_run
from bot.listeners.support import answer, answering_errors, call
from bot.runtime import BotRuntime
from jobs import service

# A grep on the local backend looks through this many of the newest lines (all `service.tail_logs` gives).
LOCAL_GREP_WINDOW = 500


def grep_lines(lines: list[str], text: str | None, tail: int) -> list[str]:
    """The last `tail` lines holding `text` (case-insensitive); pure."""
    if text:
        needle = text.lower()
        lines = [line for line in lines if needle in line.lower()]
    return lines[-tail:]


def _read(settings, run, cmd: Logs) -> tuple[list[str], str, str]:
    """(lines, where they came from, a note) for the run, from the backend it runs on."""
    if settings.backend == "aca":
        from jobs.aca import api

        found = api.run_logs(settings, run, tail=cmd.tail, grep=cmd.grep)
        return found.lines, found.source, found.note
    lines = service.tail_logs(settings, run.id, LOCAL_GREP_WINDOW if cmd.grep else cmd.tail)
    note = f"Searched the last {LOCAL_GREP_WINDOW} lines." if cmd.grep and len(lines) >= LOCAL_GREP_WINDOW else ""
    return grep_lines(lines, cmd.grep, cmd.tail), "the run's log file", note


async def handle(ack, cmd: Logs, command: dict[str, Any], rt: BotRuntime) -> None:
    await ack()
    url = command["response_url"]
    async with answering_errors(rt, url, "reading the logs"):
        run = await call(service.get_run, rt.settings.jobs, cmd.run_id)
        if run is None:
            await answer(rt, url, blocks.render_problem(unknown_run(cmd.run_id)))
            return
        lines, source, note = await call(_read, rt.settings.jobs, run, cmd)
        await answer(rt, url, blocks.render_logs(run, lines, source=source, note=note, grep=cmd.grep))
