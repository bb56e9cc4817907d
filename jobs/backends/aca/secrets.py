"""Job secrets in Azure Key Vault: write one (from the bot's secret modal), list names and dates (never values).

A secret's value goes from the modal straight to Key Vault in `set_secret` and nowhere else: not into a log line,
Redis, an RQ job argument or a Slack message. The job reads it through an ACA Key Vault reference (see
`jobs.backends.aca.provision.ensure_secret_reference`, run as an RQ task with the secret's name only). The worker reads the
values back into memory only to mask them out of what the container prints (`masks_for_job`).
"""

from __future__ import annotations

import logging
import threading
import time

from azure.core.exceptions import HttpResponseError

from jobs.backends.aca.clients import AzureClients
from jobs.backends.aca.errors import (
    azure_call,
    azure_said,
    deleted_secret_blocks,
    error_code,
    inner_error_code,
)
from jobs.backends.aca.resources import (
    ENV_TAG,
    InvalidSecretName,
    env_name_for,
    secret_name,
)
from jobs.backends.protocol import SecretInfo
from jobs.core.errors import BackendError
from jobs.core.masking import MIN_KNOWN_LEN

log = logging.getLogger(__name__)

MAX_SECRET_BYTES = 25 * 1024   # Key Vault's limit for a secret value
# A recovery takes seconds (Azure/azure-sdk-for-js records one whose poller saw 404s for over fifteen); past this, the
# person is told to try again.
RECOVERY_WAIT_S = 60.0
RECOVERY_RETRY_PAUSE_S = 1.0
MASK_TTL_S = 300.0
_mask_cache: dict[str, tuple[float, tuple[str, ...]]] = {}
_mask_lock = threading.Lock()


def check_secret(name: str, value: str) -> str:
    """The Key Vault name for `name`, or a BackendError that says what is wrong (never echoing the value)."""
    try:
        vault_name = secret_name(name)
    except InvalidSecretName as e:
        raise BackendError(str(e)) from None
    if not isinstance(value, str) or not value.strip():
        raise BackendError(f"The value for {name} is empty: paste the secret into the form and submit again.")
    if len(value.encode("utf-8")) > MAX_SECRET_BYTES:
        raise BackendError(f"The value for {name} is longer than Key Vault allows (25 KB).")
    if value != value.strip():
        raise BackendError(f"The value for {name} starts or ends with spaces or a line break: paste it again "
                           f"without them.")
    return vault_name


def set_secret(clients: AzureClients, name: str, value: str) -> SecretInfo:
    """Write `value` to Key Vault as the secret for env var `name` (HF_TOKEN -> hf-token). A quick call, made from
    the modal handler; the job reference is updated afterwards by an RQ task that gets the name only. A name still
    held by a deleted secret is recovered first (the bot's Key Vault Secrets Officer role allows it), then written."""
    vault_name = check_secret(name, value)
    action = f"write the secret {vault_name} to Key Vault"
    with azure_call(action):
        props = _write(clients, action, vault_name, name, value)
    return SecretInfo(name, vault_name, props.properties.updated_on, props.properties.created_on,
                      bool(props.properties.enabled), True)


def _write(clients: AzureClients, action: str, vault_name: str, env_name: str, value: str):
    """set_secret, through the 409s of soft delete: ObjectIsDeletedButRecoverable never clears by itself (recover,
    then write); ObjectIsBeingRecovered clears within seconds, even after the recovery poller is done (Azure/azure-
    sdk-for-net issue 31581), so the write is tried again for a while."""
    recovered = False
    deadline = time.monotonic() + RECOVERY_WAIT_S
    while True:
        try:
            return clients.secrets.set_secret(vault_name, value, tags={ENV_TAG: env_name}, content_type="text/plain")
        except HttpResponseError as e:
            inner = inner_error_code(e) if e.status_code == 409 else ""
            if inner == "ObjectIsDeletedButRecoverable" and not recovered:
                _recover(clients, action, vault_name)
                recovered, deadline = True, time.monotonic() + RECOVERY_WAIT_S
            elif inner == "ObjectIsBeingRecovered" and time.monotonic() < deadline:
                time.sleep(RECOVERY_RETRY_PAUSE_S)
            else:
                raise


def _recover(clients: AzureClients, action: str, vault_name: str) -> None:
    """Recover the deleted secret `vault_name` and wait until Key Vault serves it again."""
    try:
        poller = clients.secrets.begin_recover_deleted_secret(vault_name)
    except HttpResponseError as e:
        if e.status_code == 404:
            return  # purged meanwhile: the name is free, the write may go ahead
        if e.status_code == 403:
            raise _recover_refused(clients, action, vault_name, e) from e
        raise
    # The poller's result() does not wait; wait() polls GET /secrets/NAME/ until it stops answering 404.
    poller.wait(RECOVERY_WAIT_S)
    if not poller.done():
        raise BackendError(f"Could not {action}: Key Vault is still recovering the deleted secret {vault_name}. "
                           f"Try again in a minute.", transient=True)
    log.info("recovered the deleted Key Vault secret %s before writing its new value", vault_name)


def _recover_refused(clients: AzureClients, action: str, vault_name: str, err: HttpResponseError) -> BackendError:
    """What to do when the bot may not recover the deleted secret: the role, the purge command, the purge date."""
    purge_on = None
    try:
        purge_on = clients.secrets.get_deleted_secret(vault_name).scheduled_purge_date
    except HttpResponseError as e:  # reading deleted secrets needs its own permission; the message does without
        log.info("cannot read the deleted secret %s (%s); no purge date in the message", vault_name, error_code(e))
    return deleted_secret_blocks(action, clients.cfg.key_vault_url, vault_name, azure_said(err), purge_on=purge_on,
                                 recover_refused=True)


def list_secrets(clients: AzureClients) -> list[SecretInfo]:
    """Names and dates of the vault's secrets; values are never read."""
    out = []
    with azure_call("list the Key Vault secrets"):
        for p in clients.secrets.list_properties_of_secrets():
            if p.managed:
                continue  # certificate-backed secrets are not job secrets
            tags = p.tags or {}
            out.append(SecretInfo(env_name_for(p.name, tags), p.name, p.updated_on, p.created_on,
                                  bool(p.enabled), ENV_TAG in tags))
    return sorted(out, key=lambda s: s.env_name)


def values_to_mask(clients: AzureClients, names: list[str]) -> tuple[str, ...]:
    """The current values of the job's Key Vault secrets, held in memory only, to mask them out of the container's
    log lines before those reach Redis or Slack (a trainer may print its token in a traceback). Cached for a few
    minutes; () when the vault cannot be read (masking then falls to the bot's pattern-based redaction)."""
    if not names or not clients.cfg.key_vault_url:
        return ()
    key = clients.cfg.key_vault_url + "|" + ",".join(sorted(names))
    with _mask_lock:
        hit = _mask_cache.get(key)
        if hit and time.monotonic() - hit[0] < MASK_TTL_S:
            return hit[1]
    values = []
    try:
        for name in sorted(set(names)):
            value = clients.secrets.get_secret(name).value
            if value and len(value) >= MIN_KNOWN_LEN:
                values.append(value)
    except Exception as e:  # a missing role or an outage must not stop a run's progress
        log.warning("cannot read the job's secrets to mask them in logs (%s); relying on redaction",
                    type(e).__name__)
        return ()
    out = tuple(sorted(values, key=len, reverse=True))
    with _mask_lock:
        _mask_cache[key] = (time.monotonic(), out)
    return out


def masks_for_job(clients: AzureClients) -> tuple[str, ...]:
    """`values_to_mask` for the Key Vault secrets the ACA job references now (the job is read at most every few
    minutes)."""
    cfg = clients.cfg
    if not cfg.key_vault_url:
        return ()
    key = f"job|{cfg.key_vault_url}|{cfg.subscription_id}|{cfg.resource_group}|{cfg.job_name}"
    with _mask_lock:
        hit = _mask_cache.get(key)
    # The names are looked at again each minute, so that a secret just set is masked soon.
    if hit and time.monotonic() - hit[0] < 60.0:
        names = list(hit[1])
    else:
        try:
            job = clients.arm.jobs.get(cfg.resource_group, cfg.job_name)
            secrets = (job.properties.configuration.secrets if job.properties and job.properties.configuration
                       else None) or []
            names = sorted(s.name for s in secrets if s.key_vault_url and s.name)
        except Exception as e:
            log.warning("cannot read the job's secret references to mask them in logs (%s)", type(e).__name__)
            return ()
        with _mask_lock:
            _mask_cache[key] = (time.monotonic(), tuple(names))
    return values_to_mask(clients, names)
