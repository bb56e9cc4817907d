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
            if not request.headers.get("Authorization", "").startswith("Bearer "):
                return self._arm_error(401, "AuthenticationFailed", "no bearer token")
            if "api-version" not in request.query:
                return self._arm_error(400, "MissingApiVersionParameter", "api-version is required")
            if request.match_info.get("sub") not in (None, SUBSCRIPTION):
                return self._arm_error(404, "SubscriptionNotFound", f"subscription {request.match_info['sub']}")
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
        op = uuid.uuid4().hex
        self.operations[op] = {"polls": polls, "result": result, "empty": empty}
        host = f"{request.scheme}://{request.host}"
        return f"{host}/subscriptions/{SUBSCRIPTION}/providers/Microsoft.App/locations/{self.location}/operations/{op}" \
               f"?api-version={request.query['api-version']}"

    def arm_operation(self, request, data):
        op = self.operations.get(request.match_info["op"])
        if op is None:
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
            return self._arm_error(405, "MethodNotAllowed", "the stand-in's environments are read-only")
        if env is None:
            return self._arm_error(404, "ResourceNotFound", f"managed environment {request.match_info['env']}")
        return web.json_response(env)

    def arm_env_storage(self, request, data):
        key = (request.match_info["env"], request.match_info["name"])
        if key[0] not in self.environments:
            return self._arm_error(404, "ParentResourceNotFound", f"managed environment {key[0]}")
        if request.method == "GET":
            if key not in self.env_storages:
                return self._arm_error(404, "ResourceNotFound", f"storage {key[1]}")
            return web.json_response(self.env_storages[key])
        if request.method == "PUT":
            af = ((data or {}).get("properties") or {}).get("azureFile") or {}
            if not af.get("accountName") or not af.get("shareName") or not af.get("accountKey"):
                return self._arm_error(400, "InvalidParameterValue", "azureFile needs accountName, accountKey, shareName")
            stored = {"id": self._rid(f"managedEnvironments/{key[0]}/storages/{key[1]}"), "name": key[1],
                      "type": "Microsoft.App/managedEnvironments/storages",
                      "properties": {"azureFile": {k: v for k, v in af.items() if k != "accountKey"}}}
            self.env_storages[key] = stored
            self.add_share(af["shareName"])
            return web.json_response(stored)
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

    def _validate_job(self, body: dict) -> str:
        props = body.get("properties") or {}
        if not body.get("location"):
            return "location is required"
        env_name = str(props.get("environmentId", "")).rsplit("/", 1)[-1]
        env = self.environments.get(env_name)
        if env is None:
            return f"environmentId {props.get('environmentId')!r} is not a managed environment"
        profiles = {p["name"] for p in env["properties"]["workloadProfiles"]}
        if props.get("workloadProfileName") and props["workloadProfileName"] not in profiles:
            return f"workload profile {props['workloadProfileName']!r} is not in the environment"
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
            if not re.match(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$", s.get("name", "")):
                return f"secret name {s.get('name')!r} is invalid"
            if "value" in s and s["value"] is not None and s.get("keyVaultUrl"):
                return "a secret has either a value or a keyVaultUrl"
            if s.get("keyVaultUrl") and str(s.get("identity")).lower() not in identities and s.get("identity") != "system":
                return f"secret {s['name']}: identity {s.get('identity')!r} is not assigned to the job"
            secret_names.add(s["name"])
        template = props.get("template") or {}
        containers = template.get("containers") or []
        if not containers or not all(c.get("image") and c.get("name") for c in containers):
            return "template.containers needs at least one container with a name and an image"
        too_much = self._resources_problem(env, props)
        if too_much:
            return too_much
        volumes = {v["name"]: v for v in template.get("volumes") or []}
        for v in volumes.values():
            if v.get("storageType") == "AzureFile" and (env_name, v.get("storageName")) not in self.env_storages:
                return f"volume {v['name']}: storage {v.get('storageName')!r} is not in the environment"
        for c in containers:
            for e in c.get("env") or []:
                if e.get("secretRef") and e["secretRef"] not in secret_names:
                    return f"env {e['name']}: secretRef {e['secretRef']!r} is not a secret of the job"
            for m in c.get("volumeMounts") or []:
                if m.get("volumeName") not in volumes:
                    return f"volumeMount {m.get('volumeName')!r} names no volume"
        return ""

    def arm_job(self, request, data):
        name = request.match_info["job"]
        if request.method == "GET":
            job = self.jobs.get(name)
            if job is None:
                return self._arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.App/jobs/{name}' was not found.")
            return web.json_response(self._without_values(job))
        if request.method == "PUT":
            problem = self._validate_job(data or {})
            if problem:
                return self._arm_error(400, *_code_and_message(problem))
            created = name not in self.jobs
            job = json.loads(json.dumps(data))
            job.update(id=self._rid(f"jobs/{name}", request.match_info["rg"]), name=name, type="Microsoft.App/jobs")
            job["properties"]["provisioningState"] = "Succeeded"
            job = self.jobs[name] = _as_azure_keeps(job)
            self.executions.setdefault(name, {})
            url = self._lro(request, None, polls=1)
            return web.json_response(self._without_values(job), status=201 if created else 200,
                                     headers={"Azure-AsyncOperation": url})
        if request.method == "PATCH":
            # Jobs_Update "Patches a Container Apps Job using JSON Merge Patch" (Jobs.json, Microsoft.App 2025-01-01):
            # RFC 7386, objects merge, arrays and values replace, null removes. It answers 200 with the Job.
            job = self.jobs.get(name)
            if job is None:
                return self._arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.App/jobs/{name}' was not found.")
            merged = _merge_patch(job, data or {})
            problem = self._validate_job(merged)
            if problem:
                return self._arm_error(400, *_code_and_message(problem))
            merged = self.jobs[name] = _as_azure_keeps(merged)
            return web.json_response(self._without_values(merged))
        return self._arm_error(405, "MethodNotAllowed", request.method)

    @staticmethod
    def _without_values(resource: dict) -> dict:
        """ARM's GET leaves secret values out; listSecrets gives them."""
        out = json.loads(json.dumps(resource))
        for sec in ((out.get("properties") or {}).get("configuration") or {}).get("secrets") or []:
            sec.pop("value", None)
        return out

    def arm_list_secrets(self, request, data):
        if "job" in request.match_info:
            res = self.jobs.get(request.match_info["job"])
        else:
            res = self.apps.get(request.match_info["app"])
        if res is None:
            return self._arm_error(404, "ResourceNotFound", "no such resource")
        secrets = (res["properties"].get("configuration") or {}).get("secrets") or []
        return web.json_response({"value": [dict(s) for s in secrets]})

    def arm_job_start(self, request, data):
        name = request.match_info["job"]
        job = self.jobs.get(name)
        if job is None:
            return self._arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.App/jobs/{name}' was not found.")
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
            return self._arm_error(400, "InvalidParameterValue", "template.containers is empty")
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
        items = sorted(self.executions.get(name, {}).values(), key=lambda e: e["properties"]["startTime"], reverse=True)
        return web.json_response({"value": items})

    def arm_execution(self, request, data):
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
        return web.Response(status=200)

    def arm_app(self, request, data):
        name = request.match_info["app"]
        if request.method == "GET":
            app = self.apps.get(name)
            if app is None:
                return self._arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.App/containerApps/{name}' was not found.")
            return web.json_response(self._without_values(app))
        if request.method == "PUT":
            props = (data or {}).get("properties") or {}
            env_name = str(props.get("environmentId", "")).rsplit("/", 1)[-1]
            env = self.environments.get(env_name)
            if env is None:
                return self._arm_error(400, "InvalidParameterValue", "environmentId is not a managed environment")
            template = props.get("template") or {}
            if not template.get("containers"):
                return self._arm_error(400, "InvalidParameterValue", "template.containers is empty")
            too_much = self._resources_problem(env, props)
            if too_much:
                return self._arm_error(400, *_code_and_message(too_much))
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
            ingress = (p.get("configuration") or {}).get("ingress")
            if ingress:
                ingress["fqdn"] = f"{name}.{env['properties']['defaultDomain']}"
            app = self.apps[name] = _as_azure_keeps(app)
            url = self._lro(request, None, polls=1)
            return web.json_response(self._without_values(app), status=201 if old is None else 200,
                                     headers={"Azure-AsyncOperation": url})
        return self._arm_error(405, "MethodNotAllowed", request.method)

    def arm_restart(self, request, data):
        app = self.apps.get(request.match_info["app"])
        rev = request.match_info["rev"]
        if app is None or app["properties"].get("latestRevisionName") != rev:
            return self._arm_error(404, "ResourceNotFound", f"revision {rev}")
        self.restarts.append(rev)
        return web.Response(status=200)

    # ---- executions: the "container" -------------------------------------------------------------------------

    def _console(self, job: str, execution: str) -> Callable[[str], None]:
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


def _code_and_message(problem: str) -> tuple[str, str]:
    """'Code: message' -> (code, message); a problem without Azure's code of its own is InvalidParameterValue."""
    code, sep, message = problem.partition(": ")
    if sep and re.fullmatch(r"[A-Z][A-Za-z]+", code):
        return code, message
    return "InvalidParameterValue", problem
