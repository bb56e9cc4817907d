"""The trainer as the jobs side runs it: `python -m payload.train --config run.json` in a workspace folder.

Real 4-bit NF4 training of the tiny model on CPU, SIGKILL and SIGTERM with resume, a corrupt newest checkpoint,
and every kind of bad input ending in one line, an error event and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from payload import checkpoints as ck
from payload.config import DEMO_OVERRIDES
from payload.events import EVENTS_FILE, REQUIRED_FIELDS, parse_line, read_events

ROOT = Path(__file__).resolve().parents[2]
RUN = "runs/ft-0001"


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "HF_TOKEN")}
    e.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return e


def workspace(tmp_path: Path, tiny_model: Path, example_dataset: Path, **overrides) -> Path:
    """A workspace like the jobs side lays out: the dataset in it, the config at runs/<id>/run.json."""
    ws = tmp_path / "ws"
    (ws / RUN).mkdir(parents=True)
    shutil.copy(example_dataset, ws / "chat.jsonl")
    cfg = {**DEMO_OVERRIDES, "run_id": "ft-0001", "base_model": str(tiny_model), "dataset": "chat.jsonl",
           "output_dir": RUN, **overrides}
    (ws / RUN / "run.json").write_text(json.dumps(cfg))
    return ws


def train(ws: Path, config: str = f"{RUN}/run.json", preexec=None,
          extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "payload.train", "--config", config], cwd=ws,
                          env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=240,
                          preexec_fn=preexec)


def start(ws: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "payload.train", "--config", f"{RUN}/run.json"], cwd=ws,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, pred) -> dict:
    """Read the trainer's stdout until an event satisfies `pred`; return that event."""
    for line in proc.stdout:
        ev = parse_line(line)
        if ev is not None and pred(ev):
            return ev
    proc.wait(10)
    pytest.fail(f"the trainer ended (rc {proc.returncode}) before the awaited event: {proc.stderr.read()[-2000:]}")


def events_of(ws: Path) -> list[dict]:
    return read_events(ws / RUN / EVENTS_FILE)[0]


def runs_of(events: list[dict]) -> list[list[dict]]:
    """The events split per process start."""
    out: list[list[dict]] = []
    for e in events:
        if e["type"] == "start":
            out.append([])
        out[-1].append(e)
    return out


def assert_one_line_failure(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for n in needles:
        assert n in last
    assert "Traceback" not in res.stderr + res.stdout
    stdout_events = [e for e in map(parse_line, res.stdout.splitlines()) if e]
    assert stdout_events and stdout_events[-1]["type"] == "error" and stdout_events[-1]["message"] == last[7:]
    return last


# --- a real run --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    from payload.tinymodel import example_dataset_path

    ws = workspace(tmp_path_factory.mktemp("run"), tiny_model, example_dataset_path())
    res = train(ws)
    assert res.returncode == 0, res.stderr[-3000:]
    return ws, res


def test_4bit_run_writes_adapter_metrics_and_lowers_the_loss(finished_run):
    ws, res = finished_run
    out = ws / RUN
    adapter = out / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (adapter / name).is_file()
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 16
    assert {n.rsplit(".", 1)[-1] for n in adapter_cfg["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}

    m = json.loads((out / "metrics.json").read_text())
    q = m["quantization"]
    assert q["load_in_4bit"] and q["quant_types"] == ["nf4"] and q["double_quant"] is True
    assert q["linear4bit_layers"] == 14 and q["weight_storage"] == ["uint8"] and q["compute_dtype"] == "fp32"
    assert m["device"] == "cpu" and m["steps"] == m["total_steps"] > 100
    assert m["last_loss"] < m["first_loss"] - 0.5
    assert m["eval_loss"] < m["base_eval_loss"] - 0.3
    assert len(m["generations"]) == 2
    assert all(g["prompt"] and g["reference"] and "base" in g and "fine_tuned" in g for g in m["generations"])
    assert m["padding_waste"] == 0.0 and m["pack_fill"] > 0.85
    assert m["tokens_per_s"] > 0 and m["peak_memory_mb"] > 0 and m["duration_s"] > m["train_runtime_s"] > 0
    assert m["tokens_per_s_median"] > 0  # of the logging intervals: the throughput cost estimates learn from
    assert m["tokens_seen"] == m["tokens_this_run"] == m["tokens_per_epoch"] * 8


def test_events_tell_the_story_in_order(finished_run):
    ws, res = finished_run
    evs = events_of(ws)
    stdout_evs = [e for e in map(parse_line, res.stdout.splitlines()) if e]
    assert stdout_evs == evs                              # the same objects on stdout and in events.jsonl
    assert evs[0]["type"] == "start" and evs[-1]["type"] == "done"
    assert evs[0]["resumed_from_step"] == 0 and evs[0]["examples"] == 80
    for e in evs:
        assert all(f in e for f in REQUIRED_FIELDS[e["type"]])
    steps = [e for e in evs if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, evs[0]["total_steps"] + 1))
    assert all(e["total_steps"] == evs[0]["total_steps"] and e["eta_s"] >= 0 for e in steps)
    assert steps[-1]["eta_s"] == 0
    assert [e["step"] for e in evs if e["type"] == "checkpoint"] == [40, 80, 120, 160, 176]
    assert [e["step"] for e in evs if e["type"] == "eval"] == [40, 80, 120, 160, 176, 176]
    assert evs[-2]["type"] == "eval" and evs[-2]["final"] is True and "base_eval_loss" in evs[-2]
    assert evs[-1]["adapter"] == f"{RUN}/adapter"
    # save_total_limit 2, rotation after each complete save
    assert [c.step for c in ck.scan(ws / RUN / "checkpoints")] == [160, 176]


def test_adapter_loads_on_the_4bit_base_and_matches_the_reported_eval_loss(finished_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from payload import data
    from payload.config import load_config
    from payload.train import eval_loss

    ws, _ = finished_run
    cfg = load_config(ws / RUN / "run.json")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, device_map="cpu",
                                                quantization_config=BitsAndBytesConfig(
                                                    load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True,
                                                    bnb_4bit_compute_dtype=torch.float32))
    model = PeftModel.from_pretrained(base, ws / RUN / "adapter")
    tok = AutoTokenizer.from_pretrained(ws / RUN / "adapter")
    records = data.read_records(ws / cfg.dataset).records
    _, held = data.split_records(records, cfg.eval_split, cfg.seed)
    items = data.build_packs(data.tokenize_records(held, tok, cfg.max_seq_length), cfg.max_seq_length)
    loss = eval_loss(model, items, data.PaddingFreeCollator(), 1, "cpu")
    m = json.loads((ws / RUN / "metrics.json").read_text())
    assert loss == pytest.approx(m["eval_loss"], rel=1e-4)


def test_a_finished_run_started_again_does_not_retrain(finished_run, tmp_path):
    ws = tmp_path / "again"
    shutil.copytree(finished_run[0], ws)
    res = train(ws)
    assert res.returncode == 0, res.stderr[-2000:]
    second = runs_of(events_of(ws))[-1]
    assert second[0]["resumed_from_step"] == 176
    assert not [e for e in second if e["type"] == "step"] and second[-1]["type"] == "done"


# --- kill and resume ---------------------------------------------------------------------------------------------

def test_sigkill_after_a_checkpoint_resumes_from_it(tmp_path, tiny_model, example_dataset, finished_run):
    ws = workspace(tmp_path, tiny_model, example_dataset, save_steps=10, save_total_limit=3)
    proc = start(ws)
    try:
        wait_for(proc, lambda e: e["type"] == "checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    first = events_of(ws)
    assert first[-1]["type"] != "done"
    newest, _ = ck.newest_complete(ws / RUN / "checkpoints")
    assert newest is not None and newest.step >= 10
    total = first[0]["total_steps"]
    assert newest.step < total

    res = train(ws)
    assert res.returncode == 0, res.stderr[-3000:]
    second = runs_of(events_of(ws))[-1]
    assert second[0]["resumed_from_step"] == newest.step
    assert second[0]["resumed_from"] == f"{RUN}/checkpoints/checkpoint-{newest.step}"
    steps = [e["step"] for e in second if e["type"] == "step"]
    assert steps == list(range(newest.step + 1, total + 1))
    m = json.loads((ws / RUN / "metrics.json").read_text())
    assert m["resumed_from_step"] == newest.step and m["steps"] == total
    assert m["tokens_this_run"] < m["tokens_seen"]
    # Adapter weights, optimizer state and data order all came back: the losses after the restart are those of the
    # same run left alone (a restart from fresh weights would be back near 4.7).
    resumed = dict(m["loss_history"])
    alone = dict(json.loads((finished_run[0] / RUN / "metrics.json").read_text())["loss_history"])
    assert max(abs(resumed[s] - alone[s]) for s in resumed) < 0.01


def test_corrupt_newest_checkpoint_is_skipped(tmp_path, tiny_model, example_dataset):
    ws = workspace(tmp_path, tiny_model, example_dataset, max_steps=20, save_steps=5, save_total_limit=3,
                   eval_generations=0)
    assert train(ws).returncode == 0
    ckroot = ws / RUN / "checkpoints"
    assert [c.step for c in ck.scan(ckroot)] == [10, 15, 20]
    # a save cut short: the adapter file is half there, the marker names its full size
    weights = ckroot / "checkpoint-20" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    res = train(ws)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping checkpoint-20: adapter_model.safetensors has 100 bytes" in res.stderr
    second = runs_of(events_of(ws))[-1]
    assert second[0]["resumed_from_step"] == 15
    assert second[0]["skipped_checkpoints"][0].startswith("checkpoint-20: ")
    assert [e["step"] for e in second if e["type"] == "step"] == [16, 17, 18, 19, 20]
    assert [(c.step, c.complete) for c in ck.scan(ckroot)] == [(10, True), (15, True), (20, True)]


def test_sigterm_stops_at_a_step_with_a_checkpoint(tmp_path, tiny_model, example_dataset):
    ws = workspace(tmp_path, tiny_model, example_dataset, save_steps=1000)
    proc = start(ws)
    try:
        wait_for(proc, lambda e: e["type"] == "step" and e["step"] >= 3)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert rc == 128 + signal.SIGTERM
    last = events_of(ws)[-1]
    assert last["type"] == "error" and last["message"].startswith("stopped by SIGTERM at step ")
    step = int(last["message"].split("at step ")[1].split()[0])
    assert f"checkpoint-{step} saved" in last["message"]
    newest, _ = ck.newest_complete(ws / RUN / "checkpoints")
    assert newest.step == step >= 3
    assert err.strip().splitlines()[-1] == f"error: {last['message']}"


# --- other formats and where the model comes from ----------------------------------------------------------------

def test_prompt_completion_unpacked_from_model_cache(tmp_path, tiny_model, example_dataset):
    """A hub id is looked for in model-cache/<id> first; prompt/completion data; the plain padded path."""
    ws = workspace(tmp_path, tiny_model, example_dataset, base_model="acme/tiny-chat", dataset="pc.jsonl",
                   packing=False, micro_batch_size=4, max_steps=6, save_steps=3, eval_generations=1)
    shutil.copytree(tiny_model, ws / "model-cache" / "acme" / "tiny-chat")
    rows = [json.loads(x) for x in example_dataset.read_text().splitlines()]
    with (ws / "pc.jsonl").open("w") as f:
        for r in rows:
            msgs = r["messages"]
            f.write(json.dumps({"prompt": msgs[-2]["content"], "completion": msgs[-1]["content"]}) + "\n")
    res = train(ws)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((ws / RUN / "metrics.json").read_text())
    assert m["packing"] is False and 0.05 < m["padding_waste"] < 0.6 and m["pack_fill"] is None
    assert m["steps"] == 6 and len(m["generations"]) == 1 and m["quantization"]["quant_types"] == ["nf4"]


# --- bad input: one line, an error event, a non-zero exit ----------------------------------------------------------

@pytest.mark.parametrize("change, needles", [
    ({"lora_rank": 8}, ["unknown key 'lora_rank'"]),
    ({"learning_rate": -1}, ["bad value for 'learning_rate'"]),
    ({"lr_scheduler_type": "cosin"}, ["bad value for 'lr_scheduler_type'", "unknown scheduler 'cosin'"]),
    ({"micro_batch_size": "lots"}, ["bad value for 'micro_batch_size'"]),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, tiny_model, example_dataset, change, needles):
    ws = workspace(tmp_path, tiny_model, example_dataset, **change)
    res = train(ws)
    last = assert_one_line_failure(res, f"{RUN}/run.json", *needles)
    # the error event also lands where the watcher reads, since output_dir could still be read
    assert events_of(ws)[-1] == {**events_of(ws)[-1], "type": "error", "message": last[7:]}


def test_unreadable_config(tmp_path):
    (tmp_path / "broken.json").write_text('{"base_model": ')
    assert_one_line_failure(train(tmp_path, "broken.json"), "broken.json: not valid JSON")
    assert_one_line_failure(train(tmp_path, "missing.json"), "missing.json: config file not found")


def test_bad_dataset_fails_before_any_model_is_loaded(tmp_path, tiny_model, example_dataset):
    ws = workspace(tmp_path, tiny_model, example_dataset, base_model="no-such-folder")
    with (ws / "chat.jsonl").open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": \n')
    res = train(ws)
    # the dataset is checked before the (missing) model is even looked for
    assert_one_line_failure(res, "chat.jsonl:81: no assistant message", "(and 1 more; run `python -m payload.validate")
    assert not (ws / RUN / "checkpoints").exists()


@pytest.mark.parametrize("base_model, needles", [
    ("no-such-folder", ["base_model 'no-such-folder': folder not found"]),
    ("acme/missing-model", ["base_model 'acme/missing-model'", "model-cache/acme/missing-model", "HF_HUB_OFFLINE"]),
])
def test_missing_base_model(tmp_path, tiny_model, example_dataset, base_model, needles):
    ws = workspace(tmp_path, tiny_model, example_dataset, base_model=base_model)
    assert_one_line_failure(train(ws), *needles)
    assert events_of(ws)[-1]["type"] == "error"


def test_folder_that_is_not_a_model(tmp_path, tiny_model, example_dataset):
    ws = workspace(tmp_path, tiny_model, example_dataset, base_model="empty-model")
    (ws / "empty-model").mkdir()
    assert_one_line_failure(train(ws), "base_model 'empty-model': the folder holds no config.json")


def test_out_of_memory_is_one_line_with_what_to_lower(tmp_path, tiny_model, example_dataset):
    """A 300k-word vocabulary makes the logits of one micro-batch of 16 x 128 tokens need 2.4 GB; under a 3 GiB
    address-space cap the allocator fails on the first step, as a GPU does when a batch does not fit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from payload.tinymodel import build_tokenizer

    model_dir = tmp_path / "big-vocab"
    tok = build_tokenizer([example_dataset], vocab_extra=300_000)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ws = workspace(tmp_path, model_dir, example_dataset, micro_batch_size=16, eval_split=0.0)

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    res = train(ws, preexec=cap)
    assert_one_line_failure(res, "out of memory: lower micro_batch_size or max_seq_length")
    evs = events_of(ws)
    assert evs[0]["type"] == "start" and evs[-1]["type"] == "error"
