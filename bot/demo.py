"""`tuneops demo`: one real fine-tuning run of a tiny model, driven from a local stand-in for Slack, printed as a thread.

Needs no Slack or Azure account: it starts (where needed) a private redis-server, an RQ worker, the bot in HTTP mode
and the Slack stand-in, sends a signed `/finetune run` exactly as Slack would, prints the card's edits and the thread
as they happen, and stops everything at the end. Exit code 0 only when the run succeeded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import redis
from aiohttp import web

from bot import threads
from bot.server import build_web_app, make_bot
from bot.settings import BotSettings
from bot.standin import slack as standin
from jobs.runs import service

REPO_ROOT = Path(__file__).resolve().parent.parent
CHANNEL, USER = "C0DEMO", "U0DEMO"
DEADLINE_S = 110.0

_print_lock = threading.Lock()


def say(text: str = "") -> None:
    with _print_lock:
        print(text, flush=True)


# ---- the pieces ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    """A port that was free a moment ago: only for redis-server, which cannot bind port 0 itself, so its start
    (`start_private_redis`) checks that the server answering there is its own and retries on another port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_private_redis(stack: ExitStack, tmp: Path, attempts: int = 5) -> str:
    """A private redis-server (no persistence) on a free port, stopped with `stack`; its URL. The port may be taken
    by someone else between `_free_port()` and redis binding it: then redis exits (or another server answers, with
    another pid), and a fresh port is tried."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise DemoError("redis-server is not installed: apt-get install redis-server")
    for _ in range(attempts):
        port = _free_port()
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=2)
        deadline = time.monotonic() + 10
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if int(client.info("server")["process_id"]) == proc.pid:
                        stack.callback(stop_process, proc)
                        return f"redis://127.0.0.1:{port}/0"
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        stop_process(proc)
    raise DemoError(f"redis-server did not start in {attempts} attempts")


def _redis_answers(url: str) -> bool | None:
    """True: answers and holds no tuneops data; False: answers but is in use by tuneops; None: nothing answers."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        client.ping()
        in_use = bool(client.exists("tuneops:run_seq") or client.exists("tuneops:events"))
        client.close()
        return not in_use
    except redis.RedisError:
        return None


def start_redis(stack: ExitStack, tmp: Path) -> str:
    """REDIS_URL when it answers and holds no tuneops data (the demo must not mix with a real bot's runs); otherwise a
    private redis-server on a free port, stopped at the end."""
    url = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    state = _redis_answers(url)
    if state is True:
        say(f"· Redis: using {url}")
        return url
    if state is False:
        say(f"· Redis at {url} holds tuneops data already; the demo keeps to a private one")
    if shutil.which("redis-server") is None:
        raise DemoError("nothing usable answers at REDIS_URL and redis-server is not installed: install it "
                        "(apt-get install redis-server) or point REDIS_URL at an empty Redis.")
    url = start_private_redis(stack, tmp)
    say(f"· Redis: started a private redis-server on port {url.rsplit(':', 1)[1].split('/')[0]}")
    return url


def stop_process(proc: subprocess.Popen, group: bool = False) -> None:
    """End a process this one started (its whole process group with `group`): SIGTERM, then SIGKILL after 15 s."""
    if proc.poll() is not None:
        return
    try:
        (os.killpg(proc.pid, signal.SIGTERM) if group else proc.terminate())
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            (os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill())
        except ProcessLookupError:
            pass
        proc.wait(5)


def make_workspace(root: Path) -> Path:
    # torch and transformers load only when the demo builds its tiny model
    from transformers.utils import logging as hf_logging

    from payload.tinymodel import build_tiny_model, example_dataset_path

    hf_logging.disable_progress_bar()  # the terminal is for the thread

    ws = root / "workspace"
    (ws / "datasets").mkdir(parents=True)
    shutil.copy(example_dataset_path(), ws / "datasets" / "chat.jsonl")
    build_tiny_model(ws / "model-cache" / "tiny")
    say(f"· workspace: {ws} (model-cache/tiny built here, datasets/chat.jsonl with 80 chats)")
    return ws


def start_worker(stack: ExitStack, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.worker"], env=env, cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stack.callback(stop_process, proc, True)
    say(f"· worker: an RQ worker with the scheduler (pid {proc.pid})")
    return proc


# ---- printing the thread ------------------------------------------------------------------------------------------

EMOJI = {":mag:": "🔍", ":inbox_tray:": "📥", ":rocket:": "🚀", ":white_check_mark:": "✅", ":x:": "❌",
         ":no_entry_sign:": "🚫", ":alarm_clock:": "⏰", ":warning:": "⚠️", ":no_entry:": "⛔",
         ":information_source:": "ℹ️", ":octagonal_sign:": "🛑", ":hourglass_flowing_sand:": "⏳",
         ":package:": "📦", ":arrows_counterclockwise:": "🔄", ":busts_in_silhouette:": "👥",
         ":arrow_forward:": "▶️"}


def emoji(text: str) -> str:
    for code, char in EMOJI.items():
        text = text.replace(code, char)
    return text


def plain(blocks: list[dict[str, Any]] | None) -> list[str]:
    """Block Kit to terminal lines: section texts and fields, context lines; buttons named."""
    out: list[str] = []
    for b in blocks or []:
        if b.get("type") == "section":
            if b.get("text"):
                out.extend(b["text"]["text"].splitlines())
            for f in b.get("fields", []):
                out.append(" ".join(f["text"].split("\n")))
        elif b.get("type") == "context":
            out.extend(el.get("text", "") for el in b.get("elements", []))
        elif b.get("type") == "actions":
            out.append("[" + "] [".join(el.get("text", {}).get("text", "?") for el in b.get("elements", [])) + "]")
    return [emoji(line) for line in out]


class ThreadPrinter:
    """Called by the stand-in for every Web API call; prints what a person in the channel would see."""
    def __init__(self, started: float):
        self.started = started
        self.card_ts: str | None = None

    def __call__(self, call) -> None:
        t = f"{call.time - self.started:6.1f}s"
        p = call.params
        if not call.ok:
            if call.method not in ("auth.test",):
                say(f"{t}  ! Slack answered {call.status} {call.response.get('error', '')} to {call.method}")
            return
        if call.method == "chat.postMessage" and not p.get("thread_ts"):
            self.card_ts = call.response.get("ts")
            say(f"{t}  ┌ card posted in #{CHANNEL.lower()}: {p.get('text', '')}")
        elif call.method == "chat.update":
            bar = next((line for line in plain(_blocks(p)) if "█" in line or "░" in line), "")
            say(f"{t}  │ card edited: {p.get('text', '')}" + (f"   {bar}" if bar else ""))
        elif call.method == "chat.postMessage":
            lines = plain(_blocks(p)) or [p.get("text", "")]
            broadcast = " (also sent to the channel)" if p.get("reply_broadcast") else ""
            say(f"{t}  ├─ thread{broadcast}: {lines[0]}")
            for line in lines[1:]:
                say(f"{'':10}│     {line}")
        elif call.method == "files.completeUploadExternal":
            for f in call.response.get("files", []):
                say(f"{t}  ├─ thread: 📈 file uploaded: {f.get('title')} ({f.get('name')})")
        elif call.method == "response_url":
            lines = plain(_blocks(p)) or [p.get("text", "")]
            say(f"{t}  (only you) {lines[0]}")


def _blocks(p: dict[str, Any]) -> list[dict[str, Any]]:
    b = p.get("blocks")
    if isinstance(b, str):
        try:
            b = json.loads(b)
        except json.JSONDecodeError:
            return []
    return b if isinstance(b, list) else []


class DemoError(Exception):
    """Something the demo needs is missing; the message says what to do."""


# ---- the run --------------------------------------------------------------------------------------------------------

async def drive(env: dict[str, str], slack, standin, max_steps: int, started: float) -> bool:


    settings = BotSettings.from_env(env)
    app, runtime, notifier = make_bot(settings)
    runner = web.AppRunner(build_web_app(app, runtime, notifier=notifier), access_log=None)
    await runner.setup()
    # Port 0: the kernel picks a free one, which the site then holds; read back from the runner.
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    say(f"· bot: HTTP mode on http://127.0.0.1:{port}/slack/events, Web API calls to the stand-in")
    try:
        text = f"run --dataset datasets/chat.jsonl --max-steps {max_steps} --lr 1e-3 --name demo"
        body = standin.slash_command_body(text, user_id=USER, channel_id=CHANNEL,
                                          response_url=slack.response_url("demo"))
        headers = standin.signed_headers(env["SLACK_SIGNING_SECRET"], body)
        say()
        say(f"{time.time() - started:6.1f}s  > /finetune {text}     (signed, as Slack sends it)")
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/slack/events", data=body.encode(),
                                    headers=headers) as resp:
                ack = await resp.text()
        if resp.status != 200:
            raise DemoError(f"the bot answered {resp.status} to the signed command: {ack[:200]}")
        ack_lines = plain(json.loads(ack).get("blocks")) if ack.startswith("{") else [ack]
        say(f"{time.time() - started:6.1f}s  (only you) {ack_lines[0] if ack_lines else '(empty ack)'}")

        deadline = time.monotonic() + DEADLINE_S
        run = None
        posted = threads.Threads(settings.jobs)
        while time.monotonic() < deadline:
            run = await asyncio.to_thread(service.get_run, settings.jobs, "ft-0001")
            thread_ts = await asyncio.to_thread(posted.get, threads.RUN_CARD, "ft-0001") if run else ""
            if run is not None and run.state.terminal and thread_ts:
                final = [m for m in slack.thread(CHANNEL, thread_ts)
                         if f"{run.id} finished" in m.text or f"{run.id} failed" in m.text
                         or "cancelled by" in m.text or "ran out of time" in m.text]
                # A succeeded run's loss curve is uploaded right after its completion message.
                uploaded = run.state != "succeeded" or slack.calls_to("files.completeUploadExternal")
                if final and uploaded:
                    break
            await asyncio.sleep(0.3)
        await asyncio.sleep(0.5)  # let the last card edit print
        say()
        if run is None:
            say("The run was never created; see the answers above.")
            return False
        if not run.state.terminal:
            say(f"The run did not finish within {DEADLINE_S:.0f}s (it is {run.state}).")
            return False
        if run.state != "succeeded":
            say(f"The run ended {run.state}: {run.error}")
            return False
        say(f"Done: {run.id} succeeded in {time.time() - started:.0f}s; adapter in "
            f"{Path(env['TUNEOPS_WORKSPACE']) / run.adapter_path}")
        return True
    finally:
        await runner.cleanup()


def main(max_steps: int = 200, keep: bool = False) -> int:
    started = time.time()
    logging.getLogger().setLevel(logging.WARNING)
    if max_steps < 1:
        say("--max-steps must be at least 1")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="tuneops-demo-"))
    ok = False
    with ExitStack() as stack:
        if not keep:
            stack.callback(shutil.rmtree, tmp, True)
        try:
            say("tuneops demo: a real QLoRA run of a tiny model, driven from a local stand-in for Slack")
            redis_url = start_redis(stack, tmp)
            ws = make_workspace(tmp)
            token = "xoxb-demo-" + secrets.token_hex(8)
            printer = ThreadPrinter(started)
            slack = standin.SlackStandIn(token=token, on_call=printer).start()
            stack.callback(slack.stop)
            say(f"· Slack stand-in: {slack.api_url}")
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
                "SLACK_BOT_TOKEN": token,
                "SLACK_SIGNING_SECRET": secrets.token_hex(16),
                "SLACK_API_URL": slack.api_url,
                "SLACK_APP_TOKEN": "",
                "REDIS_URL": redis_url,
                "TUNEOPS_BACKEND": "local",
                "TUNEOPS_WORKSPACE": str(ws),
                "TUNEOPS_DEFAULT_MODEL": "model-cache/tiny",
                "TUNEOPS_ALLOWED_CHANNELS": "",
                "TUNEOPS_ALLOWED_USERS": "",
                "TUNEOPS_MONITOR_INTERVAL": "0.5",
                "TUNEOPS_PYTHON": sys.executable,
                # A CPU-sized run: small LoRA, no gradient accumulation, a checkpoint every few steps.
                "TUNEOPS_TRAIN_OVERRIDES": json.dumps({"lora_r": 8, "lora_alpha": 16, "max_seq_length": 128,
                                                       "gradient_accumulation_steps": 1, "save_steps": 4,
                                                       "eval_generations": 0}),
            }
            start_worker(stack, env, tmp / "worker.log")
            ok = asyncio.run(drive(env, slack, standin, max_steps, started))
            if not ok:
                _show_logs(tmp, ws)
        except DemoError as e:
            say(f"The demo cannot run: {e}")
        except KeyboardInterrupt:
            say("Interrupted; stopping everything.")
        finally:
            say("· stopping the worker, the Slack stand-in and any redis-server the demo started")
    if keep:
        say(f"· kept {tmp}")
    return 0 if ok else 1


def _show_logs(tmp: Path, ws: Path) -> None:
    for path in [tmp / "worker.log", *sorted(ws.glob("runs/*/train.log"))]:
        if path.is_file():
            lines = path.read_text(errors="replace").splitlines()[-15:]
            say(f"--- last lines of {path.name} ---")
            for line in lines:
                say("  " + line)


if __name__ == "__main__":
    sys.exit(main())
