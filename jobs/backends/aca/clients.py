"""The Azure SDK clients, each made once per process and reused (the Azure SDK guidelines).

Endpoints come from the config (a local stand-in's URL in tests); the credential is DefaultAzureCredential (managed
identity inside Azure, `az login` on a laptop) unless one is passed in. Transient failures are the SDK retry
policy's job: 429 with Retry-After, 5xx and timeouts are retried with exponential backoff.
"""

from __future__ import annotations

import copy
import threading
from typing import Any
from urllib.parse import urlparse

from jobs.backends.aca.config import AcaConfig, load_aca_config


class AzureClients:
    """Lazily built clients for one config; each client is created on first use, then shared by all threads."""

    def __init__(self, cfg: AcaConfig, credential: Any = None, *, retry_total: int = 6,
                 retry_backoff_factor: float = 0.8, retry_backoff_max: float = 60, read_timeout: float = 120,
                 connection_timeout: float = 20, storage_backoff: float = 2.0, upload_concurrency: int = 8):
        self.cfg = cfg
        self._credential = credential
        self._lock = threading.RLock()
        self._made: dict[str, Any] = {}
        self.upload_concurrency = upload_concurrency
        self._storage_retry = dict(retry_total=retry_total, initial_backoff=storage_backoff,
                                   increment_base=max(storage_backoff, 1.0), random_jitter_range=min(storage_backoff, 2))
        self._common: dict[str, Any] = dict(
            retry_total=retry_total, retry_backoff_factor=retry_backoff_factor, retry_backoff_max=retry_backoff_max,
            read_timeout=read_timeout, connection_timeout=connection_timeout,
        )
        if cfg.ca_bundle:
            self._common["connection_verify"] = cfg.ca_bundle

    def _once(self, name: str, make):
        with self._lock:
            if name not in self._made:
                self._made[name] = make()
            return self._made[name]

    @property
    def credential(self):
        def make():
            if self._credential is not None:
                return self._credential
            # azure SDKs are heavy: each loads when its client is first made
            from azure.identity import DefaultAzureCredential

            return DefaultAzureCredential(exclude_interactive_browser_credential=True)

        return self._once("credential", make)

    @property
    def arm(self):
        """azure-mgmt-appcontainers: jobs, executions, container apps, environment storages."""
        def make():
            # heavy: loaded with the first ARM client
            from azure.mgmt.appcontainers import ContainerAppsAPIClient

            return ContainerAppsAPIClient(self.credential, self.cfg.subscription_id, base_url=self.cfg.arm_endpoint,
                                          polling_interval=self.cfg.polling_interval, **self._common)

        return self._once("arm", make)

    @property
    def share(self):
        """azure-storage-file-share: the Azure Files share mounted at /mount in the job."""
        def make():
            # heavy: loaded with the first share client
            from azure.storage.fileshare import ExponentialRetry, ShareClient

            # Storage has its own retry policy (it throttles with 503 ServerBusy, which it retries).
            kwargs = dict(self._common, retry_policy=ExponentialRetry(**self._storage_retry))
            if self.cfg.storage_key:
                credential: Any = {"account_name": self.cfg.storage_account, "account_key": self.cfg.storage_key}
            else:
                # Files over OAuth needs the backup intent and the Storage File Data Privileged Contributor role.
                credential = self.credential
                kwargs["token_intent"] = "backup"
            return ShareClient(self.cfg.files_account_url, self.cfg.file_share, credential=credential,
                               max_range_size=4 * 1024 * 1024, **kwargs)

        return self._once("share", make)

    @property
    def secrets(self):
        """azure-keyvault-secrets, on the vault of KEY_VAULT_URL."""
        def make():

            # heavy: loaded with the first Key Vault client
            from azure.keyvault.secrets import SecretClient

            self.cfg.require("Key Vault secrets", "key_vault_url")
            host = urlparse(self.cfg.key_vault_url).hostname or ""
            # The challenge names the resource `vault.azure.net`; only a local stand-in on loopback differs from it.
            local = host in ("127.0.0.1", "localhost", "::1")
            return SecretClient(self.cfg.key_vault_url, self.credential, verify_challenge_resource=not local,
                                **self._common)

        return self._once("secrets", make)

    @property
    def logs(self):
        """azure-monitor-query: KQL over the environment's Log Analytics workspace."""
        def make():
            # heavy: loaded with the first Log Analytics client
            from azure.monitor.query import LogsQueryClient

            return LogsQueryClient(self.credential, endpoint=self.cfg.logs_endpoint, **self._common)

        return self._once("logs", make)

    def with_config(self, cfg: AcaConfig) -> AzureClients:
        """The same SDK clients (same endpoints and credential) seen with a newer config of the same connection."""
        other = copy.copy(self)
        other.cfg = cfg
        return other

    def close(self) -> None:
        with self._lock:
            for name, client in self._made.items():
                if name != "credential" and hasattr(client, "close"):
                    client.close()
            self._made.clear()


def connection_key(cfg: AcaConfig) -> tuple:
    """What the SDK clients depend on. Other config changes (names, images, an endpoint written back after a
    provision) reuse the process's clients."""
    return (cfg.subscription_id, cfg.arm_endpoint, cfg.storage_account, cfg.files_account_url, cfg.file_share,
            cfg.key_vault_url, cfg.logs_endpoint, cfg.ca_bundle, cfg.storage_key, cfg.polling_interval)


_process_clients: dict[tuple, AzureClients] = {}
_process_lock = threading.Lock()


def get_clients(cfg: AcaConfig | None = None) -> AzureClients:
    """The process's clients for `cfg` (default: the config read from infra/)."""
    cfg = cfg or load_aca_config()
    key = connection_key(cfg)
    with _process_lock:
        clients = _process_clients.get(key)
        if clients is None:
            clients = _process_clients[key] = AzureClients(cfg)
    return clients if clients.cfg == cfg else clients.with_config(cfg)


def install_clients(clients: AzureClients) -> None:
    """Make `clients` the process's clients for its connection (a worker set up with a custom credential)."""
    with _process_lock:
        _process_clients[connection_key(clients.cfg)] = clients


def reset_clients() -> None:
    with _process_lock:
        for c in _process_clients.values():
            c.close()
        _process_clients.clear()
