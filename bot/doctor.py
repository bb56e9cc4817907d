"""`tuneops doctor`: checks the configuration, Redis, Slack (auth.test), the workers and the backend, and says plainly
what is missing and what to do. Exit code 0 only when everything needed is there; a warning (WARN) says what to change
but does not fail it.

`tuneops doctor --smoke` runs the backend's smoke check instead: one short, cheap execution on Azure that proves the
share, the Key Vault references, the payload import and the logs before the first GPU minute, printing each step as it
ends. Exit code 0 only when it passes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis
from rq import Worker
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError

from bot import words
from bot.redact import redact
from bot.settings import BotSettings
from jobs.backends import get_backend
from jobs.backends.protocol import SmokeStep
from jobs.core import queue
from jobs.core.errors import BackendError
from jobs.core.settings import JobSettings, SettingsError


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    warn: bool = False  # ok, but not as it should be: printed as WARN, and the exit code stays 0


# What Redis must be for tuneops: every fact (runs, the event stream, approvals) lives only there, so it must survive
# a restart (AOF, fsync'd every second) and must never be evicted to make room (eviction drops them silently).
DURABLE = {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}
AZURE_DOCS = {
    "persistence": "https://learn.microsoft.com/azure/azure-cache-for-redis/cache-how-to-premium-persistence",
    "settings": "https://learn.microsoft.com/azure/azure-cache-for-redis/cache-configure",
}


def check_config(env: Mapping[str, str]):
    """(Check, BotSettings or None, JobSettings or None)."""
    try:
        settings = BotSettings.from_env(env)
        mode = "Socket Mode" if settings.socket_mode else "HTTP mode"
        return Check("configuration", True, f"complete ({mode}, {settings.jobs.backend} backend)"), settings, \
            settings.jobs
    except SettingsError as e:
        problems = getattr(e, "problems", None) or str(e).splitlines()
        try:
            jobs = JobSettings.from_env(env)
        except SettingsError:
            jobs = None
        return Check("configuration", False, "\n".join(problems)), None, jobs


def check_redis(jobs) -> Check:

    url = jobs.redis_url if jobs else os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        client.ping()
        version = client.info("server").get("redis_version", "?")
        client.close()
    except redis.RedisError as e:
        return Check("Redis", False, f"nothing answers at REDIS_URL ({_safe_url(url)}): {e}. Start redis-server "
                                     "(apt-get install redis-server) or point REDIS_URL at a running one.")
    return Check("Redis", True, f"Redis {version} answers at {_safe_url(url)}")


def check_durability(jobs) -> Check:
    """Warns when Redis could lose tuneops' facts: no AOF, a lazier fsync, or an eviction policy."""
    url = jobs.redis_url if jobs else os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3, decode_responses=True)
        try:
            found = {name: client.config_get(name).get(name, "") for name in DURABLE}
            persistence = client.info("persistence")
        finally:
            client.close()
    except redis.ResponseError as e:  # managed Redis (Azure Cache for Redis, ElastiCache) disables CONFIG
        return Check("Redis durability", True, durability_unreadable(str(e)), warn=True)
    except redis.RedisError as e:
        return Check("Redis durability", True, f"cannot read the settings ({type(e).__name__}: {e}).", warn=True)
    return durability_verdict(found, persistence)


def durability_unreadable(error: str) -> str:
    return (f"cannot read the settings (CONFIG answered: {error}); a managed Redis disables CONFIG, so check them in "
            "the portal: on Azure Cache for Redis, Data persistence set to AOF (Premium tier and above; "
            f"{AZURE_DOCS['persistence']}) and Advanced settings > maxmemory-policy set to noeviction "
            f"({AZURE_DOCS['settings']}).")


def durability_verdict(found: Mapping[str, str], persistence: Mapping[str, object]) -> Check:
    """Pure: the settings CONFIG GET found and INFO persistence, as a Check that says what to set."""
    wrong = {name: found.get(name, "") for name, want in DURABLE.items() if found.get(name, "") != want}
    if str(persistence.get("aof_enabled", "1" if found.get("appendonly") == "yes" else "0")) != "1":
        wrong.setdefault("appendonly", found.get("appendonly", "") or "no")
    write_status = str(persistence.get("aof_last_write_status", "ok"))
    disk = (f"AOF's last write failed ({write_status}): Redis cannot persist; check its disk (space, permissions)."
            if write_status not in ("ok", "") else "")
    if not wrong:
        if disk:
            return Check("Redis durability", True, disk, warn=True)
        return Check("Redis durability", True, "AOF on (appendfsync everysec), maxmemory-policy noeviction")
    is_now = ", ".join(f"{name} is {value or '(unset)'}" for name, value in wrong.items())
    lines = [(f"{is_now}: every fact (runs, the event stream, approvals) lives only in Redis, so a restart or an "
              "eviction would silently drop some. Set in redis.conf:")]
    lines += [f"  {name} {DURABLE[name]}" for name in wrong]
    lines.append("or at runtime: " + "; ".join(f"redis-cli CONFIG SET {name} {DURABLE[name]}" for name in wrong)
                 + "; redis-cli CONFIG REWRITE (to keep it in redis.conf).")
    lines.append("On Azure Cache for Redis: Data persistence > AOF (Premium tier and above; "
                 f"{AZURE_DOCS['persistence']}); Advanced settings > maxmemory-policy > noeviction "
                 f"({AZURE_DOCS['settings']}).")
    if disk:
        lines.append(disk)
    return Check("Redis durability", True, "\n".join(lines), warn=True)


def check_slack(env: Mapping[str, str], settings) -> Check:

    token = settings.slack_bot_token if settings else env.get("SLACK_BOT_TOKEN", "")
    if not token:
        return Check("Slack", False, "cannot call auth.test without SLACK_BOT_TOKEN (see above).")
    base = settings.slack_api_url if settings else (env.get("SLACK_API_URL") or "https://slack.com/api/")
    try:
        resp = WebClient(token=token, base_url=base, timeout=10).auth_test()
    except SlackApiError as e:
        error = e.response.get("error", "error")
        return Check("Slack", False, f"auth.test refused the token ({error}): copy the Bot User OAuth Token "
                                     "(xoxb-...) again from the app's OAuth & Permissions page, and reinstall "
                                     "the app to the workspace if its scopes changed.")
    except (SlackClientError, OSError) as e:
        return Check("Slack", False, f"cannot reach {base} ({type(e).__name__}): check the network or SLACK_API_URL.")
    return Check("Slack", True, f"authenticated as @{resp.get('user')} in {resp.get('team')} ({resp.get('team_id')})")


def check_workers(jobs) -> Check:

    try:
        workers = Worker.all(queue=queue.get_queue(jobs))
    except redis.RedisError:
        return Check("workers", False, "cannot list workers: Redis is not reachable (see above).")
    if not workers:
        return Check("workers", False, "no worker listens on the run queue, so runs would wait forever: start "
                                       "`tuneops worker` (one or more).")
    return Check("workers", True, f"{len(workers)} worker(s) on queue '{queue.QUEUE_NAME}'")


def check_backend(jobs) -> list[Check]:
    """The backend's own read-only checks (the local workspace and trainer; the Azure config, job, share, ...)."""
    try:
        backend = get_backend(jobs)
    except BackendError as e:
        return [Check("backend", False, words.refusal(e))]
    return [Check(c.what, c.ok, words.with_hint(c.detail, c.hint)) for c in backend.doctor()]


def run_checks(env: Mapping[str, str] = os.environ) -> list[Check]:
    config, settings, jobs = check_config(env)
    checks = [config]
    redis_check = check_redis(jobs)
    checks.append(redis_check)
    if redis_check.ok:
        checks.append(check_durability(jobs))
    checks.append(check_slack(env, settings))
    if jobs is not None:
        if redis_check.ok:
            checks.append(check_workers(jobs))
        checks.extend(check_backend(jobs))
    return checks


def _safe_url(url: str) -> str:

    return redact(url)


_MARK = {"ok": "ok ", "warn": "WARN", "fail": "FAILED", "info": "..."}


def print_step(step: SmokeStep, out: Callable[[str], None] = print) -> None:
    """One smoke step as a doctor line, its links under it."""
    out(f"[{_MARK.get(step.status, step.status):7}] {step.name}: {words.with_hint(step.text, step.hint)}")
    for name, url in step.links.items():
        out(f"{'':10}{name}: {url}")


def smoke(env: Mapping[str, str] = os.environ, log_wait_s: float | None = None,
          out: Callable[[str], None] = print) -> int:
    """`tuneops doctor --smoke`: the backend's smoke check, step by step; 0 only when it passes."""
    try:
        jobs = JobSettings.from_env(env)
    except SettingsError as e:
        for problem in getattr(e, "problems", None) or str(e).splitlines():
            out(f"[MISSING] configuration: {problem}")
        return 1
    try:
        backend = get_backend(jobs)
        out(f"Smoke check on the {jobs.backend} backend: one short execution; each step as it ends.")
        result = backend.smoke_check(lambda step: print_step(step, out), log_wait_s=log_wait_s)
    except BackendError as e:
        out(f"[FAILED ] smoke check: {words.refusal(e)}")
        return 1
    out("")
    out(words.with_hint(result.verdict, result.hint))
    return 0 if result.passed else 1


def main(env: Mapping[str, str] = os.environ, smoke_check: bool = False, log_wait_s: float | None = None) -> int:
    if smoke_check:
        return smoke(env, log_wait_s)
    checks = run_checks(env)
    for c in checks:
        mark = "MISSING" if not c.ok else "WARN" if c.warn else "ok "
        lines = c.detail.splitlines() or [""]
        print(f"[{mark:7}] {c.name}: {lines[0]}")
        for line in lines[1:]:
            print(f"{'':10}{c.name}: {line}")
    failed = [c.name for c in checks if not c.ok]
    warned = [c.name for c in checks if c.ok and c.warn]
    if failed:
        print(f"\n{len(failed)} thing(s) to fix: {', '.join(failed)}.")
        return 1
    print("\nEverything tuneops needs is there" + (f"; worth changing: {', '.join(warned)}." if warned else "."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
