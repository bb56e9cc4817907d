"""Serving benchmark: batched generation against one request at a time, on the same server code, in one run.

`python -m payload.bench_serve [--clients 16] [--requests 2] [--tokens 64]` builds the tiny model and 4 LoRA adapters
in a temporary folder (nothing is downloaded), starts `python -m payload.serve` on a free port with the adapters in a
manifest, once with batching (the defaults) and once with `--max-batch 1`, and sends the same load to each:

- `--clients` concurrent clients, each asking `--requests` times in turn for a `--tokens`-token completion, spread over
  the 4 adapters, greedy, streamed (for the time to first token);
- one client alone, one request at a time (what batching costs a single user).

The two servers run side by side and take turns, `--rounds` times, so that other work on the machine weighs on both
alike; the figures pool all rounds.

Every answer is exactly `--tokens` long: requests send `ignore_eos` (the server's extension, as vLLM's), so that a
random tiny model's end-of-turn token does not end some answers early; the benchmark checks each answer's usage.

It also times the engine alone, in-process without HTTP, on the same requests one by one and as one batch: the gain
of batching in the decode loop itself, before the per-token cost of streaming answers over HTTP (which on a model this
small is most of the time).

Then it loads adapters into a larger tiny model's server (hidden 512, 4 layers) one and then four at a time, to show
what each extra adapter costs in resident memory next to its file size (and the base's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

QUESTION = [{"role": "user", "content": "Is the gateway healthy after the deploy?"}]
ADAPTERS = 4


@dataclass
class Load:
    """What one load run measured."""
    wall_s: float = 0.0
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)

    def add(self, other: Load) -> None:
        self.wall_s += other.wall_s
        self.tokens += other.tokens
        self.latencies += other.latencies
        self.first_token += other.first_token

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.wall_s


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Server:
    """`python -m payload.serve` in a subprocess on a port the kernel picks, stopped on exit."""

    def __init__(self, args: list[str], logs: Path):
        self.logs = logs
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNEOPS_SERVE_API_KEY": ""}
        with open(logs, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "payload.serve", "--host", "127.0.0.1", "--port", "0",
                                          "--no-ui", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = ""

    def __enter__(self) -> Server:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"payload.serve exited with {self.proc.returncode}:\n{self.logs.read_text()}")
            bound = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", self.logs.read_text())
            if bound:
                self.url = bound.group(1)
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                raise SystemExit(f"payload.serve did not answer within 180 s:\n{self.logs.read_text()}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc: the memory figure needs Linux")


def ask(client, model: str, tokens: int, stream: bool = True) -> tuple[float, float, int]:
    """One completion: (latency s, time to first token s, completion tokens). Not streamed, the first token's time
    is unknown and reported as the latency."""
    body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": tokens, "ignore_eos": True}
    start = time.monotonic()
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise SystemExit(f"the server answered {r.status_code}: {r.text}")
        latency, n = time.monotonic() - start, r.json()["usage"]["completion_tokens"]
        if n != tokens:
            raise SystemExit(f"expected {tokens} completion tokens from {model}, got {n}")
        return latency, latency, n
    body.update(stream=True, stream_options={"include_usage": True})
    first = None
    usage = None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"the server answered {r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.monotonic() - start
    latency = time.monotonic() - start
    if usage is None or usage["completion_tokens"] != tokens:
        raise SystemExit(f"expected {tokens} completion tokens from {model}, got {usage}")
    return latency, first if first is not None else latency, usage["completion_tokens"]


def run_load(url: str, clients: int, requests: int, tokens: int, stream: bool = True) -> Load:
    import httpx

    load = Load()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client_loop(i: int) -> None:
        try:
            with httpx.Client(base_url=url, timeout=600) as client:
                for j in range(requests):
                    latency, first, n = ask(client, f"ft-{(i + j) % ADAPTERS + 1:04d}", tokens, stream)
                    with lock:
                        load.latencies.append(latency)
                        load.first_token.append(first)
                        load.tokens += n
        except BaseException as e:  # reported below, after the other clients are done
            errors.append(e)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load.wall_s = time.monotonic() - start
    if errors:
        raise errors[0]
    return load


def engine_only(base: Path, adapters: Path, clients: int, tokens: int) -> tuple[float, float]:
    """Tokens/s of the engine itself, in this process, without HTTP: `clients` requests over the adapters one after
    another, then all at once (one batch). What batching gains in the decode loop, before any per-token cost of
    streaming the answers out."""
    from payload.serving.engine import SamplingParams, load_engine

    engine = load_engine(base, None)
    for i in range(1, ADAPTERS + 1):
        engine.load_adapter(adapters / f"ft-{i:04d}", f"ft-{i:04d}")
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    models = [f"ft-{i % ADAPTERS + 1:04d}" for i in range(clients)]
    "".join(engine.generate(QUESTION, params, model=models[0]))  # warm-up
    start = time.monotonic()
    for model in models:
        "".join(engine.generate(QUESTION, params, model=model))
    serial = clients * tokens / (time.monotonic() - start)
    start = time.monotonic()
    gens = [engine.generate(QUESTION, params, model=model) for model in models]
    for gen in gens:
        "".join(gen)
    return clients * tokens / (time.monotonic() - start), serial


def write_manifest(path: Path, names: list[str]) -> None:
    entries = [{"name": n, "path": f"adapters/{n}", "run": n} for n in names]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"adapters": entries}))
    tmp.replace(path)


def measure_memory(root: Path, logs: Path) -> dict[str, float]:
    """RSS after loading 1 adapter and after 4, on a model large enough for the figures to rise above the noise."""
    import httpx

    from payload.tinymodel import build_tiny_adapter, build_tiny_model

    base = build_tiny_model(root / "mem" / "base", hidden_size=512, layers=4, heads=8)
    names = [f"mem-{i}" for i in range(1, ADAPTERS + 1)]
    for i, name in enumerate(names, 1):
        build_tiny_adapter(base, root / "mem" / "adapters" / name, seed=i, r=16)
    manifest = root / "mem" / "adapters.json"
    write_manifest(manifest, names[:1])
    with Server(["--base", str(base), "--adapters", str(manifest)], logs) as server:
        one = server.rss_mb()
        write_manifest(manifest, names)
        status = httpx.post(f"{server.url}/admin/reload", timeout=120).json()
        if [a["status"] for a in status["adapters"]] != ["loaded"] * ADAPTERS:
            raise SystemExit(f"the memory run's adapters did not all load: {status}")
        four = server.rss_mb()
    adapter_mb = (root / "mem" / "adapters" / names[0] / "adapter_model.safetensors").stat().st_size / 2**20
    base_mb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    return {"rss_one": one, "rss_four": four, "per_adapter": (four - one) / (ADAPTERS - 1), "adapter_file": adapter_mb,
            "base_file": base_mb}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m payload.bench_serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="turns each server takes at each load")
    ap.add_argument("--hidden", type=int, default=256, help="the tiny model's hidden size (default 256)")
    ap.add_argument("--layers", type=int, default=4, help="the tiny model's layers (default 4)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory-per-adapter figure")
    args = ap.parse_args(argv)

    from payload.tinymodel import build_tiny_adapter, build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        base = build_tiny_model(root / "tiny", hidden_size=args.hidden, layers=args.layers,
                                heads=max(1, args.hidden // 64))
        names = [f"ft-{i:04d}" for i in range(1, ADAPTERS + 1)]
        for i, name in enumerate(names, 1):
            build_tiny_adapter(base, root / "adapters" / name, seed=i)
        manifest = root / "adapters.json"
        write_manifest(manifest, names)

        # Both servers run side by side and take turns, round after round: on a shared machine the load of other
        # processes changes by the minute, and taking turns spreads it evenly over the two.
        configs = {"batched": [], "one at a time": ["--max-batch", "1"]}
        results = {label: {"many": Load(), "single": Load()} for label in configs}
        with contextlib.ExitStack() as stack:
            servers = {label: stack.enter_context(Server(["--base", str(base), "--adapters", str(manifest), *extra],
                                                         root / f"{label}.log"))
                       for label, extra in configs.items()}
            for server in servers.values():
                run_load(server.url, ADAPTERS, 1, 8)  # warm-up: every adapter once
            for _ in range(args.rounds):
                for label, server in servers.items():
                    results[label]["many"].add(run_load(server.url, args.clients, args.requests, args.tokens))
                for _ in range(ADAPTERS):
                    for label, server in servers.items():
                        results[label]["single"].add(run_load(server.url, 1, 1, args.tokens))
        in_process = engine_only(base, root / "adapters", args.clients, args.tokens)
        memory = None if args.no_memory else measure_memory(root, root / "memory.log")

    print(f"tiny model (hidden {args.hidden}, {args.layers} layers, 1 torch thread), {ADAPTERS} adapters, "
          f"{args.tokens}-token greedy completions, {args.rounds} rounds; {args.clients} clients x {args.requests} "
          "requests each")
    header = f"{'server':<14} {'load':<16} {'tokens/s':>9} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'TTFT p50':>9} " \
             f"{'TTFT p95':>9}"
    print(header)
    print("-" * len(header))
    for label, loads in results.items():
        for kind, load in loads.items():
            who = f"{args.clients} clients" if kind == "many" else "1 client"
            print(f"{label:<14} {who:<16} {load.tokens_per_s:9.0f} {load.requests_per_s:7.2f} "
                  f"{percentile(load.latencies, 50):7.3f} {percentile(load.latencies, 95):7.3f} "
                  f"{percentile(load.first_token, 50):9.3f} {percentile(load.first_token, 95):9.3f}")
    batched, serial = results["batched"], results["one at a time"]
    speedup = batched["many"].tokens_per_s / serial["many"].tokens_per_s
    p95_vs = percentile(batched["many"].latencies, 95) / percentile(serial["many"].latencies, 50)
    p95_vs_alone = percentile(batched["many"].latencies, 95) / percentile(serial["single"].latencies, 50)
    single_cost = percentile(batched["single"].latencies, 50) / percentile(serial["single"].latencies, 50) - 1
    print(f"\ntokens/s at {args.clients} clients, batched / one at a time: {speedup:.2f}x (goal >= 4x)")
    print(f"p95 latency at {args.clients} clients, batched / one at a time's p50 at the same load: {p95_vs:.2f}x "
          f"(goal <= 2x); / one request's p50 alone: {p95_vs_alone:.2f}x")
    print(f"one client alone, p50 latency with batching vs --max-batch 1: {single_cost:+.1%} (goal <= +10%)")
    print(f"the engine alone (in-process, no HTTP), {args.clients} requests: {in_process[0]:.0f} tokens/s in one "
          f"batch, {in_process[1]:.0f} one after another: {in_process[0] / in_process[1]:.2f}x")
    if memory:
        print(f"\nmemory (hidden 512, 4 layers, LoRA r 16 on all linear layers): RSS {memory['rss_one']:.0f} MB with 1 "
              f"adapter, {memory['rss_four']:.0f} MB with {ADAPTERS}: {memory['per_adapter']:.1f} MB per extra "
              f"adapter; an adapter file is {memory['adapter_file']:.1f} MB, the base's weights "
              f"{memory['base_file']:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
