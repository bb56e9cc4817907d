"""GPU quota before spend: how much of the GPU quota for the job's workload profile the subscription (in the
environment's location) and the environment use, and what to do when it is zero or used up.

Two ARM lists answer it (Usages.json, API 2025-01-01): `Usages_List` (the subscription, per location) and
`ManagedEnvironmentUsages_List` (one environment). Each entry is a Usage with `name.value`, `name.localizedValue`,
`currentValue`, `limit`, `unit`. The REST examples show only core and environment counts; GPU entries carry names like
`SubscriptionConsumptionNCA100Gpus`, `SubscriptionConsumptionT4Gpus`, `SubscriptionNCA100Gpus` (subscription) and
`ManagedEnvironmentConsumptionNCA100Gpus`, `ManagedEnvironmentConsumptionT4Gpus` (environment), after Microsoft's
quota-request page (https://learn.microsoft.com/azure/container-apps/quota-requests). They are matched by the GPU model
and by serverless (Consumption-GPU-*) versus dedicated (NC*-A100), not by exact spelling, so a renamed entry still
counts. Pure functions first; `read_gpu_quota` does the two GETs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs.backends.aca import profiles
from jobs.backends.aca.clients import AzureClients
from jobs.backends.aca.errors import WHERE_TO_ASK, azure_call
from jobs.backends.aca.provision import read_environment
from jobs.backends.aca.resources import as_plain
from jobs.core.errors import BackendError, Hint


@dataclass(frozen=True)
class Usage:
    """One entry of a usages list."""

    name: str          # name.value, e.g. SubscriptionConsumptionNCA100Gpus
    label: str         # name.localizedValue
    current: float
    limit: float
    scope: str         # "subscription" | "environment"

    @property
    def remaining(self) -> float:
        return max(0.0, self.limit - self.current)


@dataclass(frozen=True)
class GpuProfile:
    """The job's workload profile: its name in the environment and its type; `gpu` is the GPU model ("" for none)."""

    name: str
    type: str
    gpu: str = ""
    serverless: bool = False


def gpu_profile(name: str, profile_type: str) -> GpuProfile:
    """What GPU a workload profile type has, from the profile table (jobs.backends.aca.profiles). Pure."""
    try:
        p = profiles.profile(profile_type)
    except ValueError:
        return GpuProfile(name, (profile_type or "").strip())
    return GpuProfile(name, p.type_name, p.gpu_model.upper(), serverless=p.serverless and bool(p.gpu_model))


def profile_type_of(environment: Mapping[str, Any], profile_name: str) -> str:
    """The type of the environment's workload profile `profile_name` ('' when it has none by that name). Pure."""
    for p in (environment.get("properties") or {}).get("workloadProfiles") or []:
        if p.get("name") == profile_name:
            return p.get("workloadProfileType") or p.get("workload_profile_type") or ""
    return ""


def _get(item: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if isinstance(item, Mapping) and item.get(k) is not None:
            return item[k]
    return default


def parse_usages(items: Iterable[Any], scope: str) -> list[Usage]:
    """Usage entries from a usages list: REST JSON (camelCase) or an SDK model's as_dict (snake_case). Pure."""
    out = []
    for item in items:
        item = as_plain(item) if not isinstance(item, Mapping) else item
        name = _get(item, "name") or {}
        value = str(_get(name, "value") or "")
        label = str(_get(name, "localizedValue", "localized_value") or value)
        try:
            current = float(_get(item, "currentValue", "current_value", default=0) or 0)
            limit = float(_get(item, "limit", default=0) or 0)
        except (TypeError, ValueError):
            continue
        if value or label:
            out.append(Usage(value or label, label, current, limit, scope))
    return out


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", (text or "").lower())


def gpu_usages(usages: Iterable[Usage], profile: GpuProfile) -> list[Usage]:
    """The entries that count the GPUs of `profile`: named for GPUs, for its model (A100 in NCA100) and for serverless
    (Consumption) or dedicated alike. Pure."""
    if not profile.gpu:
        return []
    model = _norm(profile.gpu)
    out = []
    for u in usages:
        for text in {_norm(u.name), _norm(u.label)}:
            if "gpu" in text and model in text and ("consumption" in text) == profile.serverless:
                out.append(u)
                break
    return out


def _n(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class GpuQuota:
    """The GPU quota that governs the job's runs, and what it means."""

    profile: GpuProfile
    location: str
    environment: str
    usages: tuple[Usage, ...] = ()           # the GPU entries found (subscription and environment)
    listed: tuple[str, ...] = ()             # every name Azure listed, for when none matched
    notes: tuple[str, ...] = field(default=())  # what could not be read

    @property
    def binding(self) -> Usage | None:
        """The entry with the least left (that is what stops a run first)."""
        return min(self.usages, key=lambda u: (u.remaining, u.limit), default=None)

    @property
    def state(self) -> str:
        """not_gpu | unknown | zero | used_up | ok."""
        if not self.profile.gpu:
            return "not_gpu"
        if not self.usages:
            return "unknown"
        if any(u.limit <= 0 for u in self.usages):
            return "zero"
        if any(u.remaining < 1 for u in self.usages):
            return "used_up"
        return "ok"

    @property
    def ok(self) -> bool:
        """Can a run get a GPU now (or needs none)? An unknown quota is not counted as a problem."""
        return self.state in ("ok", "not_gpu", "unknown")

    def _where(self) -> str:
        parts = []
        for u in sorted(self.usages, key=lambda u: u.scope != "subscription"):
            place = f"subscription in {self.location}" if u.scope == "subscription" else \
                f"environment {self.environment}"
            parts.append(f"{place}: {_n(u.current)} of {_n(u.limit)} ({u.name})")
        return "; ".join(parts)

    def line(self) -> str:
        """One line for a person: the numbers, and what to do when a run cannot get a GPU."""
        p = self.profile
        what = f"{p.gpu} GPU(s) for the workload profile {p.name} ({p.type})"
        notes = (" " + " ".join(self.notes)) if self.notes else ""
        state = self.state
        if state == "not_gpu":
            return (f"The job's workload profile {p.name} ({p.type or 'type unknown'}) has no GPU: no GPU quota is "
                    f"needed.{notes}")
        if state == "unknown":
            listed = ", ".join(self.listed[:8]) or "nothing"
            return (f"GPU quota: could not tell; Azure lists no usage for {what} in {self.location} or in the "
                    f"environment {self.environment} (it lists {listed}). Check the portal's Quotas (provider Azure "
                    f"Container Apps) or `az containerapp env list-usages`; if it is 0, {WHERE_TO_ASK}.{notes}")
        b = self.binding
        assert b is not None
        if state == "zero":
            return (f"GPU quota: 0 {what} ({self._where()}). Runs will not start until quota is granted: "
                    f"{WHERE_TO_ASK}.{notes}")
        if state == "used_up":
            return (f"GPU quota used up: {_n(b.current)} of {_n(b.limit)} {what} used ({self._where()}). A new run "
                    f"waits until a running one ends; for more at once, {WHERE_TO_ASK}.{notes}")
        return f"GPU quota: {_n(b.current)} of {_n(b.limit)} {what} used ({self._where()}).{notes}"


def assess(environment: Mapping[str, Any], profile_name: str, profile_type: str,
           subscription: Iterable[Usage], in_environment: Iterable[Usage], notes: Iterable[str] = ()) -> GpuQuota:
    """The GpuQuota of a profile from the two usage lists. Pure."""
    subscription, in_environment = list(subscription), list(in_environment)
    profile = gpu_profile(profile_name, profile_type or profile_type_of(environment, profile_name))
    found = gpu_usages(subscription, profile) + gpu_usages(in_environment, profile)
    return GpuQuota(profile, location_name(environment.get("location") or ""), str(environment.get("name") or ""),
                    tuple(found), tuple(u.name for u in subscription + in_environment), tuple(notes))


def location_name(location: str) -> str:
    """ARM's programmatic location name: "West US 3" (as a GET may give it) -> "westus3". Pure."""
    return re.sub(r"\s+", "", location or "").lower()


# ---- reading it from Azure ---------------------------------------------------------------------------------------

def read_gpu_quota(clients: AzureClients, environment: Mapping[str, Any] | None = None,
                   job: Mapping[str, Any] | None = None) -> GpuQuota:
    """The GPU quota for the job's workload profile (WORKLOAD_PROFILE_NAME), from both usage lists. One list that
    cannot be read (the subscription's needs a role at subscription scope) leaves a note; both failing raises."""
    cfg = clients.cfg
    environment = environment if environment is not None else read_environment(clients, job, "Reading the GPU quota")
    env_name = str(environment.get("name") or cfg.environment_name)
    # The environment says what type its profile WORKLOAD_PROFILE_NAME has; the config's WORKLOAD_PROFILE_TYPE (where
    # the config has the key; it is the type the Bicep template would give it) serves only when it does not say.
    profile_type = profile_type_of(environment, cfg.workload_profile) or getattr(cfg, "workload_profile_type", "")
    if not profile_type:
        names = [p.get("name") for p in (environment.get("properties") or {}).get("workloadProfiles") or []]
        raise BackendError(f"The environment {env_name} has no workload profile {cfg.workload_profile!r} (it has "
                           f"{', '.join(n for n in names if n) or 'none'}): set WORKLOAD_PROFILE_NAME in "
                           f"infra/finetuning.config.json.", hint=Hint("provision finetune"))
    if not gpu_profile(cfg.workload_profile, profile_type).gpu:
        return assess(environment, cfg.workload_profile, profile_type, [], [])
    location = location_name(environment.get("location") or "")
    lists: dict[str, list[Usage]] = {"subscription": [], "environment": []}
    errors: list[BackendError] = []
    notes = []
    reads = (("subscription", f"read the subscription's Container Apps usage in {location}",
              lambda: clients.arm.usages.list(location)),
             ("environment", f"read the usage of the environment {env_name}",
              lambda: clients.arm.managed_environment_usages.list(cfg.resource_group, env_name)))
    for scope, action, call in reads:
        try:
            with azure_call(action):
                lists[scope] = parse_usages(list(call()), scope)
        except BackendError as e:
            errors.append(e)
            notes.append(f"({e.reason})")
    if len(errors) == 2:
        raise errors[0]
    return assess(environment, cfg.workload_profile, profile_type, lists["subscription"], lists["environment"],
                  notes)
