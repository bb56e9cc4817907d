"""Fixtures for the Azure backend tests: the local Azure stand-in over TLS, seed-format config files pointing at it,
the real SDK clients with a static token (the edge of the world), a workspace, and settings on the session's Redis."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import jobs.core.settings as jobs_settings
from jobs.backends.aca.clients import AzureClients, install_clients, reset_clients
from jobs.backends.aca.config import AcaConfig, load_aca_config, parse_aca_config
from jobs.backends.aca.standin import (
    ACCOUNT_KEY,
    AzureStandIn,
    StaticTokenCredential,
    standin_config,
)
from jobs.core import queue
from jobs.core.settings import JobSettings
from tests.conftest import make_workspace, wait_for  # noqa: F401  (wait_for: for the tests here)

ENV_STORAGE = "tuneopsstorage"
SHARE = "tuneopsshare"


# A config and an environment for the pure builders (no stand-in behind them).
IDENTITY = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id"
BASE = {"SUBSCRIPTION_ID": "sub", "RESOURCE_GROUP_NAME": "rg", "STORAGE_ACCOUNT_NAME": "store1",
        "FILE_SHARE_NAME": "share1", "ACA_JOB_NAME": "ft-job", "COMMANDS": ["cd /mount", "echo hi"],
        "KEY_VAULT_URL": "https://kv.vault.azure.net", "IDENTITY_ID": IDENTITY}
ENV = {"id": "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.App/managedEnvironments/env1",
       "location": "westus3"}


def cfg(**extra):
    return parse_aca_config(dict(BASE, **extra), {"ACA_APP_NAME": "infer", "MAX_REPLICAS": 3}, {}, Path("/infra"))


@pytest.fixture
def standin(tmp_path):
    # The Key Vault SDK caches each vault's auth challenge process-wide, by host:port; a stand-in on port 0 may get a
    # port an earlier test's vault had, and the SDK would then skip the challenge handshake. Each test starts clean.
    from azure.keyvault.secrets._shared import http_challenge_cache

    http_challenge_cache.clear()
    s = AzureStandIn(tmp_path / "azure").start()
    s.add_env_storage("tuneops-env", ENV_STORAGE, SHARE)
    yield s
    s.stop()


def make_clients(cfg: AcaConfig) -> AzureClients:
    # Short timeouts and backoffs keep fault tests quick; the policies are the SDKs' own.
    return AzureClients(cfg, StaticTokenCredential(), retry_total=3, retry_backoff_factor=0.05,
                        retry_backoff_max=0.5, read_timeout=2.0, connection_timeout=2.0, storage_backoff=0.05,
                        upload_concurrency=4)


@dataclass
class Aca:
    standin: AzureStandIn
    infra: Path
    cfg: AcaConfig
    clients: AzureClients
    env: dict[str, str]

    def reload(self, **extra) -> Aca:
        """Rewrite the config with `extra` keys and get fresh clients for it."""
        standin_config(self.standin, self.infra, extra=extra)
        cfg = load_aca_config(self.env)
        clients = make_clients(cfg)
        install_clients(clients)
        return Aca(self.standin, self.infra, cfg, clients, self.env)


@pytest.fixture
def aca(standin, tmp_path, monkeypatch) -> Aca:
    infra = tmp_path / "infra"
    standin_config(standin, infra)
    env = {"TUNEOPS_INFRA_DIR": str(infra), "TUNEOPS_AZURE_CA_BUNDLE": str(standin.ca_path),
           "TUNEOPS_STORAGE_KEY": ACCOUNT_KEY}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = load_aca_config(env)
    clients = make_clients(cfg)
    install_clients(clients)
    yield Aca(standin, infra, cfg, clients, env)
    reset_clients()


@pytest.fixture
def workspace(tmp_path, tiny_model, example_dataset) -> Path:
    return make_workspace(tmp_path / "ws", tiny_model, example_dataset)


@pytest.fixture
def settings(redis_url, workspace, monkeypatch, tmp_path):

    # The sync's local hash cache goes under the test's folder, not the user's ~/.cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s = JobSettings(redis_url=redis_url, backend="aca", workspace=workspace, monitor_interval_s=0.2,
                    python=sys.executable)
    jobs_settings.configure(s)
    yield s
    jobs_settings.configure(None)


def run_worker_burst(settings: JobSettings) -> None:
    """Run the queued jobs in this process with RQ's own worker class (no fork, so the installed clients serve)."""
    from rq import SimpleWorker


    SimpleWorker([queue.get_queue(settings)], connection=queue.rq_connection(settings)).work(burst=True)
