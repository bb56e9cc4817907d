"""A real tuneops worker (`jobs.worker.run_worker`, RQ with its scheduler and forked job processes) whose Azure
clients carry a static token for the local stand-in: the credential is the only thing that differs from production.

Run as `python -m tests.azure.standin_worker` from the repository root with the usual TUNEOPS_* / REDIS_URL env.
"""

from __future__ import annotations

import sys

from jobs.aca.clients import AzureClients, install_clients
from jobs.aca.config import load_aca_config
from jobs.settings import JobSettings
from jobs.worker import run_worker
from tests.standins.azure import StaticTokenCredential


def main() -> int:
    settings = JobSettings.from_env()
    cfg = load_aca_config(workspace=settings.workspace)
    install_clients(AzureClients(cfg, StaticTokenCredential(), retry_total=3, retry_backoff_factor=0.05,
                                 retry_backoff_max=0.5, read_timeout=5.0, storage_backoff=0.05))
    run_worker(settings, burst="--burst" in sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
