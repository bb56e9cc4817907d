"""The one place that names the backends: picks one from the settings, and knows how long each takes to start a run.

Everything else (jobs.runs, jobs.deploys, the bot) talks to the Backend protocol (`jobs.backends.protocol`).
"""

from __future__ import annotations

from jobs.backends.protocol import PROVISION, SECRETS, Backend
from jobs.core.errors import BackendError
from jobs.core.settings import JobSettings

# How long starting one run may take (the RQ job timeout of `jobs.runs.tasks.start_run`). A local start spawns a
# process; an ACA start syncs the workspace to Azure Files first, and the first sync of a large model folder (tens of
# GB) takes many minutes, plus the wait for another worker's sync (the share's manifest is synced by one at a time).
START_TIMEOUT_S = {"local": 180, "aca": 3600}


# What each backend offers beyond training and deploying, known without loading it (the bot asks before its ack).
CAPABILITIES = {"local": frozenset(), "aca": frozenset({SECRETS, PROVISION})}


def offers(settings: JobSettings, capability: str) -> bool:
    """Does the configured backend offer `capability` (SECRETS, PROVISION)?"""
    return capability in CAPABILITIES.get(settings.backend, frozenset())


def start_timeout_s(settings: JobSettings) -> int:
    return START_TIMEOUT_S.get(settings.backend, max(START_TIMEOUT_S.values()))


def get_backend(settings: JobSettings) -> Backend:
    """The configured backend. Raises BackendError when it cannot be used (e.g. the Azure config is missing)."""
    if settings.backend == "local":
        # Only the configured backend is loaded.
        from jobs.backends.local.backend import LocalBackend

        return LocalBackend(settings)
    if settings.backend == "aca":
        # The azure-* SDKs load only for this backend.
        from jobs.backends.aca.backend import AcaBackend

        return AcaBackend(settings)
    raise BackendError(f"unknown backend {settings.backend!r}: set TUNEOPS_BACKEND to 'local' or 'aca'")
