"""The workload profile table: each type's figures, what a replica may ask for, which profiles take instance counts."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.backends.aca import profiles
from jobs.backends.aca.profiles import (
    check_resources,
    check_workload_profile,
    default_resources,
    fill_resources,
    parse_memory,
    profile,
)


@pytest.mark.parametrize("type_name,gpu,vcpu,gib,serverless", [
    ("Consumption", ("", 0), 4, 8, True),
    ("Consumption-GPU-NC24-A100", ("A100", 1), 24, 220, True),
    ("Consumption-GPU-NC8as-T4", ("T4", 1), 8, 56, True),
    ("NC24-A100", ("A100", 1), 24, 220, False),
    ("NC48-A100", ("A100", 2), 48, 440, False),
    ("NC96-A100", ("A100", 4), 96, 880, False),
    ("D4", ("", 0), 4, 16, False),
    ("E32", ("", 0), 32, 256, False),
])
def test_the_table_has_the_documented_figures(type_name, gpu, vcpu, gib, serverless):
    p = profile(type_name)
    assert (p.type_name, (p.gpu_model, p.gpu_count), p.vcpu, p.memory_gib) == (type_name, gpu, vcpu, gib)
    assert p.serverless is serverless and p.dedicated is not serverless
    assert (p.max_cpu, p.max_memory_gib) == (vcpu, gib)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.vcpu = 1


def test_the_gpu_types_and_the_default():
    assert profiles.GPU_PROFILE_TYPES == ("Consumption-GPU-NC24-A100", "Consumption-GPU-NC8as-T4", "NC24-A100",
                                          "NC48-A100", "NC96-A100")
    assert profiles.DEFAULT_PROFILE_TYPE == "Consumption-GPU-NC24-A100"
    assert profile(profiles.DEFAULT_PROFILE_TYPE).serverless


def test_a_type_is_found_whatever_its_case_and_an_unknown_one_lists_the_known():
    # Azure took the CLI's upper-case spelling (Azure/azure-cli issue 30526) but refuses NC24_A100.
    assert profile("CONSUMPTION-GPU-NC8AS-T4").type_name == "Consumption-GPU-NC8as-T4"
    assert profile(" nc24-a100 ").type_name == "NC24-A100"
    for wrong in ("NC24_A100", "A100", "", "Dedicated-D4"):
        with pytest.raises(ValueError) as e:
            profile(wrong)
        assert "known types: Consumption, Consumption-GPU-NC24-A100, Consumption-GPU-NC8as-T4, NC24-A100" \
            in str(e.value)
        assert not isinstance(e.value, KeyError)


@pytest.mark.parametrize("type_name,expect", [
    ("Consumption-GPU-NC24-A100", (24.0, "220Gi")),
    ("Consumption-GPU-NC8as-T4", (8.0, "56Gi")),
    ("NC48-A100", (48.0, "440Gi")),
    ("Consumption", (4.0, "8Gi")),
    ("D4", (4.0, "16Gi")),
])
def test_the_default_is_the_most_one_replica_may_ask_for(type_name, expect):
    assert default_resources(type_name) == expect
    assert check_resources(type_name, *expect) == ""
    assert isinstance(default_resources(type_name)[0], float)


def test_asking_over_the_limit_names_the_limit_and_the_ask():
    assert check_resources("Consumption-GPU-NC8as-T4", 24, "220Gi") == \
        "8 vCPU / 56Gi at most on Consumption-GPU-NC8as-T4; asked 24 / 220Gi"
    assert check_resources("Consumption-GPU-NC8as-T4", 8, "57Gi").startswith("8 vCPU / 56Gi at most")
    assert check_resources("Consumption-GPU-NC8as-T4", 8.5, "56Gi").endswith("asked 8.5 / 56Gi")
    assert check_resources("NC24-A100", 24, "220Gi") == "" and check_resources("NC24-A100", 4, "32Gi") == ""
    assert check_resources("NC24-A100", 48, "440Gi") == "24 vCPU / 220Gi at most on NC24-A100; asked 48 / 440Gi"
    assert check_resources("NC48-A100", 48, "440Gi") == ""


def test_the_consumption_profile_takes_only_its_pairs():
    # https://learn.microsoft.com/en-us/azure/container-apps/containers#allocations: 0.25..4 vCPU, memory twice the cpu
    for cpu in (0.25, 0.5, 1, 2, 2.25, 3.75, 4):
        assert check_resources("Consumption", cpu, f"{2 * cpu:g}Gi") == ""
    assert check_resources("Consumption", 1.0, "2.0Gi") == ""
    for cpu, memory in ((1, "3Gi"), (4.25, "8.5Gi"), (0.3, "0.6Gi"), (8, "16Gi")):
        reason = check_resources("Consumption", cpu, memory)
        assert reason.startswith("Consumption takes only cpu/memory pairs from 0.25 / 0.5Gi to 4 / 8Gi in steps of "
                                 "0.25 vCPU, memory twice the cpu; asked")
        assert reason.endswith(f"asked {cpu:g} / {memory}")


def test_memory_must_be_in_gi():
    assert parse_memory("56Gi") == 56.0 and parse_memory("0.5Gi") == 0.5 and parse_memory(" 8 Gi ") == 8.0
    for wrong in ("56GB", "56", "56Mi", "Gi", "-1Gi", 56):
        with pytest.raises(ValueError, match="memory must be in Gi"):
            parse_memory(wrong)
    assert check_resources("NC24-A100", 4, "16G") == "memory must be in Gi, like '56Gi' or '0.5Gi', not '16G'"
    assert "more than 0" in check_resources("NC24-A100", 0, "16Gi")


def test_an_unset_half_is_filled_from_the_profile():
    assert fill_resources("Consumption-GPU-NC8as-T4") == (8.0, "56Gi")
    assert fill_resources("Consumption-GPU-NC8as-T4", cpu=4) == (4.0, "56Gi")
    assert fill_resources("Consumption-GPU-NC8as-T4", memory="32Gi") == (8.0, "32Gi")
    assert fill_resources("Consumption", cpu=1.5) == (1.5, "3Gi")
    assert fill_resources("Consumption", memory="5Gi") == (2.5, "5Gi")


@pytest.mark.parametrize("type_name", ["Consumption", "Consumption-GPU-NC24-A100", "Consumption-GPU-NC8as-T4"])
def test_a_serverless_profile_with_counts_is_azures_workload_profile_property_not_supported(type_name):
    # hashicorp/terraform-provider-azurerm issues 31763 and 31961, Azure/azure-cli issue 30526
    wp = {"name": "GPU", "workloadProfileType": type_name}
    assert check_workload_profile(wp) == ""
    azure_spelling = type_name.replace("-", "_")
    assert check_workload_profile({**wp, "minimumCount": 0, "maximumCount": 1}) == (
        f"WorkloadProfilePropertyNotSupported: Workload Profile property 'MinimumCount' is not supported for "
        f"{azure_spelling}")
    assert check_workload_profile({**wp, "maximumCount": 1}).startswith(
        "WorkloadProfilePropertyNotSupported: Workload Profile property 'MaximumCount'")
    assert check_workload_profile({**wp, "minimumCount": None}) == ""


@pytest.mark.parametrize("type_name", ["NC24-A100", "NC48-A100", "NC96-A100", "D4"])
def test_a_dedicated_profile_may_have_counts_and_need_not(type_name):
    # The API's WorkloadProfile schema requires only name and workloadProfileType (Microsoft.App 2024-03-01).
    wp = {"name": "GPU", "workloadProfileType": type_name}
    assert check_workload_profile(wp) == ""
    assert check_workload_profile({**wp, "minimumCount": 0, "maximumCount": 3}) == ""
    assert check_workload_profile({**wp, "minimumCount": 2}) == ""
    assert check_workload_profile({**wp, "minimumCount": 3, "maximumCount": 1}) == \
        "minimumCount (3) of workload profile 'GPU' is larger than its maximumCount (1)"
    assert "must be a whole number" in check_workload_profile({**wp, "maximumCount": "2"})
    assert "must be a whole number" in check_workload_profile({**wp, "minimumCount": -1})


def test_an_unknown_type_or_a_missing_field_is_refused():
    assert check_workload_profile({"name": "GPU", "workloadProfileType": "NC24_A100"}).startswith(
        "WorkloadProfileInvalidType: Workload profile type 'NC24_A100' is invalid")
    assert check_workload_profile({"name": "GPU"}) == "a workloadProfiles entry needs both name and workloadProfileType"
    assert check_workload_profile({"workloadProfileType": "D4"}).startswith("a workloadProfiles entry needs")
