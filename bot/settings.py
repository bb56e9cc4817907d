"""The bot's configuration, read once from the environment and checked, with one line per problem found.

The jobs side's settings (Redis, backend, workspace, ...) are read by `jobs.core.settings` and carried inside.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from bot.auth import AccessPolicy
from jobs.core.settings import JobSettings, SettingsError, duration_setting

SLACK_API_URL = "https://slack.com/api/"

_USER_RE = re.compile(r"^[UW][A-Z0-9]{2,}$")
_CHANNEL_RE = re.compile(r"^[CGD][A-Z0-9]{2,}$")


@dataclass(frozen=True)
class BotSettings:
    slack_bot_token: str
    slack_signing_secret: str
    jobs: JobSettings
    slack_app_token: str = ""
    slack_api_url: str = SLACK_API_URL
    policy: AccessPolicy = AccessPolicy()
    log_interval_s: float = 20.0   # TUNEOPS_LOG_INTERVAL: at most one log excerpt per run this often in its thread
    slack_file_max_bytes: int = 200 * 1000 * 1000   # TUNEOPS_SLACK_FILE_MAX_MB: the largest dataset fetched from Slack
    home_refresh_s: float = 30.0   # TUNEOPS_HOME_REFRESH: a person's Home tab is refreshed at most this often

    @property
    def socket_mode(self) -> bool:
        return bool(self.slack_app_token)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> BotSettings:
        """Read and check every variable; raise SettingsError listing every problem, one line each."""
        problems: list[str] = []
        try:
            jobs = JobSettings.from_env(env)
        except SettingsError as e:
            jobs = None
            problems.extend(e.problems)

        token = env.get("SLACK_BOT_TOKEN", "").strip()
        if not token:
            problems.append("SLACK_BOT_TOKEN is missing: set it to the app's Bot User OAuth Token (xoxb-...), "
                            "from the Slack app's OAuth & Permissions page.")
        elif not token.startswith("xoxb-"):
            problems.append("SLACK_BOT_TOKEN does not look like a bot token: it should start with xoxb- "
                            "(OAuth & Permissions > Bot User OAuth Token).")
        secret = env.get("SLACK_SIGNING_SECRET", "").strip()
        app_token = env.get("SLACK_APP_TOKEN", "").strip()
        if not secret and not app_token.startswith("xapp-"):
            # Socket Mode needs no signing secret: its requests come over a connection the bot opened itself.
            problems.append("SLACK_SIGNING_SECRET is missing: set it to the Signing Secret from the Slack app's "
                            "Basic Information page (or set SLACK_APP_TOKEN for Socket Mode).")
        if app_token and not app_token.startswith("xapp-"):
            problems.append("SLACK_APP_TOKEN does not look like an app-level token: it should start with xapp- "
                            "(Basic Information > App-Level Tokens, scope connections:write); leave it unset for "
                            "HTTP mode.")
        api_url = env.get("SLACK_API_URL", "").strip() or SLACK_API_URL
        parsed = urlparse(api_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            problems.append(f"SLACK_API_URL is not an http(s) URL: {api_url!r}; leave it unset for Slack's own "
                            f"({SLACK_API_URL}).")
        elif not api_url.endswith("/"):
            api_url += "/"  # slack_sdk joins method names onto the base URL

        lists = {}
        for var, pattern, kind in (
            ("TUNEOPS_ALLOWED_CHANNELS", _CHANNEL_RE, "channel ID (like C0123ABCD)"),
            ("TUNEOPS_ALLOWED_USERS", _USER_RE, "user ID (like U0123ABCD)"),
            ("TUNEOPS_ADMINS", _USER_RE, "user ID (like U0123ABCD)"),
            ("TUNEOPS_APPROVERS", _USER_RE, "user ID (like U0123ABCD)"),
        ):
            ids, bad = parse_id_list(env.get(var, ""), pattern)
            if bad:
                problems.append(f"{var}: {', '.join(repr(b) for b in bad)} is not a Slack {kind}; give "
                                "comma-separated IDs (a user's is in their profile's ⋮ menu, a channel's at the "
                                "bottom of its details), not names.")
            lists[var] = ids

        log_interval_s = duration_setting(env, "TUNEOPS_LOG_INTERVAL", cls.log_interval_s, problems,
                                          "how often a run's thread may get a log excerpt (default 20; errors go "
                                          "at once)", lo=1, hi=3600)
        home_refresh_s = duration_setting(env, "TUNEOPS_HOME_REFRESH", cls.home_refresh_s, problems,
                                          "how often an open Home tab may be refreshed while runs change "
                                          "(default 30)", lo=1, hi=3600)

        max_mb = env.get("TUNEOPS_SLACK_FILE_MAX_MB", "").strip()
        slack_file_max_bytes = cls.slack_file_max_bytes
        if max_mb:
            try:
                slack_file_max_bytes = int(float(max_mb) * 1000 * 1000)
                if not 0 < slack_file_max_bytes <= 100 * 1000 ** 3:
                    raise ValueError
            except (ValueError, OverflowError):
                problems.append(f"TUNEOPS_SLACK_FILE_MAX_MB={max_mb!r} is not a size in MB from 0.001 to 100000: set "
                                "it to the largest dataset file (in MB) the bot fetches from Slack (default 200).")

        if problems:
            raise SettingsError(problems)
        assert jobs is not None
        return cls(
            slack_bot_token=token,
            slack_signing_secret=secret,
            slack_app_token=app_token,
            slack_api_url=api_url,
            jobs=jobs,
            log_interval_s=log_interval_s,
            slack_file_max_bytes=slack_file_max_bytes,
            home_refresh_s=home_refresh_s,
            policy=AccessPolicy(
                allowed_channels=lists["TUNEOPS_ALLOWED_CHANNELS"],
                allowed_users=lists["TUNEOPS_ALLOWED_USERS"],
                admins=lists["TUNEOPS_ADMINS"],
                approvers=lists["TUNEOPS_APPROVERS"],
            ),
        )


def parse_id_list(value: str, pattern: re.Pattern[str]) -> tuple[frozenset[str], list[str]]:
    """Split a comma-separated list of Slack IDs; return the good ones and the ones that do not match."""
    good, bad = set(), []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        (good.add(item) if pattern.match(item) else bad.append(item))
    return frozenset(good), bad
