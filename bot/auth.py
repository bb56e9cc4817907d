"""Who may do what: pure checks of a command (or a button) against the access policy.

A refusal carries the reason shown to the person (ephemerally) and logged by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot import words
from bot.grammar import Command, Help, Provision, SecretList, SecretSet
from jobs.core.domain import Run

ADMIN_COMMANDS = (SecretSet, SecretList, Provision)


@dataclass(frozen=True)
class AccessPolicy:
    """Who may do what, from the TUNEOPS_* lists (Slack IDs). An empty `allowed_channels` means every channel;
    an empty `allowed_users` means everyone in an allowed channel; admins may always use the bot."""

    allowed_channels: frozenset[str] = frozenset()
    allowed_users: frozenset[str] = frozenset()
    admins: frozenset[str] = frozenset()
    approvers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Refusal:
    reason: str


def check_place(user: str, channel: str, policy: AccessPolicy) -> Refusal | None:
    """May this person use tuneops at all, here?"""
    if policy.allowed_channels and channel not in policy.allowed_channels:
        places = ", ".join(f"<#{c}>" for c in sorted(policy.allowed_channels))
        return Refusal(f"tuneops is not enabled in this channel. Use it in {places}, or ask an admin to add this "
                       "channel to TUNEOPS_ALLOWED_CHANNELS.")
    return check_person(user, policy)


def check_person(user: str, policy: AccessPolicy) -> Refusal | None:
    """May this person use tuneops at all? The whole check where there is no channel: the bot's Home tab."""
    if policy.allowed_users and user not in policy.allowed_users and user not in policy.admins:
        return Refusal("You are not on the list of people who may use tuneops. Ask an admin to add you to "
                       "TUNEOPS_ALLOWED_USERS.")
    return None


def authorize(command: Command, user: str, channel: str, policy: AccessPolicy) -> Refusal | None:
    """None when `user` may run `command` in `channel`, else the reason they may not."""
    if isinstance(command, Help):
        return None  # help says nothing that needs guarding, and is how people learn who to ask
    refusal = check_place(user, channel, policy)
    if refusal:
        return refusal
    if isinstance(command, ADMIN_COMMANDS):
        if not policy.admins:
            return Refusal("Secrets and provisioning need an admin, and none is configured: set TUNEOPS_ADMINS "
                           "to the Slack user IDs of the people who may use them.")
        if user not in policy.admins:
            return Refusal("Secrets and provisioning are for tuneops admins only (TUNEOPS_ADMINS). Ask one of "
                           f"{words.people(policy.admins)}.")
    return None


def may_manage(run: Run, user: str, policy: AccessPolicy) -> Refusal | None:
    """Cancelling or resuming a run is for the person who started it and for admins."""
    if user == run.requester or user in policy.admins:
        return None
    return Refusal(f"{run.id} was started by {words.person(run.requester)}; only they or an admin "
                   f"({words.people(policy.admins) if policy.admins else 'none configured'}) may cancel or resume it.")


