"""The bot's Home tab opened: publish the person's Home view (bot.home), which then stays fresh while they look."""

from __future__ import annotations

import logging
from typing import Any

from slack_sdk.errors import SlackApiError

from bot.outage import REDIS, UNREACHABLE
from bot.runtime import runtime_of

log = logging.getLogger("bot.listeners")


async def app_home_opened(event: dict[str, Any], context) -> None:
    # The event comes for the Messages tab too (https://api.slack.com/events/app_home_opened: "tab"); only the Home
    # tab shows a view.
    if event.get("tab", "home") != "home" or not event.get("user"):
        return
    rt = runtime_of(context)
    try:
        await rt.home.opened(event["user"])
    except UNREACHABLE as e:
        REDIS.failed(e, "publishing a Home tab")
    except SlackApiError as e:
        log.warning("views.publish refused the Home tab of %s: %s", event["user"], e.response.get("error"))
    else:
        REDIS.ok()
