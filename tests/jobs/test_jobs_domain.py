"""The run state machine: every legal move works, every other one is refused and changes nothing."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.core.domain import (
    TERMINAL_STATES,
    TRANSITIONS,
    IllegalTransition,
    Run,
    RunEvent,
    RunState,
)


def new_run(state: RunState = RunState.QUEUED) -> Run:
    run = Run(id="ft-0001", requester="U1", channel="C1", model="model-cache/tiny", dataset="d.jsonl")
    run.state = state
    return run


ALL_PAIRS = list(itertools.product(RunState, RunState))
ILLEGAL = [(a, b) for a, b in ALL_PAIRS if b not in TRANSITIONS[a]]
LEGAL = [(a, b) for a, b in ALL_PAIRS if b in TRANSITIONS[a]]


@pytest.mark.parametrize("src,dst", ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_illegal_transition_is_refused_and_changes_nothing(src, dst):
    run = new_run(src)
    before = run.to_dict()
    with pytest.raises(IllegalTransition) as e:
        run.transition(dst)
    assert run.to_dict() == before
    assert str(src) in str(e.value) and str(dst) in str(e.value)


@pytest.mark.parametrize("src,dst", LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
def test_legal_transition_moves(src, dst):
    run = new_run(src)
    run.transition(dst, now=123.0)
    assert run.state is dst and run.updated_at == 123.0


def test_the_lifecycle_and_its_timestamps():
    run = new_run()
    run.transition(RunState.PREPARING, now=1.0)
    assert run.attempts == 1 and run.started_at is None
    run.transition(RunState.RUNNING, now=2.0)
    assert run.started_at == 2.0
    run.transition(RunState.FAILED, now=3.0)
    assert run.finished_at == 3.0
    run.transition(RunState.QUEUED, now=4.0)  # a resume waits in line again
    assert run.finished_at is None
    run.transition(RunState.PREPARING, now=5.0)
    assert run.attempts == 2
    run.transition(RunState.RUNNING, now=6.0)
    assert run.started_at == 2.0  # the first start is kept
    run.transition(RunState.SUCCEEDED, now=7.0)
    assert run.finished_at == 7.0 and TRANSITIONS[RunState.SUCCEEDED] == frozenset()


@given(st.lists(st.sampled_from(list(RunState)), max_size=40))
def test_any_sequence_of_requests_follows_the_table(requests):
    run = new_run()
    attempts = 0
    for dst in requests:
        src = run.state
        if dst in TRANSITIONS[src]:
            run.transition(dst)
            attempts += dst is RunState.PREPARING
            assert run.state is dst
            assert (run.finished_at is not None) == (dst in TERMINAL_STATES)
        else:
            with pytest.raises(IllegalTransition):
                run.transition(dst)
            assert run.state is src
        assert run.attempts == attempts
    assert Run.from_dict(run.to_dict()) == run


def test_unknown_event_kind_is_refused():
    with pytest.raises(ValueError, match="unknown run event kind"):
        RunEvent("ft-0001", "exploded")
