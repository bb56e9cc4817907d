"""A start's limits fit its backend: an ACA start (a workspace sync, then the job's start operation) gets the RQ time
it needs, and its start lock is renewed while it works, so a second start_run (reconcile enqueues one for a run that
stays preparing) finds the run busy instead of starting a second execution of the same attempt."""

from __future__ import annotations

import dataclasses
import threading

from jobs import backends
from jobs.backends.aca.provision import provision_finetune
from jobs.backends.aca.standin import Fault
from jobs.core import queue, store
from jobs.runs import service, tasks, transitions
from tests.azure.conftest import wait_for


def test_start_jobs_get_the_time_their_backend_needs(settings):
    assert settings.backend == "aca"
    assert transitions.enqueue_start(settings, "ft-0001").timeout == backends.START_TIMEOUT_S["aca"] == 3600
    local = dataclasses.replace(settings, backend="local")
    assert transitions.enqueue_start(local, "ft-0002").timeout == backends.START_TIMEOUT_S["local"] == 180
    # the other tasks are quick on every backend and keep the short limit
    assert transitions.enqueue_admit(settings).timeout == queue.JOB_TIMEOUT_S


def test_a_start_longer_than_its_lock_ttl_keeps_the_lock_and_starts_one_execution(aca, settings, monkeypatch):
    provision_finetune(aca.clients)
    monkeypatch.setattr(tasks, "START_LOCK_TTL_S", 1.0)
    # A slow start: writing the run config takes 2 x 1.5 s, then the start operation another 1.5 s.
    aca.standin.inject(Fault("files", path=r"/runs/ft-0001/run\.json$", method="PUT", status=None, delay=1.5,
                             times=2))
    starting = aca.standin.inject(Fault("arm", path=r"/start$", method="POST", status=None, delay=1.5))
    run = service.submit_run(settings, requester="U1", channel="C1", model="model-cache/tiny",
                             dataset="datasets/train.jsonl", max_steps=4)
    assert tasks.admit_runs() == [run.id]

    first: dict[str, str] = {}
    t = threading.Thread(target=lambda: first.setdefault("result", tasks.start_run(run.id)))
    t.start()
    # By the time the start operation is asked for, 3 s have passed: three times the lock's TTL.
    wait_for(lambda: starting.hits, 20, "the start operation")
    assert tasks.start_run(run.id) == "busy"
    t.join(30)
    assert not t.is_alive()
    assert first["result"].startswith("tuneops-ft-")
    assert list(aca.standin.executions["tuneops-ft"]) == [first["result"]]
    assert store.load_run(store.connect(settings), run.id).execution_id == first["result"]
    # the lock was released at the end, and a later start of the same attempt finds the execution
    assert not store.connect(settings).exists(store.START_LOCK.format(run.id))
    assert tasks.start_run(run.id) == "already started"
