"""The one place that picks the executor backend from the settings, and knows how long each takes to start a run."""

from __future__ import annotations

from jobs.executor import BackendError, Executor
from jobs.settings import JobSettings

# How long starting one run may take (the RQ job timeout of `jobs.tasks.start_run`). A local start spawns a process;
# an ACA start syncs the workspace to Azure Files first, and the first sync of a large model folder (tens of GB)
# takes many minutes, plus the wait for another worker's sync (the share's manifest is synced by one at a time).
START_TIMEOUT_S = {"local": 180, "aca": 3600}


def start_timeout_s(settings: JobSettings) -> int:
    return START_TIMEOUT_S.get(settings.backend, max(START_TIMEOUT_S.values()))


def get_executor(settings: JobSettings) -> Executor:
    if settings.backend == "local":
        from jobs.local import LocalExecutor

        return LocalExecutor(settings)
    if settings.backend == "aca":
        try:
            from jobs.aca import AcaExecutor  # type: ignore[import-not-found]
        except ImportError as e:
            # Only "there is no ACA backend yet" becomes a message; a broken one shows its own error.
            if e.name != "jobs.aca":
                raise
            raise BackendError("the Azure Container Apps backend is not available in this version of tuneops: set "
                               "TUNEOPS_BACKEND=local to train on this machine") from None
        return AcaExecutor(settings)
    raise BackendError(f"unknown backend {settings.backend!r}: set TUNEOPS_BACKEND to 'local' or 'aca'")
