"""W&B reporting with the real `wandb` package in offline mode: a short 4-bit run of the tiny model, then what its
offline run folder holds (the config, the loss of every step, the evals), and that the API key is nowhere on disk.

How the offline run is read: offline mode writes no `files/config.yaml` or `files/wandb-summary.json` (checked with
wandb 0.31: `files/` holds only output.log and requirements.txt), `wandb sync --view` and wandb's Python reader of
the run file (`DataStore`) are gone, and `wandb.Api` needs a server. Everything is in `run-<id>.wandb`: LevelDB's
log format (32 KiB blocks of CRC-checked chunks) behind a 7-byte W&B header, each record one of wandb's own protobuf
`Record` messages, whose classes wandb ships (`wandb.proto.wandb_internal_pb2`). That format has to stay readable
across versions (`wandb sync` of a newer wandb uploads older offline runs, and the header carries a version for it),
so the few lines below rest on it rather than on wandb's internals; a changed header fails the test by name.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from payload.events import EVENTS_FILE, parse_line, read_events
from tests.payload.test_train import RUN, env, workspace

STEPS = 12
HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)     # ident, magic, version
BLOCK, CHUNK_HEADER = 32768, 7                       # LevelDB log: crc32 (4), length (2), chunk type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """The records of an offline run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:len(HEADER)] == HEADER, f"{path.name} starts with {raw[:7]!r}: not the run file format known here"
    records, parts, pos = [], [], len(HEADER)
    while pos + CHUNK_HEADER <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:                     # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos:pos + CHUNK_HEADER])
        if (crc, length, kind) == (0, 0, 0):        # zero padding up to the block's end
            pos += left
            continue
        body = raw[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        assert kind in (FULL, FIRST, MIDDLE, LAST) and zlib.crc32(body, zlib.crc32(bytes([kind]))) == crc, \
            f"{path.name}: bad chunk at byte {pos}"
        parts.append(body)
        pos += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def _items(items) -> dict:
    """History, summary or config items as {key: value}; newer wandb writes `nested_key`, older `key`."""
    return {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in items}


def _files(*roots: Path):
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                yield p


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, tiny_model):
    pytest.importorskip("wandb")
    from payload.tinymodel import example_dataset_path

    tmp = tmp_path_factory.mktemp("wandb")
    ws = workspace(tmp, tiny_model, example_dataset_path(), max_steps=STEPS, save_steps=STEPS // 2,
                   eval_generations=0, wandb_project="tuneops-test")
    home = tmp / "home"                              # wandb's own settings and caches land here, to be searched too
    key = secrets.token_hex(20)                      # a fake 40-character key, as W&B's look
    e = {k: v for k, v in env().items() if not k.startswith("WANDB_")}   # none of this machine's W&B settings
    e.update({"WANDB_API_KEY": key, "WANDB_MODE": "offline", "HOME": str(home),
         "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
         "WANDB_DATA_DIR": str(home / "data")})
    res = subprocess.run([sys.executable, "-m", "payload.train", "--config", f"{RUN}/run.json"], cwd=ws, env=e,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    found = list((ws / RUN / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(found) == 1, f"one offline run under {RUN}/wandb expected, found {found}"
    return ws, home, key, res, found[0], wandb_records(found[0])


def test_the_offline_run_holds_the_config(offline_run):
    ws, _, _, _, _, records = offline_run
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].project == "tuneops-test" and runs[0].display_name == "ft-0001"
    config = _items(runs[0].config.update)
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update(_items(r.config.update))
    run_json = json.loads((ws / RUN / "run.json").read_text())
    assert {k: config["tuneops"][k] for k in run_json} == run_json        # the run config, whole
    assert config["tuneops"]["wandb_entity"] == ""
    # and what the Trainer adds: its arguments, the model's config and the LoRA config
    assert config["learning_rate"] == run_json["learning_rate"] and config["max_steps"] == STEPS
    assert config["model_type"] == "llama" and "peft_config" in config


def test_the_offline_run_holds_the_loss_of_every_step_and_the_evals(offline_run):
    ws, _, _, res, _, records = offline_run
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    losses = {int(h["train/global_step"]): h["train/loss"] for h in history if "train/loss" in h}
    evals = {int(h["train/global_step"]): h["eval/loss"] for h in history if "eval/loss" in h}
    metrics = json.loads((ws / RUN / "metrics.json").read_text())
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == pytest.approx(dict(metrics["loss_history"]), rel=1e-9)
    events = read_events(ws / RUN / EVENTS_FILE)[0]
    steps = {e["step"]: e["loss"] for e in events if e["type"] == "step"}
    assert steps == pytest.approx(losses, abs=6e-6)                    # the events round to 5 decimals
    assert sorted(evals) == [STEPS // 2, STEPS]
    assert evals == pytest.approx(dict(metrics["eval_history"]), rel=1e-9)

    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert summary["final/eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-9)
    assert summary["final/base_eval_loss"] == pytest.approx(metrics["base_eval_loss"], rel=1e-9)
    assert summary["train_loss"] == pytest.approx(metrics["train_loss"], rel=1e-9)
    exits = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert len(exits) == 1 and exits[0].exit_code == 0                 # finished by the trainer, cleanly

    # W&B's console capture leaves the event lines on stdout whole; offline there is no link to announce
    stdout_events = [e for e in map(parse_line, res.stdout.splitlines()) if e]
    assert stdout_events == events and not [e for e in events if e["type"] == "link"]


def test_the_api_key_is_nowhere_on_disk_nor_in_the_output(offline_run):
    ws, home, key, res, run_file, _ = offline_run
    needle = key.encode()
    searched = list(_files(ws, home))
    assert run_file in searched and ws / RUN / EVENTS_FILE in searched
    assert any(p.name == "output.log" for p in searched) and any(p.name == "debug.log" for p in searched)
    assert [str(p) for p in searched if needle in p.read_bytes()] == []
    assert key not in res.stdout and key not in res.stderr


def test_without_the_wandb_package_or_a_key_the_trainer_reports_to_no_one(tmp_path, monkeypatch, caplog):
    """The payload's container may lack wandb: with a key set, the trainer logs so and trains without W&B."""
    import importlib.util

    from payload import train
    from payload.config import TrainConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = TrainConfig(base_model="model-cache/tiny", dataset="chat.jsonl", output_dir=str(tmp_path))
    assert train.start_wandb(cfg) is None
    assert "the wandb package is not installed; not reporting to W&B" in caplog.text
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert train.start_wandb(cfg) is None                               # no key: W&B stays off
    assert not os.listdir(tmp_path)
