"""An approved deploy on the ACA backend, seen from Slack: the bot over signed HTTP, a real worker, the real Azure SDK
clients against the Azure stand-in. The deploy task hands the run's adapter to the Azure deploy operation, follows it
to its end and posts the inference app's endpoint in the run's thread."""

from __future__ import annotations

import json

import pytest

from bot.blocks import APPROVE_ACTION
from jobs.backends.aca.standin import ExecutionPlan, simulated_trainer
from jobs.deploys import approval
from jobs.runs import service
from tests.bot.slack_azure import ADMIN, aca, aca_worker, standin, worker_log  # noqa: F401  (fixtures)
from tests.conftest import shown

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def bot_env(bot_env, aca, tmp_path, monkeypatch):  # noqa: F811  (the ACA environment of tests/bot/slack_azure.py)
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    return {**bot_env, **aca.env, "TUNEOPS_BACKEND": "aca", "TUNEOPS_ADMINS": ADMIN, "XDG_CACHE_HOME": cache,
            "TUNEOPS_APPROVERS": "U0BOSS"}


async def test_an_approved_deploy_points_the_inference_app_at_the_adapter_and_posts_its_endpoint(
        bot, slack, aca, aca_worker):
    from jobs.backends.aca.provision import provision_finetune, provision_inference

    provision_finetune(aca.clients)
    endpoint = provision_inference(aca.clients).endpoint
    assert endpoint.startswith("https://")
    aca.standin.plan_execution(ExecutionPlan(program=simulated_trainer(steps=4, step_delay=0.05)))
    _, _, key = await bot.command("run --dataset datasets/chat.jsonl --max-steps 4")
    assert await slack.until(lambda: slack.responses[key], 30)
    run = await slack.until(lambda: (r := shown(bot.settings.jobs, service.get_run(bot.settings.jobs, "ft-0001"))) and r.state.terminal and r,
                            120)
    assert run and run.state == "succeeded", (run, worker_log(aca_worker)[-3000:])

    _, _, key = await bot.command("deploy ft-0001")
    assert "(dp-0001)" in json.dumps(await slack.until(lambda: slack.responses[key], 30))
    card = await slack.until(lambda: [m for m in slack.thread("C0TRAIN", run.thread_ts)
                                      if m.text.startswith("Deploy request dp-0001 ")], 30)
    assert card and "the ACA inference app tuneops-infer" in json.dumps(card[0].blocks)
    _, _, key = await bot.click(APPROVE_ACTION, "dp-0001", user="U0BOSS", message_ts=card[0].ts)
    assert "You approved dp-0001" in json.dumps(await slack.until(lambda: slack.responses[key], 30))

    done = await slack.until(lambda: [m for m in slack.thread("C0TRAIN", run.thread_ts)
                                      if "is deployed" in m.text or "deploy of ft-0001 failed" in m.text], 120)
    assert done, (worker_log(aca_worker)[-3000:], [m.text for m in slack.thread("C0TRAIN", run.thread_ts)])
    assert "is deployed" in done[0].text and endpoint in done[0].text, done[0].text
    req = approval.get_approval(bot.settings.jobs, "dp-0001")
    assert req.state == "deployed" and req.op_id == "pv-0001" and req.url == endpoint
    # the inference app follows its base model's manifest on the share, which now lists the run's adapter
    app = json.dumps(aca.standin.apps["tuneops-infer"])
    assert "--adapters deployments/model-cache--tiny/adapters.json" in app
    share = aca.standin.share_dir(aca.cfg.file_share)
    manifest = json.loads((share / "deployments/model-cache--tiny/adapters.json").read_text())
    assert [(e["name"], e["path"], e["approval"]) for e in manifest["adapters"]] == \
        [("ft-0001", f"../../{run.adapter_path}", "dp-0001")]
    # the Azure operation told its own story in its own thread
    root = next(m for m in slack.root_messages("C0TRAIN") if m.text.startswith("pv-0001:"))
    told = await slack.until(lambda: [m.text for m in slack.thread("C0TRAIN", root.ts) if " is done" in m.text], 30)
    assert told and "ft-0001 is on the endpoint of model-cache/tiny" in told[0], \
        [m.text for m in slack.thread("C0TRAIN", root.ts)]
