"""`tuneops doctor` on Redis durability: AOF (everysec) and noeviction are what tuneops needs, anything else is a
warning that says what to set (redis.conf, CONFIG SET, Azure's portal) and leaves the exit code alone; a Redis that
disables CONFIG (a managed one) gets "check them in the portal", not a failure."""

from __future__ import annotations

import shutil
import time

import pytest

from bot.doctor import check_durability, durability_verdict, main
from jobs.core.settings import JobSettings
from tests.conftest import start_redis_server

GOOD = {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}


def test_the_settings_tuneops_needs_pass():
    c = durability_verdict(GOOD, {"aof_enabled": 1, "aof_last_write_status": "ok"})
    assert c.ok and not c.warn


@pytest.mark.parametrize("name,value", [("appendonly", "no"), ("appendfsync", "always"), ("appendfsync", "no"),
                                        ("maxmemory-policy", "allkeys-lru"), ("maxmemory-policy", "volatile-lru")])
def test_each_wrong_setting_is_a_warning_that_says_what_to_set(name, value):
    c = durability_verdict({**GOOD, name: value}, {"aof_enabled": int(name != "appendonly" or value == "yes")})
    assert c.ok and c.warn
    assert f"{name} is {value}" in c.detail
    assert f"  {name} {GOOD[name]}" in c.detail  # the redis.conf line
    assert f"CONFIG SET {name} {GOOD[name]}" in c.detail and "CONFIG REWRITE" in c.detail
    assert "Azure Cache for Redis" in c.detail and "Premium" in c.detail and "Advanced settings" in c.detail
    assert "silently drop" in c.detail


def test_a_failing_aof_write_is_a_warning():
    c = durability_verdict(GOOD, {"aof_enabled": 1, "aof_last_write_status": "err"})
    assert c.warn and "disk" in c.detail


@pytest.fixture
def start_redis(tmp_path):
    procs = []

    def start(*args: str) -> str:
        d = tmp_path / f"redis-{len(procs)}"
        d.mkdir()
        proc, port = start_redis_server(shutil.which("redis-server"), d, *args)
        procs.append(proc)
        return f"redis://127.0.0.1:{port}/0"

    yield start
    for p in procs:
        p.kill()
        p.wait(10)


def settings_for(url: str) -> JobSettings:
    return JobSettings.from_env({"REDIS_URL": url, "TUNEOPS_WORKSPACE": "/nowhere"})


def test_a_durable_redis_passes(start_redis):
    url = start_redis("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction")
    c = check_durability(settings_for(url))
    assert c.ok and not c.warn, c.detail


def test_a_volatile_redis_warns(start_redis):
    url = start_redis("--appendonly", "no", "--maxmemory-policy", "allkeys-lru")
    c = check_durability(settings_for(url))
    assert c.ok and c.warn
    assert "appendonly is no" in c.detail and "maxmemory-policy is allkeys-lru" in c.detail


def test_a_redis_without_config_says_to_check_the_portal(start_redis):
    url = start_redis("--rename-command", "CONFIG", "")  # as Azure Cache for Redis does
    c = check_durability(settings_for(url))
    assert c.ok and c.warn
    assert "cannot read the settings" in c.detail and "check them in the portal" in c.detail
    assert "Premium" in c.detail and "maxmemory-policy" in c.detail and "learn.microsoft.com" in c.detail


def test_a_warning_does_not_fail_the_doctor(bot_env, slack, workspace, worker, capsys):
    # the session's Redis runs without AOF: doctor warns, and with a worker everything else is there
    deadline = time.monotonic() + 60
    while True:
        rc = main(bot_env)
        out = capsys.readouterr().out
        if rc == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert rc == 0, out
    assert "[WARN   ] Redis durability: appendonly is no" in out
    assert "worth changing: Redis durability" in out
