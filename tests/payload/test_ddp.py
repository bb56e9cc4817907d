"""The trainer on several processes, as a multi-GPU replica runs it (`torchrun --nproc_per_node 2 -m payload.train`),
here on CPU with the gloo backend and the tiny 4-bit model: the same losses as one process with the same global
batch, a SIGKILL of one rank ending the run with an error that names it and a resumable checkpoint, and the resume
on 2 ranks continuing the same trajectory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from payload import checkpoints as ck
from payload import distributed
from payload.events import EVENTS_FILE, parse_line, read_events
from payload.tinymodel import example_dataset_path
from payload.train import plan_steps
from tests.payload.test_train import RUN, env, runs_of, workspace

STEPS = 20
# The same global batch of 2 packs an optimizer step: 1 process x 2 accumulated micro-batches, or 2 ranks x 1.
# No evaluation during training (eval_split 0): it is not part of what is compared, and costs time.
SHARED = {"max_steps": STEPS, "save_steps": 5, "save_total_limit": 3, "eval_split": 0.0, "eval_generations": 0,
          "micro_batch_size": 1}
# Both sides compute the same gradient: the token-weighted mean loss over the same 2 packs (accelerate gives rank r
# every 2nd micro-batch of the same shuffled order; the Trainer counts the answer tokens over all ranks), so only the
# order of float32 sums differs (two halves all-reduced against two micro-batches accumulated): about 1e-7 relative.
# Measured here: equal to the 5 decimals the events carry over 20 steps. Adam's first steps on the zero-initialised
# LoRA B divide by the square root of tiny second moments and so can amplify such differences (an evaluation between
# steps, which perturbs by ~5e-5, grew to 1e-3 in 10 steps); 2e-3 leaves room for that, while other packs in a step
# (another global batch, a wrong shard, duplicated packs) change its loss by 0.01-0.07 here.
LOSS_TOLERANCE = 2e-3


def torchrun(ws: Path, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "payload.train", "--config", f"{RUN}/run.json"]


def start(ws: Path, nproc: int) -> subprocess.Popen:
    """torchrun (or one trainer) in a process group of its own, so that `stop` can end its ranks too."""
    cmd = torchrun(ws, nproc) if nproc > 1 else [sys.executable, "-m", "payload.train", "--config", f"{RUN}/run.json"]
    return subprocess.Popen(cmd, cwd=ws, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Whatever happened, no rank outlives the test: the whole process group is killed."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.communicate()


def launch(ws: Path, nproc: int) -> subprocess.CompletedProcess:
    proc = start(ws, nproc)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        stop(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def losses(ws: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in runs_of(read_events(ws / RUN / EVENTS_FILE)[0])[-1] if e["type"] == "step"}


def children_by_rank(parent: int) -> dict[int, int]:
    """The processes `parent` (torchrun) started, by the RANK it gave each."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            environ = dict(x.split("=", 1) for x in (d / "environ").read_bytes().decode().split("\0") if "=" in x)
        except (OSError, ValueError):
            continue
        if "RANK" in environ:
            found[int(environ["RANK"])] = int(d.name)
    return found


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model):
    ws = workspace(tmp_path_factory.mktemp("one"), tiny_model, example_dataset_path(), gradient_accumulation_steps=2,
                   **SHARED)
    res = launch(ws, 1)
    assert res.returncode == 0, res.stderr[-3000:]
    return ws


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model):
    ws = workspace(tmp_path_factory.mktemp("two"), tiny_model, example_dataset_path(), gradient_accumulation_steps=1,
                   **SHARED)
    res = launch(ws, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    return ws, res


def test_two_ranks_follow_one_process_with_the_same_global_batch(one_process, two_ranks):
    ws, res = two_ranks
    single, ddp = losses(one_process), losses(ws)
    assert sorted(ddp) == sorted(single) == list(range(1, STEPS + 1))
    assert max(abs(ddp[s] - single[s]) for s in single) <= LOSS_TOLERANCE
    assert ddp[STEPS] < ddp[1] - 0.1                     # and it learns

    m, m1 = (json.loads((w / RUN / "metrics.json").read_text()) for w in (ws, one_process))
    assert m["world_size"] == 2 and m1["world_size"] == 1 and m["steps"] == STEPS
    assert m["tokens_seen"] == m1["tokens_seen"]          # counted over both ranks
    # Only rank 0 wrote events: each step once, one start, one done; stdout (rank 0's) holds the same events.
    evs = read_events(ws / RUN / EVENTS_FILE)[0]
    assert [e["type"] for e in evs].count("start") == 1 and evs[0]["world_size"] == 2 and evs[-1]["type"] == "done"
    assert [e for e in map(parse_line, res.stdout.splitlines()) if e] == evs
    # The run folder holds what one process writes, plus the other rank's RNG state in each checkpoint.
    assert sorted(p.name for p in (ws / RUN).iterdir()) == sorted(p.name for p in (one_process / RUN).iterdir())
    newest, _ = ck.newest_complete(ws / RUN / "checkpoints")
    assert newest.step == STEPS and (newest.path / "rng_state_1.pth").is_file()
    marker = json.loads((newest.path / ck.MARKER).read_text())
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= set(marker["files"])


def test_sigkill_of_one_rank_ends_the_run_with_an_error_and_two_ranks_resume(tmp_path, tiny_model, example_dataset,
                                                                            two_ranks):
    ws = workspace(tmp_path, tiny_model, example_dataset, gradient_accumulation_steps=1, **SHARED)
    proc = start(ws, 2)
    try:
        for line in proc.stdout:
            ev = parse_line(line)
            if ev is not None and ev["type"] == "checkpoint":
                break
        else:
            pytest.fail(f"torchrun ended (rc {proc.wait(10)}) before a checkpoint: {proc.stderr.read()[-3000:]}")
        ranks = children_by_rank(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        ended_in = time.monotonic() - killed
    finally:
        stop(proc)
    assert proc.returncode != 0
    # Rank 0 noticed at once (torchrun's SIGTERM, or its next collective failing); no process-group timeout waited.
    assert ended_in < 20, ended_in
    newest, _ = ck.newest_complete(ws / RUN / "checkpoints")
    assert newest is not None and 5 <= newest.step < STEPS
    last = read_events(ws / RUN / EVENTS_FILE)[0][-1]
    assert last["type"] == "error"
    assert last["message"].startswith(f"rank 1 (pid {ranks[1]}) of 2 was killed or crashed after step ")
    assert (f"checkpoint-{newest.step}, the last complete checkpoint, is resumable: start the run again to continue "
            f"from step {newest.step}") in last["message"]
    assert f"error: {last['message']}" in err               # rank 0's line; torchrun's own report follows it

    res = launch(ws, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    second = runs_of(read_events(ws / RUN / EVENTS_FILE)[0])[-1]
    assert second[0]["resumed_from_step"] == newest.step and second[0]["world_size"] == 2
    assert [e["step"] for e in second if e["type"] == "step"] == list(range(newest.step + 1, STEPS + 1))
    assert second[-1]["type"] == "done"
    # Adapter, optimizer, scheduler and both ranks' place in the data came back: the same losses as the run left alone.
    resumed, alone = losses(ws), losses(two_ranks[0])
    assert max(abs(resumed[s] - alone[s]) for s in resumed) <= LOSS_TOLERANCE


def test_held_out_loss_on_two_ranks_is_the_final_evaluations(tmp_path, tiny_model, example_dataset):
    """8 held-out chats make 3 packs, which do not split over 2 ranks: the Trainer's own distributed evaluation
    reports 3.8 for a true 4.6 there, so rank 0 evaluates alone, token-weighted, at each save."""
    ws = workspace(tmp_path, tiny_model, example_dataset, gradient_accumulation_steps=1, max_steps=4, save_steps=4,
                   eval_generations=0)
    res = launch(ws, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    evals = [e for e in read_events(ws / RUN / EVENTS_FILE)[0] if e["type"] == "eval"]
    assert [(e["step"], e.get("final", False)) for e in evals] == [(4, False), (4, True)]
    assert evals[0]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], abs=1e-3)


# --- the pure parts ---------------------------------------------------------------------------------------------

def test_ranks_come_from_torchruns_environment():
    assert distributed.from_env({}) == distributed.Ranks(0, 0, 1)
    r = distributed.from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (r.rank, r.local_rank, r.world_size, r.multi, r.main) == (3, 1, 4, True, False)


def test_a_dead_peer_is_one_that_exited_or_is_a_zombie():
    assert not distributed.is_gone(os.getpid())
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while not distributed.is_gone(child.pid):         # a zombie until reaped: already gone for its peers
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.wait()
    assert distributed.is_gone(child.pid)
    ranks = distributed.Ranks(0, 0, 3, pids={0: os.getpid(), 1: child.pid, 2: os.getpid()})
    assert distributed.dead_peers(ranks) == [1]


def test_the_peer_death_message_says_who_and_what_to_resume_from():
    ranks = distributed.Ranks(0, 0, 4, pids={0: 10, 1: 11, 2: 12, 3: 13})
    msg = distributed.peer_death_message([2, 3], ranks, 7, None)
    assert msg.startswith("rank 2 (pid 12), rank 3 (pid 13) of 4 were killed or crashed after step 7")
    assert msg.endswith("no checkpoint was complete yet: start the run again to train from the start")


def test_planned_steps_count_each_ranks_share_of_the_batches():
    # 23 packs, micro-batch 1: one process takes 23 batches, each of 2 ranks 12 (the last one topped up).
    assert plan_steps(23, 1, 2, 1, -1) == 12
    assert plan_steps(23, 1, 1, 1, -1, world_size=2) == 12
    assert plan_steps(23, 1, 4, 2, -1, world_size=4) == 4
