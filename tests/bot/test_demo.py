"""`tuneops demo` end to end: a real run printed as a thread, exit code 0, and nothing left running afterwards."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, dead_port

pytestmark = pytest.mark.timeout(300)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)
    except OSError:
        return False


def test_the_demo_runs_a_real_training_and_cleans_up():
    # Nothing answers at this REDIS_URL, so the demo starts (and must stop) a private redis-server.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "TUNEOPS_"))},
           "REDIS_URL": f"redis://127.0.0.1:{dead_port()}/0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "bot.cli", "demo", "--max-steps", "20"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert "started a private redis-server" in out
    assert "> /finetune run --dataset datasets/chat.jsonl --max-steps 20" in out
    assert "┌ card posted" in out and "card edited: ft-0001: succeeded, step 20/20" in out
    assert re.search(r"thread: .*<@U0DEMO> ft-0001 finished: final loss \d+\.\d{4}", out)
    assert "Adapter: `runs/ft-0001/adapter`" in out
    worker_pid = int(re.search(r"worker: .*\(pid (\d+)\)", out).group(1))
    assert not alive(worker_pid)
    redis_port = int(re.search(r"redis-server on port (\d+)", out).group(1))
    with pytest.raises(ConnectionRefusedError):  # the private redis-server is gone
        socket.create_connection(("127.0.0.1", redis_port), timeout=2).close()
    workspace = re.search(r"workspace: (\S+)", out).group(1)
    assert not os.path.exists(workspace)  # the temporary workspace is removed
