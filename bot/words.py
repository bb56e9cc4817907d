"""The one place that turns jobs' facts into Slack words: a person (`<@U…>`), a command hint (`/finetune …`), and a
refusal (a reason and, where one helps, the command to use next)."""

from __future__ import annotations

import re
from typing import Any

from jobs.core.durations import describe_duration
from jobs.core.errors import Hint, Refusal
from jobs.deploys import approval as approvals

COMMAND = "/finetune"


_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,}$")


def escape(text: str) -> str:
    """Slack's mrkdwn escaping, so that user-given text cannot form mentions or links."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def person(who: str) -> str:
    """A mention (`<@U…>`, which Slack shows as the name and, in a message, notifies) for a Slack user id; anything
    else (e.g. "an admin via the CLI") as plain, escaped text."""
    return f"<@{who}>" if _USER_ID.match(who or "") else (escape(who) or "someone")


def people(user_ids, limit: int = 5) -> str:
    """Up to `limit` people, in id order, and how many more."""
    ids = sorted(set(user_ids))
    shown = [person(u) for u in ids[:limit]]
    more = len(ids) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def command(args: str) -> str:
    """A command as the person would type it, in code style."""
    return f"`{COMMAND} {args}`" if args else f"`{COMMAND}`"


def hint(h: Hint | dict[str, Any] | None) -> str:
    """`/finetune list` shows the runs; "" for no hint."""
    found = h if isinstance(h, Hint) else Hint.from_data(h)
    if found is None:
        return ""
    return f"{command(found.command)} {found.says}".rstrip()


def with_hint(reason: str, h: Hint | dict[str, Any] | None) -> str:
    """`reason: hint`, or `Reason. Hint.` when the reason is a whole sentence."""
    said = hint(h)
    if not said:
        return reason
    text = reason.rstrip()
    if text.endswith("."):
        return f"{text} {said}."
    return f"{text}: {said}"


def decision_refused(e: approvals.DecisionRefused) -> str:
    """Why an approve or reject click changed nothing, naming the people who can act."""
    a = e.approval
    budget = a.kind == approvals.RUN_KIND
    what = "budget approval" if budget else "deploy request"
    if e.why == approvals.NOT_APPROVER:
        who = people(e.approvers) if e.approvers else "nobody: TUNEOPS_APPROVERS is empty"
        return (f"Only approvers may approve or reject a {'run over budget' if budget else 'deploy'} "
                f"(TUNEOPS_APPROVERS): {who}.")
    if e.why == approvals.EXPIRED:
        again = ("Start the run again to ask anew" if budget else f"Ask again with {command('deploy ' + a.run_id)}")
        return (f"This {what} of {a.run_id} expired at {approvals.when(a.expires_at)} with no decision "
                f"(requests wait {describe_duration(a.expires_at - a.created_at)}, TUNEOPS_APPROVAL_TTL). {again}.")
    if e.why == approvals.DECIDED:
        by = f" by {person(a.decided_by)}" if a.decided_by else ""
        at = f" at {approvals.when(a.decided_at or a.finished_at)}"
        return f"This {what} of {a.run_id} was already {a.state}{by}{at}; nothing was changed."
    others = e.approvers - {a.requested_by}
    ask = (f"Ask another approver: {people(others)}." if others else
           "No other approver is configured: an admin must add one to TUNEOPS_APPROVERS.")
    return f"You asked for this {'run' if budget else 'deploy'}, so someone else has to approve it (four eyes). {ask}"


def refusal(e: Refusal | Exception) -> str:
    """What the person reads for a refused request or a backend failure they can act on."""
    if isinstance(e, approvals.DecisionRefused):
        return decision_refused(e)
    if isinstance(e, Refusal):
        return with_hint(e.reason, e.hint)
    return str(e)
