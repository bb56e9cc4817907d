"""The /finetune grammar: every subcommand parses to its typed command, every bad input to a ParseError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.grammar import (
    GENERAL_USAGE,
    MAX_TEXT,
    USAGE,
    Cancel,
    Deploy,
    Deployments,
    Help,
    ListRuns,
    Logs,
    ParseError,
    Provision,
    Resume,
    RunCommand,
    SecretList,
    SecretSet,
    Status,
    Undeploy,
    parse,
    subcommand_of,
)


@pytest.mark.parametrize("text, expected", [
    ("", Help()),
    ("   ", Help()),
    ("help", Help()),
    ("help run", Help("run")),
    ("HELP Logs", Help("logs")),
    ("run", RunCommand()),
    ("run --dataset datasets/chat.jsonl", RunCommand(dataset="datasets/chat.jsonl")),
    ("run --model model-cache/tiny --dataset ./datasets//chat.jsonl --epochs 0.5 --lr 2e-4 --max-steps 8 "
     "--name first-try",
     RunCommand(model="model-cache/tiny", dataset="datasets/chat.jsonl", epochs=0.5, lr=2e-4, max_steps=8,
                name="first-try")),
    ("run --model=microsoft/Phi-3-mini-4k-instruct --epochs=3", RunCommand(model="microsoft/Phi-3-mini-4k-instruct",
                                                                           epochs=3.0)),
    ('run --dataset "datasets/my data.jsonl"', RunCommand(dataset="datasets/my data.jsonl")),
    ("status", Status()),
    ("status ft-0042", Status("ft-0042")),
    ("status FT-0042", Status("ft-0042")),
    ("list", ListRuns()),
    ("logs ft-0001", Logs("ft-0001", 20)),
    ("logs ft-0001 --tail 100", Logs("ft-0001", 100)),
    ("logs --tail=5 ft-12345", Logs("ft-12345", 5)),
    ("cancel ft-0003", Cancel("ft-0003")),
    ("resume ft-0003", Resume("ft-0003")),
    ("deploy ft-0003", Deploy("ft-0003")),
    ("undeploy ft-0003", Undeploy("ft-0003")),
    ("deployments", Deployments()),
    ("secret set HF_TOKEN", SecretSet("HF_TOKEN")),
    ("secret list", SecretList()),
    ("provision", Provision()),
    ("provision finetune", Provision("finetune")),
    ("provision inference", Provision("inference")),
    ("provision check", Provision("check")),
    ("provision CHECK", Provision("check")),
])
def test_every_subcommand_parses(text, expected):
    assert parse(text) == expected


def test_subcommand_of_names_each_command():
    assert subcommand_of(RunCommand()) == "run"
    assert subcommand_of(SecretList()) == "secret"
    assert subcommand_of(Logs("ft-0001")) == "logs"


def _error(text: str) -> ParseError:
    result = parse(text)
    assert isinstance(result, ParseError), f"{text!r} parsed to {result!r}"
    return result


@pytest.mark.parametrize("text, words, usage", [
    # unknown subcommand, with a suggestion when one is close
    ("rnu --dataset x.jsonl", ["`rnu` is not a /finetune subcommand", "Did you mean `run`?"], GENERAL_USAGE),
    ("frobnicate", ["`frobnicate` is not a /finetune subcommand"], GENERAL_USAGE),
    # unknown flags
    ("run --max_steps 5", ["Unknown flag `--max_steps`", "Did you mean `--max-steps`?"], USAGE["run"]),
    ("run --gpu a100", ["Unknown flag `--gpu`"], USAGE["run"]),
    ("logs ft-0001 --lines 5", ["Unknown flag `--lines`"], USAGE["logs"]),
    ("run -x", ["Unknown flag `-x`"], USAGE["run"]),
    # bad numbers
    ("run --epochs many", ["`--epochs` takes a number, not `many`"], USAGE["run"]),
    ("run --epochs 0", ["`--epochs` must be more than 0"], USAGE["run"]),
    ("run --epochs -1", ["`--epochs` must be more than 0"], USAGE["run"]),
    ("run --epochs nan", ["`--epochs` must be"], USAGE["run"]),
    ("run --lr 5", ["`--lr` must be more than 0 and at most 1"], USAGE["run"]),
    ("run --max-steps 2.5", ["`--max-steps` takes a whole number, not `2.5`"], USAGE["run"]),
    ("run --max-steps 0", ["`--max-steps` must be between 1 and"], USAGE["run"]),
    ("logs ft-0001 --tail 100000", ["`--tail` must be between 1 and 500"], USAGE["logs"]),
    # flags without values, twice, and stray words
    ("run --dataset", ["`--dataset` needs a value"], USAGE["run"]),
    ("run --dataset --epochs 1", ["`--dataset` needs a value"], USAGE["run"]),
    ("run --dataset=", ["`--dataset` needs a value"], USAGE["run"]),
    ("run --epochs 1 --epochs 2", ["`--epochs` is given twice"], USAGE["run"]),
    ("run datasets/chat.jsonl", ["Unexpected `datasets/chat.jsonl`"], USAGE["run"]),
    ("list everything", ["Unexpected `everything`"], USAGE["list"]),
    ("run --name 'two words'", ["`--name` must be 1-64 letters"], USAGE["run"]),
    ("run --name " + "x" * 65, ["`--name` must be 1-64 letters"], USAGE["run"]),
    # missing or malformed RUN
    ("logs", ["`logs` needs a run id", "/finetune list"], USAGE["logs"]),
    ("cancel", ["`cancel` needs a run id"], USAGE["cancel"]),
    ("resume", ["`resume` needs a run id"], USAGE["resume"]),
    ("deploy", ["`deploy` needs a run id"], USAGE["deploy"]),
    ("undeploy", ["`undeploy` needs a run id"], USAGE["undeploy"]),
    ("deployments ft-0001", ["`deployments` takes no arguments"], USAGE["deployments"]),
    ("cancel 42", ["`42` is not a run id", "ft-0042"], USAGE["cancel"]),
    ("status run-7", ["`run-7` is not a run id"], USAGE["status"]),
    ("cancel ft-0001 ft-0002", ["`cancel` takes one run id"], USAGE["cancel"]),
    # dataset and model paths that leave the workspace
    ("run --dataset ../secrets.jsonl", ["leaves the workspace"], USAGE["run"]),
    ("run --dataset datasets/../../etc/passwd", ["leaves the workspace"], USAGE["run"]),
    ("run --dataset /etc/passwd", ["is an absolute path"], USAGE["run"]),
    ("run --dataset ~/data.jsonl", ["is an absolute path"], USAGE["run"]),
    ("run --dataset datasets\\chat.jsonl", ["use forward slashes"], USAGE["run"]),
    ("run --dataset .", ["not the workspace itself"], USAGE["run"]),
    ("run --model ../../models/x", ["leaves the workspace"], USAGE["run"]),
    # secrets, provision, help
    ("secret", ["`secret` needs `set NAME` or `list`"], USAGE["secret"]),
    ("secret set", ["`secret set` needs a secret name"], USAGE["secret"]),
    ("secret set 1BAD", ["A secret name is a letter"], USAGE["secret"]),
    ("secret get HF_TOKEN", ["`secret get` is not known"], USAGE["secret"]),
    ("provision everything", ["`provision` takes `finetune`, `inference` or nothing"], USAGE["provision"]),
    ("provision check now", ["or `check` (a short smoke run of the set-up)"], USAGE["provision"]),
    ("help me please", ["`help` takes at most one subcommand"], USAGE["help"]),
    # shell-style quoting gone wrong
    ('run --name "unclosed', ["A quote is not closed"], GENERAL_USAGE),
])
def test_every_error_says_what_and_shows_usage(text, words, usage):
    err = _error(text)
    for w in words:
        assert w in err.message, err.message
    assert err.usage == usage


def test_over_long_text_is_refused_with_its_length():
    err = _error("run --name " + "a" * MAX_TEXT)
    assert "at most 1,000" in err.message and f"{MAX_TEXT + 11:,} characters" in err.message


def test_a_secret_value_typed_into_the_command_is_never_echoed():
    err = _error("secret set HF_TOKEN hf_abcdefghijklmnopqrstuvwxyz0123456789")
    assert "hf_abc" not in err.message
    assert "never type a secret's value" in err.message


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_never_raises_and_always_answers(text):
    result = parse(text)
    if isinstance(result, ParseError):
        assert result.message and result.usage.startswith("/finetune")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["..", "a", "b", ".", "datasets"]), min_size=1, max_size=6))
def test_an_accepted_dataset_path_never_leaves_the_workspace(parts):
    import posixpath

    result = parse("run --dataset " + "/".join(parts))
    if isinstance(result, RunCommand):
        joined = posixpath.normpath(posixpath.join("/ws", result.dataset))
        assert joined.startswith("/ws/")
    else:
        assert "workspace" in result.message


def test_slack_escapes_and_curly_quotes_are_undone():
    assert parse("run --name \u201cab\u201d --dataset a&amp;b.jsonl") == RunCommand(name="ab", dataset="a&b.jsonl")
