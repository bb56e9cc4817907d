"""Cost: the estimate's arithmetic, prices and their override, budgets, actuals and the month's report as pure
functions; then against a real Redis: the ledger and the team's throughput, a run over budget held until an approver
clicks (four eyes, as deploys), rejected or expired, and the "went past twice its estimate" event told once."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from bot import words
from jobs.core import cost, queue, store
from jobs.core.cost import GpuProfile, Price
from jobs.core.domain import Run, RunEvent, RunState
from jobs.core.errors import RunRejected
from jobs.core.settings import JobSettings, SettingsError
from jobs.deploys import approval
from jobs.deploys.approval import ApprovalState
from jobs.runs import costs, service, tasks
from jobs.runs.progress import overrun
from tests.conftest import wait_for

A100 = GpuProfile("Consumption-GPU-NC24-A100", 1, "A100")
APPROVERS = frozenset({"U0APPROVER", "U0BOSS"})


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# Pure ---------------------------------------------------------------------------------------------------------------

def test_the_estimate_is_startup_plus_tokens_over_throughput_and_costs_time_x_price_x_gpus():
    price = Price(3.60, "eastus", "2025-06-01")
    # 4.5M tokens at the team's median 1,000 tokens/s: 4,500 s, plus the A100's start-up allowance
    est = cost.estimate(4_500_000, "9b", A100, [800.0, 1000.0, 5000.0], price, now=1.0)
    assert est.throughput_from == "team" and est.team_runs == 3 and est.tokens_per_s == 1000.0
    assert est.seconds == 4500 + cost.STARTUP_S["A100"]
    assert est.usd == pytest.approx((4500 + 180) / 3600 * 3.60, abs=1e-4)
    two = cost.estimate(4_500_000, "9b", GpuProfile("NC48-A100", 2, "A100"), [1000.0], price)
    assert two.usd == pytest.approx(2 * est.usd, abs=1e-3) and two.gpus == 2
    # no run of the team yet: the shipped default of the GPU and size; an unknown GPU: the A100's
    assert cost.throughput("4b", A100, []) == (cost.DEFAULT_TOKENS_PER_S["A100"]["4b"], "defaults", 0)
    assert cost.throughput("4b", GpuProfile("X", 1, "H100"), [0.0, -1])[0] == cost.DEFAULT_TOKENS_PER_S["A100"]["4b"]
    # no price: time only
    assert cost.estimate(1000, "tiny", A100, [], None).usd is None
    local = cost.estimate(1500, "tiny", cost.LOCAL_PROFILE, [], cost.price_of("local"))
    assert local.usd == 0.0 and local.seconds == cost.STARTUP_S["cpu"] + 1.0


def test_tokens_to_train_respect_max_steps():
    # 10,000 tokens an epoch in packs of 1,000: 10 sequences, 5 steps of 2 sequences (2,000 tokens) an epoch
    assert cost.plan_tokens(10_000, 80, 3, -1, 1, 2, 1000, True) == 30_000
    assert cost.plan_tokens(10_000, 80, 3, 4, 1, 2, 1000, True) == 8_000
    assert cost.plan_tokens(10_000, 80, 3, 100, 1, 2, 1000, True) == 30_000   # the epochs end it first
    # without packing a sequence is an example: 80 examples, 40 steps an epoch of 250 tokens
    assert cost.plan_tokens(10_000, 80, 1, 4, 1, 2, 1000, False) == 1_000
    assert cost.plan_tokens(0, 0, 3, 4, 1, 1, 1024, True) == 0


def test_model_size_from_its_config_or_its_name():
    llama7b = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008, "vocab_size": 32000,
               "num_attention_heads": 32}
    assert 6.5e9 < cost.params_from_config(llama7b) < 7e9 and cost.size_class(cost.params_from_config(llama7b)) == "9b"
    assert cost.params_from_config({"hidden_size": 64}) is None
    assert cost.params_from_name("meta-llama/Llama-3.1-8B-Instruct") == 8e9
    assert cost.params_from_name("Qwen/Qwen2.5-0.5B") == 5e8
    assert cost.params_from_name("HuggingFaceTB/SmolLM-135M") == 135e6
    assert cost.params_from_name("microsoft/Phi-3-mini-4k-instruct") is None
    assert cost.size_class(None) == cost.UNKNOWN_SIZE and cost.size_class(135e6) == "tiny"
    assert cost.size_class(3.8e9) == "4b" and cost.size_class(70e9) == "80b"


def test_prices_the_table_and_the_override(tmp_path):
    assert cost.price_of("consumption-gpu-nc24-a100") is cost.PRICES["Consumption-GPU-NC24-A100"]
    assert all(p.region and p.listed for name, p in cost.PRICES.items() if name != "local")
    assert cost.price_of("Consumption") is None
    assert cost.price_of("Consumption-GPU-NC24-A100", {"consumption-gpu-nc24-a100": 2.5}).usd_per_gpu_hour == 2.5
    assert cost.parse_price_overrides('{"NC24-A100": 3, "local": 0}') == {"NC24-A100": 3.0, "local": 0.0}
    f = tmp_path / "prices.json"
    f.write_text('{"Consumption-GPU-NC8as-T4": 0.8}')
    assert cost.parse_price_overrides(str(f)) == {"Consumption-GPU-NC8as-T4": 0.8}
    for bad, said in (('{"x": -1}', "bad price"), ('{"x": "cheap"}', "bad price"), ("[1]", "JSON object"),
                      ("{nope", "not valid JSON"), (str(tmp_path / "missing.json"), "cannot read")):
        with pytest.raises(ValueError, match=said):
            cost.parse_price_overrides(bad)


def test_budget_settings_from_the_environment(tmp_path):
    s = JobSettings.from_env({"TUNEOPS_RUN_BUDGET_USD": "25", "TUNEOPS_MONTHLY_BUDGET_USD": "$1,000",
                              "TUNEOPS_GPU_PRICES": '{"local": 1.5}'})
    assert s.run_budget_usd == 25 and s.monthly_budget_usd == 1000 and dict(s.gpu_prices) == {"local": 1.5}
    assert JobSettings.from_env({}).run_budget_usd is None
    with pytest.raises(SettingsError) as e:
        JobSettings.from_env({"TUNEOPS_RUN_BUDGET_USD": "lots", "TUNEOPS_MONTHLY_BUDGET_USD": "-5",
                              "TUNEOPS_GPU_PRICES": '{"x": -1}'})
    assert [p.split(" ")[0].split("=")[0] for p in e.value.problems] == [
        "TUNEOPS_RUN_BUDGET_USD", "TUNEOPS_MONTHLY_BUDGET_USD", "TUNEOPS_GPU_PRICES"]


def test_which_budget_a_run_is_over():
    assert cost.approval_reason(12.0, 0, 10.0, None) == cost.RUN_BUDGET
    assert cost.approval_reason(9.0, 0, 10.0, None) is None
    assert cost.approval_reason(1.0, 1000.0, 10.0, 1000.0) == cost.MONTHLY_BUDGET
    assert cost.approval_reason(1.0, 999.0, 10.0, 1000.0) is None
    assert cost.approval_reason(None, 5000, 10.0, 1000.0) is None   # no price: nothing to hold it against
    assert cost.approval_reason(0.0, 5000, 10.0, 1000.0) is None    # a local run costs nothing
    assert cost.month_share(850, 1000) == 0.85 and cost.month_share(850, None) is None


def test_actuals_over_attempts_and_the_month_they_ended_in():
    periods = [[ts("2026-10-31T23:00:00"), ts("2026-10-31T23:30:00")],
               [ts("2026-11-01T00:10:00"), ts("2026-11-01T01:10:00")]]
    assert cost.gpu_seconds(periods) == 5400
    assert cost.gpu_seconds([[100.0, None]], now=160.0) == 60 and cost.gpu_seconds([[100.0, None]]) == 0
    assert cost.spend_by_month(periods) == {"2026-10": 1800, "2026-11": 3600}
    est = {"seconds": 3600.0, "usd_per_gpu_hour": 4.0, "gpus": 1, "usd": 4.0}
    assert cost.actual(est, periods) == {"gpu_s": 5400.0, "usd": 6.0, "error": 0.5}
    entries = cost.ledger_entries("ft-0001", "U0ALICE", "m", est, periods, periods[-1][1])
    assert entries["2026-10"] == {"run": "ft-0001", "requester": "U0ALICE", "model": "m", "gpu_s": 1800.0,
                                  "usd": 2.0}
    assert entries["2026-11"]["usd"] == 4.0 and entries["2026-11"]["error"] == 0.5
    assert cost.estimate_error(None, 10) is None and cost.estimate_error(100, 80) == -0.2
    assert cost.overran(100, 201) and not cost.overran(100, 200) and not cost.overran(None, 10 ** 6)


def test_the_month_report_by_person_by_model_biggest_and_median_error():
    rows = [
        {"run": "ft-0001", "requester": "U0ALICE", "model": "phi", "gpu_s": 3600, "usd": 3.6, "error": 0.1},
        {"run": "ft-0002", "requester": "U0BOB", "model": "phi", "gpu_s": 7200, "usd": 7.2, "error": -0.3},
        {"run": "ft-0003", "requester": "U0ALICE", "model": "llama", "gpu_s": 600, "usd": 0.6, "error": 0.5},
        {"run": "ft-0004", "requester": "U0CAROL", "model": "llama", "gpu_s": 60, "usd": 0.06},
    ]
    r = cost.month_report("2026-11", rows, monthly_budget=100)
    assert r.total_usd == 11.46 and r.runs == 4 and r.total_gpu_s == 11460
    assert [p[0] for p in r.by_person] == ["U0BOB", "U0ALICE", "U0CAROL"] and r.by_person[1][1] == 4.2
    assert [(m, usd) for m, usd, _ in r.by_model] == [("phi", 10.8), ("llama", 0.66)]
    assert [b["run"] for b in r.biggest] == ["ft-0002", "ft-0001", "ft-0003"]
    assert r.median_error == 0.1 and r.errors_counted == 3
    empty = cost.month_report("2026-11", [])
    assert empty.runs == 0 and empty.median_error is None


def test_a_run_keeps_its_running_time_over_attempts_and_its_actual_when_it_ends():
    run = Run(id="ft-0001", requester="U", channel="C", model="m", dataset="d",
              estimate={"seconds": 100.0, "usd_per_gpu_hour": 3.6, "gpus": 1})
    run.transition(RunState.PREPARING, now=10)
    run.transition(RunState.RUNNING, now=20)
    assert run.running_s(now=50) == 30
    run.transition(RunState.FAILED, now=120)
    assert run.gpu_periods == [[20, 120]] and run.actual == {"gpu_s": 100.0, "usd": 0.1, "error": 0.0}
    run.transition(RunState.QUEUED, now=200)
    run.transition(RunState.PREPARING, now=210)
    run.transition(RunState.RUNNING, now=220)
    run.transition(RunState.SUCCEEDED, now=270)
    assert run.started_at == 20 and run.gpu_periods == [[20, 120], [220, 270]]
    assert run.actual["gpu_s"] == 150 and run.actual["error"] == 0.5
    assert Run.from_dict(json.loads(json.dumps(run.to_dict()))) == run


def test_the_overrun_event_comes_once():
    run = Run(id="ft-0001", requester="U", channel="C", model="m", dataset="d", estimate={"seconds": 10.0})
    run.transition(RunState.PREPARING, now=0)
    run.transition(RunState.RUNNING, now=0)
    assert overrun(run, now=20) == []
    [event] = overrun(run, now=21)
    assert event.kind == "overrun" and event.data == {"running_s": 21.0, "estimate_s": 10.0, "factor": 2.0}
    assert run.overrun_warned and overrun(run, now=500) == []
    unknown = Run(id="ft-0002", requester="U", channel="C", model="m", dataset="d", state=RunState.RUNNING,
                  gpu_periods=[[0, None]])
    assert overrun(unknown, now=10 ** 6) == []


# Against Redis --------------------------------------------------------------------------------------------------------

def ended_run(settings, requester="U0ALICE", model="model-cache/tiny", state=RunState.SUCCEEDED, run_s=60.0,
              estimate=None, metrics=None) -> Run:
    conn = store.connect(settings)
    run = Run(id=store.new_run_id(conn), requester=requester, channel="C0TRAIN", model=model, dataset="d",
              estimate=estimate or {"seconds": 50.0, "usd_per_gpu_hour": 3.6, "gpus": 1, "usd": 0.05,
                                    "size": "tiny", "profile": "local"})
    store.create_run(conn, run, lambda pos: [])

    def finish(r: Run):
        now = time.time()
        r.transition(RunState.PREPARING, now=now - run_s)
        r.transition(RunState.RUNNING, now=now - run_s)
        r.metrics = dict(metrics or {})
        r.transition(state, now=now)
        return []

    store.update_run(conn, run.id, finish)
    return store.load_run(conn, run.id)


def test_the_ledger_and_the_teams_throughput_come_from_ended_runs(settings):
    conn = store.connect(settings)
    a = ended_run(settings, run_s=3600, metrics={"tokens_per_s_median": 900.0})
    ended_run(settings, requester="U0BOB", run_s=1800, state=RunState.FAILED, metrics={"tokens_per_s_median": 5.0})
    ended_run(settings, run_s=60, metrics={"tokens_per_s": 1100.0})
    month = cost.month_of(time.time())
    ledger = {e["run"]: e for e in store.month_ledger(conn, month)}
    assert ledger[a.id]["usd"] == pytest.approx(3.6) and ledger[a.id]["error"] == pytest.approx(3600 / 50 - 1)
    # only succeeded runs tell the throughput; a failed one's figure is no measure
    assert sorted(store.team_throughputs(conn, "tiny", "local")) == [900.0, 1100.0]

    # a running run counts with its time so far
    running = Run(id=store.new_run_id(conn), requester="U0CAROL", channel="C", model="model-cache/tiny", dataset="d",
                  estimate={"seconds": 50.0, "usd_per_gpu_hour": 3.6, "gpus": 1})
    store.create_run(conn, running, lambda pos: [])

    def start(r: Run):
        r.transition(RunState.PREPARING, now=time.time() - 600)
        r.transition(RunState.RUNNING, now=time.time() - 600)
        return []

    store.update_run(conn, running.id, start)
    report = costs.month_report(settings)
    # the running run counts from the start of this month (its 10 minutes may straddle it; ended runs count in the
    # month they ended in)
    now = time.time()
    this_month = datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    running_s = min(600.0, now - this_month.timestamp())
    assert report.runs == 4
    assert report.total_usd == pytest.approx(3.6 + 1.8 + 0.06 + running_s / 3600 * 3.6, abs=0.01)
    assert report.by_person[0][0] == "U0ALICE" and report.biggest[0]["run"] == a.id
    assert any(b.get("running") for b in cost.month_report(month, costs.month_entries(conn, time.time())).biggest
               + [e for e in costs.month_entries(conn, time.time()) if e["run"] == running.id])
    assert costs.month_spent(conn) == pytest.approx(report.total_usd, abs=0.01)


def test_the_estimate_uses_the_teams_measured_throughput_once_there_is_one(settings):
    conn = store.connect(settings)
    first = service.submit_run(settings, requester="U0ALICE", channel="C0TRAIN", dataset="datasets/train.jsonl",
                               max_steps=4)
    est = first.estimate
    assert est["profile"] == "local" and est["size"] == "tiny" and est["throughput_from"] == "defaults"
    assert est["usd"] == 0.0 and 0 < est["tokens"] <= 3594 * 3 and est["seconds"] > cost.STARTUP_S["cpu"]
    conn.hset(store.THROUGHPUT.format("tiny", "local"), "ft-0900", 10.0)
    second = service.submit_run(settings, requester="U0ALICE", channel="C0TRAIN", dataset="datasets/train.jsonl",
                                max_steps=4)
    assert second.estimate["throughput_from"] == "team" and second.estimate["tokens_per_s"] == 10.0
    assert second.estimate["seconds"] == pytest.approx(cost.STARTUP_S["cpu"] + est["tokens"] / 10.0, abs=0.1)


def priced(settings, **kw) -> JobSettings:
    """The local backend with a price, so that its runs cost something and meet the budgets."""
    from dataclasses import replace

    import jobs.core.settings as jobs_settings

    s = replace(settings, gpu_prices={"local": 36000.0}, **kw)  # $10 a second
    jobs_settings.configure(s)
    return s


def test_a_run_over_budget_waits_for_an_approver_other_than_its_requester(settings):
    s = priced(settings, run_budget_usd=50.0)
    conn = store.connect(s)
    run = service.submit_run(s, requester="U0ALICE", channel="C0TRAIN", dataset="datasets/train.jsonl", max_steps=4)
    assert run.held and run.estimate["usd"] > 50 and run.estimate["run_budget_usd"] == 50
    assert store.queued_ids(conn) == [] and tasks.admit_runs() == []
    assert [e.data for e in store.run_events(conn, run.id)] == [{"position": 0, "held": cost.RUN_BUDGET}]

    req = approval.request_budget_approval(s, run.id)
    assert req.kind == approval.RUN_KIND and req.reason == cost.RUN_BUDGET and req.requested_by == "U0ALICE"
    assert approval.request_budget_approval(s, run.id).id == req.id       # asked once, however often
    assert store.load_run(conn, run.id).budget_approval["id"] == req.id
    assert store.load_run(conn, run.id).deployments == []                # not a deploy request

    for user, said in (("U0ALICE", "Only approvers may approve or reject a run over budget"),
                       ("U0BOB", "Only approvers")):
        with pytest.raises(RunRejected) as e:
            approval.decide(s, req.id, user, True, APPROVERS)
        assert said in words.refusal(e.value)
    with pytest.raises(RunRejected) as e:  # the requester is an approver too: still four eyes
        approval.decide(s, req.id, "U0ALICE", True, APPROVERS | {"U0ALICE"})
    assert "You asked for this run, so someone else has to approve it (four eyes)" in words.refusal(e.value)
    assert approval.get_approval(s, req.id).state is ApprovalState.PENDING

    rq_queue = queue.get_queue(s)
    assert not any(j.func_name == queue.ADMIT_RUNS for j in rq_queue.jobs)
    decided = approval.decide(s, req.id, "U0BOSS", True, APPROVERS)
    assert decided.state is ApprovalState.APPROVED and decided.decided_by == "U0BOSS"
    run = store.load_run(conn, run.id)
    assert not run.held and run.budget_approval["state"] == "approved" and store.queued_ids(conn) == [run.id]
    assert any(j.func_name == queue.ADMIT_RUNS for j in rq_queue.jobs)
    kinds = [(e.kind, e.data) for e in store.run_events(conn, run.id)]
    assert ("approval", {"approval": req.id, "state": "approved"}) in kinds
    assert kinds[-1] == ("queued", {"position": 1})  # in line now: the card shows its place
    with pytest.raises(RunRejected) as e:
        approval.decide(s, req.id, "U0APPROVER", False, APPROVERS)
    assert "already approved by <@U0BOSS>" in words.refusal(e.value)


def test_a_rejected_run_is_cancelled_and_cannot_be_resumed_past_its_approval(settings):
    s = priced(settings, run_budget_usd=50.0)
    conn = store.connect(s)
    run = service.submit_run(s, requester="U0ALICE", channel="C0TRAIN", dataset="datasets/train.jsonl", max_steps=4)
    req = approval.request_budget_approval(s, run.id)
    approval.decide(s, req.id, "U0BOSS", False, APPROVERS)
    run = store.load_run(conn, run.id)
    assert run.state is RunState.CANCELLED and run.cancelled_by == "U0BOSS" and not run.gpu_periods
    assert [e.kind for e in store.run_events(conn, run.id)][-3:] == ["approval", "state", "cancelled"]
    with pytest.raises(RunRejected, match="never ran: its budget approval was rejected"):
        service.resume_run(s, run.id, "U0ALICE")
    assert not service.can_resume(run)


def test_an_expired_budget_approval_fails_the_run_saying_why(settings):
    from dataclasses import replace

    s = priced(settings, run_budget_usd=50.0)
    s = replace(s, approval_ttl_s=0.2)
    conn = store.connect(s)
    run = service.submit_run(s, requester="U0ALICE", channel="C0TRAIN", dataset="datasets/train.jsonl", max_steps=4)
    req = approval.request_budget_approval(s, run.id)
    time.sleep(0.3)
    assert approval.expire_approval(req.id) == "expired"
    run = store.load_run(conn, run.id)
    assert run.state is RunState.FAILED and f"budget approval {req.id} expired" in run.error
    assert run.budget_approval["state"] == "expired"


def test_past_the_monthly_budget_every_new_run_needs_an_approver(settings):
    s = priced(settings, monthly_budget_usd=100.0)
    ended_run(s, run_s=100, estimate={"seconds": 50.0, "usd_per_gpu_hour": 3600.0, "gpus": 1})  # $100 spent
    run = service.submit_run(s, requester="U0BOB", channel="C0TRAIN", dataset="datasets/train.jsonl", max_steps=4)
    assert run.held and run.budget_approval["reason"] == cost.MONTHLY_BUDGET
    assert run.estimate["month_spent_usd"] == pytest.approx(100.0) and run.estimate["monthly_budget_usd"] == 100


def test_a_run_past_twice_its_estimate_is_told_once(settings, workers, fake_trainer):
    conn = store.connect(settings)
    run = service.submit_run(settings, requester="U0ALICE", channel="C0TRAIN", dataset="datasets/train.jsonl",
                             max_steps=16)

    def tiny_estimate(r: Run):  # as if the team's runs had been very quick: 0.5 s
        r.estimate = {**r.estimate, "seconds": 0.5}
        return [RunEvent(r.id, "notice", {"text": "estimate lowered for the test"})]

    store.update_run(conn, run.id, tiny_estimate)
    workers.start(settings, FAKE_STEP_S="0.25")
    wait_for(lambda: store.load_run(conn, run.id).state.terminal, 120, "the run to end")
    run = store.load_run(conn, run.id)
    assert run.state is RunState.SUCCEEDED and run.overrun_warned
    told = [e for e in store.run_events(conn, run.id) if e.kind == "overrun"]
    assert len(told) == 1 and told[0].data["estimate_s"] == 0.5 and told[0].data["running_s"] > 1.0
    assert run.actual["gpu_s"] > 1.0 and run.actual["error"] > 1.0


def test_a_held_run_whose_approval_was_never_asked_for_is_asked_for_by_reconcile(settings):
    from jobs import reconcile

    s = priced(settings, run_budget_usd=50.0)
    conn = store.connect(s)
    run = service.submit_run(s, requester="U0ALICE", channel="C0TRAIN", dataset="datasets/train.jsonl", max_steps=4)
    assert store.held_ids(conn) == {run.id}
    assert reconcile.reconcile_once(s)["asked"] == []                      # the bot may still be asking
    assert reconcile.ask_for_lost_budget_approvals(s, time.time() + 60) == [run.id]
    req_id = store.load_run(conn, run.id).budget_approval["id"]
    assert approval.get_approval(s, req_id).state is ApprovalState.PENDING
    assert reconcile.ask_for_lost_budget_approvals(s, time.time() + 60) == []
    approval.decide(s, req_id, "U0BOSS", True, APPROVERS)
    assert store.held_ids(conn) == set()


def test_an_approved_budget_approval_deploys_nothing_and_comes_back_after_redis_lost_it(settings):
    from jobs.deploys import deploy

    s = priced(settings, run_budget_usd=50.0)
    conn = store.connect(s)
    run = service.submit_run(s, requester="U0ALICE", channel="C0TRAIN", dataset="datasets/train.jsonl", max_steps=4)
    req = approval.request_budget_approval(s, run.id)
    approval.decide(s, req.id, "U0BOSS", True, APPROVERS)

    def long_ago(a, r):
        a.decided_at = 0.0
        return []

    approval.update_approval(conn, req.id, long_ago)
    assert deploy.recover_deploys(s)["redeployed"] == []          # a deploy's recovery leaves it alone
    assert deploy.deploy_approved(req.id) == "nothing to do"

    conn.delete(approval.approval_key(req.id))                     # Redis lost it; the run record kept it
    assert deploy.restore_approvals(s, [store.load_run(conn, run.id)]) == {"requests put back": [req.id]}
    back = approval.get_approval(s, req.id)
    assert back.kind == approval.RUN_KIND and back.state is ApprovalState.APPROVED and back.decided_by == "U0BOSS"


@pytest.mark.parametrize("type_name, expected", [
    ("Consumption-GPU-NC24-A100", GpuProfile("Consumption-GPU-NC24-A100", 1, "A100")),
    ("consumption-gpu-nc8as-t4", GpuProfile("Consumption-GPU-NC8as-T4", 1, "T4")),
    ("NC96-A100", GpuProfile("NC96-A100", 4, "A100")),
])
def test_the_aca_backend_names_its_gpu_profile_from_the_job_config(type_name, expected):
    from types import SimpleNamespace

    from jobs.backends.aca.backend import AcaBackend

    backend = SimpleNamespace(cfg=SimpleNamespace(workload_profile_type=type_name))
    assert AcaBackend.gpu_profile(backend) == expected
    assert cost.price_of(expected.name) is not None


def test_the_inference_endpoints_replicas_count_in_the_months_spend_from_their_uptime(settings):
    """Each server process records [started, last written] beside its endpoint's manifest (a heartbeat a minute);
    the month's spend adds what falls in the month, priced at the endpoints' profile (here `local`, overridden)."""
    from dataclasses import replace

    from jobs.core import endpoints

    priced = replace(settings, gpu_prices={"local": 2.0})
    folder = endpoints.manifest_path(settings.workspace, "model-cache/tiny").parent / endpoints.SERVED
    folder.mkdir(parents=True)
    for name, start, end in (("a-1-1", "2026-11-15T10:00:00", "2026-11-15T11:00:00"),   # an hour this month
                             ("b-2-2", "2026-10-31T23:00:00", "2026-11-01T01:00:00"),   # an hour of it this month
                             ("c-3-3", "2026-10-10T10:00:00", "2026-10-11T10:00:00")):  # last month: nothing
        (folder / f"{name}.json").write_text(json.dumps({"started": ts(start), "updated": ts(end), "requests": {}}))
    (folder / "d-4-4.json").write_text("{not a record")
    now = ts("2026-11-15T12:00:00")
    costs._inference_cache.clear()
    entry = costs.inference_entry(priced, now)
    assert entry["gpu_s"] == 7200 and entry["usd"] == pytest.approx(4.0) and entry["inference"]
    conn = store.connect(settings)
    report = cost.month_report("2026-11", costs.month_entries(conn, now, priced))
    assert report.total_usd == pytest.approx(4.0) and report.runs == 0 and report.biggest == []
    assert ("inference endpoints", 4.0, 7200.0) in report.by_person
    assert costs.month_spent(conn, now, priced) == pytest.approx(4.0)
    costs._inference_cache.clear()
    assert costs.inference_entry(settings, now)["usd"] == 0.0  # local, not overridden: no bill, the time still shown
    costs._inference_cache.clear()
