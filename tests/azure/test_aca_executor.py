"""The ACA executor through the real SDK clients against the stand-in: a whole run, and each fault."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from jobs.backends.aca.executor import AcaExecutor, split_complete
from jobs.backends.aca.provision import provision_finetune
from jobs.backends.aca.standin import (
    ExecutionPlan,
    Fault,
    dies_at_once,
    run_command,
    simulated_trainer,
    sleeper,
)
from jobs.backends.protocol import ExecStatus
from jobs.core.domain import Run
from jobs.core.errors import BackendError
from jobs.core.runconfig import build_train_config
from tests.azure.conftest import SHARE, wait_for


def new_run(run_id="ft-0001", attempts=1, model="model-cache/tiny"):
    return Run(id=run_id, requester="U1", channel="C1", model=model, dataset="datasets/train.jsonl", attempts=attempts)


def config_for(run):
    return build_train_config(run.id, run.model, run.dataset, {"max_steps": 6}).model_dump()


@pytest.fixture
def executor(aca, settings):
    provision_finetune(aca.clients)
    return AcaExecutor(settings, clients=aca.clients)


def start(executor, run):
    run.execution_id = executor.start(run, config_for(run))
    return run


def wait_finished(executor, run, timeout=20):
    return wait_for(lambda: (i := executor.status(run)).status.finished and i, timeout, f"{run.id} to finish")


def test_a_run_on_a_profile_with_two_gpus_starts_torchrun_with_two_processes(aca, settings, workspace):
    provision_finetune(aca.clients)
    cfg = dataclasses.replace(aca.cfg, workload_profile_type="NC48-A100", gpus=2)  # as parse_aca_config makes it
    run = start(AcaExecutor(settings, cfg=cfg, clients=aca.clients), new_run())
    container = aca.standin.execution("tuneops-ft", run.execution_id)["properties"]["template"]["containers"][0]
    assert ("PYTHONSAFEPATH=1 torchrun --standalone --nproc_per_node 2 -m payload.train --config "
            "runs/ft-0001/run.json") in container["command"][2]


def test_a_whole_run_sync_start_progress_from_the_share_and_the_adapter(aca, executor, workspace):
    run = start(executor, new_run())
    share = aca.standin.share_dir(SHARE)
    # The sync put what the run needs on the share; the run config has relative paths (cwd is /mount).
    assert (share / "datasets" / "train.jsonl").read_bytes() == (workspace / "datasets" / "train.jsonl").read_bytes()
    assert (share / "model-cache" / "tiny" / "config.json").is_file()
    assert (share / "payload" / "train.py").is_file() and not list(share.glob("payload/**/*.pyc"))
    config = json.loads((share / "runs" / "ft-0001" / "run.json").read_text())
    assert config["output_dir"] == "runs/ft-0001" and config["dataset"] == "datasets/train.jsonl"
    # The execution carries the run's command and env (from the job's template, as it was at the start).
    ex = aca.standin.execution("tuneops-ft", run.execution_id)
    container = ex["properties"]["template"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TUNEOPS_RUN_ID"] == "ft-0001" and env["TUNEOPS_ATTEMPT"] == "1"
    assert "python -P -m payload.train --config runs/ft-0001/run.json" in container["command"][2]
    assert "pip install" not in container["command"][2]  # the configured image is ours

    seen, cursor, log_cursor, lines, states = [], 0, 0, [], set()
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the execution did not finish in 120 s"
        info = executor.status(run)
        states.add(info.status)
        batch = executor.read(run, cursor, log_cursor)
        seen += batch.events
        lines += batch.log_lines
        cursor, log_cursor = batch.event_cursor, batch.log_cursor
        if info.status.finished:
            batch = executor.read(run, cursor, log_cursor)
            seen += batch.events
            lines += batch.log_lines
            break
        time.sleep(0.05)  # a poll, not a spin: the stand-in's execution needs the CPU on a busy machine
    assert info.status is ExecStatus.SUCCEEDED
    assert ExecStatus.RUNNING in states or ExecStatus.PENDING in states
    types = [e["type"] for e in seen]
    assert types[0] == "start" and types.count("step") == 6 and types[-1] == "done"
    assert [e["step"] for e in seen if e["type"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert "training finished" in lines and not any(line.startswith("TUNEOPS_EVENT") for line in lines)
    out = executor.outputs(run)
    assert out["adapter"] == "runs/ft-0001/adapter" and out["metrics"]["steps"] == 6
    assert executor.tail_logs(run, 2) == ["step 6/6 loss 0.3333", "training finished"]
    links = executor.links(run)
    assert set(links) == {"job", "execution", "logs"}


def test_the_run_rides_in_the_jobs_template_and_the_start_sends_no_override(aca, executor):
    """Defect: a start override replaces the job's containers and brings no volumes (microsoft/azure-container-apps
    #909), so a run started with one found /mount empty. The run goes into the job's template instead."""
    run = start(executor, new_run())
    starts = aca.standin.requests_to("arm", "POST", r"/jobs/tuneops-ft/start$")
    assert starts and all(r.body in (b"", b"null") for r in starts)
    patches = aca.standin.requests_to("arm", "PATCH", r"/jobs/tuneops-ft$")
    sent = json.loads(patches[-1].body)
    assert set(sent) == {"properties"} and set(sent["properties"]) == {"template"}
    assert sent["properties"]["template"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/mount"
    assert wait_finished(executor, run).status is ExecStatus.SUCCEEDED
    assert executor.outputs(run)["adapter"] == "runs/ft-0001/adapter"


def test_an_override_start_would_leave_the_mount_empty(aca, executor):
    """The stand-in's side of the defect: an execution started with a template runs without the job's volumes."""
    job = aca.clients.arm.jobs.get("tuneops-rg", "tuneops-ft").as_dict()
    container = job["properties"]["template"]["containers"][0]
    container["resources"].pop("ephemeralStorage", None)  # read-only: Azure fills it in
    override = {"containers": [{k: container[k] for k in ("name", "image", "command", "env", "resources")}]}
    name = aca.clients.arm.jobs.begin_start("tuneops-rg", "tuneops-ft", override).result().name
    ex = aca.standin.wait_execution("tuneops-ft", name)
    assert ex["properties"]["status"] == "Failed" and "/mount" in aca.standin.execution_outcome[name]["message"]


def test_a_start_whose_operation_ends_without_a_body_still_finds_its_execution(aca, executor):
    """Defect: Jobs_Start's operation may end on a Location poll with an empty body; the SDK then gives None and
    `started.name` raised AttributeError past the error handling."""
    aca.standin.start_answers_name = False
    assert aca.clients.arm.jobs.begin_start("tuneops-rg", "tuneops-ft").result() is None  # what the SDK gives
    run = start(executor, new_run("ft-0002"))
    ex = aca.standin.execution("tuneops-ft", run.execution_id)
    env = {e["name"]: e.get("value") for e in ex["properties"]["template"]["containers"][0]["env"]}
    assert env["TUNEOPS_RUN_ID"] == "ft-0002"
    assert wait_finished(executor, run).status is ExecStatus.SUCCEEDED


def test_a_run_waits_for_a_provisioning_of_the_job_to_finish(aca, executor, settings):
    """The run's template and the start take the job's lock, the one a provisioning holds."""
    import threading

    from jobs.core import store

    lock = store.connect(settings).lock(store.azure_lock("job", "tuneops-ft"), timeout=30)
    assert lock.acquire(blocking=False)
    started = {}
    t = threading.Thread(target=lambda: started.setdefault("run", start(executor, new_run("ft-0003"))))
    t.start()
    t.join(1.5)
    assert t.is_alive() and not aca.standin.requests_to("arm", "PATCH", r"/jobs/tuneops-ft$")
    lock.release()
    t.join(30)
    assert started["run"].execution_id


def test_starting_the_same_attempt_twice_gives_the_same_execution(aca, executor):
    run = new_run()
    first = executor.start(run, config_for(run))
    second = AcaExecutor(executor.settings, clients=aca.clients).start(run, config_for(run))
    assert first == second
    assert len(aca.standin.executions["tuneops-ft"]) == 1
    assert "execution" in executor.links(run)  # known before the run record holds the id
    aca.standin.wait_execution("tuneops-ft", first)  # a later attempt starts once the earlier one has ended
    run.attempts = 2
    assert executor.start(run, config_for(run)) != first


def test_a_hub_model_without_a_local_copy_is_downloaded_on_the_share(aca, executor):
    run = new_run(model="org/some-model")
    start(executor, run)
    script = aca.standin.execution("tuneops-ft", run.execution_id)["properties"]["template"]["containers"][0]["command"][2]
    assert "model-cache/org/some-model/config.json" in script and 'snapshot_download("org/some-model"' in script


def test_the_seed_image_installs_the_payload_packages_first(aca, settings):
    a = aca.reload(IMAGE=None)
    provision_finetune(a.clients)
    ex = AcaExecutor(settings, clients=a.clients)
    run = start(ex, new_run())
    script = a.standin.execution("tuneops-ft", run.execution_id)["properties"]["template"]["containers"][0]["command"][2]
    assert "pip install" in script and "peft" in script


def test_a_missing_dataset_or_job_is_a_clear_error(aca, settings, executor, workspace):
    run = new_run()
    cfg = dict(config_for(run), dataset="datasets/nope.jsonl")
    with pytest.raises(BackendError, match="dataset datasets/nope.jsonl is neither in the workspace"):
        executor.start(run, cfg)
    aca.standin.jobs.clear()
    with pytest.raises(BackendError, match="does not exist.*provision the job") as e:
        executor.start(run, config_for(run))
    assert e.value.hint.command == "provision finetune"  # the bot says `/finetune provision finetune`


def test_429_with_retry_after_on_start_is_retried(aca, executor):
    fault = aca.standin.inject(Fault("arm", path=r"/start$", method="POST", status=429, retry_after=1))
    run = start(executor, new_run())
    assert fault.hits == 1 and run.execution_id
    assert len(aca.standin.executions["tuneops-ft"]) == 1


def test_500_and_a_slow_answer_on_status_are_retried(aca, executor):
    run = start(executor, new_run())
    err = aca.standin.inject(Fault("arm", path=r"/executions/", method="GET", status=500, times=2))
    slow = aca.standin.inject(Fault("arm", path=r"/executions/", method="GET", status=None, delay=3.0))
    assert executor.status(run).status in (ExecStatus.PENDING, ExecStatus.RUNNING, ExecStatus.SUCCEEDED)
    assert err.hits == 2 and slow.hits == 1


def test_quota_and_authorization_failures_end_with_what_to_do(aca, executor):
    aca.standin.inject(Fault("arm", path=r"/start$", method="POST", status=400, code="MaxRegionalQuotaExceeded",
                             message="Operation would exceed the GPU quota in westus3."))
    with pytest.raises(BackendError) as e:
        start(executor, new_run())
    assert "GPU quota is used up" in str(e.value) and "MaxRegionalQuotaExceeded" in str(e.value)
    assert not e.value.transient and "Traceback" not in str(e.value)
    aca.standin.inject(Fault("arm", path=r"/jobs/tuneops-ft$", method="GET", status=403, code="AuthorizationFailed",
                             message="The client does not have authorization"))
    with pytest.raises(BackendError, match="not allowed to.*infra/README.md"):
        start(executor, new_run("ft-0002"))


def test_an_execution_that_fails_gives_its_exit_and_log_tail(aca, executor):
    aca.standin.plan_execution(ExecutionPlan(program=simulated_trainer(fail_at_step=2)))
    run = start(executor, new_run())
    info = wait_finished(executor, run)
    assert info.status is ExecStatus.FAILED
    assert "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in executor.tail_logs(run, 5)
    assert executor.outputs(run)["adapter"] == ""


def test_a_failed_execution_tells_the_exit_code_its_script_left_on_the_share(aca, executor, tmp_path):
    """ACA says Failed and no more (JobExecution has status, start and end only); the run's own script, run here
    for real by bash, leaves the exit code beside train.log."""
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'RuntimeError: boom'\nexit 3\n")
    fake.chmod(0o755)
    aca.standin.plan_execution(ExecutionPlan(program=run_command(python=str(fake))))
    run = start(executor, new_run())
    info = wait_finished(executor, run)
    assert info.status is ExecStatus.FAILED and info.exit_code == 3 and "exited with code 3" in info.detail
    assert "RuntimeError: boom" in executor.tail_logs(run, 5)


def test_a_degraded_execution_is_a_failure(aca, executor):
    aca.standin.plan_execution(ExecutionPlan(final_status="Degraded"))
    run = start(executor, new_run())
    info = wait_finished(executor, run)
    assert info.status is ExecStatus.FAILED and "Degraded" in info.detail


def test_the_replica_timeout_maps_to_timed_out(aca, settings):
    a = aca.reload(REPLICA_TIMEOUT=1)
    provision_finetune(a.clients)
    ex = AcaExecutor(settings, clients=a.clients)
    a.standin.plan_execution(ExecutionPlan(program=sleeper(), processing_s=0.0))
    run = start(ex, new_run())
    info = wait_finished(ex, run)
    assert info.status is ExecStatus.TIMED_OUT and "replica timeout" in info.detail


def test_a_container_that_died_before_writing_leaves_its_last_words_in_log_analytics(aca, executor):
    aca.standin.plan_execution(ExecutionPlan(program=dies_at_once(("pulling image", "exec format error"))))
    run = start(executor, new_run())
    assert wait_finished(executor, run).status is ExecStatus.FAILED
    assert executor.read(run, 0, 0).log_lines == []
    assert executor.tail_logs(run, 10) == ["pulling image", "exec format error"]


def test_stop_leaves_no_execution_running(aca, executor):
    aca.standin.plan_execution(ExecutionPlan(program=sleeper()))
    run = start(executor, new_run())
    wait_for(lambda: executor.status(run).status is ExecStatus.RUNNING, 10, "running")
    executor.stop(run)
    assert executor.status(run).status is ExecStatus.STOPPED
    executor.stop(Run(id="ft-0009", requester="U", channel="C", model="m", dataset="d"))  # never started: no-op


def test_split_complete_keeps_a_half_written_line_for_later():
    assert split_complete(b'{"a":1}\n{"b"', 10, 100) == (b'{"a":1}\n', 18)
    assert split_complete(b"partial", 0, 100) == (b"", 0)
    assert split_complete(b"x" * 100, 0, 100) == (b"x" * 100, 100)
