"""The one place that picks the executor backend from the settings."""

from __future__ import annotations

from jobs.executor import BackendError, Executor
from jobs.settings import JobSettings


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
