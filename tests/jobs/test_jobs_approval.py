"""Deploy requests against a real Redis: the four-eyes checks, one decision under concurrent clicks, expiry, the run
record, and durations as settings are written."""

from __future__ import annotations

import threading
import time

import pytest

import jobs.core.settings as jobs_settings
from bot import words
from jobs import reconcile
from jobs.core import queue, store
from jobs.core.domain import Run, RunEvent, RunState
from jobs.core.durations import describe_duration, parse_duration
from jobs.core.errors import RunRejected
from jobs.deploys import approval
from jobs.deploys.approval import Approval, ApprovalState, decision_refusal

APPROVERS = frozenset({"U0APPROVER", "U0BOSS"})


def succeeded_run(settings, **kw) -> Run:
    conn = store.connect(settings)
    run = Run(id=store.new_run_id(conn), requester="U0ALICE", channel="C0TRAIN", model="model-cache/tiny",
              dataset="datasets/train.jsonl", **kw)
    store.create_run(conn, run, lambda pos: [RunEvent(run.id, "queued", {"position": pos})])

    def finish(r: Run):
        for state in (RunState.PREPARING, RunState.RUNNING, RunState.SUCCEEDED):
            r.transition(state)
        r.adapter_path = f"runs/{r.id}/adapter"
        return []

    store.update_run(conn, run.id, finish)
    return store.load_run(conn, run.id)


def pending_request(**kw) -> Approval:
    now = time.time()
    fields = dict(id="dp-0001", run_id="ft-0001", requested_by="U0ALICE", channel="C0TRAIN", target="local",
                  backend="local", created_at=now, expires_at=now + 60)
    return Approval(**{**fields, **kw})


def said(req, user, approve, approvers, now):
    """The refusal as the person reads it: the jobs check says why (a code), the bot says it in words."""
    why = decision_refusal(req, user, approve, approvers, now)
    return None if why is None else words.refusal(approval.DecisionRefused(why, req, approvers))


@pytest.mark.parametrize("user, approve, expected", [
    ("U0BOB", True, "Only approvers may approve or reject"),
    ("U0BOB", False, "Only approvers may approve or reject"),
    ("U0ALICE", True, "Only approvers"),  # the requester is no approver here
    ("U0APPROVER", True, None),
    ("U0APPROVER", False, None),
])
def test_who_may_decide(user, approve, expected):
    reason = said(pending_request(), user, approve, APPROVERS, time.time())
    assert (reason is None) if expected is None else (expected in reason)


def test_four_eyes_even_for_an_approver_and_the_state_and_the_clock():
    req = pending_request(requested_by="U0APPROVER")
    reason = said(req, "U0APPROVER", True, APPROVERS, time.time())
    assert "someone else has to approve it (four eyes)" in reason and "<@U0BOSS>" in reason
    assert said(req, "U0APPROVER", False, APPROVERS, time.time()) is None  # withdrawing is fine
    alone = said(req, "U0APPROVER", True, frozenset({"U0APPROVER"}), time.time())
    assert "No other approver is configured" in alone
    assert "expired" in said(req, "U0BOSS", True, APPROVERS, req.expires_at + 1)
    req.state, req.decided_by = ApprovalState.REJECTED, "U0BOSS"
    assert "already rejected by <@U0BOSS>" in said(req, "U0APPROVER", True, APPROVERS, time.time())


def test_durations():
    assert parse_duration("10800") == 10800 and parse_duration("24h") == 86400
    assert parse_duration("1h30m") == 5400 and parse_duration(" 90s ") == 90 and parse_duration("1.5") == 1.5
    for bad in ("", "0", "-5", "soon", "24 hours", "h", "inf", "nan"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert describe_duration(10800) == "3h" and describe_duration(5400) == "1h 30m" and describe_duration(42) == "42s"


def test_a_request_needs_a_succeeded_run_and_there_is_one_open_request_a_run(settings):
    conn = store.connect(settings)
    run = Run(id=store.new_run_id(conn), requester="U0ALICE", channel="C0TRAIN", model="m", dataset="d")
    store.create_run(conn, run, lambda pos: [])
    with pytest.raises(RunRejected, match="only a run that succeeded"):
        approval.request_deploy(settings, run.id, "U0ALICE", "C0TRAIN")
    with pytest.raises(RunRejected, match="there is no run ft-0999"):
        approval.request_deploy(settings, "ft-0999", "U0ALICE", "C0TRAIN")

    run = succeeded_run(settings)
    req = approval.request_deploy(settings, run.id, "U0BOB", "C0TRAIN")
    assert req.state is ApprovalState.PENDING and req.requested_by == "U0BOB"
    assert req.expires_at == pytest.approx(req.created_at + settings.approval_ttl_s)
    record = store.load_run(conn, run.id).deployments
    assert [d["id"] for d in record] == [req.id] and record[0]["state"] == "pending"
    events = [e for e in store.run_events(conn, run.id) if e.kind == "approval"]
    assert [e.data for e in events] == [{"approval": req.id, "state": "pending"}]
    with pytest.raises(RunRejected, match=f"already has a deploy request \\({req.id}"):
        approval.request_deploy(settings, run.id, "U0CAROL", "C0TRAIN")


def test_two_approvals_at_once_decide_once_and_enqueue_one_deploy(settings):
    conn = store.connect(settings)
    run = succeeded_run(settings)
    req = approval.request_deploy(settings, run.id, "U0ALICE", "C0TRAIN")
    rq_queue = queue.get_queue(settings)
    before = rq_queue.count
    results: dict[str, object] = {}
    start = threading.Barrier(2)

    def click(user: str) -> None:
        start.wait()
        try:
            results[user] = approval.decide(settings, req.id, user, True, APPROVERS)
        except RunRejected as e:
            results[user] = e

    threads = [threading.Thread(target=click, args=(u,)) for u in sorted(APPROVERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    won = [u for u, r in results.items() if isinstance(r, Approval)]
    lost = [r for r in results.values() if isinstance(r, RunRejected)]
    assert len(won) == 1 and len(lost) == 1 and "already approved by" in words.refusal(lost[0])
    stored = approval.get_approval(settings, req.id)
    assert stored.state is ApprovalState.APPROVED and stored.decided_by == won[0] and stored.decided_at
    assert rq_queue.count == before + 1 and rq_queue.jobs[-1].id == f"deploy-{req.id}"
    record = store.load_run(conn, run.id).deployments[0]
    assert record["state"] == "approved" and record["decided_by"] == won[0]
    states = [e.data["state"] for e in store.run_events(conn, run.id) if e.kind == "approval"]
    assert states == ["pending", "approved"]


def test_an_expired_request_is_refused_and_marked(settings):
    settings = type(settings)(**{**settings.__dict__, "approval_ttl_s": 1.5})
    jobs_settings.configure(settings)
    run = succeeded_run(settings)
    req = approval.request_deploy(settings, run.id, "U0ALICE", "C0TRAIN")
    assert approval.expire_approval(req.id) == "not yet"  # too early: looks again later
    time.sleep(1.6)
    with pytest.raises(RunRejected, match="expired"):
        approval.decide(settings, req.id, "U0APPROVER", True, APPROVERS)
    assert approval.get_approval(settings, req.id).state is ApprovalState.EXPIRED
    assert approval.expire_approval(req.id) == "decided"
    assert queue.get_queue(settings).fetch_job(f"deploy-{req.id}") is None
    # the run may be asked for again
    again = approval.request_deploy(settings, run.id, "U0ALICE", "C0TRAIN")
    assert again.id != req.id
    assert [d["state"] for d in store.load_run(store.connect(settings), run.id).deployments] == ["expired", "pending"]


def test_the_expiry_task_marks_a_request_nobody_decided(settings):
    settings = type(settings)(**{**settings.__dict__, "approval_ttl_s": 0.2})
    jobs_settings.configure(settings)
    run = succeeded_run(settings)
    req = approval.request_deploy(settings, run.id, "U0ALICE", "C0TRAIN")
    time.sleep(0.3)
    assert approval.expire_approval(req.id) == "expired"
    states = [e.data["state"] for e in store.run_events(store.connect(settings), run.id) if e.kind == "approval"]
    assert states == ["pending", "expired"]


def approved(settings, run: Run) -> Approval:
    req = approval.request_deploy(settings, run.id, "U0ALICE", "C0TRAIN")
    return approval.decide(settings, req.id, "U0APPROVER", True, APPROVERS)


def test_a_local_deploy_that_cannot_start_fails_with_its_reason(settings):
    from jobs.deploys.deploy import deploy_approved

    run = succeeded_run(settings)  # its adapter folder was never written
    req = approved(settings, run)
    assert deploy_approved(req.id) == "failed"
    assert deploy_approved(req.id) == "nothing to do"  # a second copy of the job does nothing
    failed = approval.get_approval(settings, req.id)
    assert failed.state is ApprovalState.FAILED
    assert failed.error == f"the adapter of {run.id} is not at runs/{run.id}/adapter any more; run it again"
    events = [e.data for e in store.run_events(store.connect(settings), run.id) if e.kind == "deploy"]
    assert [e["state"] for e in events] == ["deploying", "failed"] and events[-1]["error"] == failed.error


def test_following_an_azure_deploy_records_how_its_operation_ended(settings):
    from jobs.core.store import OP_KEY
    from jobs.deploys.deploy import follow_backend_deploy

    conn = store.connect(settings)
    results = {"pv-0001": ("failed", "The inference app tuneops-infer does not exist yet: run `/finetune provision "
                                     "inference` first, then deploy again."),
               "pv-0002": ("succeeded", "Updated the inference app tuneops-infer: restarted revision r2. "
                                        "Endpoint: https://tuneops-infer.example.io")}
    for op_id, (state, result) in results.items():
        run = succeeded_run(settings)
        req = approved(settings, run)

        def hand_over(a: Approval, r: Run, op_id=op_id):
            a.move(ApprovalState.DEPLOYING)
            a.op_id = op_id
            return []

        approval.update_approval(conn, req.id, hand_over)
        conn.hset(OP_KEY.format(op_id), mapping={"kind": "deploy", "state": "running", "target": run.id})
        assert follow_backend_deploy(req.id) == "following"
        endpoint = "https://tuneops-infer.example.io" if state == "succeeded" else ""
        conn.hset(OP_KEY.format(op_id), mapping={"state": state, "result": result, "endpoint": endpoint})
        assert follow_backend_deploy(req.id) == ("failed" if state == "failed" else "deployed")
        done = approval.get_approval(settings, req.id)
        if state == "failed":
            assert done.state is ApprovalState.FAILED and "provision inference" in done.error
        else:
            assert done.state is ApprovalState.DEPLOYED and done.url == "https://tuneops-infer.example.io"
            assert done.api_url == "https://tuneops-infer.example.io/v1"
        assert store.load_run(conn, run.id).deployments[0]["state"] == str(done.state)


def test_reconcile_recovers_a_deploy_whose_worker_died(settings):
    from rq.job import Job

    from jobs.deploys.deploy import LOST_DEPLOY

    conn = store.connect(settings)
    run = succeeded_run(settings)
    req = approved(settings, run)
    assert reconcile.reconcile_once(settings)["redeployed"] == []  # its deploy task is still queued

    def lose_the_task_and_age(a: Approval, r: Run):
        a.decided_at = time.time() - 60
        return []

    Job.fetch(f"deploy-{req.id}", connection=queue.rq_connection(settings)).delete()
    approval.update_approval(conn, req.id, lose_the_task_and_age)
    assert reconcile.reconcile_once(settings)["redeployed"] == [req.id]
    assert queue.get_queue(settings).jobs[-1].id == f"deploy-{req.id}"

    def begin(a: Approval, r: Run):  # the worker took the task and died while deploying
        a.move(ApprovalState.DEPLOYING)
        return []

    approval.update_approval(conn, req.id, begin)
    Job.fetch(f"deploy-{req.id}", connection=queue.rq_connection(settings)).delete()
    assert reconcile.reconcile_once(settings)["failed"] == [req.id]
    failed = approval.get_approval(settings, req.id)
    assert failed.state is ApprovalState.FAILED and failed.error == LOST_DEPLOY
    events = [e.data for e in store.run_events(conn, run.id) if e.kind == "deploy"]
    assert events[-1]["state"] == "failed" and events[-1]["hint"] == {"command": f"deploy {run.id}", "says": "asks again"}
    assert "`/finetune deploy " + run.id + "` asks again" in words.with_hint(failed.error, failed.error_hint)
    assert reconcile.reconcile_once(settings)["failed"] == []  # decided once
