"""Benchmark of the incremental workspace sync: `python -m jobs.backends.aca.bench_sync [--files 1000 --mb 200]`.

Syncs a generated workspace to the local Azure stand-in (jobs/backends/aca/standin/, in a process of its own) through the real azure-storage-file-share client: once in full, then again with one file changed. Prints the
figures; the goal is that the second sync sends only that file and takes at most 5% of the first one's time.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from jobs.backends.aca.clients import AzureClients
from jobs.backends.aca.config import parse_aca_config
from jobs.backends.aca.standin import (
    ACCOUNT,
    ACCOUNT_KEY,
    AzureStandIn,
    StaticTokenCredential,
)
from jobs.backends.aca.sync import HashCache, Source, sync_workspace


def make_workspace(root: Path, files: int, total_mb: int, seed: int = 7) -> tuple[int, int]:
    """`files` files of `total_mb` MB in all: mostly small ones (datasets, code, configs) and a few big ones
    (model shards) that go up in several ranges."""
    rng = random.Random(seed)
    total = total_mb * 1024 * 1024
    big = max(1, files // 100)
    big_bytes = int(total * 0.7)
    small_bytes = total - big_bytes
    sizes = [big_bytes // big] * big
    weights = [rng.random() + 0.2 for _ in range(files - big)]
    scale = small_bytes / sum(weights)
    sizes += [max(1, int(w * scale)) for w in weights]
    block = os.urandom(1024 * 1024)
    written = 0
    for i, size in enumerate(sizes):
        sub = "model-cache/bench" if i < big else f"datasets/part{i % 20:02d}"
        path = root / sub / f"file-{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            left = size
            # Distinct content per file (its index up front), cheap to produce.
            f.write(i.to_bytes(4, "big"))
            left -= 4
            while left > 0:
                chunk = block[: min(left, len(block))]
                f.write(chunk)
                left -= len(chunk)
        written += size
    return len(sizes), written


def _serve(root: str, conn) -> None:

    standin = AzureStandIn(Path(root))
    standin.record = False  # the benchmark measures the sync, not the stand-in's bookkeeping
    standin.start()
    standin.add_share("bench")
    conn.send({"files_url": standin.files_url, "ca": str(standin.ca_path)})
    conn.recv()
    standin.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.backends.aca.bench_sync", description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(argv)


    with tempfile.TemporaryDirectory(prefix="tuneops-bench-") as tmp:
        tmp_path = Path(tmp)
        n, size = make_workspace(tmp_path / "ws", args.files, args.mb)
        parent, child = mp.Pipe()
        server = mp.get_context("spawn").Process(target=_serve, args=(str(tmp_path / "azure"), child), daemon=True)
        server.start()
        try:
            info = parent.recv()

            cfg = parse_aca_config(
                {"SUBSCRIPTION_ID": "bench", "RESOURCE_GROUP_NAME": "bench", "STORAGE_ACCOUNT_NAME": ACCOUNT,
                 "FILE_SHARE_NAME": "bench", "ACA_JOB_NAME": "bench", "COMMANDS": [],
                 "FILES_ENDPOINT": info["files_url"]},
                None, {"TUNEOPS_AZURE_CA_BUNDLE": info["ca"], "TUNEOPS_STORAGE_KEY": ACCOUNT_KEY}, tmp_path)
            clients = AzureClients(cfg, StaticTokenCredential(), upload_concurrency=args.concurrency)
            source = [Source(tmp_path / "ws", "")]
            # As in the executor, syncs that share the manifest hold a lock (Redis there; no other writer here).
            lock = threading.Lock()
            cache_file = tmp_path / "hashes.json"

            first = sync_workspace(clients.share, source, concurrency=args.concurrency, cache=HashCache(cache_file),
                                   lock=lock)
            changed = tmp_path / "ws" / "datasets" / "part03" / "file-0103.bin"
            with changed.open("ab") as f:
                f.write(b"one more line\n")
            t0 = time.perf_counter()
            second = sync_workspace(clients.share, source, concurrency=args.concurrency, cache=HashCache(cache_file),
                                    lock=lock)
            second_s = time.perf_counter() - t0
            # The same with no local hash cache (a fresh worker): every file is read and hashed again.
            with changed.open("ab") as f:
                f.write(b"and another\n")
            cold = sync_workspace(clients.share, source, concurrency=args.concurrency, cache=HashCache(None), lock=lock)
            clients.close()
        finally:
            parent.send("stop")
            server.join(30)

    ratio = second_s / first.seconds
    print(f"workspace: {n} files, {size / 1e6:.1f} MB; upload concurrency {args.concurrency}; "
          f"CPUs {os.cpu_count()}")
    print(f"full sync:            {first.seconds:7.2f} s  sent {len(first.uploaded)} files, "
          f"{first.bytes_sent / 1e6:.1f} MB ({first.bytes_sent / 1e6 / first.seconds:.1f} MB/s)")
    print(f"one file changed:     {second_s:7.3f} s  sent {len(second.uploaded)} file(s) {second.uploaded}, "
          f"{second.bytes_sent} bytes  = {ratio * 100:.1f}% of the full sync")
    print(f"same, no hash cache:  {cold.seconds:7.2f} s  sent {len(cold.uploaded)} file(s) (every file re-hashed)")
    ok = second.uploaded == ["datasets/part03/file-0103.bin"] and ratio <= 0.05
    print(f"goal (only that file, <= 5% of the full sync): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
