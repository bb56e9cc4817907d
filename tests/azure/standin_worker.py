"""A real tuneops worker (`jobs.worker.run_worker`, RQ with its scheduler and forked job processes) whose Azure
clients carry a static token for the local stand-in: the credential is the only thing that differs from production.

Run as `python -m tests.azure.standin_worker` from the repository root with the usual TUNEOPS_* / REDIS_URL env.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from jobs.backends.aca.clients import AzureClients, install_clients
from jobs.backends.aca.config import load_aca_config
from jobs.backends.aca.standin import StaticTokenCredential
from jobs.core.settings import JobSettings
from jobs.worker import run_worker


def main() -> int:
    settings = JobSettings.from_env()
    cfg = load_aca_config(workspace=settings.workspace)
    install_clients(AzureClients(cfg, StaticTokenCredential(), retry_total=3, retry_backoff_factor=0.05,
                                 retry_backoff_max=0.5, read_timeout=5.0, storage_backoff=0.05))
    run_worker(settings, burst="--burst" in sys.argv)
    return 0


def start(env: dict[str, str], log: Path) -> subprocess.Popen:
    """This worker as a process of its own session (its forks go with it), writing to `log`."""
    root = Path(__file__).resolve().parents[2]
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "tests.azure.standin_worker"], cwd=root, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (RQ's warm shutdown), then SIGKILL for the whole session if it does not end in 20 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
