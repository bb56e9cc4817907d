"""The smoke check before the first GPU minute: the container's script (pure, and run for real with bash), and the
whole check with the real SDK clients against the Azure stand-in, whose execution runs the smoke job's own command
(`run_command`), on a good set-up and with a failure injected at each step."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.backends.aca import share as sharefs
from jobs.backends.aca import smoke
from jobs.backends.aca.executor import AcaExecutor
from jobs.backends.aca.provision import provision_finetune
from jobs.backends.aca.resources import CODE_PATH
from jobs.backends.aca.secrets import set_secret
from jobs.backends.aca.standin import ExecutionPlan, Fault, dies_at_once, run_command
from jobs.backends.protocol import ExecStatus, SmokeStep
from jobs.core.errors import Hint
from tests.conftest import ROOT

TOKEN = "hf_smoke-test-token-value-0123456789"


# ---- pure ----------------------------------------------------------------------------------------------------------

def test_the_smoke_job_is_named_after_the_job_within_acas_32_characters():
    assert smoke.smoke_job_name("tuneops-ft") == "tuneops-ft-smoke"
    long = "a" + "b" * 30 + "c"
    assert len(long) == 32 and len(smoke.smoke_job_name(long)) == 32
    assert smoke.smoke_job_name("abcdefghijklmnopqrstuvwxy-zzzzzz").endswith("y-smoke")  # no "--"
    assert smoke.result_path("0a1b") == "smoke/0a1b/result.json" and smoke.marker("0a1b") == "tuneops-smoke-marker 0a1b"


def test_the_smoke_script_marks_writes_imports_and_names_the_secrets_only():
    script = smoke.smoke_script(["WANDB_API_KEY", "HF_TOKEN", "HF_TOKEN"])
    assert 'echo "tuneops-smoke-marker $TUNEOPS_SMOKE_ID"' in script
    assert '/mount/smoke/"$TUNEOPS_SMOKE_ID"/result.json HF_TOKEN WANDB_API_KEY' in script
    assert CODE_PATH in script and 'python -P -c "import payload.train"' in script
    assert "pip install" not in script
    with_install = smoke.smoke_script([], install=["transformers>=5", "peft"])
    assert "pip install --no-cache-dir --quiet 'transformers>=5' peft" in with_install
    assert with_install.index("pip install") < with_install.index("import payload.train")


def run_script(tmp_path: Path, script: str, env: dict[str, str], share: Path) -> subprocess.CompletedProcess:
    """The script as the container runs it, with /mount being `share` (as the stand-in's run_command does)."""
    base = {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
            "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", "-c", script.replace("/mount", str(share))], env={**base, **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_script_really_runs_and_reports_presence_and_length_never_the_value(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "payload").symlink_to(ROOT / "payload")
    script = smoke.smoke_script(["HF_TOKEN", "WANDB_API_KEY"])
    done = run_script(tmp_path, script, {"TUNEOPS_SMOKE_ID": "s1", "HF_TOKEN": TOKEN}, share)
    assert done.returncode == 1  # WANDB_API_KEY is absent
    assert done.stdout.splitlines()[0] == "tuneops-smoke-marker s1"
    result = json.loads((share / "smoke/s1/result.json").read_text())
    assert result["share"] and result["import"] == {"ok": True, "error": ""}
    assert result["secrets"] == {"HF_TOKEN": {"present": True, "length": len(TOKEN)},
                                 "WANDB_API_KEY": {"present": False, "length": 0}}
    assert TOKEN not in done.stdout + done.stderr + (share / "smoke/s1/result.json").read_text()

    # a payload that does not import: the error's last line is reported
    broken = tmp_path / "broken" / "payload"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    (broken / "train.py").write_text("import tuneops_no_such_module\n")
    (share / "payload").unlink()
    (share / "payload").symlink_to(broken)
    done = run_script(tmp_path, smoke.smoke_script([]), {"TUNEOPS_SMOKE_ID": "s2"}, share)
    result = json.loads((share / "smoke/s2/result.json").read_text())
    assert done.returncode == 1 and not result["import"]["ok"]
    assert result["import"]["error"] == "ModuleNotFoundError: No module named 'tuneops_no_such_module'"


def test_judging_the_result():
    good = {"share": True, "secrets": {"HF_TOKEN": {"present": True, "length": 12}},
            "import": {"ok": True, "error": ""}, "python": "3.11.7"}
    steps = smoke.judge(good, ["HF_TOKEN"], share_name="sh", status=ExecStatus.SUCCEEDED, detail="", result_rel="r")
    assert [(s.name, s.status) for s in steps] == [("share", "ok"), ("Key Vault references", "ok"),
                                                   ("payload import", "ok")]
    assert "HF_TOKEN (12 characters)" in steps[1].text

    missing = dict(good, secrets={"HF_TOKEN": {"present": False, "length": 0}})
    steps = smoke.judge(missing, ["HF_TOKEN"], share_name="sh", status=ExecStatus.FAILED, detail="", result_rel="r")
    assert steps[1].status == "fail" and "did not get HF_TOKEN" in steps[1].text

    no_result = smoke.judge(None, [], share_name="sh", status=ExecStatus.SUCCEEDED, detail="", result_rel="r")
    assert [(s.name, s.status) for s in no_result] == [("share", "fail")]
    vault = smoke.judge(None, ["HF_TOKEN"], share_name="sh", status=ExecStatus.FAILED,
                        detail="Failed: ContainerCreateFailure; Key Vault secret hf-token not found", result_rel="r")
    assert vault[0].name == "Key Vault references" and "hf-token not found" in vault[0].text
    died = smoke.judge(None, ["HF_TOKEN"], share_name="sh", status=ExecStatus.FAILED, detail="Failed",
                       result_rel="r")
    assert died[0].name == "execution" and "console log" in died[0].text
    gone = smoke.judge(None, ["HF_TOKEN"], share_name="sh", status=ExecStatus.FAILED, detail="Failed",
                       result_rel="r", not_in_vault=["HF_TOKEN"])
    assert gone[0].name == "Key Vault references" and "hf-token (for HF_TOKEN)" in gone[0].text

    passed, line = smoke.verdict([SmokeStep("share", "ok", "x"), SmokeStep("Log Analytics", "warn", "lag")])
    assert passed and line.startswith("Smoke check passed") and "1 warning(s): Log Analytics" in line
    passed, line = smoke.verdict([SmokeStep("share", "fail", "not mounted")])
    assert not passed and line == "Smoke check failed at share: not mounted"


def test_the_smoke_config_and_its_id():
    from jobs.backends.aca.config import AcaConfig

    cfg = AcaConfig(Path("/x"), "sub", "rg", "acct", "share", "tuneops-ft", ("echo",), image="img:1")
    s = smoke.smoke_config(cfg, "Consumption", "echo hi")
    assert (s.job_name, s.workload_profile, s.cpu, s.memory, s.commands) == \
        ("tuneops-ft-smoke", "Consumption", 0.5, "1Gi", ("echo hi",))
    assert s.job_image == "img:1" and s.file_share == "share"
    body = {"properties": {"template": {"containers": [{"env": [{"name": "A", "value": "1"},
                                                                 {"name": smoke.SMOKE_ID_ENV, "value": "old"}]}]}}}
    env = smoke.with_smoke_id(body, "new")["properties"]["template"]["containers"][0]["env"]
    assert env == [{"name": "A", "value": "1"}, {"name": smoke.SMOKE_ID_ENV, "value": "new"}]
    assert body["properties"]["template"]["containers"][0]["env"][1]["value"] == "old"  # not changed in place


# ---- against the stand-in ----------------------------------------------------------------------------------------

@pytest.fixture
def ready(aca, settings):
    """A provisioned job that references HF_TOKEN in Key Vault, some GPU quota, and executions that really run the
    smoke job's command."""
    set_secret(aca.clients, "HF_TOKEN", TOKEN)
    provision_finetune(aca.clients)
    aca.standin.set_usage("SubscriptionConsumptionNCA100Gpus", 0, 2)
    aca.standin.plan_execution(ExecutionPlan(program=run_command()))
    return aca


def check(aca, settings, *, log_wait_s: float = 0.5, clients=None):
    steps: list[SmokeStep] = []
    result = smoke.run_smoke(clients or aca.clients, steps.append, log_wait_s=log_wait_s,
                             sync=AcaExecutor(settings, clients=clients or aca.clients).sync)
    assert steps == result.steps
    assert "\n" not in result.verdict
    return result


def statuses(result) -> dict[str, str]:
    return {s.name: s.status for s in result.steps}


def test_a_good_set_up_passes_every_step(ready, settings):
    result = check(ready, settings)
    assert result.passed, result.verdict
    assert statuses(result) == {"GPU quota": "ok", "smoke job": "ok", "payload code": "ok", "start": "ok",
                                "share": "ok", "Key Vault references": "ok", "payload import": "ok",
                                "Log Analytics": "ok"}
    assert result.verdict.startswith("Smoke check passed: the share is mounted and writable")
    s = ready.standin
    job = s.jobs["tuneops-ft-smoke"]
    main = s.jobs["tuneops-ft"]
    p = job["properties"]
    c = p["template"]["containers"][0]
    assert p["workloadProfileName"] == "Consumption"
    assert (c["resources"]["cpu"], c["resources"]["memory"]) == (0.5, "1Gi")
    assert c["image"] == main["properties"]["template"]["containers"][0]["image"]
    assert p["configuration"]["secrets"] == main["properties"]["configuration"]["secrets"]
    assert {"name": "HF_TOKEN", "secretRef": "hf-token"} in c["env"]
    assert c["volumeMounts"] == [{"volumeName": "tuneopssharevolume", "mountPath": "/mount"}]
    assert p["template"]["volumes"] == main["properties"]["template"]["volumes"]
    # started without a template override: the execution runs the job's own template, with its volume
    [start] = s.requests_to("arm", "POST", r"/jobs/tuneops-ft-smoke/start$")
    assert start.body == b""
    # the secret reached the container, and only its length came back
    assert any(env.get("HF_TOKEN") == TOKEN for env in s.execution_env.values())
    assert f"HF_TOKEN ({len(TOKEN)} characters)" in statuses_text(result)
    assert TOKEN not in statuses_text(result) + result.verdict
    assert TOKEN not in (s.share_dir("tuneopsshare") / "smoke").joinpath(
        next(iter(os.listdir(s.share_dir("tuneopsshare") / "smoke"))), "result.json").read_text()
    links = next(st.links for st in result.steps if st.name == "start")
    assert set(links) == {"job", "execution", "logs"} and "tuneops-ft-smoke" in links["job"]
    assert result.links == links

    # again: the same job, updated (a new check id), never a second one; the main job is untouched. This time the
    # start's operation ends without the execution's name (`begin_start(...).result()` is None): found by the id.
    s.plan_execution(ExecutionPlan(program=run_command()))
    s.start_answers_name = False
    again = check(ready, settings, clients=ready.clients)
    assert again.passed and "updated tuneops-ft-smoke" in statuses_text(again)
    assert sorted(s.jobs) == ["tuneops-ft", "tuneops-ft-smoke"]
    assert s.jobs["tuneops-ft"] == main


def statuses_text(result) -> str:
    return " | ".join(s.text for s in result.steps)


def test_before_the_job_exists_the_check_uses_the_references_provisioning_would_give(aca, settings):
    set_secret(aca.clients, "HF_TOKEN", TOKEN)
    aca.standin.plan_execution(ExecutionPlan(program=run_command()))
    result = check(aca, settings)
    assert result.passed, result.verdict
    assert "tuneops-ft" not in aca.standin.jobs and "tuneops-ft-smoke" in aca.standin.jobs
    assert statuses(result)["GPU quota"] == "warn"  # no GPU entry listed: it cannot tell


def test_a_share_not_mounted_at_mount_is_named(ready, settings, tmp_path):
    # The container's /mount is a folder of its own, not the share (a job without the volume).
    local = tmp_path / "container-root-mount"
    local.mkdir()
    ready.standin.plans.clear()
    ready.standin.plan_execution(ExecutionPlan(
        program=lambda ctx: run_command()(dataclasses.replace(ctx, mount=local))))
    result = check(ready, settings)
    assert not result.passed
    assert result.verdict.startswith("Smoke check failed at share: the container ran, but smoke/")
    assert "is not on the share tuneopsshare" in result.verdict and "ACA_ENVIRONMENT_STORAGE_NAME" in result.verdict
    assert (local / "smoke").is_dir()  # it did write, just not to the share


def test_a_files_fault_reading_the_result_back_is_named(ready, settings):
    ready.standin.inject(Fault("files", path=r"/smoke/[0-9a-f]+/result\.json$", status=403,
                               code="AuthorizationPermissionMismatch", message="not authorized", times=50))
    result = check(ready, settings)
    assert not result.passed and result.verdict.startswith("Smoke check failed at share: Could not read the smoke "
                                                           "check's result")
    assert "not allowed to" in result.verdict


def test_a_key_vault_reference_that_does_not_resolve_is_named(ready, settings):
    ready.clients.secrets.begin_delete_secret("hf-token").result()
    result = check(ready, settings)
    assert not result.passed
    assert result.verdict.startswith("Smoke check failed at Key Vault references: the execution ended Failed before "
                                     "its container wrote anything, and the job references hf-token (for HF_TOKEN), "
                                     "which Key Vault does not have")
    assert result.verdict.endswith("Set it again, then check again.")
    assert result.hint == Hint("secret set HF_TOKEN", "stores it again")
    assert "Log Analytics" not in statuses(result)


def test_a_payload_that_does_not_import_is_named(ready, settings):
    broken = ready.standin.share_dir("tuneopsshare") / "payload"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "__init__.py").write_text("")
    (broken / "train.py").write_text("import tuneops_missing_dependency\n")
    result = check(ready, settings, clients=ready.reload(SYNC_PAYLOAD=False).clients)
    assert not result.passed and "payload code" not in statuses(result)
    assert statuses(result)["share"] == "ok" and statuses(result)["Key Vault references"] == "ok"
    assert result.verdict == ("Smoke check failed at payload import: `import payload.train` failed in the container: "
                              "ModuleNotFoundError: No module named 'tuneops_missing_dependency'. The payload code on "
                              "the share or the image's packages are broken: sync the payload again (SYNC_PAYLOAD), "
                              "or fix the image, then check again.")


def test_no_line_in_log_analytics_is_a_warning_not_a_failure(ready, settings, monkeypatch):
    # Ingestion lags: the console lines are not in the table yet.
    monkeypatch.setattr(ready.standin, "_console", lambda job, execution: (lambda line: None))
    result = check(ready, settings, log_wait_s=0.3)
    assert result.passed and statuses(result)["Log Analytics"] == "warn"
    step = result.steps[-1]
    assert "is not yet seen after 0.3 s" in step.text and "appLogsConfiguration" in step.text
    assert "1 warning(s): Log Analytics" in result.verdict


def test_a_log_analytics_that_refuses_the_query_is_a_warning(ready, settings):
    ready.standin.inject(Fault("logs", path=r"/query$", status=403, code="InsufficientAccessError", times=50))
    result = check(ready, settings)
    assert result.passed and statuses(result)["Log Analytics"] == "warn"
    assert "could not query it" in result.steps[-1].text


@pytest.mark.parametrize("status, code, message, said", [
    (403, "AuthorizationFailed", "does not have authorization to perform action 'Microsoft.App/jobs/start/action'",
     "not allowed to"),
    (409, "OperationNotAllowed", "Operation results in exceeding quota limits of Core.", "quota is used up"),
])
def test_an_execution_that_azure_will_not_start_is_named(ready, settings, status, code, message, said):
    ready.standin.inject(Fault("arm", path=r"/jobs/tuneops-ft-smoke/start$", method="POST", status=status, code=code,
                               message=message))
    result = check(ready, settings)
    assert not result.passed and result.verdict.startswith("Smoke check failed at start: Could not start the smoke "
                                                           "job tuneops-ft-smoke")
    assert said in result.verdict and code in result.verdict


def test_a_container_that_dies_before_writing_is_named(ready, settings):
    ready.standin.plans.clear()
    ready.standin.plan_execution(ExecutionPlan(program=dies_at_once(("exec /bin/bash: exec format error",))))
    result = check(ready, settings)
    assert not result.passed and result.verdict.startswith("Smoke check failed at execution: the execution ended "
                                                           "Failed")
    assert sharefs.list_files(ready.clients.share, "smoke") == []


def test_an_arm_refusal_to_write_the_smoke_job_is_named(ready, settings):
    ready.standin.inject(Fault("arm", path=r"/jobs/tuneops-ft-smoke$", method="PUT", status=403,
                               code="AuthorizationFailed", message="no jobs/write"))
    result = check(ready, settings)
    assert result.verdict.startswith("Smoke check failed at smoke job: Could not create the smoke job "
                                     "tuneops-ft-smoke: the bot's Azure identity is not allowed to")
