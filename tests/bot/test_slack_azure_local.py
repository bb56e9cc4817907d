"""On the local backend: `/finetune logs --grep` reads the run's log file, and the Azure-only commands say what they
need instead of failing. The bot over signed HTTP with the Slack stand-in."""

from __future__ import annotations

import json

import pytest

from jobs.core import store
from jobs.core.domain import Run
from jobs.runs import service


@pytest.fixture
def bot_env(bot_env):
    return {**bot_env, "TUNEOPS_ADMINS": "U0ALICE"}


def started_run(bot, workspace, lines: list[str]) -> Run:
    """A queued run whose first attempt wrote `lines` to its log file (what the local trainer's launcher does)."""
    run = service.submit_run(bot.settings.jobs, requester="U0ALICE", channel="C0TRAIN",
                             dataset="datasets/chat.jsonl", max_steps=2)

    def attempted(r: Run):
        r.attempts = 1
        return []

    store.update_run(store.connect(bot.settings.jobs), run.id, attempted)
    log = workspace / "runs" / run.id / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("\n".join(lines) + "\n")
    return run


async def test_logs_grep_reads_the_local_log_file(bot, slack, workspace):
    run = started_run(bot, workspace, [f"step {i} loss {1 / i:.3f}" for i in range(1, 30)] +
                      ["Traceback (most recent call last):", "RuntimeError: CUDA out of memory"])
    _, _, key = await bot.command(f"logs {run.id} --grep LOSS --tail 3")
    [answer] = await slack.until(lambda: slack.responses[key], 20)
    assert answer["response_type"] == "ephemeral"
    assert "holding `LOSS`" in json.dumps(answer) and "from the run's log file" in json.dumps(answer)
    code = answer["blocks"][1]["text"]["text"]
    assert code.splitlines()[1:-1] == ["step 27 loss 0.037", "step 28 loss 0.036", "step 29 loss 0.034"]

    _, _, key = await bot.command(f'logs {run.id} --grep "out of memory"')
    [answer] = await slack.until(lambda: slack.responses[key], 20)
    assert answer["blocks"][1]["text"]["text"].splitlines()[1:-1] == ["RuntimeError: CUDA out of memory"]


async def test_azure_commands_on_the_local_backend_say_what_they_need(bot, slack):
    for text, said in (("secret set HF_TOKEN", "set HF_TOKEN or WANDB_API_KEY in the worker's environment"),
                       ("secret list", "needs TUNEOPS_BACKEND=aca"),
                       ("provision finetune", "needs TUNEOPS_BACKEND=aca and infra/finetuning.config.json")):
        status, ack, _ = await bot.command(text)
        assert status == 200 and said in ack and "runs the `local` backend" in ack, ack
    assert not slack.calls_to("views.open")
