"""Container programs: what a started execution runs against the share's folder, standing in for the GPU
container that mounts the share at /mount."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from payload.events import EVENTS_FILE, encode, make_event


@dataclass
class ContainerContext:
    """What a container program gets: the mounted share, its env (secrets resolved), the command."""

    mount: Path
    env: dict[str, str]
    command: list[str]
    stop: threading.Event
    console: Callable[[str], None]

    @property
    def script(self) -> str:
        return self.command[-1] if self.command else ""

    def config_path(self) -> Path | None:
        m = re.search(r"--config\s+([^\s;&|]+)", self.script)
        return self.mount / m.group(1) if m else None


# A container program returns the exit code; it should return early (any code) when `stop` is set.
Program = Callable[[ContainerContext], int]


@dataclass
class ExecutionPlan:
    program: Program | None = None        # default: simulated_trainer()
    processing_s: float = 0.1             # how long the execution stays "Processing"
    final_status: str | None = None       # force "Degraded" etc.; default from the exit code
    reason: str = ""


def simulated_trainer(steps: int = 6, step_delay: float = 0.05, fail_at_step: int | None = None,
                      write_outputs: bool = True, leak_env: str = "") -> Program:
    """Stands in for `python -m payload.train` in the GPU container: reads the run config from the share, writes the
    payload's progress events, train.log, metrics.json and the adapter there, and echoes to the console log."""

    def program(ctx: ContainerContext) -> int:
        cfg_path = ctx.config_path()
        if cfg_path is None or not cfg_path.exists():
            ctx.console(f"error: config not found: {cfg_path}")
            return 2
        cfg = json.loads(cfg_path.read_text())
        out = ctx.mount / cfg["output_dir"]
        out.mkdir(parents=True, exist_ok=True)
        log = (out / "train.log").open("a", encoding="utf-8")

        def say(line: str) -> None:
            log.write(line + "\n")
            log.flush()
            ctx.console(line)

        def emit(type_: str, **fields) -> None:
            line = encode(make_event(type_, **fields))
            with (out / EVENTS_FILE).open("a", encoding="utf-8") as f:
                f.write(line + "\n")
            say("TUNEOPS_EVENT " + line)

        say(f"loading {cfg['base_model']} in 4-bit (nf4)")
        if not (ctx.mount / cfg["dataset"]).exists():
            say(f"FileNotFoundError: dataset {cfg['dataset']} not on the share")
            emit("error", message=f"dataset {cfg['dataset']} not found")
            return 1
        say(f"HF_TOKEN set: {'yes' if ctx.env.get('HF_TOKEN') else 'no'}")
        if leak_env:  # a careless trainer that prints a secret, as a traceback might
            say(f"debug: {leak_env}={ctx.env.get(leak_env)}")
        emit("start", total_steps=steps)
        for step in range(1, steps + 1):
            if ctx.stop.wait(step_delay):
                say("received SIGTERM, stopping")
                return 143
            if fail_at_step == step:
                say("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
                emit("error", message="CUDA out of memory" + (f" ({ctx.env.get(leak_env)})" if leak_env else ""))
                return 1
            emit("step", step=step, total_steps=steps, epoch=step / steps, loss=round(2.0 / step, 4), lr=1e-4,
                 tokens_per_s=1000.0, eta_s=(steps - step) * step_delay)
            say(f"step {step}/{steps} loss {2.0 / step:.4f}")
        if write_outputs:
            adapter = out / "adapter"
            adapter.mkdir(exist_ok=True)
            (adapter / "adapter_config.json").write_text(json.dumps({"r": cfg.get("lora_r", 64), "peft_type": "LORA"}))
            (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 128)
            metrics = {"train_loss": round(2.0 / steps, 4), "eval_loss": 0.5, "steps": steps}
            (out / "metrics.json").write_text(json.dumps(metrics))
            emit("done", adapter=str(Path(cfg["output_dir"]) / "adapter"), metrics=metrics)
        say("training finished")
        log.close()
        return 0

    return program


def sleeper(seconds: float = 3600) -> Program:
    """A container that runs until stopped or killed (for stop and replica-timeout tests)."""

    def program(ctx: ContainerContext) -> int:
        ctx.console("started, waiting")
        return 143 if ctx.stop.wait(seconds) else 0

    return program


def dies_at_once(lines: tuple[str, ...] = ("exec /bin/bash: exec format error",)) -> Program:
    """A container that dies before writing anything to the share; only the console log has its last words."""

    def program(ctx: ContainerContext) -> int:
        for line in lines:
            ctx.console(line)
        return 1

    return program


def run_command(python: str = sys.executable, timeout: float = 600) -> Program:
    """Runs the job's real bash command, with /mount being the share's folder and `python` on PATH."""

    def program(ctx: ContainerContext) -> int:
        script = ctx.script.replace("/mount", str(ctx.mount))
        env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
        env.update(ctx.env)
        env["PATH"] = str(Path(python).parent) + os.pathsep + os.environ.get("PATH", "")
        proc = subprocess.Popen(["bash", "-c", script], cwd=ctx.mount, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        reader = threading.Thread(target=lambda: [ctx.console(line.rstrip("\n")) for line in proc.stdout], daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if ctx.stop.wait(0.1) or time.monotonic() > deadline:
                proc.terminate()
                proc.wait(10)
                break
        reader.join(5)
        return proc.returncode

    return program
