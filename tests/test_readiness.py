"""The readiness and liveness policy over board records, and the pid check."""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import process_state, wait_for
from webapp.board.readiness import Gate, gate, judge, pid_alive
from webapp.board.slots import SlotRecord, State

NOW = 1000.0


def rec(state: State, pid: int = 0, heartbeat: float = NOW, **kw) -> SlotRecord:
    return SlotRecord(state=state, pid=pid, heartbeat_mono=heartbeat, state_since_mono=NOW - 1, **kw)


def everyone_alive(pid: int) -> bool:
    return True


def verdict(records, required_ready=2, alive=everyone_alive, master_alive=True):
    return judge(records, NOW, required_ready, heartbeat_timeout=10, master_alive=master_alive, is_alive=alive)


def test_all_ready_is_ready_and_alive():
    v = verdict([rec(State.READY, 1), rec(State.READY, 2)])
    assert v.ready and v.alive
    assert v.ready_reason == "2 of 2 required workers ready"


@pytest.mark.parametrize("state", [State.STARTING, State.LOADING, State.WARMING, State.DRAINING])
def test_one_worker_not_ready_is_503_but_still_alive(state):
    v = verdict([rec(State.READY, 1), rec(state, 2, attempt=2, max_attempts=5, error="ConnectionError: x")])
    assert not v.ready and v.alive
    assert f"worker 1 {state.name}" in v.ready_reason


def test_loading_reason_names_the_attempt_and_the_last_error():
    v = verdict([rec(State.READY, 1), rec(State.LOADING, 2, attempt=2, max_attempts=5, error="ConnectionError: x")])
    assert "worker 1 LOADING (attempt 2/5): ConnectionError: x" in v.ready_reason


@pytest.mark.parametrize("state", [State.FAILED, State.UNHEALTHY])
def test_a_failed_or_unhealthy_worker_makes_the_container_not_alive(state):
    v = verdict([rec(State.READY, 1), rec(state, 2, error="it broke")])
    assert not v.ready and not v.alive
    assert v.alive_reason == f"worker 1 is {state.name}: it broke"


def test_a_dead_slot_is_shown_but_not_counted_and_is_no_reason_to_restart():
    v = verdict([rec(State.DEAD, 1), rec(State.READY, 2)])
    assert not v.ready and v.alive
    assert [w.record.state for w in v.workers] == [State.DEAD, State.READY]


def test_a_ready_record_whose_pid_is_gone_is_not_ready():
    v = verdict([rec(State.READY, 1), rec(State.READY, 2)], alive=lambda pid: pid != 2)
    assert not v.ready and v.alive
    assert "worker 1 pid 2 is gone" in v.ready_reason


def test_a_ready_record_with_a_stale_heartbeat_is_not_ready():
    v = verdict([rec(State.READY, 1), rec(State.READY, 2, heartbeat=NOW - 11)])
    assert not v.ready
    assert "heartbeat 11.0 s old (limit 10 s)" in v.ready_reason


def test_a_torn_record_is_not_trusted():
    v = verdict([rec(State.READY, 1), SlotRecord(state=State.READY, pid=2, heartbeat_mono=NOW, torn=True)])
    assert not v.ready


def test_any_and_number_policies_need_only_their_count_of_ready_workers():
    records = [rec(State.READY, 1), rec(State.LOADING, 2), rec(State.FAILED, 3)]
    assert verdict(records, required_ready=1).ready
    assert not verdict(records, required_ready=2).ready


def test_missing_workers_are_reported_when_slots_are_still_empty():
    v = verdict([rec(State.READY, 1), SlotRecord()])
    assert not v.ready
    assert "1 worker(s) not started yet" in v.ready_reason


def test_a_dead_master_means_neither_ready_nor_alive():
    v = verdict([rec(State.READY, 1), rec(State.READY, 2)], master_alive=False)
    assert not v.ready and not v.alive


def test_pid_alive_sees_a_zombie_as_gone():
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    try:
        assert pid_alive(pid)
        os.kill(pid, signal.SIGKILL)
        # Not reaped yet: a zombie, which os.kill(pid, 0) would still call alive.
        wait_for(lambda: process_state(pid) == "Z", 10, "the child to become a zombie", 0.001)
        assert not pid_alive(pid)
        os.kill(pid, 0)  # the zombie still exists as a pid
    finally:
        os.waitpid(pid, 0)
    assert not pid_alive(pid)
    assert not pid_alive(0) and not pid_alive(-5)
    assert pid_alive(os.getpid())


@pytest.mark.parametrize(
    ("mine", "other", "expected"),
    [
        (State.READY, State.READY, Gate.SERVES),
        (State.READY, State.LOADING, Gate.SERVES),
        (State.LOADING, State.READY, Gate.STANDS_BY),
        (State.WARMING, State.READY, Gate.STANDS_BY),
        (State.FAILED, State.READY, Gate.STANDS_BY),
        (State.LOADING, State.LOADING, Gate.STANDS_IN),
        (State.LOADING, State.DRAINING, Gate.STANDS_IN),
        (State.STARTING, State.DEAD, Gate.STANDS_IN),
    ],
)
def test_a_worker_that_is_not_ready_stands_by_only_while_another_is(mine, other, expected):
    """docs/architecture.md §14: some worker always accepts; one that cannot serve leaves it to one that can."""
    records = [rec(mine, 1), rec(other, 2)]
    assert gate(records, 0, NOW, heartbeat_timeout=10, is_alive=everyone_alive) is expected
    assert expected.accepts is (expected is not Gate.STANDS_BY)


@pytest.mark.parametrize(
    "untrusted",
    [
        {"pid": 2, "alive": lambda pid: pid != 2},  # the READY worker's pid is gone (killed, not yet reaped)
        {"pid": 2, "heartbeat": NOW - 11},  # its heartbeat is older than the limit
    ],
)
def test_a_ready_worker_that_cannot_be_trusted_leaves_the_others_accepting(untrusted):
    alive = untrusted.pop("alive", everyone_alive)
    records = [rec(State.LOADING, 1), rec(State.READY, **untrusted)]
    assert gate(records, 0, NOW, heartbeat_timeout=10, is_alive=alive) is Gate.STANDS_IN
