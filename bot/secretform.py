"""The secret form: the modal `/finetune secret set NAME` opens, reading and checking what was submitted, the views
that answer a submission, and the `secret list` reply. Pure: views and messages are plain dicts.

A secret's value is typed into the modal only (never into a channel); nothing here puts it into a view, a message or
an error text. `VALUE_BLOCK` is also a redaction trigger (bot.redact): a log line holding a submission's raw body
is masked from that block on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from bot import words
from bot.blocks import Message, context, escape, line_sections, message, section
from jobs.core.errors import BackendError

CALLBACK_ID = "tuneops_secret_set"
NAME_BLOCK = "tuneops_secret_name"
VALUE_BLOCK = "tuneops_secret_value"
NAME_ACTION = "name"
VALUE_ACTION = "value"
MAX_INPUT = 3000            # Slack's limit for a plain_text_input; Key Vault would take 25 KB
MAX_LIST = 40
# An environment variable name, as the secret form asks for (the backend may add rules of its own).
ENV_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}[A-Za-z0-9]$")


def _plain(text: str) -> dict[str, str]:
    return {"type": "plain_text", "text": text}


def secret_modal(name: str, channel: str) -> dict[str, Any]:
    """The form for one secret's value; `channel` is where the command was typed (the op's thread goes there)."""
    return {
        "type": "modal",
        "callback_id": CALLBACK_ID,
        "private_metadata": json.dumps({"channel": channel}),
        "title": _plain("Set a job secret"),
        "submit": _plain("Save to Key Vault"),
        "close": _plain("Cancel"),
        "blocks": [
            section(":closed_lock_with_key: The value goes straight to Azure Key Vault. tuneops never posts, logs "
                    "or stores it; the training job reads it through a Key Vault reference."),
            {
                "type": "input",
                "block_id": NAME_BLOCK,
                "label": _plain("Name (the job's environment variable)"),
                "hint": _plain("Letters, digits and _ like HF_TOKEN; stored in Key Vault as hf-token."),
                "element": {"type": "plain_text_input", "action_id": NAME_ACTION, "initial_value": name,
                            "max_length": 64},
            },
            {
                "type": "input",
                "block_id": VALUE_BLOCK,
                "label": _plain("Value"),
                "hint": _plain("Paste the token itself, without spaces or quotes around it."),
                "element": {"type": "plain_text_input", "action_id": VALUE_ACTION, "max_length": MAX_INPUT,
                            "placeholder": _plain("paste the secret here")},
            },
        ],
    }


@dataclass(frozen=True)
class SecretForm:
    name: str
    value: str = ""
    channel: str = ""

    def __repr__(self) -> str:  # a stray log of the form must not carry the value
        return f"SecretForm(name={self.name!r}, channel={self.channel!r}, value=<{len(self.value)} characters>)"


def read_form(view: dict[str, Any]) -> SecretForm:
    """What was typed into the form, from a view_submission's `view`."""
    values = (view.get("state") or {}).get("values") or {}

    def field(block: str, action: str) -> str:
        value = ((values.get(block) or {}).get(action) or {}).get("value")
        return value if isinstance(value, str) else ""

    try:
        meta = json.loads(view.get("private_metadata") or "{}")
    except json.JSONDecodeError:
        meta = {}
    channel = meta.get("channel") if isinstance(meta, dict) else ""
    return SecretForm(field(NAME_BLOCK, NAME_ACTION).strip(), field(VALUE_BLOCK, VALUE_ACTION),
                      channel if isinstance(channel, str) else "")


def form_errors(form: SecretForm, backend) -> dict[str, str]:
    """Per input block, what is wrong with the submission (shown under the field by Slack); {} when it is fine.

    The value is checked by the backend's check_secret, the same check `set_secret` makes; its messages never
    hold the value."""
    errors: dict[str, str] = {}
    if not ENV_NAME.match(form.name):
        errors[NAME_BLOCK] = ("Use an environment variable name: 2-64 letters, digits and _, starting with a "
                              "letter (HF_TOKEN).")
    if not form.value.strip():
        errors[VALUE_BLOCK] = "Paste the secret's value."
    elif NAME_BLOCK not in errors:
        try:
            backend.check_secret(form.name, form.value)
        except BackendError as e:
            errors[VALUE_BLOCK] = words.refusal(e)
    return errors


Outcome = tuple[dict[str, Any], Message]   # the modal's last view, and the same as a private message


def _outcome(title: str, text: str, note: str = "") -> Outcome:
    blocks = [section(text)] + ([context(note)] if note else [])
    view = {"type": "modal", "callback_id": CALLBACK_ID + "_done", "title": _plain(title), "close": _plain("Close"),
            "blocks": blocks}
    return view, message(f"{text} {note}".strip(), blocks)


def saving_view(name: str) -> dict[str, Any]:
    return _outcome("Saving the secret", f":hourglass_flowing_sand: Saving {escape(name)} to Key Vault…")[0]


def refused_view(reason: str) -> dict[str, Any]:
    return _outcome("Not allowed", f":no_entry: {escape(reason)}")[0]


def saved(name: str, vault_name: str, op_id: str, channel: str) -> Outcome:
    return _outcome("Secret saved", f":white_check_mark: {escape(name)} is saved in Key Vault as "
                                    f"`{escape(vault_name)}`.",
                    f"{op_id} now makes the training job reference it; its thread in <#{channel}> tells when that "
                    "is done.")


def not_saved(name: str, reason: str) -> Outcome:
    return _outcome("Secret not saved", f":x: {escape(name)} was not saved: {escape(reason)}",
                    f"Nothing was stored. Fix the cause, then `/finetune secret set {escape(name)}` again.")


def saved_without_reference(name: str, vault_name: str, reason: str) -> Outcome:
    return _outcome("Secret saved", f":warning: {escape(name)} is saved in Key Vault as `{escape(vault_name)}`, but "
                                    f"the job's reference to it was not queued: {escape(reason)}",
                    "Once the cause is fixed, `/finetune provision finetune` adds the reference.")


def render_secret_list(secrets: list) -> Message:
    """Names and dates of the vault's secrets (the backend protocol's SecretInfo), never values."""
    if not secrets:
        text = "Key Vault holds no secrets yet. `/finetune secret set HF_TOKEN` adds one."
        return message(text, [section(text)])
    shown = secrets[:MAX_LIST]
    lines = [f"• {escape(s.describe())}" + ("" if s.tagged else " (not set through tuneops)") for s in shown]
    if len(secrets) > len(shown):
        lines.append(f"…and {len(secrets) - len(shown)} more.")
    blocks = [section(f"*Job secrets in Key Vault* ({len(secrets)}): names and dates only; values are never shown.")]
    blocks += line_sections(lines)
    return message(f"{len(secrets)} secret(s) in Key Vault: " + ", ".join(s.env_name for s in shown), blocks)
