"""Session-wide fixtures: a real redis-server on a free port, and a tiny model built locally."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that was free a moment ago. Only for servers that cannot bind port 0 themselves (redis-server);
    their start must retry on a taken port. For an address where nothing may listen, use `dead_port()`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_held: list[socket.socket] = []


def dead_port() -> int:
    """A TCP port on 127.0.0.1 where nothing listens, and nothing will: it stays bound (never listening) by this
    process until it exits, so a connection to it is refused however busy the machine is."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _held.append(s)
    return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until it returns something true (returned), or fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def make_workspace(ws: Path, tiny_model: Path, example_dataset: Path) -> Path:
    """A workspace as the jobs side sees one: datasets/train.jsonl and model-cache/tiny (a link to the tiny model)."""
    (ws / "datasets").mkdir(parents=True)
    (ws / "model-cache").mkdir()
    shutil.copy(example_dataset, ws / "datasets" / "train.jsonl")
    (ws / "model-cache" / "tiny").symlink_to(tiny_model, target_is_directory=True)
    return ws


def _launch_redis(exe: str, d: Path, port: int, args: tuple[str, ...], timeout: float) -> subprocess.Popen | None:
    """A redis-server on `port` with its folder `d` and extra `args`, once it answers with its own pid (a PING
    answered by some other redis that took the port is never mistaken for ours); None, and nothing left running,
    when it exited (the port was taken) or did not get ready within `timeout`."""
    import redis

    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(d), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port, socket_timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if int(client.info("server")["process_id"]) == proc.pid:
                    return proc
            except redis.ConnectionError:
                pass
            except redis.ResponseError:  # LOADING: still reading its AOF
                pass
            time.sleep(0.05)
    finally:
        client.close()
    proc.kill()
    proc.wait(10)
    return None


def start_redis_server(exe: str, d: Path, *args: str, attempts: int = 5) -> tuple[subprocess.Popen, int]:
    """A redis-server on a free TCP port, ready for commands. redis-server cannot bind port 0, so the port from
    `free_port()` may be taken by someone else before redis binds it: then redis exits, and we try a fresh port
    (a bounded number of times). `args` go on its command line after ours (the last of a repeated setting wins)."""
    for _ in range(attempts):
        port = free_port()
        proc = _launch_redis(exe, d, port, args, 30)
        if proc is not None:
            return proc, port
    pytest.fail(f"redis-server did not start in {attempts} attempts")


def restart_redis_server(exe: str, d: Path, port: int, *args: str, timeout: float = 30) -> subprocess.Popen:
    """A redis-server again on `port` (after the one there was killed), with the same folder `d` (so it loads its
    AOF or RDB) and `args`; ready as in `start_redis_server`."""
    proc = _launch_redis(exe, d, port, args, timeout)
    if proc is None:
        pytest.fail(f"redis-server did not start again on port {port}")
    return proc


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server for the whole session; yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs Debian's redis-server")
    proc, port = start_redis_server(exe, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis, flushed before each test."""
    import redis

    r = redis.Redis.from_url(redis_server)
    r.flushall()
    yield redis_server
    r.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama-style model and tokenizer on disk, built once a session from the shipped example data."""
    from payload.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def example_dataset() -> Path:
    from payload.tinymodel import example_dataset_path

    return example_dataset_path()


def shown(settings, run):
    """The run with where the bot posted its card (bot.threads), as `thread_ts` and `card_ts`: tests follow the
    thread as a reader of the channel would."""
    from bot.threads import RUN_CARD, Threads

    if run is not None:
        run.thread_ts = run.card_ts = Threads(settings).get(RUN_CARD, run.id)
    return run
