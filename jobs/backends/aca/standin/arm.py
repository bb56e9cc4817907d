"""ARM for Container Apps: managed environments and their storages, jobs with start, executions and stop,
container apps with revision restart, long-running operations; and the executions' "containers"."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from jobs.backends.aca import profiles
from jobs.backends.aca.standin.common import (
    SUBSCRIPTION,
    _iso,
    _now,
    _rand,
)
from jobs.backends.aca.standin.programs import (
    ContainerContext,
    ExecutionPlan,
    simulated_trainer,
)


class ArmService:
    """The ARM endpoints of the stand-in; its state lives on AzureStandIn."""

    def _arm_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        prefix = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.App"
        app.router.add_route("*", prefix + "/managedEnvironments/{env}", self._arm(self.arm_environment))
        app.router.add_route("*", prefix + "/managedEnvironments/{env}/storages/{name}", self._arm(self.arm_env_storage))
        app.router.add_route("*", prefix + "/jobs/{job}", self._arm(self.arm_job))
        app.router.add_route("POST", prefix + "/jobs/{job}/start", self._arm(self.arm_job_start))
        app.router.add_route("POST", prefix + "/jobs/{job}/listSecrets", self._arm(self.arm_list_secrets))
        app.router.add_route("POST", prefix + "/containerApps/{app}/listSecrets", self._arm(self.arm_list_secrets))
        app.router.add_route("GET", prefix + "/jobs/{job}/executions", self._arm(self.arm_executions))
        app.router.add_route("GET", prefix + "/jobs/{job}/executions/{ex}", self._arm(self.arm_execution))
        app.router.add_route("POST", prefix + "/jobs/{job}/executions/{ex}/stop", self._arm(self.arm_stop))
        app.router.add_route("*", prefix + "/containerApps/{app}", self._arm(self.arm_app))
        app.router.add_route("POST", prefix + "/containerApps/{app}/revisions/{rev}/restart",
                             self._arm(self.arm_restart))
        app.router.add_route("GET", "/subscriptions/{sub}/providers/Microsoft.App/locations/{loc}/operations/{op}",
                             self._arm(self.arm_operation))
        self._usage_routes(app, prefix)
        return app

    def _arm(self, handler):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            early, body = await self._gate("arm", request)
            if early is not None:
                return early
            # ARM's answer to a request without a token, word for word as clients print it
            # (hashicorp/terraform-provider-azurerm#3612, Azure/azure-sdk-for-net#4103).
            if not request.headers.get("Authorization", "").startswith("Bearer "):
                return self._arm_error(401, "AuthenticationFailed",
                                       "Authentication failed. The 'Authorization' header is missing.")
            # Word for word as ARM answers it (MicrosoftDocs/feedback#2279, Azure/azure-sdk-for-go#22571).
            if "api-version" not in request.query:
                return self._arm_error(400, "MissingApiVersionParameter",
                                       "The api-version query parameter (?api-version=) is required for all requests.")
            # SubscriptionNotFound is ARM's code for it ("Troubleshoot common Azure deployment errors",
            # learn.microsoft.com/azure/azure-resource-manager/troubleshooting/common-deployment-errors); the message
            # is the stand-in's.
            if request.match_info.get("sub") not in (None, SUBSCRIPTION):
                return self._arm_error(404, "SubscriptionNotFound", f"subscription {request.match_info['sub']}")
            # A body ARM cannot deserialize is InvalidRequestContent (jobs.backends.aca.schema names its sources).
            try:
                data = json.loads(body) if body else None
            except json.JSONDecodeError:
                return self._arm_error(400, "InvalidRequestContent", "body is not JSON")
            refused = self._against_spec("arm", request, data)
            if refused is not None:
                return refused
            with self.lock:
                return handler(request, data)

        return wrapped

    def _lro(self, request: web.Request, result: dict | None, polls: int = 1, empty: bool = False) -> str:
        """A long-running operation's status URL, in the shape "Track asynchronous Azure operations"
        (learn.microsoft.com/azure/azure-resource-manager/management/async-operations) shows for it:
        /subscriptions/{sub}/providers/{namespace}/locations/{region}/operations/{operation-id}?api-version=...
        The path segment ACA itself uses there is not public; clients follow the header, whatever the path."""
        op = uuid.uuid4().hex
        self.operations[op] = {"polls": polls, "result": result, "empty": empty}
        host = f"{request.scheme}://{request.host}"
        return f"{host}/subscriptions/{SUBSCRIPTION}/providers/Microsoft.App/locations/{self.location}/operations/{op}" \
               f"?api-version={request.query['api-version']}"

    def arm_operation(self, request, data):
        """Polling, as "Track asynchronous Azure operations" describes both kinds: an Azure-AsyncOperation URL
        answers 200 with {"status": "InProgress"} until {"status": "Succeeded"} (status values as in the page and
        in AzureAsyncOperationResult: InProgress, Succeeded, Failed); a Location URL answers 202 (with Location)
        while the operation runs and 200 with the operation's result when it is done (the page's "Create storage
        account (202 with Location and Retry-After)" case; Jobs_Start's 200/202 in Jobs.json 2025-01-01)."""
        op = self.operations.get(request.match_info["op"])
        if op is None:
            # No public source for an unknown operation id's answer; kept because clients only poll ids they got.
            return self._arm_error(404, "ResourceNotFound", "no such operation")
        if op["polls"] > 0:
            op["polls"] -= 1
            if op["result"] is None and not op.get("empty"):
                return web.json_response({"status": "InProgress"})
            return web.Response(status=202, headers={"Location": str(request.url)})
        if op.get("empty"):
            return web.Response(status=200)
        if op["result"] is None:
            return web.json_response({"status": "Succeeded"})
        return web.json_response(op["result"])

    def arm_environment(self, request, data):
        env = self.environments.get(request.match_info["env"])
        if request.method != "GET":
            # No public source; kept because tuneops never writes an environment (the Bicep does) and a test that
            # tried would be wrong. MethodNotAllowed is the name jobs.backends.aca.schema uses for it.
            return self._arm_error(405, "MethodNotAllowed", "the stand-in's environments are read-only")
        if env is None:
            return self._arm_error(404, "ResourceNotFound", _not_found("managedEnvironments", request.match_info["env"],
                                                                 request.match_info["rg"]))
        return web.json_response(env)

    def arm_env_storage(self, request, data):
        key = (request.match_info["env"], request.match_info["name"])
        if key[0] not in self.environments:
            # ARM's code and message for a child of a missing parent ("Resolve errors for parent resources",
            # learn.microsoft.com/azure/azure-resource-manager/troubleshooting/error-parent-resource).
            return self._arm_error(404, "ParentResourceNotFound", "Can not perform requested operation on nested "
                                                                  f"resource. Parent resource '{key[0]}' not found.")
        if request.method == "GET":
            if key not in self.env_storages:
                return self._arm_error(404, "ResourceNotFound", f"storage {key[1]}")
            return web.json_response(self.env_storages[key])
        if request.method == "PUT":
            # ACA refuses an Azure Files storage without all four properties, with this code and message
            # (tfitzmac/resource-capabilities#9, Azure/azure-quickstart-templates#12880: "Must contain 'AccountName',
            # 'AccountKey', 'ShareName' and 'AccessMode' when setting Azure File Share Storage.").
            af = ((data or {}).get("properties") or {}).get("azureFile") or {}
            if not all(af.get(k) for k in ("accountName", "accountKey", "shareName", "accessMode")):
                return self._arm_error(400, "ManagedEnvironmentStorageAzureFilePropertyInvalidRequest",
                                       f"Invalid request body for managed environment storage '{key[1]}'. Must "
                                       f"contain 'AccountName', 'AccountKey', 'ShareName' and 'AccessMode' when "
                                       f"setting Azure File Share Storage.")
            # The answer is 200 (the only success ManagedEnvironmentsStorages_CreateOrUpdate lists, not a long-running
            # operation) without the accountKey: it is x-ms-secret (CommonDefinitions.json AzureFileProperties), which
            # "must not exist in response" (Azure/autorest docs/extensions/readme.md, x-ms-secret), as
            # examples/ManagedEnvironmentsStorages_CreateOrUpdate.json shows.
            stored = {"id": self._rid(f"managedEnvironments/{key[0]}/storages/{key[1]}"), "name": key[1],
                      "type": "Microsoft.App/managedEnvironments/storages",
                      "properties": {"azureFile": {k: v for k, v in af.items() if k != "accountKey"}}}
            self.env_storages[key] = stored
            self.add_share(af["shareName"])
            return web.json_response(stored)
        # No public source; kept because tuneops only reads and writes a storage (MethodNotAllowed as in schema.py).
        return self._arm_error(405, "MethodNotAllowed", request.method)

    def _resources_problem(self, env: dict, props: dict) -> str:
        """A job's or app's containers against their workload profile: Azure refuses what one replica may not ask
        for with ContainerAppInvalidResourceTotal (microsoft/azure-container-apps#1259, Azure/bicep-types-az#1924:
        "The total requested CPU and memory resources for this application (CPU: 4, memory: 8) is invalid"); the
        limits are the profile table's (jobs.backends.aca.profiles, each figure with its source)."""
        by_name = {wp["name"]: wp["workloadProfileType"] for wp in env["properties"]["workloadProfiles"]}
        type_name = by_name.get(props.get("workloadProfileName") or "Consumption", "Consumption")
        containers = (props.get("template") or {}).get("containers") or []
        try:
            cpu = sum(float((c.get("resources") or {}).get("cpu") or 0) for c in containers)
            gib = sum(profiles.parse_memory((c.get("resources") or {}).get("memory") or "0Gi") for c in containers)
        except (TypeError, ValueError) as e:
            return f"ContainerAppInvalidResourceTotal: {e}"
        why = profiles.check_resources(type_name, cpu, profiles.format_memory(gib))
        return (f"ContainerAppInvalidResourceTotal: The total requested CPU and memory resources for this application "
                f"(CPU: {cpu:g}, memory: {gib:g}) is invalid: {why}") if why else ""

    def _validate_job(self, body: dict, name: str = "") -> str:
        """What ACA refuses in a job, as "Code: message" (_code_and_message); a rule without a known code of
        Azure's is InvalidParameterValue. Each rule names its source."""
        props = body.get("properties") or {}
        # location is required: a Job is a TrackedResource (types.json v3, "required": ["location"]).
        if not body.get("location"):
            return "location is required"
        env_name = str(props.get("environmentId", "")).rsplit("/", 1)[-1]
        env = self.environments.get(env_name)
        if env is None:
            # ACA's code for an environment that is not there (Azure/container-apps-deploy-action#84:
            # "(ManagedEnvironmentNotFound)"); its message is not in the thread, so the stand-in's is kept.
            return (f"ManagedEnvironmentNotFound: environmentId {props.get('environmentId')!r} is not a managed "
                    f"environment")
        # workloadProfileName: "Workload profile name to pin for container apps job execution"
        # (CommonDefinitions.json WorkloadProfileName): one of the environment's. No public source for the
        # refusal's code or text; kept because a job pinned to no profile could not run.
        profiles = {p["name"] for p in env["properties"]["workloadProfiles"]}
        if props.get("workloadProfileName") and props["workloadProfileName"] not in profiles:
            return f"workload profile {props['workloadProfileName']!r} is not in the environment"
        # triggerType and replicaTimeout are JobConfiguration's required members (Jobs.json 2025-01-01); the spec
        # check (schema.py) refuses their absence first, with ARM's InvalidRequestContent.
        conf = props.get("configuration") or {}
        if conf.get("triggerType") not in ("Manual", "Schedule", "Event"):
            return "configuration.triggerType is required"
        if not isinstance(conf.get("replicaTimeout"), int):
            return "configuration.replicaTimeout is required"
        assigned = list(((body.get("identity") or {}).get("userAssignedIdentities") or {}).keys())
        identities = {i.lower() for i in assigned}
        if len(identities) < len(assigned):
            # Resource ids are case-insensitive (pulumi/pulumi-azure-native#2152); one identity listed twice in
            # two spellings is refused, as ARM refused such ids with InvalidIdentityValues
            # (hashicorp/terraform-provider-azurerm#10406).
            return "identity.userAssignedIdentities lists one identity twice (ids differ only in case)"
        secret_names = set()
        for s in conf.get("secrets") or []:
            # ACA's rule, code and text (Azure/container-apps-deploy-action#116, 2024: "(ContainerAppInvalidSecretName)
            # Secret name has an invalid value '...'. A value must consist of lower case alphanumeric characters,
            # '-', and must start and end with an alphanumeric character. The length must not be more than 253
            # characters."; older answers also allowed '.': microsoft/azure-container-apps#495).
            name = s.get("name", "")
            if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name) or len(name) > 253:
                return (f"ContainerAppInvalidSecretName: Secret name has an invalid value '{name}'. A value must "
                        f"consist of lower case alphanumeric characters, '-', and must start and end with an "
                        f"alphanumeric character. The length must not be more than 253 characters.")
            # A secret's value is given directly or as a Key Vault reference ("Manage secrets in Azure Container
            # Apps": "specified directly or as a reference to a secret stored in Azure Key Vault"). Neither is
            # refused with ContainerAppSecretInvalid (pulumi/pulumi-azure-native#2673, #2807: "Invalid Request:
            # Container app secret(s) with name(s) '...' are invalid: value or keyVaultUrl and identity should be
            # provided."). Both at once: no public source for a refusal; kept because it is read as either-or.
            has_value = s.get("value") is not None
            if not has_value and not s.get("keyVaultUrl"):
                return (f"ContainerAppSecretInvalid: Invalid Request: Container app secret(s) with name(s) '{name}' "
                        f"are invalid: value or keyVaultUrl and identity should be provided.")
            if has_value and s.get("keyVaultUrl"):
                return "a secret has either a value or a keyVaultUrl"
            # A Key Vault reference's identity is "Resource ID of a managed identity ..., or System to use a
            # system-assigned identity" (CommonDefinitions.json Secret; the docs write "system"), and it must be the
            # app's ("Manage secrets": "you must first enable managed identity in your container app"). ACA refuses
            # a reference it cannot resolve (InvalidParameterValueInContainerTemplate, microsoft/azure-container-apps
            # #1174, #930); the code for an identity not assigned is not public, so the stand-in's message is kept.
            identity = str(s.get("identity"))
            if s.get("keyVaultUrl") and identity.lower() not in identities and identity.lower() != "system":
                return f"secret {name}: identity {s.get('identity')!r} is not assigned to the job"
            secret_names.add(name)
        template = props.get("template") or {}
        containers = template.get("containers") or []
        # At least one container with a name and an image: no public source for the job refusal's code or text
        # (an app's create is refused with ContainerAppCreateMustCont..., cut off in microsoft/azure-container-apps
        # #194); kept because a job without one could not run.
        if not containers or not all(c.get("image") and c.get("name") for c in containers):
            return "template.containers needs at least one container with a name and an image"
        too_much = self._resources_problem(env, props)
        if too_much:
            return too_much
        # An AzureFile volume names a storage of the environment; ACA refuses another with
        # ManagedEnvironmentStorageNotFound (DFE-Digital/terraform-azurerm-container-apps-hosting#281: "Storage ...
        # not found under managed environment").
        volumes = {v["name"]: v for v in template.get("volumes") or []}
        for v in volumes.values():
            if v.get("storageType") == "AzureFile" and (env_name, v.get("storageName")) not in self.env_storages:
                return (f"ManagedEnvironmentStorageNotFound: Storage {v.get('storageName')} not found under "
                        f"managed environment")
        for c in containers:
            # secretRef is "Name of the Container App secret from which to pull the environment variable value"
            # (CommonDefinitions.json EnvironmentVar); a name that is not a secret is refused ("SecretRef '...'
            # defined for container '...' not found.", pulumi/pulumi-azure-native#1715; its code is not given).
            for e in c.get("env") or []:
                if e.get("secretRef") and e["secretRef"] not in secret_names:
                    return f"SecretRef '{e['secretRef']}' defined for container '{c.get('name')}' not found."
            # volumeName "must match the Name of a Volume" (CommonDefinitions.json VolumeMount); ACA's refusal
            # (MicrosoftDocs/azure-docs#103756: "(ContainerAppInvalidVolumeMount) Invalid Request: Volume '...' to
            # mount doesn't defined in the Container App '...'.", its typo included).
            for m in c.get("volumeMounts") or []:
                if m.get("volumeName") not in volumes:
                    return (f"ContainerAppInvalidVolumeMount: Invalid Request: Volume '{m.get('volumeName')}' to mount "
                            f"doesn't defined in the Container App '{name}'.")
        return ""

    def arm_job(self, request, data):
        name = request.match_info["job"]
        rg = request.match_info["rg"]
        if request.method == "GET":
            job = self.jobs.get(name)
            if job is None:
                return self._arm_error(404, "ResourceNotFound", _not_found("jobs", name, rg))
            return web.json_response(self._without_values(job))
        if request.method == "PUT":
            problem = self._validate_job(data or {}, name)
            if problem:
                return self._arm_error(400, *_code_and_message(problem))
            # Jobs_CreateOrUpdate answers 201 for a new job and 200 for an update (Jobs.json 2025-01-01), as a
            # long-running operation that ends via its Azure-AsyncOperation URL ("final-state-via":
            # "azure-async-operation"); the answer shows provisioningState InProgress (examples/Job_CreateorUpdate.json,
            # both answers). The stand-in's operation is done after one poll, so the stored job is Succeeded.
            created = name not in self.jobs
            job = json.loads(json.dumps(data))
            job.update(id=self._rid(f"jobs/{name}", rg), name=name, type="Microsoft.App/jobs")
            job["properties"]["provisioningState"] = "Succeeded"
            job = self.jobs[name] = _as_azure_keeps(job)
            self.executions.setdefault(name, {})
            url = self._lro(request, None, polls=1)
            answer = self._without_values(job)
            answer["properties"]["provisioningState"] = "InProgress"
            return web.json_response(answer, status=201 if created else 200, headers={"Azure-AsyncOperation": url})
        if request.method == "PATCH":
            # Jobs_Update "Patches a Container Apps Job using JSON Merge Patch" (Jobs.json, Microsoft.App 2025-01-01):
            # RFC 7386, objects merge, arrays and values replace, null removes. It answers 200 with the Job.
            job = self.jobs.get(name)
            if job is None:
                return self._arm_error(404, "ResourceNotFound", _not_found("jobs", name, rg))
            merged = _merge_patch(job, data or {})
            problem = self._validate_job(merged, name)
            if problem:
                return self._arm_error(400, *_code_and_message(problem))
            merged = self.jobs[name] = _as_azure_keeps(merged)
            return web.json_response(self._without_values(merged))
        # DELETE is not among the operations kept in restspec/ (the spec check refuses it first); MethodNotAllowed
        # for the rest is schema.py's name for it, with no recorded answer behind it.
        return self._arm_error(405, "MethodNotAllowed", request.method)

    @staticmethod
    def _without_values(resource: dict) -> dict:
        """ARM's GET leaves secret values out; listSecrets gives them. Secret.value is x-ms-secret
        (CommonDefinitions.json), and "Secrets should never expose on a GET. If a secret does need to be returned
        after the fact, a POST api can be used" (Azure/autorest docs/extensions/readme.md, x-ms-secret): here
        Jobs_ListSecrets and ContainerApps_ListSecrets (Jobs.json, ContainerApps.json 2025-01-01)."""
        out = json.loads(json.dumps(resource))
        for sec in ((out.get("properties") or {}).get("configuration") or {}).get("secrets") or []:
            sec.pop("value", None)
        return out

    def arm_list_secrets(self, request, data):
        # POST .../listSecrets answers {"value": [Secret...]} with the values (JobSecretsCollection in Jobs.json,
        # SecretsCollection in ContainerApps.json; examples/Job_ListSecrets.json); a Key Vault reference comes back
        # as its name, keyVaultUrl and identity (ContainerAppSecret's members).
        if "job" in request.match_info:
            res = self.jobs.get(request.match_info["job"])
        else:
            res = self.apps.get(request.match_info["app"])
        if res is None:
            return self._arm_error(404, "ResourceNotFound", "no such resource")  # ARM's code; message the stand-in's
        secrets = (res["properties"].get("configuration") or {}).get("secrets") or []
        return web.json_response({"value": [dict(s) for s in secrets]})

    def arm_job_start(self, request, data):
        name = request.match_info["job"]
        job = self.jobs.get(name)
        if job is None:
            return self._arm_error(404, "ResourceNotFound", _not_found("jobs", name, request.match_info["rg"]))
        base = job["properties"]["template"]
        if data:
            # A start template replaces the job's containers for this execution (Jobs_Start, Jobs.json 2025-01-01)
            # and brings no volumes: JobExecutionTemplate has none, and executions started with an override lost the
            # job's volumes (microsoft/azure-container-apps#909, #1044). Built from the start body alone.
            template, volumes = data, []
        else:
            template = {"containers": base["containers"], "initContainers": base.get("initContainers")}
            volumes = base.get("volumes") or []
        if not template.get("containers"):
            # No public source for this refusal's code or text; kept because an execution needs a container.
            return self._arm_error(400, "InvalidParameterValue", "template.containers is empty")
        # An execution is named after its job with a 7-letter suffix ("testcontainerappsjob0-pjxhsye" in
        # examples/Job_Start.json) and starts Processing (JobExecution's status enum in Jobs.json 2025-01-01:
        # Running, Processing, Stopped, Degraded, Failed, Unknown, Succeeded).
        ex_name = f"{name}-{_rand(7)}"
        ex = {"id": self._rid(f"jobs/{name}/executions/{ex_name}", request.match_info["rg"]), "name": ex_name,
              "type": "Microsoft.App/jobs/executions",
              "properties": {"status": "Processing", "startTime": _iso(_now()), "endTime": None,
                             "template": _execution_template(template)}}
        self.executions.setdefault(name, {})[ex_name] = ex
        # What the execution's container mounts: fixed at the start, whatever the job's template becomes later.
        mounts = (template["containers"][0].get("volumeMounts") or []) if not data else []
        self.execution_mounts[ex_name] = (job["properties"]["environmentId"], json.loads(json.dumps(volumes)),
                                          json.loads(json.dumps(mounts)))
        plan = self.plans.pop(0) if self.plans else self.default_plan
        self._launch(job, ex, plan)
        # Jobs_Start answers 202 with a Location header and no body (examples/Job_Start.json); the long-running
        # operation ends on the Location, final-state-via location. Its final answer carries the JobExecutionBase,
        # or nothing when `start_answers_name` is off: then the SDK's poller gives None.
        url = self._lro(request, {"name": ex_name, "id": ex["id"]} if self.start_answers_name else None, polls=1,
                        empty=not self.start_answers_name)
        return web.Response(status=202, headers={"Location": url})

    def arm_executions(self, request, data):
        name = request.match_info["job"]
        if name not in self.jobs:
            return self._arm_error(404, "ResourceNotFound", f"job {name}")
        # JobsExecutions_List: {"value": [JobExecution...]} (ContainerAppJobExecutions, Jobs.json 2025-01-01;
        # examples/Job_Executions_Get.json). Newest first: "Create a job with Azure Container Apps"
        # (MicrosoftDocs/azure-docs articles/container-apps/jobs-get-started-cli.md) takes the most recent execution
        # as `az containerapp job executionhistory ... --query "[0].name"`.
        items = sorted(self.executions.get(name, {}).values(), key=lambda e: e["properties"]["startTime"], reverse=True)
        return web.json_response({"value": items})

    def arm_execution(self, request, data):
        # JobExecution (Jobs.json 2025-01-01; examples/Job_Execution_Get.json): name, id, type, and status,
        # startTime, endTime and template under properties.
        ex = self.executions.get(request.match_info["job"], {}).get(request.match_info["ex"])
        if ex is None:
            return self._arm_error(404, "ResourceNotFound", f"execution {request.match_info['ex']}")
        return web.json_response(ex)

    def arm_stop(self, request, data):
        ex = self.executions.get(request.match_info["job"], {}).get(request.match_info["ex"])
        if ex is None:
            return self._arm_error(404, "ResourceNotFound", f"execution {request.match_info['ex']}")
        stop = self._stop_events.get(ex["name"])
        if ex["properties"]["status"] in ("Running", "Processing"):
            self._stopped.add(ex["name"])
            if stop is not None:
                stop.set()
        # Jobs_StopExecution answers 200 with no body, or 202 with a Location (Jobs.json 2025-01-01;
        # examples/Job_Stop_Execution.json); the stand-in stops at once, so 200. A stop of an execution that has
        # already ended answers 200 too: no public source found; kept because the stop is then a no-op.
        return web.Response(status=200)

    def arm_app(self, request, data):
        name = request.match_info["app"]
        if request.method == "GET":
            app = self.apps.get(name)
            if app is None:
                return self._arm_error(404, "ResourceNotFound",
                                       _not_found("containerApps", name, request.match_info["rg"]))
            return web.json_response(self._without_values(app))
        if request.method == "PUT":
            props = (data or {}).get("properties") or {}
            env_name = str(props.get("environmentId", "")).rsplit("/", 1)[-1]
            env = self.environments.get(env_name)
            if env is None:
                # ManagedEnvironmentNotFound, as for a job (Azure/container-apps-deploy-action#84).
                return self._arm_error(400, "ManagedEnvironmentNotFound", "environmentId is not a managed environment")
            template = props.get("template") or {}
            if not template.get("containers"):
                # No public source for the code (microsoft/azure-container-apps#194 shows a "ContainerAppCreateMust..."
                # code cut off); kept because an app needs a container.
                return self._arm_error(400, "InvalidParameterValue", "template.containers is empty")
            too_much = self._resources_problem(env, props)
            if too_much:
                return self._arm_error(400, *_code_and_message(too_much))
            # A new revision only when the template changes ("Revisions in Azure Container Apps",
            # MicrosoftDocs/azure-docs articles/container-apps/revisions.md: "Any change that affects the template
            # section" creates one; changes outside it do not). Its name is the app's, "--" and a suffix
            # (Template.revisionSuffix, "appended to the revision name", CommonDefinitions.json; app names may not
            # contain "--", MicrosoftDocs/azure-docs#95762 quoting ACA's refusal). The random 7-letter suffix is the
            # stand-in's.
            old = self.apps.get(name)
            revision = (old or {}).get("properties", {}).get("latestRevisionName")
            if old is None or old["properties"].get("template") != template:
                revision = f"{name}--{_rand(7)}"
            app = json.loads(json.dumps(data))
            app.update(id=self._rid(f"containerApps/{name}", request.match_info["rg"]), name=name,
                       type="Microsoft.App/containerApps")
            p = app["properties"]
            p["provisioningState"] = "Succeeded"
            p["latestRevisionName"] = p["latestReadyRevisionName"] = revision
            # fqdn: the app's name under the environment's default domain (examples/ContainerApps_Get.json:
            # "testcontainerapp0.demokube-t24clv0g.eastus.containerApps.k4apps.io").
            ingress = (p.get("configuration") or {}).get("ingress")
            if ingress:
                ingress["fqdn"] = f"{name}.{env['properties']['defaultDomain']}"
            app = self.apps[name] = _as_azure_keeps(app)
            # ContainerApps_CreateOrUpdate: 201 new, 200 update, final-state-via azure-async-operation
            # (ContainerApps.json 2025-01-01); its example answers show provisioningState Succeeded.
            url = self._lro(request, None, polls=1)
            return web.json_response(self._without_values(app), status=201 if old is None else 200,
                                     headers={"Azure-AsyncOperation": url})
        # No public source; kept because tuneops only reads and writes the app (MethodNotAllowed as in schema.py).
        return self._arm_error(405, "MethodNotAllowed", request.method)

    def arm_restart(self, request, data):
        # ContainerAppsRevisions_RestartRevision answers 200 with no body (examples/Revisions_Restart.json). The
        # stand-in keeps only the latest revision, so an older one is a 404: a simplification, no public source.
        app = self.apps.get(request.match_info["app"])
        rev = request.match_info["rev"]
        if app is None or app["properties"].get("latestRevisionName") != rev:
            return self._arm_error(404, "ResourceNotFound", f"revision {rev}")
        self.restarts.append(rev)
        return web.Response(status=200)

    # ---- executions: the "container" -------------------------------------------------------------------------

    def _console(self, job: str, execution: str) -> Callable[[str], None]:
        """A container's console lines, as Log Analytics keeps them. Tables and columns: ContainerAppConsoleLogs_CL
        with Log_s ("Monitor logs in Azure Container Apps with Log Analytics", MicrosoftDocs/azure-docs
        articles/container-apps/log-monitoring.md) and ContainerGroupName_s, a replica's name that starts with its
        execution's ("Create a job with Azure Container Apps", jobs-get-started-cli.md: "where ContainerGroupName_s
        startswith '$JOB_EXECUTION_NAME'"); ContainerAppConsoleLogs with JobName, ContainerGroupName, Log and
        Stream (Azure Monitor table reference, MicrosoftDocs/azure-reference-other
        azure-monitor-ref/tables/includes/containerappconsolelogs-include.md). ContainerJobName_s and Stream_s: no
        Microsoft page found that lists them (the log-monitoring.md version read lists ContainerAppName_s,
        ContainerGroupName_g, Log_s and others); public queries against real workspaces filter on
        ContainerJobName_s (found by code search, repositories not named there); kept because tuneops' queries use
        it, as the _CL spelling of the Azure Monitor table's JobName."""
        group = f"{execution}-{_rand(5)}"

        def console(line: str) -> None:
            with self.lock:
                # Strictly increasing times, as a container's lines are in order; ties would make ordering arbitrary.
                t = max(_now(), self._last_log_time + dt.timedelta(microseconds=1))
                self._last_log_time = t
                if self.log_schema == "custom":
                    self.log_tables["ContainerAppConsoleLogs_CL"].append(
                        {"TimeGenerated": t, "ContainerJobName_s": job, "ContainerGroupName_s": group, "Log_s": line,
                         "Stream_s": "stdout"})
                else:
                    self.log_tables["ContainerAppConsoleLogs"].append(
                        {"TimeGenerated": t, "JobName": job, "ContainerGroupName": group, "Log": line,
                         "Stream": "stdout"})

        return console

    def _resolve_env(self, job: dict, container: dict) -> tuple[dict[str, str], str]:
        """The container's env: secretRef entries take their secret's value, a Key Vault reference the latest
        version of its vault secret ("Manage secrets in Azure Container Apps": "If a version isn't specified in
        the URI, then the app uses the latest version that exists in the key vault"). The stand-in resolves at the
        execution's start; Azure's 30-minute refresh of references does not matter to an execution."""
        secrets = {s["name"]: s for s in job["properties"]["configuration"].get("secrets") or []}
        env: dict[str, str] = {}
        for e in container.get("env") or []:
            if "secretRef" in e and e["secretRef"]:
                s = secrets.get(e["secretRef"])
                if s is None:
                    return {}, f"secret {e['secretRef']} not found"
                if s.get("keyVaultUrl"):
                    vault_name = s["keyVaultUrl"].rstrip("/").split("/secrets/", 1)[-1].split("/")[0]
                    versions = self.vault.get(vault_name)
                    if not versions:
                        return {}, f"Key Vault secret {vault_name} not found"
                    env[e["name"]] = versions[-1]["value"]
                else:
                    env[e["name"]] = s.get("value") or ""
            else:
                env[e["name"]] = e.get("value", "")
        return env, ""

    def _mount_dir(self, execution: str) -> Path | None:
        """The share folder the execution's container has at /mount, from the volumes fixed at its start."""
        env_id, volumes, mounts = self.execution_mounts.get(execution, ("", [], []))
        by_name = {v["name"]: v for v in volumes}
        for m in mounts:
            v = by_name.get(m.get("volumeName"))
            if m.get("mountPath") == "/mount" and v and v.get("storageType") == "AzureFile":
                storage = self.env_storages.get((env_id.rsplit("/", 1)[-1], v["storageName"]))
                if storage:
                    return self.add_share(storage["properties"]["azureFile"]["shareName"])
        return None

    def _launch(self, job: dict, ex: dict, plan: ExecutionPlan) -> None:
        stop = threading.Event()
        self._stop_events[ex["name"]] = stop
        self._stops.append(stop)
        job_name = job["name"]
        timeout = job["properties"]["configuration"]["replicaTimeout"]

        # An execution goes Processing, Running, then Succeeded (exit code 0), Failed (another code, or a replica
        # that ran past replicaTimeout: "The maximum time in seconds to wait for a replica to complete", "Jobs in
        # Azure Container Apps", MicrosoftDocs/azure-docs articles/container-apps/jobs.md) or Stopped
        # (Jobs_StopExecution); the statuses are JobExecution's enum (Jobs.json 2025-01-01). Retries
        # (replicaRetryLimit) are not modelled.
        # The reasons kept in execution_outcome (ContainerCreateFailure, DeadlineExceeded, BackoffLimitExceeded) never
        # reach a client; no public ACA source names them; kept as labels for the tests (the last two are Kubernetes
        # Job condition reasons, kubernetes.io "Jobs").

        def finish(status: str, reason: str = "", message: str = "") -> None:
            with self.lock:
                p = ex["properties"]
                if ex["name"] in self._stopped:
                    status, reason = "Stopped", ""
                p["status"] = plan.final_status or status
                p["endTime"] = _iso(_now())
                # An execution tells its status, start and end only (examples/Job_Execution_Get.json, JobExecution
                # in Jobs.json 2025-01-01): why it failed is kept here, for the tests, not in the answer.
                self.execution_outcome[ex["name"]] = {"reason": plan.reason or reason, "message": message}

        def run() -> None:
            if stop.wait(plan.processing_s):
                finish("Stopped")
                return
            container = ex["properties"]["template"]["containers"][0]
            with self.lock:
                env, problem = self._resolve_env(job, container)
                mount = self._mount_dir(ex["name"])
                ex["properties"]["status"] = "Running"
            console = self._console(job_name, ex["name"])
            if problem or mount is None:
                console(problem or "no share mounted at /mount")
                finish("Failed", "ContainerCreateFailure", problem or "no volume mounted at /mount")
                return
            with self.lock:
                self.execution_env[ex["name"]] = env
            ctx = ContainerContext(mount=mount, env=env, command=list(container.get("command") or []) +
                                   list(container.get("args") or []), stop=stop, console=console)
            result: dict[str, int] = {}
            worker = threading.Thread(target=lambda: result.setdefault("code", (plan.program or simulated_trainer())(ctx)),
                                      daemon=True)
            worker.start()
            worker.join(timeout)
            if worker.is_alive():
                stop.set()
                worker.join(10)
                finish("Failed", "DeadlineExceeded", f"replica timed out after {timeout}s")
                return
            code = result.get("code", 1)
            finish("Succeeded" if code == 0 else "Failed", "" if code == 0 else "BackoffLimitExceeded",
                   "" if code == 0 else f"container exited with code {code}")

        t = threading.Thread(target=run, name=f"execution-{ex['name']}", daemon=True)
        self._threads.append(t)
        t.start()



def _merge_patch(target, patch):
    """RFC 7386 JSON Merge Patch."""
    if not isinstance(patch, dict):
        return json.loads(json.dumps(patch))
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


_EXECUTION_CONTAINER_KEYS = ("image", "name", "command", "args", "env", "resources")


def _execution_template(template: dict) -> dict:
    """A JobExecutionTemplate (Jobs.json 2025-01-01): containers and initContainers with only image, name, command,
    args, env and resources (no volume mounts, no probes)."""
    out = {}
    for key in ("containers", "initContainers"):
        if template.get(key):
            out[key] = [{k: json.loads(json.dumps(c[k])) for k in _EXECUTION_CONTAINER_KEYS if k in c}
                        for c in template[key]]
    return out


def _as_azure_keeps(resource: dict) -> dict:
    """A job or app as ARM stores it and gives it back, not as it was sent:
    - user-assigned identity ids come back in lower case, with the identity's principal and client ids filled in
      (Azure/azure-rest-api-specs#18595: "userAssignedIdentities are returned in lower case"; the resource group
      segment as `resourcegroups`: pulumi/pulumi-azure-native#2152);
    - each container's resources come back with ephemeralStorage, a read-only field;
    - an app's ingress comes back with `transport: "auto"` in lower case and `allowInsecure` filled in
      (examples/ContainerApps_Get.json, Microsoft.App 2025-01-01; Azure/terraform-azurerm-avm-res-app-containerapp#88
      on the drift these defaults cause), and with `managedEnvironmentId` beside `environmentId` (same example)."""
    out = json.loads(json.dumps(resource))
    identity = out.get("identity") or {}
    if identity.get("userAssignedIdentities"):
        identity["userAssignedIdentities"] = {
            k.lower(): {"principalId": str(uuid.uuid5(uuid.NAMESPACE_URL, k.lower())),
                        "clientId": str(uuid.uuid5(uuid.NAMESPACE_URL, "client:" + k.lower()))}
            for k in identity["userAssignedIdentities"]}
    props = out.get("properties") or {}
    # Each container's resources come back with ephemeralStorage, which "can only be populated by the server"
    # (ContainerResources, @azure/arm-appcontainers; readOnly in CommonDefinitions.json).
    for c in (props.get("template") or {}).get("containers") or []:
        if isinstance(c.get("resources"), dict):
            c["resources"].setdefault("ephemeralStorage", "1Gi")
    ingress = (props.get("configuration") or {}).get("ingress")
    if out.get("type") == "Microsoft.App/containerApps":
        props["managedEnvironmentId"] = props.get("environmentId")
        if ingress is not None:
            ingress["transport"] = str(ingress.get("transport") or "auto").lower()
            ingress.setdefault("allowInsecure", False)
    return out


def _not_found(resource_type: str, name: str, rg: str) -> str:
    """ARM's ResourceNotFound message, word for word as `az` prints it (microsoft/azure-container-apps#1112: "The
    Resource 'Microsoft.App/managedEnvironments/...' under resource group '...' was not found. For more details
    please go to https://aka.ms/ARMResourceNotFoundFix")."""
    return (f"The Resource 'Microsoft.App/{resource_type}/{name}' under resource group '{rg}' was not found. For more "
            f"details please go to https://aka.ms/ARMResourceNotFoundFix")


def _code_and_message(problem: str) -> tuple[str, str]:
    """'Code: message' -> (code, message); a problem without Azure's code of its own is InvalidParameterValue
    (no public source names ACA's code for those rules; kept as ARM's generic name for a bad parameter value)."""
    code, sep, message = problem.partition(": ")
    if sep and re.fullmatch(r"[A-Z][A-Za-z]+", code):
        return code, message
    return "InvalidParameterValue", problem
