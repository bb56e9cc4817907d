"""Several GPUs of one replica under `torchrun`: which rank this process is, the process group, and which peers died.

Each rank trains the same 4-bit base with its own LoRA copy (DDP synchronizes only the LoRA gradients); rank 0 alone
writes the run folder. torchrun stops every rank when one dies; the survivors use the pid table gathered at the start
to say which rank it was. Torch is imported inside the functions: the trainer checks its config and data first.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

# How long a collective may wait for a peer that is alive but stuck before the process group gives up. A dead peer
# is noticed at once (its sockets close, and torchrun stops the others); this is for a hung one. It must cover the
# longest wait of the others on rank 0: saving a checkpoint to the share.
PROCESS_GROUP_TIMEOUT_S = 600


@dataclass
class Ranks:
    """This process's place among the processes torchrun started (one, without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    pids: dict[int, int] = field(default_factory=dict)   # rank -> pid, once the process group exists

    @property
    def multi(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env(env=None) -> Ranks:
    """The ranks torchrun sets in the environment (RANK, LOCAL_RANK, WORLD_SIZE)."""
    env = os.environ if env is None else env

    def num(name: str, default: int) -> int:
        value = env.get(name, "")
        return int(value) if value.strip().isdigit() else default

    return Ranks(rank=num("RANK", 0), local_rank=num("LOCAL_RANK", 0), world_size=num("WORLD_SIZE", 1))


def init(ranks: Ranks, device: str) -> None:
    """Start the process group (NCCL on GPUs, gloo on CPUs) and learn every rank's pid. The Trainer (accelerate)
    adopts a group that exists; starting it here sets its timeout, which accelerate passes on GPUs only."""
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            timeout=dt.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    pids: list = [None] * ranks.world_size
    dist.all_gather_object(pids, os.getpid())
    ranks.pids = dict(enumerate(pids))


def _collective_device(device: str):
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def any_rank(flag: bool, device: str) -> bool:
    """True on every rank when it is true on any: a stop must happen at the same step everywhere."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


_PF_EXITING = 0x4   # include/linux/sched.h: set when a task starts to exit, before its sockets are closed


def is_gone(pid: int) -> bool:
    """A process that has exited or is exiting: no longer there, a zombie its parent (torchrun) has not reaped
    yet, or still tearing itself down (its peers see its sockets close while it does)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return False
    return fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)


def dead_peers(ranks: Ranks, wait_s: float = 0.0) -> list[int]:
    """The ranks (other than this one) whose process has exited; waits up to `wait_s` for one to show."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = sorted(r for r, pid in ranks.pids.items() if r != ranks.rank and is_gone(pid))
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


def peer_death_message(dead: list[int], ranks: Ranks, step: int, checkpoint_step: int | None) -> str:
    """The one line a run's owner reads when a rank died: which one, where, and what to resume from."""
    who = ", ".join(f"rank {r} (pid {ranks.pids.get(r, '?')})" for r in dead)
    verb = "were" if len(dead) > 1 else "was"
    where = f"after step {step}" if step else "before the first step ended"
    resume = (f"checkpoint-{checkpoint_step}, the last complete checkpoint, is resumable: start the run again to "
              f"continue from step {checkpoint_step}" if checkpoint_step else
              "no checkpoint was complete yet: start the run again to train from the start")
    return (f"{who} of {ranks.world_size} {verb} killed or crashed {where} (its own last lines in the log say why, "
            f"if it could write any); the other ranks were stopped; {resume}")
