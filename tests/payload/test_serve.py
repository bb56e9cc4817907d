"""The inference server: pure helpers, the app in-process over its ASGI interface, and the real CLI over real HTTP."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from payload.lorashapes import adapter_mismatch
from payload.serving.app import build_app
from payload.serving.engine import (
    SamplingParams,
    StartupError,
    StopScanner,
    default_model_id,
    load_engine,
)
from payload.serving.openai_schema import APIError
from payload.serving.ui import history_messages
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "Is the gateway healthy?"}]
API_KEY = "sk-test-7f3a9c1e55"


def make_adapter(base: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA adapter on all linear layers with random (not zero) B, so that it visibly changes the answers."""
    from payload.tinymodel import build_tiny_adapter

    return build_tiny_adapter(base, out, seed=seed)


def reference_answer(base: Path, adapter: Path | None, messages, max_new_tokens: int) -> str:
    """Greedy answer computed with plain transformers + peft, independent of the server's code."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter or base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def sse_payloads(lines) -> list[str]:
    """The data of each SSE event, in order."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("runs") / "ft-0042" / "adapter")


@pytest.fixture(scope="module")
def engine(tiny_model, adapter_dir):
    return load_engine(tiny_model, adapter_dir)


@pytest.fixture(scope="module")
def reference(tiny_model, adapter_dir) -> str:
    return reference_answer(tiny_model, adapter_dir, QUESTION, 8)


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    with TestClient(build_app(engine, ui=False)) as c:
        yield c


def ask(client, **body):
    return client.post("/v1/chat/completions", json={"messages": QUESTION, "temperature": 0, **body})


# --- pure helpers ----------------------------------------------------------------------------------------------------

@example(text="<|<", stops=["|", "<|<"], cuts=[2])  # a stop found first may lose to a longer one that began earlier
@example(text="<|", stops=["|", "<|<"], cuts=[])
@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab <|>", max_size=40), stops=st.lists(st.text(alphabet="ab <|>", min_size=1, max_size=4),
                                                                   max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_stop_scanner_same_result_however_text_is_split(text, stops, cuts):
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[:min(hits)] if hits else text
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    scanner, got, stopped = StopScanner(stops), "", False
    for a, b in zip(bounds, bounds[1:]):
        piece, stopped = scanner.feed(text[a:b])
        got += piece
        if stopped:
            break
    if not stopped:
        piece, stopped = scanner.flush()
        got += piece
    assert got == expected
    assert stopped == bool(hits)


def test_adapter_mismatch_names_the_layer_and_sizes():
    base = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (128, 64)}
    fits = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 64),
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": (4, 128),
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": (64, 4)}
    assert adapter_mismatch(fits, base) is None
    narrower = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 32)}
    assert adapter_mismatch(narrower, base) == \
        "layer model.layers.0.self_attn.q_proj has 64 inputs in the base model but 32 in the adapter"
    wrong_out = {"base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": (96, 4)}
    assert "has 64 outputs in the base model but 96" in adapter_mismatch(wrong_out, base)
    elsewhere = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": (4, 64)}
    assert "transformer.h.0.attn.c_attn, which the base model does not have" in adapter_mismatch(elsewhere, base)


def test_default_model_id_is_the_run_id():
    assert default_model_id(Path("/m/tiny"), Path("/mount/runs/ft-0042/adapter")) == "ft-0042"
    assert default_model_id(Path("/m/tiny"), Path("/adapters/support-bot")) == "support-bot"
    assert default_model_id(Path("/mount/model-cache/tiny"), None) == "tiny"


def test_history_messages_keeps_text_turns_only():
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": [{"type": "text", "text": "hello"}, {"type": "file", "path": "x"}]},
               {"role": "user", "content": {"path": "/tmp/a.png"}}]
    assert history_messages(history) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


# --- the engine and the app in-process -------------------------------------------------------------------------------

def test_completion_has_openai_shape_and_the_adapters_answer(client, engine, reference):
    r = ask(client, max_tokens=8)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "ft-0042" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == reference
    prompt_tokens = len(engine.encode(QUESTION))
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    assert body["usage"]["total_tokens"] == prompt_tokens + body["usage"]["completion_tokens"]
    assert choice["finish_reason"] == ("length" if body["usage"]["completion_tokens"] == 8 else "stop")


def test_adapter_is_applied(tiny_model, engine, reference):
    base_only = load_engine(tiny_model, None)
    assert base_only.model_id == "tiny"
    base_answer = "".join(base_only.generate(QUESTION, SamplingParams(max_tokens=8, temperature=0)))
    assert base_answer == reference_answer(tiny_model, None, QUESTION, 8)
    assert base_answer != reference


def test_base_in_4bit_on_cpu_answers(tiny_model, adapter_dir):
    import bitsandbytes as bnb

    engine4 = load_engine(tiny_model, adapter_dir, load_in_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in engine4.model.modules())
    gen = engine4.generate(QUESTION, SamplingParams(max_tokens=6, temperature=0))
    text = "".join(gen)
    assert text.strip() and gen.completion_tokens >= 1 and gen.finish_reason in ("stop", "length")


def test_max_tokens_one_ends_with_length(client):
    body = ask(client, max_tokens=1).json()
    assert body["usage"]["completion_tokens"] == 1
    assert body["choices"][0]["finish_reason"] == "length"
    body = ask(client, max_completion_tokens=2).json()
    assert body["usage"]["completion_tokens"] == 2


def test_stop_sequence_cuts_the_answer(client, reference):
    words = reference.split(" ")
    assert len(words) >= 3, reference
    stop = " " + words[2]
    body = ask(client, max_tokens=8, stop=[stop, "never-in-vocabulary"]).json()
    assert body["choices"][0]["message"]["content"] == reference[:reference.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_repeats(client):
    first = ask(client, max_tokens=8, temperature=1.2, top_p=0.9, seed=7).json()
    second = ask(client, max_tokens=8, temperature=1.2, top_p=0.9, seed=7).json()
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


def test_streaming_in_process_matches_the_plain_answer(client, reference):
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": QUESTION, "temperature": 0, "max_tokens": 8, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r.iter_lines())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "ft-0042" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content_chunks, last, usage_chunk = chunks[1:]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content_chunks) == reference
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 1


BAD_BODIES = [
    ("not json", "is not valid JSON", None),
    ("", "request body is empty", None),
    ({"temperature": 0}, "messages: Field required", "messages"),
    ({"messages": []}, "messages: List should have at least 1 item", "messages"),
    ({"messages": "hello"}, "messages: Input should be a valid list", "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role: Input should be 'system'", "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content: Field required", "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "only text content parts are supported", "messages.0.content"),
    ({"messages": QUESTION, "n": 2}, "n: only n=1 is supported", "n"),
    ({"messages": QUESTION, "temperature": 3}, "temperature: Input should be less than or equal to 2", "temperature"),
    ({"messages": QUESTION, "top_p": 0}, "top_p: Input should be greater than 0", "top_p"),
    ({"messages": QUESTION, "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1", "max_tokens"),
    ({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop sequences", "stop"),
    ({"messages": QUESTION, "stop": [""]}, "must not be empty", "stop"),
    ({"messages": QUESTION, "tools": [{"type": "function"}]}, "tools and function calling are not supported", "tools"),
    ({"messages": QUESTION, "logprobs": True}, "logprobs are not supported", "logprobs"),
    ({"messages": QUESTION, "presence_penalty": 0.5}, "penalties are not supported", "presence_penalty"),
    ({"messages": QUESTION, "response_format": {"type": "json_object"}}, "'json_object' is not supported",
     "response_format"),
    ({"messages": QUESTION, "max_tokens": 100_000}, "maximum context length is 4096 tokens", "messages"),
]


@pytest.mark.parametrize("body,message,param", BAD_BODIES, ids=[m for _, m, _ in BAD_BODIES])
def test_bad_request_is_400_with_a_message(client, body, message, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert "Traceback" not in r.text


def test_prompt_longer_than_the_context_is_400(client):
    long = [{"role": "user", "content": "gateway " * 5000}]
    r = client.post("/v1/chat/completions", json={"messages": long})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_wrong_model_and_unknown_endpoints(client):
    r = ask(client, model="gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "'ft-0042'" in r.json()["error"]["message"]
    assert ask(client, model="ft-0042", max_tokens=1).status_code == 200
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "use POST" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={})
    assert r.status_code == 404 and "POST /v1/chat/completions" in r.json()["error"]["message"]
    assert client.get("/v1/models/ft-0042").json()["id"] == "ft-0042"
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"  # the base, served beside its adapter


def test_models_and_health(client):
    assert client.get("/healthz").json() == {"status": "ok", "model": "ft-0042"}
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["ft-0042", "tiny"]  # adapter, then base


def test_api_key_guards_v1_and_is_never_logged(engine, caplog):
    from fastapi.testclient import TestClient

    caplog.set_level("DEBUG")
    with TestClient(build_app(engine, api_key=API_KEY, ui=False)) as c:
        assert c.get("/healthz").status_code == 200  # probes carry no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert ask(c, max_tokens=1).status_code == 401
        good = {"Authorization": f"Bearer {API_KEY}"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.post("/v1/chat/completions", headers=good,
                      json={"messages": QUESTION, "max_tokens": 2}).status_code == 200
    assert "generated model=ft-0042" in caplog.text
    assert API_KEY not in caplog.text


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client, engine, reference):
    """Requests that wait together run as one batch, and batching changes no greedy answer."""
    real_forward = engine.forward
    batch_sizes: list[int] = []

    def counting_forward(ids, *args, **kwargs):
        batch_sizes.append(ids.shape[0])
        return real_forward(ids, *args, **kwargs)

    answers: list[str] = []
    engine.forward = counting_forward
    try:
        # Holding the model makes the first batch wait in its forward pass while the other requests queue up.
        with engine.model_lock:
            threads = [threading.Thread(target=lambda: answers.append(
                ask(client, max_tokens=8).json()["choices"][0]["message"]["content"])) for _ in range(4)]
            for t in threads:
                t.start()
            wait_for(lambda: batch_sizes and batch_sizes[0] + engine.scheduler.waiting.qsize() == 4, 30,
                     "the four requests to be in the first batch or waiting")
        for t in threads:
            t.join(60)
    finally:
        del engine.forward
    assert answers == [reference] * 4
    first = batch_sizes[0]
    assert first == 4 or 4 - first in batch_sizes[1:]  # those that waited ran together, as one batch


def test_model_failure_is_a_500_or_an_error_event_without_a_traceback(client, engine, caplog):
    def failing_forward(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    engine.forward = failing_forward
    try:
        r = ask(client, max_tokens=2)
        with client.stream("POST", "/v1/chat/completions",
                           json={"messages": QUESTION, "max_tokens": 2, "stream": True}) as s:
            payloads = sse_payloads(s.iter_lines())
    finally:
        del engine.forward
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "server log" in r.json()["error"]["message"]
    assert "Traceback" not in r.text and "CUDA" not in r.text
    assert json.loads(payloads[0])["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(payloads[1])["error"]["type"] == "server_error"
    assert payloads[2:] == ["[DONE]"]
    assert "device-side assert" in caplog.text  # ours to debug: logged with its cause
    assert ask(client, max_tokens=1).status_code == 200  # and the model is free again


def test_chat_template_refusal_is_400(engine):
    original = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    try:
        with pytest.raises(APIError) as e:
            engine.generate(QUESTION, SamplingParams(max_tokens=1))
    finally:
        engine.tokenizer.chat_template = original
    assert e.value.status == 400 and "roles must alternate" in e.value.message


# --- the real CLI ----------------------------------------------------------------------------------------------------

def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "payload.serve", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_startup_errors_are_one_line_and_exit_2(tiny_model, tmp_path):
    empty = tmp_path / "ft-0007" / "adapter"
    empty.mkdir(parents=True)
    cases = [
        (["--base", str(tmp_path / "nope"), "--base-only"], "base model folder not found"),
        (["--base", str(tmp_path), "--base-only"], "no config.json in"),
        (["--base", str(tiny_model), "--adapter", str(tmp_path / "missing")], "adapter folder not found"),
        (["--base", str(tiny_model), "--adapter", str(empty)], "adapter_config.json not found"),
        (["--base", str(tiny_model)], "nothing to serve"),
    ]
    for args, message in cases:
        done = run_cli(*args)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], done.stderr


def test_damaged_weights_are_a_startup_error(tiny_model, adapter_dir, tmp_path):
    """A weights file cut short (a copy interrupted on the share) is one line naming the folder, not a traceback."""
    adapter = tmp_path / "ft-0008" / "adapter"
    shutil.copytree(adapter_dir, adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(StartupError, match="adapter_model.safetensors cannot be read .* the adapter folder is damaged"):
        load_engine(tiny_model, adapter)
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    for weights in base.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(StartupError, match=f"cannot load the base model from {base}"):
        load_engine(base, None)


def test_adapter_for_another_base_is_refused(tiny_model, adapter_dir, tmp_path):
    from payload.tinymodel import build_tiny_model

    wider = build_tiny_model(tmp_path / "wider", hidden_size=32)
    done = run_cli("--base", str(wider), "--adapter", str(adapter_dir))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "trained for a different base model" in lines[0] and str(tiny_model) in lines[0]


@pytest.fixture(scope="module")
def server(tiny_model, adapter_dir, tmp_path_factory):
    """`python -m payload.serve` as the container runs it, with an API key, on port 0: uvicorn logs the port the
    kernel gave it, so no other process can take it between our choosing and its binding."""
    logs = tmp_path_factory.mktemp("serve-logs")
    env = {**os.environ, "TUNEOPS_SERVE_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"}
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "payload.serve", "--base", str(tiny_model), "--adapter",
                                 str(adapter_dir), "--host", "127.0.0.1", "--port", "0"],
                                cwd=ROOT, env=env, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 120
        url = None
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {(logs / 'stderr').read_text()}")
            if url is None:
                bound = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", (logs / "stdout").read_text())
                url = bound and bound.group(1)
            try:
                if url and httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not become healthy in 120 s")
            time.sleep(0.3)
        yield {"url": url, "logs": logs, "auth": {"Authorization": f"Bearer {API_KEY}"}}
    finally:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            # Gradio's heartbeat streams hold the graceful shutdown open; a SIGINT then makes uvicorn exit now.
            proc.send_signal(signal.SIGINT)
            proc.wait(20)


def test_cli_answers_a_chat_completion_over_http(server, reference):
    with httpx.Client(base_url=server["url"], headers=server["auth"], timeout=60) as c:
        assert c.get("/healthz").json()["model"] == "ft-0042"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["ft-0042", "tiny"]
        r = c.post("/v1/chat/completions",
                   json={"model": "ft-0042", "messages": QUESTION, "temperature": 0, "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == reference


def test_cli_streams_server_sent_events(server, reference):
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{server['url']}/v1/chat/completions", json=body, headers=server["auth"],
                      timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r.iter_lines())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == reference
    assert len(chunks) >= 3 and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_cli_bad_body_is_400_and_missing_key_is_401(server):
    url = f"{server['url']}/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={**server["auth"], "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"messages": QUESTION, "n": 3}, headers=server["auth"])
    assert r.status_code == 400 and "only n=1" in r.json()["error"]["message"]
    r = httpx.post(url, json={"messages": QUESTION})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_cli_serves_the_gradio_ui(server, reference):
    r = httpx.get(f"{server['url']}/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text.lower() and "gradio" in r.text.lower()

    from gradio_client import Client

    ui = Client(server["url"], auth=("alice", API_KEY), verbose=False, analytics_enabled=False,
                download_files=False)
    try:
        answer = ui.predict("Is the gateway healthy?", 0.0, 8, api_name="/chat")
    finally:
        ui.close()
    assert answer == reference


def test_cli_hung_up_stream_frees_the_model(server, reference):
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", f"{server['url']}/v1/chat/completions", json=body, headers=server["auth"],
                      timeout=60) as r:
        lines = r.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith("data: ")) >= 3
    # At some 50 tokens/s the 3,000 would take a minute; the log line says generation stopped early instead.
    stdout = server["logs"] / "stdout"
    deadline = time.monotonic() + 30
    while "stopped early" not in stdout.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "stopped early" in stdout.read_text()
    r = httpx.post(f"{server['url']}/v1/chat/completions", headers=server["auth"], timeout=60,
                   json={"messages": QUESTION, "temperature": 0, "max_tokens": 8})
    assert r.json()["choices"][0]["message"]["content"] == reference


def test_cli_logs_hold_no_api_key(server):
    stdout = server["logs"] / "stdout"
    before = stdout.read_text().count("GET /v1/models")
    httpx.get(f"{server['url']}/v1/models", headers={"Authorization": f"Bearer {API_KEY}x"})
    httpx.get(f"{server['url']}/v1/models", headers=server["auth"])
    # Both requests' access-log lines are written: everything they could have logged is in the files.
    wait_for(lambda: stdout.read_text().count("GET /v1/models") >= before + 2, 30, "the two requests' log lines")
    out = stdout.read_text()
    assert API_KEY not in out and API_KEY not in (server["logs"] / "stderr").read_text()
