"""The ACA usages APIs: how much of a quota the subscription (per location) and an environment use.

Shapes and paths: Azure/azure-rest-api-specs, specification/app/resource-manager/Microsoft.App/stable/2025-01-01/
Usages.json (operations Usages_List and ManagedEnvironmentUsages_List, both a ListUsagesResult of Usage items with
`unit`, `currentValue`, `limit`, `name.value`, `name.localizedValue`) and its examples Usages_List.json and
ManagedEnvironmentUsages_List.json, whose entries are the defaults here. The examples show no GPU entries; tests add
them with `set_usage` under the names in `GPU_USAGE_NAMES`.
"""

from __future__ import annotations

import copy

from aiohttp import web

# The examples' entries, exactly (examples/Usages_List.json, examples/ManagedEnvironmentUsages_List.json).
EXAMPLE_LOCATION_USAGES = (
    {"currentValue": 5, "limit": 10, "name": {"localizedValue": "ManagedEnvironmentCount",
                                              "value": "ManagedEnvironmentCount"}, "unit": "Count"},
    {"currentValue": 3, "limit": 20, "name": {"localizedValue": "ManagedEnvironmentCores",
                                              "value": "ManagedEnvironmentCores"}, "unit": "Count"},
)
EXAMPLE_ENVIRONMENT_USAGES = (
    {"currentValue": 0.5, "limit": 10, "name": {"localizedValue": "Managed Environment Consumption Cores",
                                                "value": "ManagedEnvironmentConsumptionCores"}, "unit": "Count"},
)

# GPU quota names, which the REST examples do not show. Localized names: Microsoft's "Request quota changes for Azure
# Container Apps" (MicrosoftDocs/azure-docs, articles/container-apps/quota-requests.md at commit b0a4167, 2025-04-29,
# lists "Subscription consumption NCA 100 GPUs", "Subscription consumption T 4 GPUs" and "Subscription NCA 100 GPUs";
# a later version, as https://learn.microsoft.com/ja-jp/azure/container-apps/quota-requests shows it, adds the
# environment-scoped "managed environment consumption NCA100 GPUs" and "... T4 GPUs" as manual requests). The `value`
# spellings: `az containerapp env
# list-usages` output quoted in a public deployment runbook ("ManagedEnvironmentConsumptionNCA100Gpus 0/2"), and the
# quota types a public Container Apps quota-request tool enumerates (SubscriptionNCA100Gpus,
# SubscriptionConsumptionNCA100Gpus, SubscriptionConsumptionT4Gpus, ManagedEnvironmentConsumptionNCA100Gpus,
# ManagedEnvironmentConsumptionT4Gpus); both found by public code search, their repositories not named there.
GPU_USAGE_NAMES = {
    "SubscriptionConsumptionNCA100Gpus": "Subscription Consumption NCA100 GPUs",
    "SubscriptionConsumptionT4Gpus": "Subscription Consumption T4 GPUs",
    "SubscriptionNCA100Gpus": "Subscription NCA100 GPUs",
    "ManagedEnvironmentConsumptionNCA100Gpus": "Managed Environment Consumption NCA100 GPUs",
    "ManagedEnvironmentConsumptionT4Gpus": "Managed Environment Consumption T4 GPUs",
}


class UsagesService:
    """The usages endpoints of the stand-in, registered on the ARM app. Its state (usage entries per location and
    per environment) is made on first use."""

    def _usage_routes(self, app: web.Application, prefix: str) -> None:
        """Add the usages routes to the ARM app (`prefix` is the resource group's Microsoft.App path)."""
        # Usages_List is a subscription-level path (no resource group): Usages.json.
        app.router.add_route("GET", "/subscriptions/{sub}/providers/Microsoft.App/locations/{loc}/usages",
                             self._arm(self.arm_location_usages))
        # ManagedEnvironmentUsages_List: Usages.json.
        app.router.add_route("GET", prefix + "/managedEnvironments/{env}/usages", self._arm(self.arm_env_usages))

    # ---- state ----------------------------------------------------------------------------------------------------

    def _usages(self) -> dict[str, dict[str, dict]]:
        """scope ("location:<loc>" or "environment:<name>") -> usage name -> Usage; made lazily."""
        state = self.__dict__.get("_usage_state")
        if state is None:
            state = self.__dict__["_usage_state"] = {}
        return state

    def _scope(self, scope: str) -> dict[str, dict]:
        table = self._usages()
        if scope not in table:
            defaults = EXAMPLE_LOCATION_USAGES if scope.startswith("location:") else EXAMPLE_ENVIRONMENT_USAGES
            table[scope] = {u["name"]["value"]: copy.deepcopy(u) for u in defaults}
        return table[scope]

    def set_usage(self, name: str, current: float, limit: float, *, environment: str = "", location: str = "",
                  localized: str = "") -> None:
        """Set one usage entry: the location's (the stand-in's own by default), or `environment`'s when given."""
        scope = f"environment:{environment}" if environment else f"location:{location or self.location}"
        label = localized or GPU_USAGE_NAMES.get(name, name)
        with self.lock:
            self._scope(scope)[name] = {"currentValue": current, "limit": limit,
                                        "name": {"localizedValue": label, "value": name}, "unit": "Count"}

    # ---- handlers (called under self.lock by ArmService._arm) ------------------------------------------------

    def arm_location_usages(self, request, data):
        loc = request.match_info["loc"]
        if loc.lower().replace(" ", "") != self.location:
            # The stand-in has resources in its one location only: elsewhere the list (Usages.json
            # ListUsagesResult) has no items.
            return web.json_response({"value": []})
        return web.json_response({"value": list(copy.deepcopy(self._scope(f"location:{self.location}")).values())})

    def arm_env_usages(self, request, data):
        env = request.match_info["env"]
        if env not in self.environments:
            # As the environment's own GET answers (arm_environment): ARM's 404 ResourceNotFound.
            return self._arm_error(404, "ResourceNotFound", f"managed environment {env}")
        return web.json_response({"value": list(copy.deepcopy(self._scope(f"environment:{env}")).values())})
