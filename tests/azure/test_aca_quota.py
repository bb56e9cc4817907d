"""GPU quota before spend: reading the ACA usages (subscription per location, and the environment), finding the entry
for the job's GPU workload profile, and saying plainly when it is zero or used up; in the doctor and in provisioning."""

from __future__ import annotations

import pytest

from jobs.backends.aca import ops
from jobs.backends.aca.backend import AcaBackend
from jobs.backends.aca.errors import QUOTA_REQUESTS_URL
from jobs.backends.aca.quota import (
    GpuProfile,
    Usage,
    assess,
    gpu_profile,
    gpu_usages,
    location_name,
    parse_usages,
    profile_type_of,
    read_gpu_quota,
)
from jobs.backends.aca.standin import Fault
from jobs.core import store
from tests.azure.conftest import run_worker_burst

# The bodies of the REST examples, verbatim (Azure/azure-rest-api-specs, Microsoft.App/stable/2025-01-01/examples/
# Usages_List.json and ManagedEnvironmentUsages_List.json).
USAGES_LIST = {"value": [
    {"currentValue": 5, "limit": 10, "name": {"localizedValue": "ManagedEnvironmentCount",
                                              "value": "ManagedEnvironmentCount"}, "unit": "Count"},
    {"currentValue": 3, "limit": 20, "name": {"localizedValue": "ManagedEnvironmentCores",
                                              "value": "ManagedEnvironmentCores"}, "unit": "Count"},
]}
ENV_USAGES_LIST = {"value": [
    {"currentValue": 0.5, "limit": 10, "name": {"localizedValue": "Managed Environment Consumption Cores",
                                                "value": "ManagedEnvironmentConsumptionCores"}, "unit": "Count"},
]}
ENVIRONMENT = {"name": "tuneops-env", "location": "West US 3", "properties": {"workloadProfiles": [
    {"name": "Consumption", "workloadProfileType": "Consumption"},
    {"name": "GPU", "workloadProfileType": "Consumption-GPU-NC24-A100"}]}}


def gpu(name, current, limit, scope="subscription"):
    return Usage(name, name, current, limit, scope)


# ---- pure ----------------------------------------------------------------------------------------------------------

def test_the_examples_shapes_parse_and_hold_no_gpu_entry():
    sub = parse_usages(USAGES_LIST["value"], "subscription")
    env = parse_usages(ENV_USAGES_LIST["value"], "environment")
    assert sub == [Usage("ManagedEnvironmentCount", "ManagedEnvironmentCount", 5, 10, "subscription"),
                   Usage("ManagedEnvironmentCores", "ManagedEnvironmentCores", 3, 20, "subscription")]
    assert env == [Usage("ManagedEnvironmentConsumptionCores", "Managed Environment Consumption Cores", 0.5, 10,
                         "environment")]
    assert env[0].remaining == 9.5
    a100 = gpu_profile("GPU", "Consumption-GPU-NC24-A100")
    assert gpu_usages(sub + env, a100) == []
    # the SDK's as_dict spelling (snake_case) reads the same
    snake = {"current_value": 1, "limit": 2, "unit": "Count",
             "name": {"value": "SubscriptionConsumptionNCA100Gpus", "localized_value": "Subscription Consumption"}}
    assert parse_usages([snake], "subscription")[0].current == 1


@pytest.mark.parametrize("ptype, want", [
    ("Consumption-GPU-NC24-A100", GpuProfile("p", "Consumption-GPU-NC24-A100", "A100", True)),
    ("Consumption-GPU-NC8as-T4", GpuProfile("p", "Consumption-GPU-NC8as-T4", "T4", True)),
    ("NC24-A100", GpuProfile("p", "NC24-A100", "A100", False)),
    ("NC96-A100", GpuProfile("p", "NC96-A100", "A100", False)),
    ("Consumption", GpuProfile("p", "Consumption", "", False)),
    ("D4", GpuProfile("p", "D4", "", False)),
])
def test_the_gpu_of_a_workload_profile_type(ptype, want):
    assert gpu_profile("p", ptype) == want


def test_the_entry_for_the_profile_is_found_by_model_and_by_serverless_or_dedicated():
    usages = [gpu("SubscriptionConsumptionNCA100Gpus", 1, 4), gpu("SubscriptionConsumptionT4Gpus", 0, 1),
              gpu("SubscriptionNCA100Gpus", 0, 8), gpu("ManagedEnvironmentCores", 3, 20),
              gpu("ManagedEnvironmentConsumptionNCA100Gpus", 1, 2, "environment")]
    names = lambda p: [u.name for u in gpu_usages(usages, p)]
    assert names(gpu_profile("GPU", "Consumption-GPU-NC24-A100")) == ["SubscriptionConsumptionNCA100Gpus",
                                                                       "ManagedEnvironmentConsumptionNCA100Gpus"]
    assert names(gpu_profile("GPU", "Consumption-GPU-NC8as-T4")) == ["SubscriptionConsumptionT4Gpus"]
    assert names(gpu_profile("GPU", "NC24-A100")) == ["SubscriptionNCA100Gpus"]
    # a localized name only ("Managed Environment Consumption NCA100 GPUs") matches too
    only_label = [Usage("x", "Managed Environment Consumption NCA100 GPUs", 0, 1, "environment")]
    assert gpu_usages(only_label, gpu_profile("GPU", "Consumption-GPU-NC24-A100")) == only_label


def test_what_the_quota_says_zero_used_up_plenty_unknown_and_no_gpu():
    plenty = assess(ENVIRONMENT, "GPU", "", [gpu("SubscriptionConsumptionNCA100Gpus", 1, 4)],
                    [gpu("ManagedEnvironmentConsumptionNCA100Gpus", 0, 2, "environment")])
    assert plenty.state == "ok" and plenty.ok and plenty.location == "westus3"
    assert plenty.line().startswith("GPU quota: 0 of 2 A100 GPU(s) for the workload profile GPU "
                                    "(Consumption-GPU-NC24-A100) used (subscription in westus3: 1 of 4")

    zero = assess(ENVIRONMENT, "GPU", "", [gpu("SubscriptionConsumptionNCA100Gpus", 0, 0)], [])
    assert zero.state == "zero" and not zero.ok
    line = zero.line()
    assert line.startswith("GPU quota: 0 A100 GPU(s)") and "Runs will not start until quota is granted" in line
    assert QUOTA_REQUESTS_URL in line and "Azure portal > Quotas" in line and "\n" not in line

    used = assess(ENVIRONMENT, "GPU", "", [gpu("SubscriptionConsumptionNCA100Gpus", 2, 4)],
                  [gpu("ManagedEnvironmentConsumptionNCA100Gpus", 1, 1, "environment")])
    assert used.state == "used_up" and not used.ok
    assert used.line().startswith("GPU quota used up: 1 of 1 A100 GPU(s)") and "waits until a running one ends" \
        in used.line()

    unknown = assess(ENVIRONMENT, "GPU", "", parse_usages(USAGES_LIST["value"], "subscription"), [])
    assert unknown.state == "unknown" and unknown.ok
    assert "could not tell" in unknown.line() and "ManagedEnvironmentCount" in unknown.line()

    cpu = assess(ENVIRONMENT, "Consumption", "", [], [])
    assert cpu.state == "not_gpu" and "no GPU quota is needed" in cpu.line()


def test_profile_type_and_location_name():
    assert profile_type_of(ENVIRONMENT, "GPU") == "Consumption-GPU-NC24-A100"
    assert profile_type_of(ENVIRONMENT, "nope") == ""
    assert location_name("West US 3") == "westus3" and location_name("swedencentral") == "swedencentral"


# ---- against the stand-in ----------------------------------------------------------------------------------------

def test_the_quota_is_read_from_both_usage_lists(aca):
    s = aca.standin
    s.set_usage("SubscriptionConsumptionNCA100Gpus", 0, 2)
    s.set_usage("ManagedEnvironmentConsumptionNCA100Gpus", 0, 1, environment="tuneops-env")
    q = read_gpu_quota(aca.clients)
    assert q.state == "ok" and q.profile.type == "Consumption-GPU-NC24-A100" and q.environment == "tuneops-env"
    assert {u.scope for u in q.usages} == {"subscription", "environment"}
    assert q.line().startswith("GPU quota: 0 of 1 A100 GPU(s)")
    paths = [r.path for r in s.requests_to("arm", "GET", r"/usages$")]
    assert any(p.endswith("/providers/Microsoft.App/locations/westus3/usages") and "/resourceGroups/" not in p
               for p in paths)
    assert any(p.endswith("/managedEnvironments/tuneops-env/usages") for p in paths)

    s.set_usage("SubscriptionConsumptionNCA100Gpus", 0, 0)
    assert read_gpu_quota(aca.clients).state == "zero"
    s.set_usage("SubscriptionConsumptionNCA100Gpus", 2, 2)
    assert read_gpu_quota(aca.clients).state == "used_up"


def test_a_subscription_list_the_bot_may_not_read_leaves_a_note_and_the_environment_answers(aca):
    aca.standin.set_usage("ManagedEnvironmentConsumptionNCA100Gpus", 0, 1, environment="tuneops-env")
    aca.standin.inject(Fault("arm", path=r"/locations/westus3/usages$", status=403, code="AuthorizationFailed",
                             message="does not have authorization to perform action "
                                     "'Microsoft.App/locations/usages/read'"))
    q = read_gpu_quota(aca.clients)
    assert q.state == "ok" and [u.scope for u in q.usages] == ["environment"]
    assert "not allowed to" in q.line() and "usages/read" in q.line()


def test_the_doctor_says_plainly_when_the_quota_is_zero(aca, settings):
    aca.standin.set_usage("SubscriptionConsumptionNCA100Gpus", 0, 0)
    checks = {c.what: c for c in AcaBackend(settings, clients=aca.clients).doctor()}
    quota = checks["GPU quota"]
    assert not quota.ok and "Runs will not start until quota is granted" in quota.detail
    aca.standin.set_usage("SubscriptionConsumptionNCA100Gpus", 0, 3)
    checks = {c.what: c for c in AcaBackend(settings, clients=aca.clients).doctor()}
    assert checks["GPU quota"].ok and checks["GPU quota"].detail.startswith("GPU quota: 0 of 3 A100")


def test_provisioning_says_the_quota_first_and_a_zero_quota_does_not_stop_it(aca, settings):
    aca.standin.set_usage("SubscriptionConsumptionNCA100Gpus", 0, 0)
    op_id = ops.enqueue_provision(settings, "finetune", "U1", "C1")
    run_worker_burst(settings)
    events = store.run_events(store.connect(settings), op_id)
    texts = [e.data.get("text", "") for e in events]
    first_step = events[1]
    assert first_step.data["step"] == "GPU quota" and first_step.data["status"] == "warn"
    assert first_step.data["text"].startswith("GPU quota: 0 A100") and "Runs will not start" in first_step.data["text"]
    creating = next(i for i, t in enumerate(texts) if "creating the ACA job" in t)
    assert creating > 1
    assert events[-1].kind == "succeeded" and "tuneops-ft" in aca.standin.jobs

    aca.standin.set_usage("SubscriptionConsumptionNCA100Gpus", 1, 4)
    again = ops.enqueue_provision(settings, "finetune", "U1", "C1")
    run_worker_burst(settings)
    step = store.run_events(store.connect(settings), again)[1]
    assert step.data["status"] == "ok" and step.data["text"].startswith("GPU quota: 1 of 4 A100 GPU(s)")


def test_provisioning_goes_on_when_the_quota_cannot_be_read(aca, settings):
    aca.standin.inject(Fault("arm", path=r"/usages$", status=403, code="AuthorizationFailed", times=20))
    op_id = ops.enqueue_provision(settings, "finetune", "U1", "C1")
    run_worker_burst(settings)
    events = store.run_events(store.connect(settings), op_id)
    assert events[1].data["status"] == "warn" and "could not read it" in events[1].data["text"]
    assert events[-1].kind == "succeeded"
