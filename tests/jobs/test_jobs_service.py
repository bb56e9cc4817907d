"""The service facade the bot calls: checks before anything is queued, and what each call leaves in Redis."""

from __future__ import annotations

import json
import threading

import pytest
from rq import Queue

from jobs.core import queue, store
from jobs.core.domain import RunState
from jobs.core.errors import RunRejected
from jobs.runs import service, tasks


def submit(settings, **kw):
    kw.setdefault("dataset", "datasets/train.jsonl")
    return service.submit_run(settings, requester="U1", channel="C1", **kw)


def queued_jobs(settings) -> list[str]:
    return [job.func_name for job in Queue(queue.QUEUE_NAME, connection=queue.rq_connection(settings)).jobs]


def nothing_created(settings) -> bool:
    conn = store.connect(settings)
    return not conn.exists(store.ALL_RUNS) and not conn.exists(store.EVENT_STREAM) and queued_jobs(settings) == []


def test_submit_creates_a_queued_run_reports_it_and_asks_for_admission(settings):
    run = submit(settings, epochs=2, lr=2e-4, max_steps=30, name="faq bot")
    assert run.id == "ft-0001" and run.state is RunState.QUEUED
    assert (run.requester, run.channel, run.model, run.dataset) == ("U1", "C1", "model-cache/tiny",
                                                                      "datasets/train.jsonl")
    assert run.params == {"num_epochs": 2, "learning_rate": 2e-4, "max_steps": 30} and run.name == "faq bot"
    assert service.get_run(settings, run.id) == run
    events = store.run_events(store.connect(settings), run.id)
    assert [(e.kind, e.data) for e in events] == [("queued", {"position": 1})]
    assert queued_jobs(settings) == ["jobs.runs.tasks.admit_runs"]
    assert service.queue_position(settings, run.id) == 1


def test_only_given_params_are_recorded(settings):
    assert submit(settings).params == {}


def test_model_is_a_workspace_folder_a_cached_hub_id_or_a_hub_id(settings):
    ws = settings.workspace
    (ws / "model-cache" / "microsoft" / "Phi-3-mini-4k-instruct").mkdir(parents=True)
    (ws / "models" / "mine").mkdir(parents=True)
    assert submit(settings, model="models/mine").model == "models/mine"
    assert submit(settings, model="microsoft/Phi-3-mini-4k-instruct").model == \
        "model-cache/microsoft/Phi-3-mini-4k-instruct"
    assert submit(settings, model="meta-llama/Llama-3.2-1B").model == "meta-llama/Llama-3.2-1B"


@pytest.mark.parametrize("kw,fragment", [
    ({"dataset": None}, "a run needs a dataset: add --dataset PATH"),
    ({"dataset": "/etc/passwd"}, "leads outside the workspace"),
    ({"dataset": "../secrets.jsonl"}, "leads outside the workspace"),
    ({"dataset": "datasets/missing.jsonl"}, "dataset datasets/missing.jsonl not found in the workspace"),
    ({"dataset": "datasets"}, "is a folder: give a JSONL file"),
    ({"model": "nothing-here"}, "model 'nothing-here' not found"),
    ({"model": "model-cache/absent"}, "not found"),
    ({"lr": 5.0}, "--lr 5.0 is not accepted"),
    ({"epochs": 0}, "--epochs 0 is not accepted"),
    ({"max_steps": -7}, "--max-steps -7 is not accepted"),
    ({"name": "x" * 65}, "--name is longer than 64 characters"),
])
def test_bad_requests_are_refused_with_what_to_do_and_nothing_is_queued(settings, kw, fragment):
    with pytest.raises(RunRejected, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        submit(settings, **kw)
    assert nothing_created(settings)


def test_a_dataset_that_links_outside_the_workspace_is_refused(settings, tmp_path, example_dataset):
    outside = tmp_path / "outside.jsonl"
    outside.write_text(example_dataset.read_text())
    (settings.workspace / "datasets" / "link.jsonl").symlink_to(outside)
    with pytest.raises(RunRejected, match="outside the workspace"):
        submit(settings, dataset="datasets/link.jsonl")
    assert nothing_created(settings)


def test_a_malformed_dataset_is_refused_with_file_line_errors(settings):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                      {"role": "assistant", "content": f"a{i}"}]}) for i in range(30)]
    bad = {2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}  # 12 broken lines: 10 shown, then how many more
    text = "\n".join("{not json" if i in bad else line for i, line in enumerate(lines, start=1)) + "\n"
    (settings.workspace / "datasets" / "bad.jsonl").write_text(text)
    with pytest.raises(RunRejected) as e:
        submit(settings, dataset="datasets/bad.jsonl")
    message = str(e.value)
    first, *errors = message.splitlines()
    assert first == "dataset datasets/bad.jsonl has problems; fix them and run again:"
    assert errors[0].strip().startswith("datasets/bad.jsonl:2: ")
    assert len([x for x in errors if x.strip().startswith("datasets/bad.jsonl:")]) == 10
    assert errors[-1].strip() == "... and 2 more"
    assert str(settings.workspace) not in message  # paths as the user wrote them
    assert nothing_created(settings)


def test_a_repeated_request_returns_the_first_run(settings):
    first = submit(settings, request_id="trigger-123")
    again = submit(settings, request_id="trigger-123")
    assert again.id == first.id
    assert [r.id for r in service.list_runs(settings)] == [first.id]


def test_concurrent_deliveries_of_one_request_make_one_run(settings):
    results = []
    threads = [threading.Thread(target=lambda: results.append(submit(settings, request_id="trigger-9").id))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(service.list_runs(settings)) == 1


def test_a_repeat_after_the_first_delivery_died_mid_submit_makes_the_run_it_named(settings, monkeypatch):
    # The first delivery claimed the request (and its run id), then its process died before the run was created.
    conn = store.connect(settings)
    conn.set(store.REQUEST_KEY.format("trigger-dead"), store.new_run_id(conn), ex=service.REQUEST_TTL_S)
    monkeypatch.setattr(service, "REQUEST_WAIT_S", 0.2)
    run = submit(settings, request_id="trigger-dead")
    assert run.id == "ft-0001"
    assert submit(settings, request_id="trigger-dead").id == "ft-0001"
    assert [r.id for r in service.list_runs(settings)] == ["ft-0001"]
    assert [e.kind for e in store.run_events(conn, "ft-0001")] == ["queued"]


def test_list_is_newest_first_and_limited(settings):
    ids = [submit(settings).id for _ in range(3)]
    assert [r.id for r in service.list_runs(settings)] == ids[::-1]
    assert [r.id for r in service.list_runs(settings, limit=2)] == ids[:0:-1]


def test_cancel_a_queued_run_and_the_line_moves(settings):
    a, b, c = (submit(settings) for _ in range(3))
    cancelled = service.cancel_run(settings, a.id, by="U2")
    assert cancelled.state is RunState.CANCELLED and cancelled.cancelled_by == "U2"
    assert [(e.kind, e.data) for e in store.run_events(store.connect(settings), a.id)] == [
        ("queued", {"position": 1}),
        ("state", {"state": "cancelled", "previous": "queued"}),
        ("cancelled", {"by": "U2"}),
    ]
    assert "jobs.runs.tasks.admit_runs" in queued_jobs(settings)
    tasks.admit_runs()  # what a worker does with that job: here max_running is 2, so b and c are admitted
    assert service.get_run(settings, b.id).state is RunState.PREPARING
    assert service.get_run(settings, c.id).state is RunState.PREPARING


def test_the_line_moves_when_a_queued_run_is_cancelled(settings):
    runs = [submit(settings) for _ in range(4)]
    service.cancel_run(settings, runs[1].id, by="U2")
    tasks.admit_runs()  # admits runs[0] and runs[2]; runs[3] is first in line now
    assert service.queue_position(settings, runs[3].id) == 1
    last = [e for e in store.run_events(store.connect(settings), runs[3].id) if e.kind == "queued"][-1]
    assert last.data == {"position": 1}


@pytest.mark.parametrize("call", [service.cancel_run, service.resume_run])
def test_unknown_and_malformed_run_ids_are_refused(settings, call):
    with pytest.raises(RunRejected, match="there is no run ft-0042"):
        call(settings, "ft-0042", "U1")
    with pytest.raises(RunRejected, match="is not a run id"):
        call(settings, "42; drop", "U1")


def test_cancel_of_a_finished_run_is_refused(settings):
    run = submit(settings)
    service.cancel_run(settings, run.id, by="U1")
    with pytest.raises(RunRejected, match="has already been cancelled: there is nothing to cancel"):
        service.cancel_run(settings, run.id, by="U1")


def test_resume_only_finished_runs_and_back_in_line(settings):
    run = submit(settings)
    with pytest.raises(RunRejected, match="is queued: only a failed, timed-out or cancelled run can be resumed"):
        service.resume_run(settings, run.id, by="U1")
    service.cancel_run(settings, run.id, by="U1")
    resumed = service.resume_run(settings, run.id, by="U3")
    assert resumed.state is RunState.QUEUED and resumed.cancelled_by == "" and resumed.finished_at is None
    tail = store.run_events(store.connect(settings), run.id)[-3:]
    assert [(e.kind, e.data.get("state")) for e in tail] == [("state", "queued"), ("resumed", None), ("queued", None)]
    assert tail[1].data == {"by": "U3", "checkpoint_step": 0, "auto": False} and tail[2].data == {"position": 1}


def test_the_bot_records_where_it_posted_and_jobs_keeps_nothing_of_slack(settings):
    from bot.threads import RUN_CARD, Threads

    run = submit(settings)
    Threads(settings).set(RUN_CARD, run.id, "1712345678.000100")
    assert Threads(settings).get(RUN_CARD, run.id) == "1712345678.000100"  # read back by another instance
    stored = service.get_run(settings, run.id)
    assert not any("ts" in key.split("_") for key in stored.to_dict())
    assert service.queue_position(settings, run.id) == 1


def test_logs_of_a_run_that_never_started_are_empty(settings):
    run = submit(settings)
    assert service.run_logs(settings, run.id, 20, None).lines == []
    with pytest.raises(RunRejected, match="there is no run"):
        service.run_logs(settings, "ft-0077", 20, None)


def test_get_run_of_garbage_is_none(settings):
    assert service.get_run(settings, "not-a-run") is None
    assert service.get_run(settings, "ft-0005") is None


def test_a_dataset_fixed_after_a_refusal_is_checked_again(settings):
    """The validator's report is reused only while the file is unchanged."""
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                      {"role": "assistant", "content": f"a{i}"}]}) for i in range(12)]
    path = settings.workspace / "datasets" / "fixme.jsonl"
    path.write_text("\n".join(["{not json", *lines[1:]]) + "\n")
    with pytest.raises(RunRejected, match="fixme.jsonl:1: "):
        submit(settings, dataset="datasets/fixme.jsonl")
    assert service.validated(path, 1024) is service.validated(path, 1024)  # unchanged: checked once
    path.write_text("\n".join(lines) + "\n")
    run = submit(settings, dataset="datasets/fixme.jsonl")
    assert run.state is RunState.QUEUED


def test_submit_records_the_datasets_checksum_and_source_so_the_run_outlives_the_file(settings):
    import hashlib

    path = settings.workspace / "datasets" / "train.jsonl"
    run = submit(settings, dataset_source="https://standin.slack.com/archives/C1/p1700000000000100")
    stored = service.get_run(settings, run.id)
    assert stored.dataset_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert stored.dataset_source == "https://standin.slack.com/archives/C1/p1700000000000100"
    assert submit(settings).dataset_source == ""  # a file put in the workspace has no link

    # a changed file gets its new checksum, not a cached one
    path.write_bytes(path.read_bytes() + path.read_bytes())
    assert submit(settings).dataset_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() != stored.dataset_sha256
