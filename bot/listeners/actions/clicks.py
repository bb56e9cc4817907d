"""What every button handler reads from a click (who, where, which value, where to answer), the check every button
makes before it acts (the value names something of the right kind, and the person may use tuneops in that channel),
and `button_listener`, which builds the Bolt listener of a button from what it does.

A click on the bot's Home tab has neither a channel nor a response_url (https://api.slack.com/reference/
interaction-payloads/block-actions: its container is the view): the person is checked without a channel, and the
answer goes on their Home view (bot.home.home_address); the handler is the same."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bot import blocks
from bot.auth import check_person, check_place
from bot.home import home_address
from bot.listeners.support import answer, log_refusal
from bot.runtime import BotRuntime, runtime_of


@dataclass(frozen=True)
class Click:
    user: str
    channel: str
    response_url: str
    value: str
    action_id: str = ""
    on_home: bool = False   # clicked on the Home tab: no channel, answers go on the person's Home view


def read_click(body: dict[str, Any], action: dict[str, Any]) -> Click:
    user = body.get("user", {}).get("id", "")
    on_home = (body.get("container") or {}).get("type") == "view" and (body.get("view") or {}).get("type") == "home"
    return Click(
        user=user,
        channel=(body.get("channel") or {}).get("id") or body.get("container", {}).get("channel_id", ""),
        response_url=home_address(user) if on_home else body.get("response_url", ""),
        value=str(action.get("value", "")),
        action_id=str(action.get("action_id", "")),
        on_home=on_home,
    )


async def allowed(rt: BotRuntime, click: Click, what: str, pattern: re.Pattern[str], usage: str) -> bool:
    """False (and the person told why, privately) when the button's value is not an id of `pattern`'s kind or the
    person may not use tuneops here."""
    if not pattern.match(click.value):
        await answer(rt, click.response_url, blocks.render_problem(f"That button names nothing tuneops knows; "
                                                                    f"use `{usage}`."))
        return False
    policy = rt.settings.policy
    refusal = check_person(click.user, policy) if click.on_home else check_place(click.user, click.channel, policy)
    if refusal is not None:
        log_refusal(f"{what} button {click.value}", click.user, click.channel, refusal.reason)
        await answer(rt, click.response_url, blocks.render_refusal(refusal.reason))
        return False
    return True


def button_listener(what: str, pattern: re.Pattern[str], usage: str,
                    act: Callable[[BotRuntime, Click], Awaitable[None]]):
    """A Bolt listener that acks, reads the click, checks it with `allowed`, then does `act`."""

    async def listener(ack, body: dict[str, Any], action: dict[str, Any], context) -> None:
        await ack()
        rt = runtime_of(context)
        click = read_click(body, action)
        if await allowed(rt, click, what, pattern, usage):
            await act(rt, click)

    listener.__name__ = f"{what.replace(' ', '_')}_button"
    return listener


async def already_acked(**_: Any) -> None:
    """For handing a click to a command handler that acks first: the click was acked already."""
