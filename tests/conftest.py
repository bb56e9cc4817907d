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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server for the whole session; yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs Debian's redis-server")
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(d)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
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
