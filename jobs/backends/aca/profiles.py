"""The ACA workload profile types tuneops knows: what each one has, and what one replica on it may ask for.

The one table behind the Bicep templates' profile maps (tests/azure/test_aca_infra.py holds them to it), the job's and
the app's default resources and the config's limit checks; the local stand-in can check what it is sent against it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Figures: vCPU and memory per profile type, and serverless vs dedicated, from
# https://learn.microsoft.com/en-us/azure/container-apps/workload-profiles-overview (Consumption 4 vCPU / 8 GiB per
# replica; Consumption-GPU-* 8-24 vCPU / 56-220 GiB per replica; D4-D32, E4-E32 and NC24/48/96-A100 per node).
# Consumption-GPU-NC8as-T4 is the NC8as_T4_v3 size, 8 vCPU / 56 GiB / one T4:
# https://learn.microsoft.com/en-us/azure/virtual-machines/sizes/gpu-accelerated/ncast4v3-series
# What one replica may ask for: https://learn.microsoft.com/en-us/azure/container-apps/containers#allocations (on the
# Consumption profile only the listed cpu/memory pairs, 0.25 to 4 vCPU with memory twice the cpu in Gi; on a Dedicated
# profile up to the cores and memory of the profile). A serverless GPU replica has a whole GPU to itself:
# https://learn.microsoft.com/en-us/azure/container-apps/gpu-serverless-overview ("multi and fractional GPU replicas
# aren't supported").

_GI_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*Gi\s*$")


@dataclass(frozen=True)
class Profile:
    """One workload profile type, named as ARM spells `workloadProfiles[].workloadProfileType`."""

    type_name: str
    vcpu: float  # a serverless profile: what one replica gets; a dedicated one: what one node has
    memory_gib: float
    serverless: bool  # billed per replica and scaled by Azure: takes no minimumCount/maximumCount
    gpu_model: str = ""
    gpu_count: int = 0
    # The (vCPU, GiB) pairs a replica may ask for where Azure allows only fixed steps; empty: anything up to the maxima.
    allocations: tuple[tuple[float, float], ...] = ()

    @property
    def dedicated(self) -> bool:
        return not self.serverless

    @property
    def max_cpu(self) -> float:
        return self.vcpu

    @property
    def max_memory_gib(self) -> float:
        return self.memory_gib

    @property
    def limit(self) -> str:
        return f"{self.max_cpu:g} vCPU / {format_memory(self.max_memory_gib)} at most on {self.type_name}"


_CONSUMPTION_STEPS = tuple((0.25 * i, 0.5 * i) for i in range(1, 17))

PROFILES: dict[str, Profile] = {p.type_name: p for p in (
    Profile("Consumption", 4, 8, serverless=True, allocations=_CONSUMPTION_STEPS),
    Profile("Consumption-GPU-NC24-A100", 24, 220, serverless=True, gpu_model="A100", gpu_count=1),
    Profile("Consumption-GPU-NC8as-T4", 8, 56, serverless=True, gpu_model="T4", gpu_count=1),
    Profile("NC24-A100", 24, 220, serverless=False, gpu_model="A100", gpu_count=1),
    Profile("NC48-A100", 48, 440, serverless=False, gpu_model="A100", gpu_count=2),
    Profile("NC96-A100", 96, 880, serverless=False, gpu_model="A100", gpu_count=4),
    Profile("D4", 4, 16, serverless=False),
    Profile("D8", 8, 32, serverless=False),
    Profile("D16", 16, 64, serverless=False),
    Profile("D32", 32, 128, serverless=False),
    Profile("E4", 4, 32, serverless=False),
    Profile("E8", 8, 64, serverless=False),
    Profile("E16", 16, 128, serverless=False),
    Profile("E32", 32, 256, serverless=False),
)}
# The types the templates' 'GPU' profile may have (infra/provision/*.bicep, `@allowed` on gpuProfileType).
GPU_PROFILE_TYPES = tuple(name for name, p in PROFILES.items() if p.gpu_count)
DEFAULT_PROFILE_TYPE = "Consumption-GPU-NC24-A100"

_BY_KEY = {name.lower(): p for name, p in PROFILES.items()}


def profile(type_name: str) -> Profile:
    """The profile of a type name, whatever its case: Azure took CONSUMPTION-GPU-NC8AS-T4 (Azure/azure-cli issue 30526)
    but refuses NC24_A100 as WorkloadProfileInvalidType, so '_' for '-' is not forgiven."""
    found = _BY_KEY.get(str(type_name).strip().lower())
    if found is None:
        raise ValueError(f"{type_name!r} is not a workload profile type tuneops knows; known types: "
                         f"{', '.join(PROFILES)}")
    return found


def parse_memory(memory: str) -> float:
    """'56Gi' -> 56.0. ACA takes memory in Gi only (e.g. '0.5Gi'); anything else is a ValueError."""
    m = _GI_RE.match(memory) if isinstance(memory, str) else None
    if not m:
        raise ValueError(f"memory must be in Gi, like '56Gi' or '0.5Gi', not {memory!r}")
    return float(m.group(1))


def format_memory(gib: float) -> str:
    return f"{gib:g}Gi"


def default_resources(type_name: str) -> tuple[float, str]:
    """The most one replica may ask for on the profile: what a job or app gets when CPU and MEMORY are not set."""
    p = profile(type_name)
    cpu, gib = p.allocations[-1] if p.allocations else (p.max_cpu, p.max_memory_gib)
    return float(cpu), format_memory(gib)


def fill_resources(type_name: str, cpu: float | None = None, memory: str | None = None) -> tuple[float, str]:
    """CPU and memory with an unset half filled in: on a profile of fixed pairs the partner, else the profile's most."""
    p = profile(type_name)
    default_cpu, default_memory = default_resources(type_name)
    if cpu is None and memory is None:
        return default_cpu, default_memory
    if p.allocations:
        if memory is None:
            memory = format_memory(dict(p.allocations).get(float(cpu), 2 * float(cpu)))
        elif cpu is None:
            gib = parse_memory(memory)
            cpu = {g: c for c, g in p.allocations}.get(gib, gib / 2)
    return (float(cpu) if cpu is not None else default_cpu), (memory if memory is not None else default_memory)


def check_resources(type_name: str, cpu: float, memory: str) -> str:
    """'' when one replica may ask for `cpu` and `memory` on the profile, else a one-line reason naming the limit.

    An unknown type is a ValueError (see `profile`)."""
    p = profile(type_name)
    try:
        gib = parse_memory(memory)
    except ValueError as e:
        return str(e)
    asked = f"asked {cpu:g} / {memory.strip()}"
    if cpu <= 0 or gib <= 0:
        return f"cpu and memory must be more than 0 on {p.type_name}; {asked}"
    if p.allocations:
        if (float(cpu), gib) not in p.allocations:
            low, high = p.allocations[0], p.allocations[-1]
            step = p.allocations[1][0] - low[0]
            return (f"{p.type_name} takes only cpu/memory pairs from {low[0]:g} / {format_memory(low[1])} to "
                    f"{high[0]:g} / {format_memory(high[1])} in steps of {step:g} vCPU, memory twice the cpu; {asked}")
        return ""
    if cpu > p.max_cpu or gib > p.max_memory_gib:
        return f"{p.limit}; {asked}"
    return ""


def check_workload_profile(wp: Mapping[str, Any]) -> str:
    """'' when a managedEnvironments `workloadProfiles` entry is one Azure takes, else a one-line reason; where Azure's
    own error is known the reason starts with its code.

    minimumCount/maximumCount: serverless types (Consumption, Consumption-GPU-*) refuse them with
    WorkloadProfilePropertyNotSupported (hashicorp/terraform-provider-azurerm issues 31763 and 31961, Azure/azure-cli
    issue 30526). Dedicated types may have them and need not: the API's WorkloadProfile schema requires only `name` and
    `workloadProfileType` (azure-rest-api-specs, Microsoft.App 2024-03-01 ManagedEnvironments.json)."""
    name, type_name = wp.get("name"), wp.get("workloadProfileType")
    if not name or not type_name:
        return "a workloadProfiles entry needs both name and workloadProfileType"
    try:
        p = profile(type_name)
    except ValueError:
        return (f"WorkloadProfileInvalidType: Workload profile type '{type_name}' is invalid "
                f"(known types: {', '.join(PROFILES)})")
    counts = {k: wp.get(k) for k in ("minimumCount", "maximumCount") if wp.get(k) is not None}
    if p.serverless:
        if counts:
            prop = "MinimumCount" if "minimumCount" in counts else "MaximumCount"
            return (f"WorkloadProfilePropertyNotSupported: Workload Profile property '{prop}' is not supported for "
                    f"{p.type_name.replace('-', '_')}")
        return ""
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{key} of workload profile {name!r} must be a whole number, 0 or more, not {value!r}"
    if len(counts) == 2 and counts["minimumCount"] > counts["maximumCount"]:
        return (f"minimumCount ({counts['minimumCount']}) of workload profile {name!r} is larger than its "
                f"maximumCount ({counts['maximumCount']})")
    return ""
