"""Turns Azure SDK errors into BackendErrors whose message says what went wrong and what to do.

Transient failures (429 with Retry-After, 5xx, timeouts) are retried by the SDK's own retry policy first; what
reaches here has outlived those retries or is permanent (quota, authorization, a missing resource).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from urllib.parse import urlparse

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from jobs.core import metrics
from jobs.core.errors import BackendError, Hint

log = logging.getLogger(__name__)

# Codes that always mean a quota. OperationNotAllowed is not among them: Azure answers it for quotas ("Operation could
# not be completed as it results in exceeding approved Total Regional Cores quota", nforgeio/neonKUBE issue 1671;
# "Operation results in exceeding quota limits of Core", cloudfoundry/bosh-azure-cpi-release issue 57) and for much
# else: a VM "marked for deletion" (sassoftware/viya4-iac-azure issue 140), throttling with HTTP 429 (Microsoft Learn,
# "Troubleshooting API throttling errors"), an AKS upgrade that skips a version. Only the message tells them apart.
QUOTA_CODES = ("MaxRegionalQuotaExceeded", "QuotaExceeded", "InsufficientQuota", "ManagedEnvironmentGpuQuota",
               "SubscriptionQuotaExceeded")
# What quota messages say. ACA's own ("Maximum Allowed Cores exceeded for the Managed Environment. Please check
# https://learn.microsoft.com/en-us/azure/container-apps/quotas for resource limits", microsoft/azure-container-apps
# issue 1529; the ACA quotas page quotes it) does not say "exceeding ... quota".
QUOTA_MESSAGE = re.compile(r"exceed\w*\b[^.]*\bquota|\bquota\b[^.]*\b(exceed\w*|reached)\b|not (have )?enough quota|"
                           r"Maximum Allowed Cores exceeded", re.IGNORECASE)
GPU_WORDS = re.compile(r"gpu|a100|\bt4\b|\bnc\d", re.IGNORECASE)
AUTH_CODES = ("AuthorizationFailed", "Forbidden", "LinkedAuthorizationFailed", "AuthenticationFailed",
              "InvalidAuthenticationToken", "ForbiddenByRbac", "AuthorizationPermissionMismatch")
NOT_FOUND_CODES = ("ResourceNotFound", "ResourceGroupNotFound", "SubscriptionNotFound", "ParentResourceNotFound",
                   "SecretNotFound", "ShareNotFound", "ResourceNotFoundError", "PathNotFound", "WorkspaceNotFound")


def error_code(err: HttpResponseError) -> str:
    """The service's error code (ARM `error.code`, Storage `x-ms-error-code`), or ''."""
    code = getattr(err, "error_code", None) or ""
    if not code and err.error is not None:
        code = getattr(err.error, "code", "") or ""
    if not code and err.response is not None:
        code = err.response.headers.get("x-ms-error-code", "")
    return str(code)


def inner_error_code(err: HttpResponseError) -> str:
    """The service's inner error code (Key Vault puts the precise one there: error.innererror.code), or ''."""
    inner = getattr(err.error, "innererror", None) if err.error is not None else None
    return str(inner.get("code", "")) if isinstance(inner, dict) else ""


def _service_message(err: HttpResponseError) -> str:
    if err.error is not None and getattr(err.error, "message", None):
        return str(err.error.message).splitlines()[0][:300]
    return (err.reason or "").strip()


def azure_said(err: HttpResponseError) -> str:
    """" Azure said: CODE: first line of its message", to quote in a human message ('' when Azure said nothing)."""
    code, detail = error_code(err), _service_message(err)
    return f" Azure said: {code + ': ' if code else ''}{detail}" if (code or detail) else ""


# Where to ask for more: Microsoft's page on Container Apps quota requests (the GPU quotas are requested there: in the
# portal's Quotas for the subscription, by a support request for an environment), the serverless GPU page's section on
# requesting GPU quota, and the portal's Quotas blade (the link that quota-requests page gives).
QUOTA_REQUESTS_URL = "https://learn.microsoft.com/azure/container-apps/quota-requests"
GPU_QUOTA_URL = "https://learn.microsoft.com/azure/container-apps/gpu-serverless-overview#request-serverless-gpu-quota"
PORTAL_QUOTAS_URL = "https://portal.azure.com/#view/Microsoft_Azure_Capacity/QuotaMenuBlade/~/myQuotas"
WHERE_TO_ASK_ANY = (f"request it in the Azure portal > Quotas (provider Azure Container Apps, {PORTAL_QUOTAS_URL}); "
                    f"how, and for an environment's own quota: {QUOTA_REQUESTS_URL}")
WHERE_TO_ASK = f"{WHERE_TO_ASK_ANY} (serverless GPUs: {GPU_QUOTA_URL})"


def is_quota(code: str, message: str) -> bool:
    """Whether Azure's answer is about a quota: a quota code, or a message that says one is exceeded."""
    return any(c.lower() in code.lower() for c in QUOTA_CODES) or bool(QUOTA_MESSAGE.search(message))


def vault_name(vault_url: str) -> str:
    """The vault's name in its URL (https://NAME.vault.azure.net), as `az keyvault --vault-name` takes it."""
    return (urlparse(vault_url).hostname or "").split(".")[0] or vault_url


def deleted_secret_blocks(action: str, vault_url: str, name: str, said: str = "", *,
                          purge_on: datetime | None = None, recover_refused: bool = False) -> BackendError:
    """A secret name held by a soft-deleted secret: Key Vault refuses it (409 ObjectIsDeletedButRecoverable) until
    the deleted secret is recovered or purged, or Key Vault purges it when the retention period ends; waiting a
    minute never helps."""
    vault = vault_name(vault_url)
    when = f"on {purge_on:%Y-%m-%d %H:%M} UTC" if purge_on else "when the vault's retention period ends"
    head = (f"Could not {action}: a deleted secret named {name} still holds that name in the vault (deleted but "
            f"recoverable) until it is recovered or purged. Key Vault purges it {when}, not sooner, so retrying will "
            f"not help.{said}")
    purge = f"`az keyvault secret purge --vault-name {vault} --name {name}`"
    if recover_refused:
        return BackendError(
            f"{head} The bot may not recover it: its Azure identity lacks the recover permission. Either give that "
            f"identity the \"Key Vault Secrets Officer\" role on the vault (it includes recover; see infra/README.md, "
            f"section Roles) and save again: the deleted secret is recovered and the new value written over it. Or "
            f"purge it, {purge}, and save again. Or wait until it is purged.")
    return BackendError(f"{head} Recover it (`az keyvault secret recover --vault-name {vault} --name {name}`) or "
                        f"purge it ({purge}), then save again.")


def _deleted_secret_of(err: HttpResponseError) -> tuple[str, str]:
    """The vault URL and the secret name of the request that got `err`."""
    url = str(err.response.request.url) if err.response is not None and err.response.request is not None else ""
    parts = urlparse(url)
    path = [p for p in parts.path.split("/") if p]
    name = path[1] if len(path) > 1 and path[0] in ("secrets", "deletedsecrets") else "<name>"
    return (f"{parts.scheme}://{parts.netloc}" if parts.netloc else "https://<vault>.vault.azure.net"), name


def explain(err: Exception, action: str) -> BackendError:
    """A BackendError for a failed `action` ("start the job", "write the secret"...), with a next step."""
    if isinstance(err, BackendError):
        return err
    if isinstance(err, HttpResponseError) and err.status_code is not None:
        status, code, detail, said = err.status_code, error_code(err), _service_message(err), azure_said(err)
        if is_quota(code, detail):
            if GPU_WORDS.search(code + " " + detail):
                return BackendError(f"Could not {action}: the GPU quota is used up.{said} Wait for running jobs to "
                                    f"finish, or ask for more: {WHERE_TO_ASK}; then try again.")
            return BackendError(f"Could not {action}: an Azure quota is used up.{said} Free some of it, or ask for more: "
                                f"{WHERE_TO_ASK_ANY}; then try again.")
        if status in (401, 403) or code in AUTH_CODES:
            return BackendError(
                f"Could not {action}: the bot's Azure identity is not allowed to.{said} Give it the roles listed in "
                f"infra/README.md (section Roles), then try again.")
        if status == 404 or code in NOT_FOUND_CODES:
            return BackendError(
                f"Could not {action}: the Azure resource does not exist.{said} Check the names in "
                f"infra/finetuning.config.json, or provision the job first.",
                hint=Hint("provision finetune", "creates the job"))
        if code == "ScopeLocked":
            # A lock stays until someone removes it: "... cannot perform delete operation because following scope(s)
            # are locked: '...'. Please remove the lock and try again." (409, Azure/apiops issue 606)
            return BackendError(
                f"Could not {action}: a lock on the resource or its resource group forbids it.{said} Retrying will not "
                f"help: someone allowed to manage locks (an Owner) removes it in the Azure portal (the resource "
                f"group > Locks) if the change is wanted, then try again.")
        if code.lower() == "operationnotallowed" and status != 429:
            return BackendError(
                f"Could not {action}: Azure does not allow this operation now (not a quota problem).{said} Do what "
                f"Azure's message says (e.g. wait until a resource being deleted is gone), then try again.")
        if status == 409:
            if inner_error_code(err) == "ObjectIsDeletedButRecoverable":
                return deleted_secret_blocks(action, *_deleted_secret_of(err), said)
            return BackendError(f"Could not {action}: Azure reports a conflict.{said} Another change may be in "
                                f"progress; try again in a minute.", transient=True)
        if status == 429 or status >= 500:
            return BackendError(f"Could not {action}: Azure is busy or failing (HTTP {status}) even after retries."
                                f"{said} Try again in a few minutes.", transient=True)
        return BackendError(f"Could not {action}: Azure refused the request (HTTP {status}).{said}")
    if isinstance(err, ClientAuthenticationError):
        return BackendError(
            f"Could not {action}: no Azure credential. Inside Azure give the bot a managed identity; on a laptop run "
            f"`az login`. ({str(err).splitlines()[0][:200]})")
    if isinstance(err, (ServiceRequestError, ServiceResponseError)):
        return BackendError(f"Could not {action}: Azure did not answer in time or the connection failed. "
                            f"Try again in a few minutes.", transient=True)
    if isinstance(err, AzureError):
        return BackendError(f"Could not {action}: {str(err).splitlines()[0][:300]}")
    return BackendError(f"Could not {action}: {type(err).__name__}: {err}")


@contextmanager
def azure_call(action: str) -> Iterator[None]:
    """Run a block of SDK calls; any Azure failure leaves as a BackendError that says what to do."""
    try:
        yield
    except BackendError:
        raise
    except AzureError as e:
        log.warning("azure call failed: %s: %s", action, e.__class__.__name__, exc_info=log.isEnabledFor(logging.DEBUG))
        metrics.count_azure_error(error_code(e) if isinstance(e, HttpResponseError) else type(e).__name__)
        raise explain(e, action) from e
