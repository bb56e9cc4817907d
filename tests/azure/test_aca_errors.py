"""What a person reads for Azure's refusals: the ARM client gets the stand-in's answer (with messages Azure gave in
public reports), and explain() must read the message, not only the code, before it blames a quota."""

from __future__ import annotations

import pytest

from jobs.backends.aca.errors import azure_call, is_quota, vault_name
from jobs.backends.aca.standin import Fault
from jobs.core.errors import BackendError

JOB = r"/jobs/tuneops-ft$"
# "Operation could not be completed ... Total Regional Cores quota": 409 OperationNotAllowed (nforgeio/neonKUBE
# issue 1671; cloud-barista/cb-spider issue 1558 shows the whole body).
REGIONAL_CORES = ("Operation could not be completed as it results in exceeding approved Total Regional Cores quota. "
                  "Additional details - Deployment Model: Resource Manager, Location: westus3, Current Limit: 24, "
                  "Current Usage: 24, Additional Required: 24, (Minimum) New Limit Required: 48.")
# A resource lock: 409 ScopeLocked (Azure/apiops issue 606).
LOCKED = ("The scope '/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/tuneops-rg/providers/"
          "Microsoft.App/jobs/tuneops-ft' cannot perform write operation because following scope(s) are locked: "
          "'/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/tuneops-rg'. Please remove the lock and "
          "try again.")
# A resource being deleted: OperationNotAllowed (sassoftware/viya4-iac-azure issue 140, Azure/azure-sdk-for-python
# issue 2702).
DELETING = ("Operation 'startTenantUpdate' is not allowed on VM 'tuneops-vm' since the VM is marked for deletion. You "
            "can only retry the Delete operation (or wait for an ongoing one to complete).")
# Throttling: 429 with OperationNotAllowed (Microsoft Learn, "Troubleshooting API throttling errors", Compute).
THROTTLED = "The server rejected the request because too many requests have been received for this subscription."


def refusal(aca, status: int, code: str, message: str) -> BackendError:
    # the SDK's retry policy (retry_total=3 in these tests) tries a 429 four times before it gives up
    aca.standin.inject(Fault("arm", path=JOB, method="GET", status=status, code=code, message=message,
                             times=4 if status == 429 else 1))
    with pytest.raises(BackendError) as e, azure_call("update the job"):
        aca.clients.arm.jobs.get(aca.cfg.resource_group, aca.cfg.job_name)
    return e.value


def test_operation_not_allowed_is_a_quota_only_when_the_message_says_so(aca):
    quota = refusal(aca, 409, "OperationNotAllowed", REGIONAL_CORES)
    said = str(quota)
    assert said.startswith("Could not update the job: an Azure quota is used up.") and REGIONAL_CORES[:60] in said
    assert "Azure portal > Quotas" in said and "GPU" not in said and not quota.transient

    deleting = refusal(aca, 409, "OperationNotAllowed", DELETING)
    said = str(deleting)
    assert "quota is used up" not in said and "not a quota problem" in said
    assert f"Azure said: OperationNotAllowed: {DELETING}" in said and not deleting.transient

    throttled = refusal(aca, 429, "OperationNotAllowed", THROTTLED)
    assert "quota" not in str(throttled) and "busy" in str(throttled) and throttled.transient


def test_a_lock_is_named_and_never_called_a_passing_conflict(aca):
    locked = refusal(aca, 409, "ScopeLocked", LOCKED)
    said = str(locked)
    assert "a lock on the resource or its resource group forbids it" in said and "Locks" in said
    assert "try again in a minute" not in said and "quota" not in said.replace(LOCKED, "") and not locked.transient


def test_only_messages_about_a_quota_count_as_one():
    assert is_quota("OperationNotAllowed", REGIONAL_CORES)
    assert is_quota("OperationNotAllowed", "Operation results in exceeding quota limits of Core. Maximum allowed: 4, "
                                           "Current in use: 4, Additional requested: 1.")
    # ACA's own: no "exceeding ... quota" in it (microsoft/azure-container-apps issue 1529; the ACA quotas page).
    assert is_quota("", "Maximum Allowed Cores exceeded for the Managed Environment. Please check "
                        "https://learn.microsoft.com/en-us/azure/container-apps/quotas for resource limits")
    aks_upgrade = ("Upgrading Kubernetes version 1.9.9 to 1.11.2 is not allowed. Only one minor version upgrade is "
                   "supported.")  # AKS says so with OperationNotAllowed (a public walkthrough of AKS upgrades by ARM)
    for message in (DELETING, THROTTLED, LOCKED, aks_upgrade):
        assert not is_quota("OperationNotAllowed", message), message


def test_the_vault_name_comes_from_its_url():
    assert vault_name("https://aikvab12c.vault.azure.net") == "aikvab12c"
    assert vault_name("https://aikvab12c.vault.azure.net/") == "aikvab12c"
