"""The `/finetune` command grammar: one pure function, `parse(text)`, that returns a typed command or a ParseError.

Nothing here does I/O; whether a run exists or a dataset is valid is checked later, by jobs/.
"""

from __future__ import annotations

import difflib
import math
import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import Literal, Union

from jobs.core.domain import RUN_ID_RE

MAX_TEXT = 1000          # a command line longer than this is a paste gone wrong, not a command
MAX_NAME = 64
MAX_TAIL = 500
MAX_GREP = 200           # Log Analytics' `contains` needs no more; a longer one is a paste gone wrong

USAGE: dict[str, str] = {
    "help": "/finetune help",
    "run": "/finetune run [--model M] [--dataset PATH|SLACK_FILE] [--epochs N] [--lr X] [--max-steps N] [--name NAME]",
    "status": "/finetune status [RUN]",
    "list": "/finetune list",
    "logs": "/finetune logs RUN [--tail N] [--grep TEXT]",
    "cancel": "/finetune cancel RUN",
    "resume": "/finetune resume RUN",
    "deploy": "/finetune deploy RUN",
    "undeploy": "/finetune undeploy RUN",
    "deployments": "/finetune deployments",
    "cost": "/finetune cost",
    "secret": "/finetune secret set NAME | /finetune secret list",
    "provision": "/finetune provision [finetune|inference|check]",
}
SUBCOMMANDS = tuple(USAGE)
GENERAL_USAGE = "/finetune " + " | ".join(SUBCOMMANDS)

_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SECRET_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,126}$")
# A Slack file: its id (F0123ABCD), or a link to it as Slack gives them: the file's permalink
# (https://TEAM.slack.com/files/U…/F…/name) or its url_private[_download] (https://files.slack.com/files-pri/T…-F…/…).
SLACK_FILE_ID_RE = re.compile(r"^F[A-Z0-9]{8,}$")
_SLACK_FILE_LINK_RE = re.compile(r"^https://[A-Za-z0-9.-]*slack\.com/"
                                 r"(?:files/[A-Z0-9]+/(F[A-Z0-9]{8,})(?:/|$)|files-pri/T[A-Z0-9]+-(F[A-Z0-9]{8,})/)")


# The commands. Frozen dataclasses so that a parse result can be compared in tests and passed around safely.
@dataclass(frozen=True)
class Help:
    topic: str | None = None


@dataclass(frozen=True)
class RunCommand:
    model: str | None = None
    dataset: str | None = None
    dataset_file: str | None = None     # a Slack file id: the bot fetches it into the workspace (then sets `dataset`)
    epochs: float | None = None
    lr: float | None = None
    max_steps: int | None = None
    name: str | None = None


@dataclass(frozen=True)
class Status:
    run_id: str | None = None


@dataclass(frozen=True)
class ListRuns:
    pass


@dataclass(frozen=True)
class Logs:
    run_id: str
    tail: int = 20
    grep: str | None = None     # only lines holding this text (case-insensitive)


@dataclass(frozen=True)
class Cancel:
    run_id: str


@dataclass(frozen=True)
class Resume:
    run_id: str


@dataclass(frozen=True)
class Deploy:
    run_id: str


@dataclass(frozen=True)
class Undeploy:
    run_id: str


@dataclass(frozen=True)
class Deployments:
    pass


@dataclass(frozen=True)
class Cost:
    pass


@dataclass(frozen=True)
class SecretSet:
    name: str


@dataclass(frozen=True)
class SecretList:
    pass


@dataclass(frozen=True)
class Provision:
    target: Literal["finetune", "inference", "check"] | None = None   # None: both; check: the smoke check


Command = Union[Help, RunCommand, Status, ListRuns, Logs, Cancel, Resume, Deploy, Undeploy, Deployments, Cost,
                SecretSet, SecretList, Provision]


@dataclass(frozen=True)
class ParseError:
    """What was wrong, and the usage line of the subcommand (or of the whole command) to show with it."""

    message: str
    usage: str = GENERAL_USAGE
    subcommand: str | None = None


class _Bad(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def subcommand_of(command: Command) -> str:
    """The subcommand word a command came from, e.g. "run" for RunCommand (for authorization and logging)."""
    return {
        Help: "help", RunCommand: "run", Status: "status", ListRuns: "list", Logs: "logs", Cancel: "cancel",
        Resume: "resume", Deploy: "deploy", Undeploy: "undeploy", Deployments: "deployments", Cost: "cost",
        SecretSet: "secret", SecretList: "secret",
        Provision: "provision",
    }[type(command)]


def parse(text: str) -> Command | ParseError:
    """Parse the text after `/finetune` into a command, or say what is wrong with it."""
    # Slack escapes &, < and > in command text, and phones like to curl quotes; undo both before splitting.
    text = (text or "").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    text = text.translate(_QUOTES).strip()
    if len(text) > MAX_TEXT:
        return ParseError(f"That command is {len(text):,} characters long; at most {MAX_TEXT:,} are accepted. "
                          "Shorten it (put long settings in the dataset or config files instead).")
    try:
        words = _split(text)
    except ValueError:
        return ParseError("A quote is not closed. Close it, or leave quotes out.")
    if not words:
        return Help()
    sub, args = words[0].lower(), words[1:]
    if sub not in USAGE:
        close = difflib.get_close_matches(sub, SUBCOMMANDS, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        return ParseError(f"`{_shorten(words[0])}` is not a /finetune subcommand.{hint}")
    try:
        return _PARSERS[sub](args)
    except _Bad as e:
        return ParseError(e.message, USAGE[sub], sub)


def _split(text: str) -> list[str]:
    # Shell-like words with quotes, but a backslash stays a character (so that `datasets\\x` gets a clear message
    # instead of silently becoming `datasetsx`), and `#` starts no comment.
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""
    lexer.commenters = ""
    return list(lexer)


def _shorten(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


# ---- argument helpers --------------------------------------------------------------------------------------------

def _flags(args: list[str], spec: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Split `--flag value` / `--flag=value` pairs (flags named in `spec`) from positional words."""
    values: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word.startswith("--") or (word.startswith("-") and len(word) > 1 and not _is_number(word)):
            flag, eq, value = word.partition("=")
            if flag not in spec:
                close = difflib.get_close_matches(flag, list(spec), n=1)
                hint = f" Did you mean `{close[0]}`?" if close else ""
                known = ", ".join(f"`{f}`" for f in spec) or "none"
                raise _Bad(f"Unknown flag `{_shorten(flag)}`.{hint} Flags here: {known}.")
            if flag in values:
                raise _Bad(f"`{flag}` is given twice; give it once.")
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise _Bad(f"`{flag}` needs a value: {spec[flag]}.")
                value = args[i + 1]
                i += 1
            if value == "":
                raise _Bad(f"`{flag}` needs a value: {spec[flag]}.")
            values[flag] = value
        else:
            positional.append(word)
        i += 1
    return values, positional


def _is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


def _no_extra(positional: list[str], what: str) -> None:
    if positional:
        raise _Bad(f"Unexpected `{_shorten(' '.join(positional))}`: {what}.")


def _int(flag: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise _Bad(f"`{flag}` takes a whole number, not `{_shorten(value)}`.") from None
    if not lo <= n <= hi:
        raise _Bad(f"`{flag}` must be between {lo:,} and {hi:,}; got {n:,}.")
    return n


def _float(flag: str, value: str, lo: float, hi: float, lo_open: bool = True) -> float:
    try:
        x = float(value)
    except ValueError:
        raise _Bad(f"`{flag}` takes a number, not `{_shorten(value)}`.") from None
    if not math.isfinite(x) or (x <= lo if lo_open else x < lo) or x > hi:
        bound = "more than" if lo_open else "at least"
        raise _Bad(f"`{flag}` must be {bound} {lo:g} and at most {hi:g}; got `{_shorten(value)}`.")
    return x


def workspace_path(flag: str, value: str) -> str:
    """Normalise a path that must stay inside the workspace, or raise _Bad saying why it does not."""
    if "\\" in value or "\x00" in value:
        raise _Bad(f"`{flag} {_shorten(value)}`: use forward slashes, relative to the workspace "
                   "(e.g. `datasets/train.jsonl`).")
    if value.startswith(("/", "~")):
        raise _Bad(f"`{flag} {_shorten(value)}` is an absolute path; give a path relative to the workspace "
                   "(e.g. `datasets/train.jsonl`).")
    norm = posixpath.normpath(value)
    if norm == ".." or norm.startswith("../"):
        raise _Bad(f"`{flag} {_shorten(value)}` leaves the workspace; give a path inside it "
                   "(e.g. `datasets/train.jsonl`).")
    if norm == ".":
        raise _Bad(f"`{flag}` needs a file or folder inside the workspace, not the workspace itself.")
    return norm


def _run_id(args: list[str], sub: str) -> str:
    if not args:
        raise _Bad(f"`{sub}` needs a run id, e.g. `/finetune {sub} ft-0042`; `/finetune list` shows the runs.")
    if len(args) > 1:
        raise _Bad(f"`{sub}` takes one run id; got `{_shorten(' '.join(args))}`.")
    return _check_run_id(args[0])


def _check_run_id(word: str) -> str:
    run_id = word.lower()
    if not RUN_ID_RE.match(run_id):
        raise _Bad(f"`{_shorten(word)}` is not a run id; run ids look like `ft-0042` (see `/finetune list`).")
    return run_id


# ---- one parser per subcommand ---------------------------------------------------------------------------------

def _help(args: list[str]) -> Help:
    if not args:
        return Help()
    if len(args) == 1 and args[0].lower() in USAGE:
        return Help(args[0].lower())
    raise _Bad(f"`help` takes at most one subcommand name ({', '.join(SUBCOMMANDS)}).")


_RUN_FLAGS = {
    "--model": "a folder in the workspace (`model-cache/tiny`) or a hub id (`microsoft/Phi-3-mini-4k-instruct`)",
    "--dataset": "a JSONL file relative to the workspace (`datasets/train.jsonl`), or a Slack file's link or id",
    "--epochs": "a number of epochs, e.g. `3` or `0.5`",
    "--lr": "a learning rate, e.g. `1e-4`",
    "--max-steps": "a whole number of optimizer steps, e.g. `200`",
    "--name": "a short label of letters, digits, `.`, `_` or `-`",
}


def _run(args: list[str]) -> RunCommand:
    values, positional = _flags(args, _RUN_FLAGS)
    _no_extra(positional, "`run` takes only flags")
    model = values.get("--model")
    if model is not None:
        if any(c.isspace() for c in model):
            raise _Bad("`--model` must not contain spaces.")
        model = workspace_path("--model", model)
    dataset, dataset_file = values.get("--dataset"), None
    if dataset is not None:
        dataset_file = slack_file(dataset)
        dataset = None if dataset_file else workspace_path("--dataset", dataset)
    epochs = _float("--epochs", values["--epochs"], 0.0, 100.0) if "--epochs" in values else None
    lr = _float("--lr", values["--lr"], 0.0, 1.0) if "--lr" in values else None
    max_steps = _int("--max-steps", values["--max-steps"], 1, 10_000_000) if "--max-steps" in values else None
    name = values.get("--name")
    if name is not None and (len(name) > MAX_NAME or not _NAME_RE.match(name)):
        raise _Bad(f"`--name` must be 1-{MAX_NAME} letters, digits, `.`, `_` or `-`, starting with a letter or "
                   f"digit; got `{_shorten(name)}`.")
    return RunCommand(model=model, dataset=dataset, dataset_file=dataset_file, epochs=epochs, lr=lr,
                      max_steps=max_steps, name=name)


def slack_file(value: str) -> str | None:
    """The Slack file id that `--dataset` names (an id or a file link), None for a workspace path; _Bad for a link
    that is no file's."""
    link = value.strip("<>").split("|", 1)[0]  # an escaped link arrives as <url> or <url|label>
    if SLACK_FILE_ID_RE.match(link):
        return link
    if not re.match(r"^[a-z]+://", link, re.I):
        return None
    found = _SLACK_FILE_LINK_RE.match(link)
    if found:
        return found.group(1) or found.group(2)
    if "/archives/" in link:
        raise _Bad("`--dataset` got a link to a message, not to a file. Use the file's own link (hover the file, "
                   "⋮ > Copy link) or its id, or use the message's shortcut *Fine-tune on this file*.")
    raise _Bad(f"`--dataset {_shorten(link)}` is neither a path in the workspace nor a Slack file link: give "
               "`datasets/train.jsonl`, a Slack file's link (⋮ > Copy link) or its id (`F0123ABCD`).")


def _status(args: list[str]) -> Status:
    if not args:
        return Status()
    if len(args) > 1:
        raise _Bad(f"`status` takes at most one run id; got `{_shorten(' '.join(args))}`.")
    return Status(_check_run_id(args[0]))


def _list(args: list[str]) -> ListRuns:
    _no_extra(args, "`list` takes no arguments")
    return ListRuns()


def _logs(args: list[str]) -> Logs:
    values, positional = _flags(args, {"--tail": f"a number of lines, 1 to {MAX_TAIL}",
                                       "--grep": 'the text to look for, e.g. `--grep "out of memory"`'})
    run_id = _run_id(positional, "logs")
    tail = _int("--tail", values["--tail"], 1, MAX_TAIL) if "--tail" in values else 20
    grep = values.get("--grep")
    if grep is not None and (len(grep) > MAX_GREP or not grep.strip() or any(c in grep for c in "\r\n\x00")):
        raise _Bad(f"`--grep` takes one line of at most {MAX_GREP} characters; quote text with spaces, "
                   'e.g. `--grep "out of memory"`.')
    return Logs(run_id, tail, grep)


def _cancel(args: list[str]) -> Cancel:
    return Cancel(_run_id(args, "cancel"))


def _resume(args: list[str]) -> Resume:
    return Resume(_run_id(args, "resume"))


def _deploy(args: list[str]) -> Deploy:
    return Deploy(_run_id(args, "deploy"))


def _undeploy(args: list[str]) -> Undeploy:
    return Undeploy(_run_id(args, "undeploy"))


def _deployments(args: list[str]) -> Deployments:
    _no_extra(args, "`deployments` takes no arguments")
    return Deployments()


def _cost(args: list[str]) -> Cost:
    _no_extra(args, "`cost` takes no arguments")
    return Cost()


def _secret(args: list[str]) -> SecretSet | SecretList:
    if not args:
        raise _Bad("`secret` needs `set NAME` or `list`.")
    action = args[0].lower()
    if action == "list":
        _no_extra(args[1:], "`secret list` takes no arguments")
        return SecretList()
    if action == "set":
        if len(args) == 1:
            raise _Bad("`secret set` needs a secret name, e.g. `/finetune secret set HF_TOKEN`.")
        if len(args) > 2:
            # Never echo what follows: it is most likely the secret value itself.
            raise _Bad("`secret set` takes only the secret's NAME; never type a secret's value in a channel. "
                       "`/finetune secret set NAME` opens a private form for the value.")
        name = args[1]
        if not _SECRET_NAME_RE.match(name):
            raise _Bad("A secret name is a letter followed by up to 126 letters, digits, `_` or `-` "
                       "(e.g. `HF_TOKEN`).")
        return SecretSet(name)
    raise _Bad(f"`secret {_shorten(args[0], 20)}` is not known; use `secret set NAME` or `secret list`.")


def _provision(args: list[str]) -> Provision:
    if not args:
        return Provision()
    if len(args) == 1 and args[0].lower() in ("finetune", "inference", "check"):
        return Provision(args[0].lower())  # type: ignore[arg-type]
    raise _Bad(f"`provision` takes `finetune`, `inference` or nothing (both), or `check` (a short smoke run of the "
               f"set-up); got `{_shorten(' '.join(args))}`.")


_PARSERS = {
    "help": _help, "run": _run, "status": _status, "list": _list, "logs": _logs, "cancel": _cancel,
    "resume": _resume, "deploy": _deploy, "undeploy": _undeploy, "deployments": _deployments, "cost": _cost,
    "secret": _secret, "provision": _provision,
}
