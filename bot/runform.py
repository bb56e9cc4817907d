"""The "Fine-tune on this file" form: the modal the message shortcut opens on a message with a .jsonl attachment,
reading what was submitted (through the one `/finetune run` grammar), and the views that answer a submission.
Pure: views are plain dicts.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from bot import grammar
from bot.blocks import context, escape, section, truncate
from jobs.core.domain import Run
from jobs.core.runconfig import build_train_config
from jobs.core.settings import JobSettings

SHORTCUT_ID = "tuneops_finetune_file"   # the message shortcut's callback_id (manifest.yaml)
CALLBACK_ID = "tuneops_run_file"        # the modal's
FILE_BLOCK = "tuneops_run_file_file"
MODEL_BLOCK = "tuneops_run_file_model"
EPOCHS_BLOCK = "tuneops_run_file_epochs"
LR_BLOCK = "tuneops_run_file_lr"
STEPS_BLOCK = "tuneops_run_file_max_steps"
NAME_BLOCK = "tuneops_run_file_name"
VALUE = "value"
MAX_FILES = 100            # a static_select's options
MAX_ERROR = 1500           # what an input block's error shows; more would push the form off the screen
# Which field a refusal belongs under, by the flag or word it names (grammar and jobs.runs.service say them so).
_BLOCK_OF = (("--epochs", EPOCHS_BLOCK), ("--lr", LR_BLOCK), ("--max-steps", STEPS_BLOCK), ("--name", NAME_BLOCK),
             ("--model", MODEL_BLOCK), ("model ", MODEL_BLOCK))


def _plain(text: str) -> dict[str, str]:
    return {"type": "plain_text", "text": text}


@dataclass(frozen=True)
class Defaults:
    model: str
    epochs: float
    lr: float
    max_steps: int     # -1: as many as the epochs take


def defaults(settings: JobSettings) -> Defaults:
    """What a run gets when nothing is said: the configured default model and the run config's defaults (with
    TUNEOPS_TRAIN_OVERRIDES)."""
    config = build_train_config("ft-0000", settings.default_model, "dataset.jsonl", {}, settings.train_overrides)
    return Defaults(settings.default_model, config.num_epochs, config.learning_rate, config.max_steps)


def jsonl_files(message: dict[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """The message's .jsonl attachments as (file id, name), and the names of its other attachments."""
    ok, other = [], []
    for f in message.get("files") or []:
        if not isinstance(f, dict) or not f.get("id"):
            continue
        name = str(f.get("name") or f.get("title") or f["id"])
        (ok.append((str(f["id"]), name)) if name.lower().endswith(".jsonl") else other.append(name))
    return ok, other


def _number(x: float) -> str:
    return f"{x:g}"


def _input(block_id: str, label: str, *, initial: str = "", hint: str = "", optional: bool = False,
           placeholder: str = "", max_length: int = 200) -> dict[str, Any]:
    element: dict[str, Any] = {"type": "plain_text_input", "action_id": VALUE, "max_length": max_length}
    if initial:
        element["initial_value"] = initial
    if placeholder:
        element["placeholder"] = _plain(placeholder)
    block: dict[str, Any] = {"type": "input", "block_id": block_id, "label": _plain(label), "element": element,
                             "optional": optional}
    if hint:
        block["hint"] = _plain(hint)
    return block


def run_modal(files: list[tuple[str, str]], channel: str, message_ts: str, d: Defaults) -> dict[str, Any]:
    """The form for a run on one of `files` (the message's .jsonl attachments), with the configured defaults."""
    options = [{"text": _plain(truncate(name, 75)), "value": file_id} for file_id, name in files[:MAX_FILES]]
    return {
        "type": "modal",
        "callback_id": CALLBACK_ID,
        "private_metadata": json.dumps({"channel": channel, "ts": message_ts}),
        "title": _plain("Fine-tune on this file"),
        "submit": _plain("Queue the run"),
        "close": _plain("Cancel"),
        "blocks": [
            section(":floppy_disk: tuneops downloads the file into its workspace, checks every line, and queues the "
                    "run; its card goes into this channel."),
            {"type": "input", "block_id": FILE_BLOCK, "label": _plain("Dataset"),
             "element": {"type": "static_select", "action_id": VALUE, "options": options,
                         "initial_option": options[0]}},
            _input(MODEL_BLOCK, "Base model", initial=d.model,
                   hint="A folder in the workspace (model-cache/tiny) or a hub id (microsoft/Phi-3-mini-4k-instruct)."),
            _input(EPOCHS_BLOCK, "Epochs", initial=_number(d.epochs), max_length=20),
            _input(LR_BLOCK, "Learning rate", initial=_number(d.lr), max_length=20),
            _input(STEPS_BLOCK, "Max steps", initial=str(d.max_steps) if d.max_steps > 0 else "", optional=True,
                   placeholder="as many as the epochs take", max_length=20),
            _input(NAME_BLOCK, "Name", optional=True, placeholder="a short label, e.g. support-v2",
                   max_length=grammar.MAX_NAME),
        ],
    }


@dataclass(frozen=True)
class RunForm:
    file_id: str
    channel: str
    message_ts: str
    model: str = ""
    epochs: str = ""
    lr: str = ""
    max_steps: str = ""
    name: str = ""


def read_form(view: dict[str, Any]) -> RunForm:
    """What was entered, from a view_submission's `view`."""
    values = (view.get("state") or {}).get("values") or {}

    def field(block: str) -> str:
        state = (values.get(block) or {}).get(VALUE) or {}
        value = (state.get("selected_option") or {}).get("value") if "selected_option" in state else state.get("value")
        return value.strip() if isinstance(value, str) else ""

    try:
        meta = json.loads(view.get("private_metadata") or "{}")
    except json.JSONDecodeError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    return RunForm(file_id=field(FILE_BLOCK), channel=str(meta.get("channel") or ""),
                   message_ts=str(meta.get("ts") or ""),
                   model=field(MODEL_BLOCK), epochs=field(EPOCHS_BLOCK), lr=field(LR_BLOCK),
                   max_steps=field(STEPS_BLOCK), name=field(NAME_BLOCK))


def block_of(text: str) -> str:
    """The input block a refusal's text is about: the flag it names, else the dataset."""
    if text.startswith("dataset"):
        return FILE_BLOCK
    return next((block for word, block in _BLOCK_OF if word in text), FILE_BLOCK)


def to_command(form: RunForm) -> grammar.RunCommand | dict[str, str]:
    """The form as the `/finetune run` it stands for, parsed by the one grammar; or the errors to show, by block."""
    if not grammar.SLACK_FILE_ID_RE.match(form.file_id):
        return {FILE_BLOCK: "Pick the .jsonl file to train on."}
    words = ["run", "--dataset", form.file_id]
    for flag, value in (("--model", form.model), ("--epochs", form.epochs), ("--lr", form.lr),
                        ("--max-steps", form.max_steps), ("--name", form.name)):
        if value:
            words += [flag, value]
    parsed = grammar.parse(" ".join(shlex.quote(w) for w in words))
    if isinstance(parsed, grammar.ParseError):
        return {block_of(parsed.message): parsed.message}
    assert isinstance(parsed, grammar.RunCommand)
    return parsed


def errors_text(text: str) -> str:
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 1] + "…"


def _done(title: str, text: str, note: str = "") -> dict[str, Any]:
    blocks = [section(text)] + ([context(note)] if note else [])
    return {"type": "modal", "callback_id": CALLBACK_ID + "_done", "title": _plain(title), "close": _plain("Close"),
            "blocks": blocks}


def checking_view(file_name: str) -> dict[str, Any]:
    return _done("Checking the file", f":mag: Downloading and checking `{escape(file_name)}`…",
                 "This takes a moment for a large file; the answer shows here.")


def queued_view(run: Run, position: int | None) -> dict[str, Any]:
    place = f", number {position} in line" if position else ""
    return _done("Run queued", f":inbox_tray: Queued *{escape(run.display_name)}*{place} on `{escape(run.dataset)}`.",
                 f"Its card is in <#{run.channel}>; progress goes into its thread. sha256 "
                 f"`{escape(run.dataset_sha256[:12])}`.")


def problem_view(text: str) -> dict[str, Any]:
    return _done("Run not queued", f":warning: {escape(errors_text(text))}",
                 "Nothing was queued. Fix the cause, then use the shortcut on the message again.")


def refused_view(reason: str) -> dict[str, Any]:
    """`reason` is bot.auth's own words, with channel and people links in Slack markup: not escaped."""
    return _done("Not allowed", f":no_entry: {reason}")
