"""`deploy`, `secret` and `provision`: these need the Azure backend, whose Slack side is not part of this version yet.

They answer honestly with what they need instead of pretending to work.
"""

from __future__ import annotations

from typing import Any

from bot import blocks, grammar
from bot.runtime import BotRuntime


def what_it_needs(cmd: grammar.Command, backend: str) -> str:
    """What this subcommand needs before it can work here; pure."""
    if isinstance(cmd, grammar.Provision):
        configs = {"finetune": "infra/finetuning.config.json", "inference": "infra/inference.config.json",
                   None: "infra/finetuning.config.json and infra/inference.config.json"}[cmd.target]
        need = f"`provision` needs TUNEOPS_BACKEND=aca and {configs} in the workspace"
    elif isinstance(cmd, (grammar.SecretSet, grammar.SecretList)):
        need = ("`secret` stores values in Azure Key Vault and needs TUNEOPS_BACKEND=aca; with the local backend, "
                "set HF_TOKEN or WANDB_API_KEY in the worker's environment instead")
    else:
        need = "`deploy` needs TUNEOPS_BACKEND=aca and infra/inference.config.json in the workspace"
    if backend != "aca":
        return f"{need}. This bot runs the `{backend}` backend."
    return f"{need}. This version of the bot cannot do it from Slack yet; use the Azure portal or CLI meanwhile."


async def handle(ack, cmd: grammar.Command, command: dict[str, Any], rt: BotRuntime) -> None:
    await ack(**rt.gateway.clean(blocks.render_problem(what_it_needs(cmd, rt.settings.jobs.backend))))
