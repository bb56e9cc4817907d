"""Turns Azure SDK errors into BackendErrors whose message says what went wrong and what to do.

Transient failures (429 with Retry-After, 5xx, timeouts) are retried by the SDK's own retry policy first; what
reaches here has outlived those retries or is permanent (quota, authorization, a missing resource).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from jobs.core.errors import BackendError, Hint

log = logging.getLogger(__name__)

QUOTA_CODES = ("MaxRegionalQuotaExceeded", "QuotaExceeded", "InsufficientQuota", "ManagedEnvironmentGpuQuota",
               "SubscriptionQuotaExceeded", "OperationNotAllowed")
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


def _service_message(err: HttpResponseError) -> str:
    if err.error is not None and getattr(err.error, "message", None):
        return str(err.error.message).splitlines()[0][:300]
    return (err.reason or "").strip()


def explain(err: Exception, action: str) -> BackendError:
    """A BackendError for a failed `action` ("start the job", "write the secret"...), with a next step."""
    if isinstance(err, BackendError):
        return err
    if isinstance(err, HttpResponseError) and err.status_code is not None:
        status, code, detail = err.status_code, error_code(err), _service_message(err)
        said = f" Azure said: {code + ': ' if code else ''}{detail}" if (code or detail) else ""
        if any(c.lower() in code.lower() for c in QUOTA_CODES) or "quota" in detail.lower():
            return BackendError(
                f"Could not {action}: the GPU quota is used up.{said} Wait for running jobs to finish, or ask for "
                f"more quota for the workload profile in the Azure portal (Quotas), then try again.")
        if status in (401, 403) or code in AUTH_CODES:
            return BackendError(
                f"Could not {action}: the bot's Azure identity is not allowed to.{said} Give it the roles listed in "
                f"infra/README.md (section Roles), then try again.")
        if status == 404 or code in NOT_FOUND_CODES:
            return BackendError(
                f"Could not {action}: the Azure resource does not exist.{said} Check the names in "
                f"infra/finetuning.config.json, or provision the job first.",
                hint=Hint("provision finetune", "creates the job"))
        if status == 409:
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
        raise explain(e, action) from e
