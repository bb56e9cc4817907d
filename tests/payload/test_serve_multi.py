"""One server, many adapters, batched generation: the official `openai` client against a real server on a free port
(uvicorn in a thread, so that a test can hold the model still while requests queue up), and the engine directly
where batching itself is the subject."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from payload.serving.app import build_app
from payload.serving.engine import SamplingParams, load_engine
from payload.serving.manifest import AdapterManifest, parse_manifest
from tests.conftest import wait_for
from tests.payload.test_serve import QUESTION, make_adapter, reference_answer

API_KEY = "sk-multi-2b7e41"
OTHER_QUESTION = [{"role": "user", "content": "How do I restart the worker after a failed run?"}]


class ThreadServer:
    """uvicorn serving `app` on 127.0.0.1 and a port the kernel picks, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "uvicorn to start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def write_manifest(path: Path, *entries: dict) -> None:
    # Written whole and renamed into place, as a deploy does, so the poller never reads half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"adapters": list(entries)}))
    tmp.replace(path)


def chat(client: openai.OpenAI, model: str, messages=QUESTION, **kwargs) -> str:
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8, **kwargs)
    return r.choices[0].message.content


@contextlib.contextmanager
def one_batch(engine, size: int):
    """The next `size` requests run as one batch: the scheduler waits for them all (however slowly they come)."""
    scheduler = engine.scheduler
    # Not while the last batch winds down: it would take the first of them in (continuous batching) on its own.
    wait_for(scheduler.idle.is_set, 30, "the scheduler to be idle")
    saved = scheduler.max_batch, scheduler.batch_window_s
    scheduler.max_batch, scheduler.batch_window_s = size, 60.0
    try:
        yield
    finally:
        scheduler.max_batch, scheduler.batch_window_s = saved


def generate_together(engine, requests: list[tuple[list[dict], SamplingParams, str | None]]) -> list[str]:
    """Run the requests as one batch; their texts."""
    with one_batch(engine, len(requests)):
        gens = [engine.generate(m, p, model=model) for m, p, model in requests]
        texts = ["".join(g) for g in gens]
    return texts


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("share")
    for i in (1, 2, 3):
        make_adapter(tiny_model, root / "runs" / f"ft-000{i}" / "adapter", seed=i)
    from payload.tinymodel import build_tiny_model

    wider = build_tiny_model(root / "wider", hidden_size=32)
    make_adapter(wider, root / "runs" / "ft-0099" / "adapter")
    (root / "runs" / "ft-0098" / "adapter").mkdir(parents=True)  # a run that died before writing its adapter
    return root


@pytest.fixture(scope="module")
def references(tiny_model, runs) -> dict[str, str]:
    answers = {f"ft-000{i}": reference_answer(tiny_model, runs / "runs" / f"ft-000{i}" / "adapter", QUESTION, 8)
               for i in (1, 2, 3)}
    answers["tiny"] = reference_answer(tiny_model, None, QUESTION, 8)
    return answers


BASE_ENTRIES = (
    {"name": "ft-0001", "path": "runs/ft-0001/adapter", "aliases": ["support-bot"], "run": "ft-0001"},
    {"name": "ft-0002", "path": "runs/ft-0002/adapter", "run": "ft-0002"},
)


@pytest.fixture(scope="module")
def served(tiny_model, runs):
    engine = load_engine(tiny_model, None)
    path = runs / "adapters.json"
    write_manifest(path, *BASE_ENTRIES)
    manifest = AdapterManifest(engine, path, poll_s=0.2)
    manifest.start()
    try:
        with ThreadServer(build_app(engine, api_key=API_KEY, ui=False, manifest=manifest)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
            yield {"engine": engine, "manifest": manifest, "path": path, "url": url, "client": client,
                   "auth": {"Authorization": f"Bearer {API_KEY}"}}
    finally:
        manifest.stop()


@pytest.fixture
def restore_manifest(served):
    yield
    write_manifest(served["path"], *BASE_ENTRIES)
    httpx.post(f"{served['url']}/admin/reload", headers=served["auth"], timeout=60).raise_for_status()


# --- the manifest, pure --------------------------------------------------------------------------------------------

def test_manifest_paths_are_relative_to_its_folder_and_bad_entries_are_refused():
    text = json.dumps({"adapters": [
        {"name": "ft-0001", "path": "runs/ft-0001/adapter", "aliases": ["a"], "run": "ft-0001"},
        {"name": "ft-0002", "path": "/abs/adapter"},
        {"name": "ft-0001", "path": "elsewhere"},
        {"name": "x"},
        {"name": "y", "path": "p", "aliases": "not-a-list"},
        "just a string",
    ]})
    entries, refused = parse_manifest(text, Path("/mount"))
    assert [(e.name, str(e.path), e.aliases, e.run) for e in entries] == [
        ("ft-0001", "/mount/runs/ft-0001/adapter", ("a",), "ft-0001"), ("ft-0002", "/abs/adapter", (), None)]
    assert "appears twice" in refused["ft-0001"]
    assert "'path' must be" in refused["x"] and "'aliases' must be" in refused["y"]
    assert "JSON object" in refused["#5"]


# --- the API, over HTTP with the openai client ---------------------------------------------------------------------

def test_models_lists_the_base_and_every_loaded_adapter(served):
    models = {m.id: m for m in served["client"].models.list()}
    assert set(models) == {"tiny", "ft-0001", "ft-0002"}
    for m in models.values():
        assert m.object == "model" and isinstance(m.created, int) and m.owned_by == "tuneops"
    assert models["ft-0001"].model_extra["run"] == "ft-0001"
    assert models["ft-0001"].model_extra["aliases"] == ["support-bot"]
    assert served["client"].models.retrieve("support-bot").id == "ft-0001"


def test_two_adapters_in_one_batch_each_answer_as_alone(served, references):
    """Two adapters in concurrent requests run in one batch (PEFT's mixed-adapter forward) and each answers as
    plain transformers + peft does with that adapter alone; the base, by its folder name, answers as the base."""
    engine, client = served["engine"], served["client"]
    real_forward = engine.forward
    batches: list[list] = []

    def recording_forward(ids, mask, positions, cache, adapters):
        batches.append(list(adapters))
        return real_forward(ids, mask, positions, cache, adapters)

    answers: dict[str, str] = {}
    engine.forward = recording_forward
    try:
        with engine.model_lock:
            threads = [threading.Thread(target=lambda m=m: answers.__setitem__(m, chat(client, m)))
                       for m in ("ft-0001", "ft-0002", "tiny")]
            for t in threads:
                t.start()
            wait_for(lambda: engine.scheduler.waiting.qsize() + sum(map(len, batches)) == 3, 30,
                     "the three requests to be queued or held in a forward pass")
        for t in threads:
            t.join(60)
    finally:
        del engine.forward
    assert answers == {m: references[m] for m in ("ft-0001", "ft-0002", "tiny")}
    assert len(set(answers.values())) == 3
    assert any(len(set(b)) >= 2 for b in batches), batches  # adapters mixed within one forward pass
    assert chat(client, "support-bot") == references["ft-0001"]  # an alias


def test_streaming_with_usage(served, references):
    stream = served["client"].chat.completions.create(
        model="ft-0002", messages=QUESTION, temperature=0, max_tokens=8, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == references["ft-0002"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert {c.model for c in chunks} == {"ft-0002"}


def test_unknown_model_and_bad_parameter(served):
    client = served["client"]
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "ft-9999")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    assert "'ft-0001'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ft-0001", messages=QUESTION, temperature=3)
    assert e.value.param == "temperature" and "less than or equal to 2" in e.value.message


def test_api_key_guards_v1_and_admin(served):
    wrong = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.code == "invalid_api_key"
    for method, path in (("GET", "/admin/adapters"), ("POST", "/admin/reload")):
        r = httpx.request(method, f"{served['url']}{path}", timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{served['url']}/admin/adapters", headers=served["auth"], timeout=30)
    assert r.status_code == 200
    assert [(a["name"], a["status"]) for a in r.json()["adapters"]] == [("ft-0001", "loaded"), ("ft-0002", "loaded")]


def test_hot_load_by_manifest_then_unload_by_reload(served, references, restore_manifest):
    client = served["client"]
    third = {"name": "ft-0003", "path": str(served["path"].parent / "runs/ft-0003/adapter"), "aliases": ["triage"]}
    write_manifest(served["path"], *BASE_ENTRIES, third)
    # Picked up by the poller, with no reload call and no restart.
    wait_for(lambda: "ft-0003" in {m.id for m in client.models.list()}, 30, "the poller to load ft-0003")
    assert chat(client, "triage") == references["ft-0003"]

    write_manifest(served["path"], BASE_ENTRIES[0], third)
    r = httpx.post(f"{served['url']}/admin/reload", headers=served["auth"], timeout=60)
    assert r.status_code == 200
    assert [a["name"] for a in r.json()["adapters"]] == ["ft-0001", "ft-0003"]
    with pytest.raises(openai.NotFoundError):
        chat(client, "ft-0002")
    assert "ft-0002" not in served["engine"].peft.peft_config  # deleted from the model, not just hidden
    assert chat(client, "ft-0001") == references["ft-0001"]
    assert chat(client, "ft-0003") == references["ft-0003"]
    # What each adapter served since it was loaded, for the team's list of deployments.
    rows = {a["name"]: a for a in httpx.get(f"{served['url']}/admin/adapters", headers=served["auth"],
                                            timeout=30).json()["adapters"]}
    assert rows["ft-0003"]["requests"] == 2  # by its alias, then by its name
    assert rows["ft-0003"]["loaded_at"] >= rows["ft-0001"]["loaded_at"] > 0
    # A request refused after the model was resolved (too long for the context) served nothing: not counted.
    with pytest.raises(openai.BadRequestError) as e:
        served["client"].chat.completions.create(model="ft-0003", messages=QUESTION, max_tokens=10**6)
    assert e.value.code == "context_length_exceeded"
    # The process's record beside the manifest, which the bot sums for /finetune deployments.
    manifest = served["manifest"]
    assert manifest.write_served(force=True) and manifest.served_path.parent == served["path"].parent / "served"
    record = json.loads(manifest.served_path.read_text())
    assert record["requests"]["ft-0003"] == 2 and record["pid"] == os.getpid()
    assert not manifest.write_served(force=True)  # nothing new: not written again


def test_misfit_adapters_are_refused_and_the_others_keep_answering(served, references, restore_manifest):
    client = served["client"]
    write_manifest(served["path"], *BASE_ENTRIES,
                   {"name": "ft-0099", "path": "runs/ft-0099/adapter"},
                   {"name": "ft-0098", "path": "runs/ft-0098/adapter"},
                   {"name": "tiny", "path": "runs/ft-0003/adapter"})
    status = httpx.post(f"{served['url']}/admin/reload", headers=served["auth"], timeout=60).json()
    by_name = {a["name"]: a for a in status["adapters"]}
    assert by_name["ft-0001"]["status"] == by_name["ft-0002"]["status"] == "loaded"
    for name, reason in (("ft-0099", "trained for a different base model"),
                         ("ft-0098", "adapter_config.json not found"),
                         ("tiny", "already served here")):
        assert by_name[name]["status"] == "refused", by_name[name]
        assert reason in by_name[name]["reason"] and "\n" not in by_name[name]["reason"]
    assert {m.id for m in client.models.list()} == {"tiny", "ft-0001", "ft-0002"}
    assert chat(client, "ft-0001") == references["ft-0001"]
    assert chat(client, "tiny") == references["tiny"]


def test_full_queue_is_429_with_retry_after(tiny_model):
    engine = load_engine(tiny_model, None, max_batch=1, max_queue=1)
    with ThreadServer(build_app(engine, ui=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        results: list[str] = []
        # The model held: the first request waits inside its forward pass, the second fills the queue.
        with engine.model_lock:
            threads = [threading.Thread(target=lambda: results.append(chat(client, "tiny"))) for _ in range(2)]
            for t in threads:
                t.start()
                time.sleep(0.05)
            wait_for(lambda: engine.scheduler.waiting.full(), 30, "the queue to fill")
            with pytest.raises(openai.RateLimitError) as e:
                chat(client, "tiny")
        for t in threads:
            t.join(60)
    assert e.value.response.headers["retry-after"] == "1"
    assert e.value.code == "rate_limit_exceeded" and "retry" in e.value.message
    assert len(results) == 2 and results[0] == results[1]


# --- batching, on the engine ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def multi_engine(tiny_model, runs):
    engine = load_engine(tiny_model, None)
    for i in (1, 2):
        engine.load_adapter(runs / "runs" / f"ft-000{i}" / "adapter", f"ft-000{i}")
    return engine


def test_batched_answers_equal_the_same_requests_alone(multi_engine):
    """Greedy and seeded answers do not depend on the batch: left padding, masks and positions are right, and each
    seeded row samples with its own generator."""
    greedy = SamplingParams(max_tokens=10, temperature=0)
    seeded = SamplingParams(max_tokens=10, temperature=1.1, top_p=0.9, seed=11)
    long_question = [{"role": "system", "content": "You answer for the on-call team, briefly."}, *OTHER_QUESTION]
    requests = [(QUESTION, greedy, "ft-0001"), (long_question, greedy, "ft-0002"), (OTHER_QUESTION, greedy, None),
                (long_question, seeded, "ft-0001"), (QUESTION, greedy, "ft-0002")]
    alone = ["".join(multi_engine.generate(m, p, model=model)) for m, p, model in requests]
    assert multi_engine.scheduler.largest_batch == 1
    together = generate_together(multi_engine, requests)
    assert multi_engine.scheduler.largest_batch == len(requests)
    assert together == alone
    assert len(set(alone)) >= 4


def test_a_row_that_ends_early_finishes_while_the_batch_goes_on(multi_engine):
    real_forward = multi_engine.forward
    sizes: list[int] = []

    def slow_forward(ids, *args):
        sizes.append(ids.shape[0])
        time.sleep(0.02)  # slow enough that the ends of the two rows are far apart in time
        return real_forward(ids, *args)

    multi_engine.forward = slow_forward
    try:
        with one_batch(multi_engine, 2):
            short = multi_engine.generate(QUESTION, SamplingParams(max_tokens=1, temperature=0), model="ft-0001")
            long = multi_engine.generate(QUESTION, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                                        model="ft-0002")
            "".join(short)
        short_done = time.monotonic()
        assert long.finish_reason is None  # still generating
        "".join(long)
        long_done = time.monotonic()
    finally:
        del multi_engine.forward
    assert short.finish_reason == "length" and short.completion_tokens == 1
    assert long.completion_tokens == 30 and long.finish_reason == "length"
    assert long_done - short_done > 0.1
    assert sizes[0] == 2 and set(sizes[1:]) == {1}  # the short row left the batch after its one token


def test_requests_join_a_running_batch_and_answer_as_alone(multi_engine):
    """Continuous batching: requests that come while a batch decodes join it (their cache left-padded to the
    batch's length) instead of waiting for it to end, and still answer as they do alone."""
    greedy = SamplingParams(max_tokens=8, temperature=0)
    late = [(OTHER_QUESTION, greedy, "ft-0002"), (QUESTION, greedy, None)]
    alone = ["".join(multi_engine.generate(m, p, model=model)) for m, p, model in late]
    long_params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    first_alone = "".join(multi_engine.generate(QUESTION, long_params, model="ft-0001"))
    real_forward = multi_engine.forward
    sizes: list[int] = []

    def slow_forward(ids, *args):
        sizes.append(ids.shape[0])
        time.sleep(0.02)  # a long first request: the others surely come while it decodes
        return real_forward(ids, *args)

    joined_before = multi_engine.scheduler.joined
    multi_engine.forward = slow_forward
    try:
        first = multi_engine.generate(QUESTION, long_params, model="ft-0001")
        pieces: list[str] = []
        reader = threading.Thread(target=lambda: pieces.extend(first))
        reader.start()
        wait_for(lambda: first.completion_tokens >= 3, 30, "the first request to be decoding")
        gens = [multi_engine.generate(m, p, model=model) for m, p, model in late]
        answers = ["".join(g) for g in gens]
        assert first.finish_reason is None  # they finished inside the first one's batch
        reader.join(60)
    finally:
        del multi_engine.forward
    assert answers == alone
    # The first row went on alone after the others left (their columns trimmed from the cache), answering as alone.
    assert "".join(pieces) == first_alone
    assert multi_engine.scheduler.joined - joined_before >= 2
    assert 3 in sizes  # decode steps for all three rows at once
    assert first.completion_tokens == 40


def test_mixed_adapters_in_one_batch_on_a_4bit_base(tiny_model, runs):
    """PEFT's mixed-adapter forward also works with bitsandbytes' Linear4bit LoRA layers (the GPU path)."""
    import bitsandbytes as bnb

    engine = load_engine(tiny_model, None, load_in_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in engine.base.modules())
    for i in (1, 2):
        engine.load_adapter(runs / "runs" / f"ft-000{i}" / "adapter", f"ft-000{i}")
    greedy = SamplingParams(max_tokens=8, temperature=0)
    requests = [(QUESTION, greedy, "ft-0001"), (QUESTION, greedy, "ft-0002"), (QUESTION, greedy, None)]
    alone = ["".join(engine.generate(m, p, model=model)) for m, p, model in requests]
    assert generate_together(engine, requests) == alone
    assert len(set(alone)) == 3


def test_unload_waits_for_the_requests_still_using_the_adapter(tiny_model, runs):
    engine = load_engine(tiny_model, None)
    adapter = runs / "runs" / "ft-0001" / "adapter"
    engine.load_adapter(adapter, "ft-0001")
    with engine.model_lock:
        gen = engine.generate(QUESTION, SamplingParams(max_tokens=5, temperature=0), model="ft-0001")
        unloading = threading.Thread(target=engine.unload_adapter, args=("ft-0001",))
        unloading.start()
        wait_for(lambda: "ft-0001" not in {m.id for m in engine.models()}, 10, "ft-0001 to leave the list")
    assert "".join(gen) and gen.finish_reason in ("stop", "length")  # it finished on its adapter
    unloading.join(30)
    assert not engine.peft.peft_config
    engine.load_adapter(adapter, "ft-0001")  # and it can come back
    assert "".join(engine.generate(QUESTION, SamplingParams(max_tokens=5, temperature=0), model="ft-0001"))
