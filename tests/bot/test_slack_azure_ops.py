"""Provisioning, runs and logs on the ACA backend, seen from Slack: the bot over signed HTTP with the Slack stand-in,
the real Azure SDK clients against the Azure stand-in, and a real worker process."""

from __future__ import annotations

import json
import os

import pytest
from rq import Worker

from bot import doctor
from jobs.backends.aca.standin import (
    ExecutionPlan,
    Fault,
    dies_at_once,
    run_command,
    simulated_trainer,
)
from jobs.core import store
from jobs.runs import service
from tests.azure import standin_worker
from tests.bot.slack_azure import (  # noqa: F401  (fixtures)
    ADMIN,
    aca,
    aca_worker,
    bot_env,
    standin,
    worker_log,
)
from tests.conftest import ROOT, shown

pytestmark = pytest.mark.timeout(240)


def op_root(slack, op_id: str):
    return next((m for m in slack.root_messages("C0TRAIN") if m.text.startswith(f"{op_id}:")), None)


async def op_outcome(slack, op_id: str, timeout: float = 60):
    """The op's root message and its thread, once the thread says how it ended."""
    def ended():
        root = op_root(slack, op_id)
        if root is None:
            return None
        thread = slack.thread("C0TRAIN", root.ts)
        return (root, thread) if any(" is done" in m.text or " failed" in m.text for m in thread) else None

    return await slack.until(ended, timeout)


async def test_provision_twice_makes_one_job_and_both_threads_report(bot, slack, aca, aca_worker, bot_env, tmp_path):
    # Two workers, and a slow create: the second provisioning starts while the first holds the job's lock.
    second_worker = standin_worker.start({**os.environ, **bot_env, "PYTHONPATH": str(ROOT)}, tmp_path / "w2.log")
    aca.standin.inject(Fault("arm", path=r"/jobs/tuneops-ft$", method="PUT", status=None, delay=1.5))
    # Both workers listen before the ops are queued; else the first could do both, one after the other.
    assert await slack.until(lambda: Worker.count(connection=store.connect_bytes(bot.settings.jobs)) >= 2, 60)
    try:
        await provision_twice(bot, slack, aca, aca_worker)
    finally:
        standin_worker.stop(second_worker)


async def provision_twice(bot, slack, aca, aca_worker):
    _, ack1, key1 = await bot.command("provision finetune")
    _, ack2, key2 = await bot.command("provision finetune")
    first = await slack.until(lambda: slack.responses[key1], 20)
    second = await slack.until(lambda: slack.responses[key2], 20)
    assert "pv-0001" in json.dumps(first) and "pv-0002" in json.dumps(second)
    assert "provisioning the fine-tuning job" in json.dumps(first)

    one = await op_outcome(slack, "pv-0001")
    two = await op_outcome(slack, "pv-0002")
    assert one and two, ([m.text for m in slack.root_messages("C0TRAIN")], worker_log(aca_worker))
    # Two workers take the two ops at once: either may win the job's lock. The winner creates the job, the other
    # waits for it and then finds nothing to change.
    outcomes = {"pv-0001": one, "pv-0002": two}
    created = "Created the ACA job tuneops-ft."
    [winner] = [op for op, (_, thread) in outcomes.items() if thread[-1].text.endswith(created)]
    [waiter] = [op for op in outcomes if op != winner]
    (root_w, thread_w), (root_x, thread_x) = outcomes[winner], outcomes[waiter]
    assert all(f"asked by <@{ADMIN}>" in json.dumps(r.blocks) for r in (root_w, root_x))
    steps = [m.text for m in thread_w]
    assert any("queued" in s for s in steps) and any("creating the ACA job tuneops-ft" in s for s in steps)
    assert thread_w[-1].text == f"<@{ADMIN}> {winner} is done: {created}"
    assert thread_x[-1].text == (f"<@{ADMIN}> {waiter} is done: The ACA job tuneops-ft was already up to date; "
                                 "nothing changed.")
    assert any("waiting for another provisioning of the same resource" in m.text for m in thread_x)
    # it went on only after the first one had finished: the ops' own events say so (the notifier posts the threads
    # of different ops side by side, so their messages' order across threads proves nothing)
    ended = {e.run_id: e.ts for e in store.run_events(store.connect(bot.settings.jobs)) if e.kind == "succeeded"}
    assert ended[waiter] > ended[winner]
    assert "portal.azure.com" in json.dumps(thread_w[-1].blocks)
    # the roots were edited to say how each op ended
    assert await slack.until(lambda: all("done" in json.dumps(slack.messages["C0TRAIN"][r.ts].blocks)
                                         for r in (root_w, root_x)), 10)
    # one job, created once: the second op changed nothing
    assert list(aca.standin.jobs) == ["tuneops-ft"]
    assert len(aca.standin.requests_to("arm", "PUT", r"/jobs/tuneops-ft$")) == 1


async def test_provision_without_a_target_does_both_and_a_failure_says_what_to_do(bot, slack, aca, aca_worker):
    _, _, key = await bot.command("provision")
    [answer] = await slack.until(lambda: slack.responses[key], 20)
    assert "pv-0001" in json.dumps(answer) and "pv-0002" in json.dumps(answer)
    assert (await op_outcome(slack, "pv-0001"))[1][-1].text.endswith("Created the ACA job tuneops-ft.")
    root, thread = await op_outcome(slack, "pv-0002")
    assert "inference app tuneops-infer" in thread[-1].text and "tuneops-infer" in aca.standin.apps

    # the environment lost its GPU profile: the op fails with Azure's words and a next step, not a trace
    aca.standin.add_environment("tuneops-env", profiles=("Consumption",))
    aca.standin.jobs.clear()
    _, _, key = await bot.command("provision finetune")
    assert await slack.until(lambda: slack.responses[key], 20)
    root, thread = await op_outcome(slack, "pv-0003")
    failed = thread[-1]
    assert failed.text.startswith(f"<@{ADMIN}> pv-0003 failed: ") and "Traceback" not in failed.text
    assert "provision finetune" in json.dumps(failed.blocks)
    assert await slack.until(lambda: "failed" in json.dumps(slack.messages["C0TRAIN"][root.ts].blocks), 10)


async def test_provision_refusals_and_a_broken_config(bot, slack, aca):
    status, ack, _ = await bot.command("provision", user="U0BOB")
    assert status == 200 and "for tuneops admins only" in ack
    (aca.infra / "finetuning.config.json").write_text("{not json")
    _, _, key = await bot.command("provision finetune")
    [answer] = await slack.until(lambda: slack.responses[key], 20)
    assert "finetuning.config.json: not valid JSON (line 1" in json.dumps(answer)
    assert not slack.root_messages("C0TRAIN")


async def test_a_run_on_aca_has_portal_links_in_its_thread_and_card_and_logs_from_log_analytics(
        bot, slack, aca, aca_worker):
    from jobs.backends.aca.provision import provision_finetune

    provision_finetune(aca.clients)
    aca.standin.plan_execution(ExecutionPlan(program=simulated_trainer(steps=4, step_delay=0.05)))
    _, _, key = await bot.command("run --dataset datasets/chat.jsonl --max-steps 4")
    assert await slack.until(lambda: slack.responses[key], 30)
    run = await slack.until(lambda: (r := shown(bot.settings.jobs, service.get_run(bot.settings.jobs, "ft-0001"))) and r.state.terminal and r,
                            120)
    assert run and run.state == "succeeded", (run, worker_log(aca_worker)[-3000:])
    assert run.backend == "aca" and set(run.links) == {"job", "execution", "logs"}

    started = await slack.until(lambda: [m for m in slack.thread("C0TRAIN", run.thread_ts)
                                         if "started" in m.text], 20)
    links = json.dumps(started[0].blocks)
    assert run.execution_id in started[0].text
    for name, url in run.links.items():
        assert url in links
    assert "/providers/Microsoft.App/jobs/tuneops-ft/overview|ACA job>" in links
    assert "LogsBlade" in links and "executionHistory" in links
    card = await slack.until(lambda: (c := slack.messages["C0TRAIN"][run.card_ts]) and "succeeded" in c.text and c, 20)
    assert card and run.links["logs"] in json.dumps(card.blocks)

    # /finetune logs from Log Analytics: the trainer's console lines, progress events left out, filtered by --grep
    _, _, key = await bot.command("logs ft-0001 --grep LOSS --tail 2")
    [answer] = await slack.until(lambda: slack.responses[key], 30)
    text = json.dumps(answer)
    assert answer["response_type"] == "ephemeral" and "from Log Analytics" in text and "holding `LOSS`" in text
    code = answer["blocks"][1]["text"]["text"]
    assert code.startswith("```") and code.splitlines()[1:-1] == ["step 3/4 loss 0.6667", "step 4/4 loss 0.5000"]
    _, _, key = await bot.command("logs ft-0001 --grep nothing-like-this")
    assert "No log lines of ft-0001 holding `nothing-like-this`" in json.dumps(await slack.until(
        lambda: slack.responses[key], 30))


async def test_a_container_that_died_before_writing_anything_shows_its_last_words(bot, slack, aca, aca_worker):
    from jobs.backends.aca.provision import provision_finetune

    provision_finetune(aca.clients)
    aca.standin.plan_execution(ExecutionPlan(program=dies_at_once(("exec /bin/bash: exec format error",
                                                                   "standard_init_linux.go:228: exec user process"))))
    _, _, key = await bot.command("run --dataset datasets/chat.jsonl --max-steps 4")
    assert await slack.until(lambda: slack.responses[key], 30)
    run = await slack.until(lambda: (r := shown(bot.settings.jobs, service.get_run(bot.settings.jobs, "ft-0001"))) and r.state.terminal and r,
                            120)
    assert run and run.state == "failed", (run, worker_log(aca_worker)[-3000:])
    failed = await slack.until(lambda: [m for m in slack.thread("C0TRAIN", run.thread_ts) if "failed" in m.text], 20)
    assert failed and failed[0].reply_broadcast
    body = json.dumps(failed[0].blocks)
    assert "Last 2 log lines" in body and "exec /bin/bash: exec format error" in body
    assert "Failed" in failed[0].text  # the execution says no more than that (Job_Execution_Get.json)


def test_doctor_includes_the_azure_checks(aca, bot_env, slack):
    checks = {c.name: c for c in doctor.run_checks(bot_env)}
    assert checks["configuration"].ok and "aca backend" in checks["configuration"].detail
    assert checks["Azure config"].ok and checks["Azure Files share"].ok and checks["Key Vault"].ok
    assert not checks["ACA job"].ok and "/finetune provision finetune" in checks["ACA job"].detail
    assert "backend" not in checks  # the placeholder that said Azure was not checked is gone


# ---- /finetune provision check: the smoke check -------------------------------------------------------------------

SMOKE_TOKEN = "hf_smoke-slack-test-token-0123456789"
SMOKE_STEPS = ["GPU quota", "smoke job", "payload code", "start", "share", "Key Vault references", "payload import",
               "Log Analytics"]


def valid_blocks(blocks) -> bool:
    """Every block builds as slack_sdk's Block Kit model, whose validation raises on what Slack would refuse."""
    from slack_sdk.models.blocks import Block

    for b in blocks:
        Block.parse(b).to_dict()
    return True


async def test_provision_check_reports_each_step_of_the_smoke_check_in_its_thread(bot, slack, aca, aca_worker):
    from jobs.backends.aca.provision import provision_finetune
    from jobs.backends.aca.secrets import set_secret

    set_secret(aca.clients, "HF_TOKEN", SMOKE_TOKEN)
    provision_finetune(aca.clients)
    aca.standin.set_usage("SubscriptionConsumptionNCA100Gpus", 0, 1)
    aca.standin.plan_execution(ExecutionPlan(program=run_command()))

    status, ack, _ = await bot.command("provision check", user="U0BOB")
    assert status == 200 and "for tuneops admins only" in ack
    _, _, key = await bot.command("provision check")
    [answer] = await slack.until(lambda: slack.responses[key], 20)
    assert "pv-0001" in json.dumps(answer) and "a smoke check of the Azure set-up" in json.dumps(answer)

    outcome = await op_outcome(slack, "pv-0001", timeout=120)
    assert outcome, ([m.text for m in slack.root_messages("C0TRAIN")], worker_log(aca_worker)[-3000:])
    root, thread = outcome
    steps = [m.text.split(": ", 1)[1].split(":", 1)[0] for m in thread[1:-1]]
    assert steps == SMOKE_STEPS, [m.text for m in thread]
    assert thread[1].text.startswith("pv-0001: GPU quota: 0 of 1 A100 GPU(s)")
    start = next(m for m in thread if m.text.startswith("pv-0001: start:"))
    links = json.dumps(start.blocks)
    assert "tuneops-ft-smoke/overview|ACA job>" in links and "executionHistory" in links and "LogsBlade" in links
    assert ":white_check_mark:" in json.dumps(thread[-2].blocks)
    assert thread[-1].text.startswith(f"<@{ADMIN}> pv-0001 is done: Smoke check passed: the share is mounted")
    assert "LogsBlade" in json.dumps(thread[-1].blocks)
    assert all(SMOKE_TOKEN not in json.dumps(m.blocks) + m.text for m in thread)
    assert valid_blocks(root.blocks) and all(valid_blocks(m.blocks) for m in thread)
    assert await slack.until(lambda: "done" in json.dumps(slack.messages["C0TRAIN"][root.ts].blocks), 10)
    assert valid_blocks(slack.messages["C0TRAIN"][root.ts].blocks)

    # the secret is gone from Key Vault: the next check fails there, in one line that says what to do
    aca.clients.secrets.begin_delete_secret("hf-token").result()
    _, _, key = await bot.command("provision check")
    assert await slack.until(lambda: slack.responses[key], 20)
    root, thread = await op_outcome(slack, "pv-0002", timeout=120)
    failed = thread[-1]
    assert failed.text.startswith(f"<@{ADMIN}> pv-0002 failed: Smoke check failed at Key Vault references: ")
    assert "Set it again, then check again." in failed.text and "\n" not in failed.text
    assert "`/finetune secret set HF_TOKEN` stores it again" in json.dumps(failed.blocks)
    assert "`/finetune secret set HF_TOKEN` stores it again" in json.dumps(thread[-2].blocks)
    assert "/finetune provision check" in json.dumps(failed.blocks)
    assert ":x:" in json.dumps(thread[-2].blocks)
    assert valid_blocks(failed.blocks) and all(valid_blocks(m.blocks) for m in thread)
