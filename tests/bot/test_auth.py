"""Authorization: channel and user lists, admin-only commands, who may cancel a run."""

from __future__ import annotations

from bot.auth import AccessPolicy, authorize, may_manage
from bot.grammar import (
    Cancel,
    Help,
    ListRuns,
    Provision,
    RunCommand,
    SecretList,
    SecretSet,
)
from jobs.core.domain import Run

OPEN = AccessPolicy()
STRICT = AccessPolicy(allowed_channels=frozenset({"C0TRAIN"}), allowed_users=frozenset({"U0ALICE"}),
                      admins=frozenset({"U0ADMIN"}))


def test_an_open_policy_lets_anyone_run_anywhere_but_not_admin_commands():
    assert authorize(RunCommand(), "U0ANY", "C0ANY", OPEN) is None
    refusal = authorize(Provision(), "U0ANY", "C0ANY", OPEN)
    assert refusal is not None and "TUNEOPS_ADMINS" in refusal.reason and "none is configured" in refusal.reason


def test_a_channel_outside_the_list_is_refused_with_where_to_go():
    refusal = authorize(RunCommand(), "U0ALICE", "C0OTHER", STRICT)
    assert refusal is not None
    assert "<#C0TRAIN>" in refusal.reason and "TUNEOPS_ALLOWED_CHANNELS" in refusal.reason


def test_a_user_outside_the_list_is_refused_but_admins_always_pass():
    refusal = authorize(ListRuns(), "U0MALLORY", "C0TRAIN", STRICT)
    assert refusal is not None and "TUNEOPS_ALLOWED_USERS" in refusal.reason
    assert authorize(ListRuns(), "U0ALICE", "C0TRAIN", STRICT) is None
    assert authorize(ListRuns(), "U0ADMIN", "C0TRAIN", STRICT) is None


def test_secrets_and_provision_are_for_admins():
    for cmd in (SecretSet("HF_TOKEN"), SecretList(), Provision("inference")):
        refusal = authorize(cmd, "U0ALICE", "C0TRAIN", STRICT)
        assert refusal is not None and "admins only" in refusal.reason and "<@U0ADMIN>" in refusal.reason
        assert authorize(cmd, "U0ADMIN", "C0TRAIN", STRICT) is None


def test_help_is_never_refused():
    assert authorize(Help(), "U0MALLORY", "C0OTHER", STRICT) is None
    assert authorize(Cancel("ft-0001"), "U0MALLORY", "C0OTHER", STRICT) is not None


def test_only_the_requester_or_an_admin_may_manage_a_run():
    run = Run(id="ft-0001", requester="U0ALICE", channel="C0TRAIN", model="m", dataset="d")
    assert may_manage(run, "U0ALICE", STRICT) is None
    assert may_manage(run, "U0ADMIN", STRICT) is None
    refusal = may_manage(run, "U0BOB", STRICT)
    assert refusal is not None and "<@U0ALICE>" in refusal.reason
