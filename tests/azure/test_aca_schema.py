"""The Azure REST spec gate: the official examples pass, what the spec refuses is refused in the service's error shape
naming where, the bodies tuneops builds fit, and every request the real SDK clients send in a run fits the spec."""

from __future__ import annotations

import copy
import json
import re
from importlib.resources import files
from urllib.parse import urldefrag, urljoin

import pytest

from jobs.backends.aca import resources, schema
from jobs.backends.aca.executor import AcaExecutor
from jobs.backends.aca.logs import query_logs
from jobs.backends.aca.provision import provision_finetune
from jobs.backends.aca.secrets import list_secrets, set_secret
from jobs.backends.aca.share import list_files, read_range, size_of, write_bytes
from jobs.backends.protocol import ExecStatus
from jobs.core.domain import Run
from jobs.core.runconfig import build_train_config
from tests.azure.conftest import ENV, cfg, wait_for

RESTSPEC = files("jobs.backends.aca") / "restspec"
ARM = "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.App"
Q = {"api-version": "2025-01-01"}
JOB = "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.App/jobs/ft-job"
APP = "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.App/containerApps/infer"
FILE = "/store1/share1/runs/ft-0001/train.log"

# As tests/azure/test_aca_resources.py builds them.


def example(name: str) -> dict:
    return json.loads((RESTSPEC / "examples" / name).read_text(encoding="utf-8"))


# An official example, the request it describes (path filled from its parameters) and its body parameter.
EXAMPLES = [
    ("Job_CreateorUpdate.json", "arm", "PUT", ARM + "/jobs/{jobName}", "JobEnvelope"),
    ("Job_Start.json", "arm", "POST", ARM + "/jobs/{jobName}/start", "template"),
    ("Job_Get.json", "arm", "GET", ARM + "/jobs/{jobName}", None),
    ("Job_Execution_Get.json", "arm", "GET", ARM + "/jobs/{jobName}/executions/{jobExecutionName}", None),
    ("ContainerApps_CreateOrUpdate.json", "arm", "PUT", ARM + "/containerApps/{containerAppName}",
     "containerAppEnvelope"),
    ("ContainerApps_Get.json", "arm", "GET", ARM + "/containerApps/{containerAppName}", None),
    ("ManagedEnvironmentsStorages_CreateOrUpdate.json", "arm", "PUT",
     ARM + "/managedEnvironments/{environmentName}/storages/{storageName}", "storageEnvelope"),
    ("ManagedEnvironmentsStorages_Get.json", "arm", "GET",
     ARM + "/managedEnvironments/{environmentName}/storages/{storageName}", None),
    ("Usages_List.json", "arm", "GET",
     "/subscriptions/{subscriptionId}/providers/Microsoft.App/locations/{location}/usages", None),
    ("ManagedEnvironmentUsages_List.json", "arm", "GET", ARM + "/managedEnvironments/{environmentName}/usages", None),
    ("RecoverDeletedSecret-example.json", "vault", "POST", "/deletedsecrets/{secret-name}/recover", None),
    ("oms-post-example.json", "logs", "POST", "/v1/workspaces/{workspaceId}/query", "body"),
]


def request_of(name, template):
    ex = example(name)
    params = ex["parameters"]
    path = re.sub(r"\{([^}]+)\}", lambda m: str(params[m.group(1)]), template)
    query = {"api-version": params["api-version"]} if "api-version" in params else {}
    return ex, path, query


@pytest.mark.parametrize("name,service,method,template,body_param", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_the_official_examples_requests_and_answers_fit_the_spec(name, service, method, template, body_param):
    ex, path, query = request_of(name, template)
    body = copy.deepcopy(ex["parameters"][body_param]) if body_param else None
    assert schema.check_request(service, method, path, query, {}, body) is None
    for status, answer in ex["responses"].items():
        if "body" in answer:
            assert schema.check_response(service, method, path, int(status), answer["body"]) is None, status


def job_put():
    return copy.deepcopy(example("Job_CreateorUpdate.json")["parameters"]["JobEnvelope"])


def set_in(body, dotted, value):
    *parents, last = dotted.split(".")
    node = body
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return body


@pytest.mark.parametrize("change,code,named", [
    (("properties.provisioningState", "Succeeded"), "InvalidParameter",
     ["'properties.provisioningState'", "read-only"]),
    (("properties.configuration.triggerType", "Sometimes"), "InvalidRequestContent",
     ["Path 'properties.configuration.triggerType'", '"Sometimes" is not one of']),
    (("properties.configuration.replicaTimeout", "10"), "InvalidRequestContent",
     ["Path 'properties.configuration.replicaTimeout'", "'integer'"]),
    (("properties.configuration.triggerType", KeyError), "InvalidRequestContent",
     ["Required property 'triggerType'", "Path 'properties.configuration'"]),
    (("location", KeyError), "InvalidRequestContent", ["Required property 'location'"]),
    (("properties.template.containers", [{"name": "a", "image": "b", "gpus": 1}]), "InvalidRequestContent",
     ["Could not find member 'gpus'", "Path 'properties.template.containers[0].gpus'"]),
    (("id", JOB), "InvalidParameter", ["'id'", "read-only"]),
])
def test_a_job_put_the_spec_refuses_is_refused_naming_where(change, code, named):
    v = schema.check_request("arm", "PUT", JOB, Q, {}, set_in(job_put(), *change))
    assert v is not None and v.status == 400 and v.code == code and v.operation == "Jobs_CreateOrUpdate"
    for text in named:
        assert text in v.message, v.message
    assert v.arm_body() == {"error": {"code": code, "message": v.message}}


def test_a_start_override_cannot_mount_volumes():
    """JobExecutionContainer has no volumeMounts (Jobs.json): ACA's RP refuses a member its type lacks."""
    template = copy.deepcopy(example("Job_Start.json")["parameters"]["template"])
    template["containers"][0]["volumeMounts"] = [{"volumeName": "share", "mountPath": "/mount"}]
    v = schema.check_request("arm", "POST", JOB + "/start", Q, {}, template)
    assert v.code == "InvalidRequestContent" and "Path 'containers[0].volumeMounts'" in v.message
    assert "'JobExecutionContainer'" in v.message
    assert schema.check_request("arm", "POST", JOB + "/start", Q, {}, None) is None  # the body is optional


def test_a_patch_need_not_repeat_what_it_leaves_but_still_may_not_send_read_only_members():
    patch = {"properties": {"configuration": {"replicaTimeout": 60}}}  # triggerType, required in a PUT, stays
    assert schema.check_request("arm", "PATCH", JOB, Q, {}, patch) is None
    resources_ = {"cpu": 1, "ephemeralStorage": "8Gi"}
    patch["properties"]["template"] = {"containers": [{"name": "a", "resources": resources_}]}
    v = schema.check_request("arm", "PATCH", JOB, Q, {}, patch)
    assert v.code == "InvalidParameter"
    assert "'properties.template.containers[0].resources.ephemeralStorage'" in v.message


def test_null_members_count_as_absent_and_x_nullable_allows_null():
    body = {"query": "T | take 1", "timespan": None, "workspaces": None}  # what azure-monitor-query sends
    assert schema.check_request("logs", "POST", "/v1/workspaces/w/query", {}, {}, body) is None
    assert schema.check_request("logs", "POST", "/v1/workspaces/w/query", {}, {}, {"query": None}).code == \
        "BadArgumentError"


def test_x_ms_mutability_refuses_a_member_the_verb_may_not_set():
    only_read = {"properties": {"p": {"type": "string", "x-ms-mutability": ["read", "create"]}}}
    assert not schema._PATCH(only_read).is_valid({"p": "x"})
    assert schema._PUT(only_read).is_valid({"p": "x"})


def test_key_vault_requests_are_checked_against_secrets_json():
    secret = "/secrets/hf-token"
    assert schema.check_request("vault", "PUT", secret, {"api-version": "7.6"}, {}, {"value": "v", "tags": {}}) is None
    assert schema.check_request("vault", "GET", secret + "/", {"api-version": "7.6"}, {}, None) is None  # latest
    bad_name = schema.check_request("vault", "PUT", "/secrets/hf_token", {"api-version": "7.6"}, {}, {"value": "v"})
    assert bad_name.code == "BadParameter" and "'secret-name'" in bad_name.message
    no_value = schema.check_request("vault", "PUT", secret, {"api-version": "7.6"}, {}, {"contentType": "x"})
    assert no_value.code == "BadParameter" and "Required property 'value'" in no_value.message
    created = schema.check_request("vault", "PUT", secret, {"api-version": "7.6"}, {},
                                   {"value": "v", "attributes": {"created": 1}})
    assert "'attributes.created'" in created.message and "read-only" in created.message
    assert schema.check_request("vault", "PUT", secret, {}, {}, {"value": "v"}).code == "BadParameter"


PUT_RANGE = {"x-ms-version": "2026-10-06", "x-ms-range": "bytes=0-9", "x-ms-write": "update", "Content-Length": "10"}


def test_a_files_put_range_needs_its_range_and_a_known_write_mode():
    assert schema.check_request("files", "PUT", FILE, {"comp": "range"}, PUT_RANGE, None) is None
    no_range = {k: v for k, v in PUT_RANGE.items() if k != "x-ms-range"}
    v = schema.check_request("files", "PUT", FILE, {"comp": "range"}, no_range, None)
    assert v.code == "MissingRequiredHeader" and "'x-ms-range'" in v.message and v.operation == "File_UploadRange"
    v = schema.check_request("files", "PUT", FILE, {"comp": "range"}, dict(PUT_RANGE, **{"x-ms-write": "sometimes"}),
                             None)
    assert v.code == "InvalidHeaderValue" and "'x-ms-write'" in v.message and '"sometimes"' in v.message
    v = schema.check_request("files", "PUT", FILE, {"comp": "range"}, dict(PUT_RANGE, **{"Content-Length": "ten"}),
                             None)
    assert v.code == "InvalidHeaderValue" and "'Content-Length'" in v.message


def test_files_requests_find_their_operation_by_path_restype_and_comp():
    h = {"x-ms-version": "2026-10-06"}
    create = dict(h, **{"x-ms-type": "file", "x-ms-content-length": "10"})
    assert schema.check_request("files", "PUT", FILE, {}, create, None) is None
    assert schema.check_request("files", "PUT", "/store1/share1/top.txt", {}, create, None) is None
    v = schema.check_request("files", "PUT", FILE, {}, dict(create, **{"x-ms-type": "directory"}), None)
    assert v.code == "InvalidHeaderValue" and "'x-ms-type'" in v.message
    assert schema.check_request("files", "PUT", FILE, {}, h, None).code == "MissingRequiredHeader"
    assert schema.check_request("files", "HEAD", FILE, {}, h, None) is None
    assert schema.check_request("files", "GET", "/store1/share1", {"restype": "directory", "comp": "list"}, h,
                                None) is None
    assert schema.check_request("files", "PUT", "/store1/share1/runs", {"restype": "directory"}, h, None) is None
    assert schema.check_request("files", "GET", "/store1/share1", {"restype": "share"}, h, None) is None
    assert schema.check_request("files", "GET", FILE, {}, {}, None).code == "MissingRequiredHeader"  # x-ms-version


@pytest.mark.parametrize("service,method,path,query", [
    ("arm", "DELETE", JOB, Q),
    ("arm", "GET", "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.App/builders/b", Q),
    ("vault", "GET", "/keys/k", {"api-version": "7.6"}),
    ("files", "PUT", FILE, {"comp": "lease"}),
    ("logs", "GET", "/v1/workspaces/w/query", {}),
])
def test_an_operation_the_spec_does_not_have_is_refused(service, method, path, query):
    v = schema.check_request(service, method, path, query, {"x-ms-version": "2026-10-06"}, None)
    assert v is not None and v.status == 400 and "no such operation" in v.message and v.operation is None


def test_arms_own_operation_status_urls_are_followed_unchecked():
    poll = "/subscriptions/sub/providers/Microsoft.App/locations/westus3/containerappOperationStatuses/abc"
    assert schema.check_request("arm", "GET", poll, Q, {}, None) is None


def test_answers_are_checked_with_open_objects_and_extensible_enums():
    usages = example("Usages_List.json")["responses"]["200"]["body"]
    path = "/subscriptions/s/providers/Microsoft.App/locations/westus/usages"
    assert schema.check_response("arm", "GET", path, 200, dict(usages, extra=1)) is None
    bad = copy.deepcopy(usages)
    bad["value"][0]["unit"] = "Bytes"  # UsageUnit is modelAsString: false
    assert "value[0].unit" in schema.check_response("arm", "GET", path, 200, bad).message
    execution = copy.deepcopy(example("Job_Execution_Get.json")["responses"]["200"]["body"])
    execution["properties"]["status"] = "Paused"  # JobExecutionRunningState is modelAsString: true
    assert schema.check_response("arm", "GET", JOB + "/executions/e", 200, execution) is None


def test_every_reference_a_request_can_reach_resolves():
    docs = {}
    for entry in RESTSPEC.iterdir():
        if entry.name.endswith(".json"):
            doc = json.loads(entry.read_text(encoding="utf-8"))
            docs[schema.SPEC_BASE + doc.pop("_source")["path"]] = doc

    def resolve(base, ref):
        uri, fragment = urldefrag(urljoin(base, ref))
        node = docs[uri]
        for part in fragment.lstrip("/").split("/") if fragment else ():
            node = node[part]
        return uri, node

    seen = set()

    def follow(base, node):
        if isinstance(node, list):
            for item in node:
                follow(base, item)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    target = urljoin(base, value)
                    if target not in seen:
                        seen.add(target)
                        follow(*resolve(base, value))
                elif key not in ("responses", "x-ms-examples"):
                    follow(base, value)

    for uri, doc in docs.items():
        for item in {**doc.get("paths", {}), **doc.get("x-ms-paths", {})}.values():
            follow(uri, item)
    assert len(seen) > 60


# ---- the bodies tuneops builds --------------------------------------------------------------------------------------

def test_the_job_and_app_bodies_tuneops_builds_fit_the_spec():
    job = resources.job_body(cfg(), ENV, storage_name="envstore", secret_envs=["WANDB_API_KEY", "HF_TOKEN"])
    assert schema.check_request("arm", "PUT", JOB, Q, {}, job) is None
    private = resources.job_body(cfg(REGISTRY="myacr.azurecr.io"), ENV, storage_name="envstore", secret_envs=[],
                                 existing=job, foreign_secret_values={})
    assert schema.check_request("arm", "PUT", JOB, Q, {}, private) is None
    for app in (resources.app_body(cfg(IMAGE="reg.io/tuneops-payload:1"), ENV, storage_name="envstore",
                                   secret_envs=["HF_TOKEN"], base_model="microsoft/Phi-3-mini-4k-instruct",
                                   name="tuneops-infer-1a2b3c4d",
                                   manifest="deployments/microsoft--Phi-3-mini-4k-instruct/adapters.json"),
                resources.app_body(cfg(), ENV, storage_name="envstore", secret_envs=[])):
        assert schema.check_request("arm", "PUT", APP, Q, {}, app) is None


def test_the_runs_template_patch_fits_the_spec():
    job = resources.job_body(cfg(), ENV, storage_name="envstore", secret_envs=["HF_TOKEN"])
    template = resources.run_template(job, "echo run", resources.run_env("ft-0003", 2, "runs/ft-0003/run.json"))
    assert schema.check_request("arm", "PATCH", JOB, Q, {}, {"properties": {"template": template}}) is None
    if hasattr(resources, "execution_template"):  # the former start override, where it still exists
        override = resources.execution_template(job, "echo run", resources.run_env("ft-0003", 2, "r.json"))
        assert schema.check_request("arm", "POST", JOB + "/start", Q, {}, override) is None


def test_the_runs_template_patch_fits_the_spec_when_the_job_comes_from_azure():
    """Azure's GET fills in resources.ephemeralStorage, read-only in ContainerResources: the PATCH leaves it out."""
    job = resources.job_body(cfg(), ENV, storage_name="envstore", secret_envs=["HF_TOKEN"])
    job["properties"]["template"]["containers"][0]["resources"]["ephemeralStorage"] = "8Gi"  # as `az containerapp show`
    template = resources.run_template(job, "echo run", resources.run_env("ft-0003", 2, "runs/ft-0003/run.json"))
    assert schema.check_request("arm", "PATCH", JOB, Q, {}, {"properties": {"template": template}}) is None


def test_every_request_the_sdk_clients_send_in_a_run_fits_the_spec(aca, settings):
    """Provisioning, secrets, the share, a run through the executor and a log query, through the real SDK clients;
    then each request the stand-in saw is checked (Key Vault's tokenless challenge request aside)."""
    provision_finetune(aca.clients)
    set_secret(aca.clients, "HF_TOKEN", "hf_value-0123456789")
    assert [s.env_name for s in list_secrets(aca.clients)] == ["HF_TOKEN"]
    write_bytes(aca.clients.share, "probe/a/b.txt", b"0123456789")
    assert size_of(aca.clients.share, "probe/a/b.txt") == 10
    assert read_range(aca.clients.share, "probe/a/b.txt", 2, 3) == b"234"
    assert list_files(aca.clients.share, "probe/a") == ["b.txt"]
    aca.clients.share.get_file_client("probe/a/b.txt").delete_file()
    executor = AcaExecutor(settings, clients=aca.clients)
    run = Run(id="ft-0001", requester="U1", channel="C1", model="model-cache/tiny", dataset="datasets/train.jsonl")
    run.execution_id = executor.start(run, build_train_config(run.id, run.model, run.dataset,
                                                              {"max_steps": 2}).model_dump())
    info = wait_for(lambda: (i := executor.status(run)).status.finished and i, 30, "the run to finish")
    assert info.status is ExecStatus.SUCCEEDED
    query_logs(aca.clients, aca.cfg.job_name, run.execution_id, tail=5)

    checked = set()
    for service in ("arm", "vault", "files", "logs"):
        for rec in aca.standin.requests_to(service):
            if service == "vault" and "Authorization" not in rec.headers:
                continue
            body = json.loads(rec.body) if service != "files" and rec.body else None
            v = schema.check_request(service, rec.method, rec.path, rec.query, rec.headers, body)
            assert v is None, (rec.method, rec.path, v)
            checked.add(service)
    assert checked == {"arm", "vault", "files", "logs"}
