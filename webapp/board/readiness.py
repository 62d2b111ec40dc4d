"""Judging the board: is the container ready for traffic, and is it still alive?

``judge`` is a pure function over slot records, so the policy is unit-tested without processes.
``observe`` judges the live board and records a change of the container's readiness on it, once, whichever
worker sees it first: the health routes, the metrics scrape and every worker's heartbeat call it.
"""

from __future__ import annotations

import enum
import errno
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from webapp.board.slots import Board, SlotRecord, State
from webapp.settings import Settings
from webapp.telemetry import logs

log = logs.get(__name__)

PF_EXITING = 0x4  # include/linux/sched.h: the task is exiting


class Distrust(enum.Enum):
    """Why a reader does not believe a worker's record, whatever state it says."""

    TORN = "slot record torn"
    GONE = "pid gone"
    STALE = "heartbeat stale"
    STALLED = "generation stalled"  # alive, but its running call has made no step for STALL_TIMEOUT


# States from which a worker can still become ready without a restart (liveness holds).


def pid_alive(pid: int) -> bool:
    """True if a process with this pid is running. A zombie (killed, not yet reaped by the master) counts
    as gone: ``os.kill(pid, 0)`` still succeeds on it, which would keep a dead worker READY for a while."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except FileNotFoundError:
        return False
    except OSError:
        return _signal_zero(pid)  # no procfs here: existence is the best we can tell
    # Fields after the command name (in parentheses, and it may itself hold ")"): state is the first,
    # the kernel's task flags the seventh. A killed process keeps its state letter while the kernel frees
    # its memory (tens of ms for a loaded model); PF_EXITING is set from the moment it starts dying.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0] not in (b"Z", b"X") and not int(fields[6]) & PF_EXITING


def _signal_zero(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM  # exists, owned by someone else
    return True


@dataclass(frozen=True)
class WorkerView:
    """One worker as a reader judges it now."""

    slot: int
    record: SlotRecord
    problem: str  # empty when the record can be trusted; else why this worker counts as gone, in words
    distrust: Distrust | None = None  # the kind of ``problem``

    @property
    def ready(self) -> bool:
        return self.record.state is State.READY and not self.problem

    def as_row(self, now: float) -> dict[str, object]:
        record = self.record
        row: dict[str, object] = {
            "slot": self.slot,
            "state": record.state.name,
            "pid": record.pid,
            "device": record.device,
            "model": record.model,
            "attempt": record.attempt,
            "max_attempts": record.max_attempts,
            "in_state_s": round(now - record.state_since_mono, 3) if record.state_since_mono else None,
            "heartbeat_age_s": round(now - record.heartbeat_mono, 3) if record.heartbeat_mono else None,
            "served": record.served,
            "failed": record.failed,
            "shed": record.shed,
            "in_flight": record.in_flight,
            "queued": record.queued,
        }
        if record.crashes:
            row["crashes"] = record.crashes
        if record.next_retry_mono and record.state in (State.STARTING, State.LOADING) and record.next_retry_mono > now:
            row["next_retry_in_s"] = round(record.next_retry_mono - now, 3)
        if record.error:
            row["error"] = record.error
        if self.problem:
            row["problem"] = self.problem
        return row


@dataclass(frozen=True)
class Verdict:
    """What /readyz and /healthz answer: ``ready`` and ``alive`` with a reason in words."""

    ready: bool
    ready_reason: str
    alive: bool
    alive_reason: str
    workers: list[WorkerView]
    required_ready: int  # READY workers READY_POLICY asks for
    # The same reasons with no pid, device or error text: what PROBE_DETAIL=brief shows an open probe.
    ready_brief: str = ""
    alive_brief: str = ""


def view_workers(
    records: Sequence[SlotRecord],
    now: float,
    heartbeat_timeout: float,
    stall_timeout: float = math.inf,
    is_alive: Callable[[int], bool] = pid_alive,
) -> list[WorkerView]:
    """The occupied slots, each with the reason it cannot be trusted (pid gone, heartbeat stale, a
    generation stalled, torn record)."""
    views = []
    for slot, record in enumerate(records):
        if record.state is State.EMPTY:
            continue
        problem, distrust = "", None
        if record.state is not State.DEAD:
            if record.torn:
                problem = "slot record torn: its writer stopped mid-write, or it fails its checksum"
                distrust = Distrust.TORN
            elif record.pid and not is_alive(record.pid):
                problem, distrust = f"pid {record.pid} is gone", Distrust.GONE
            elif record.heartbeat_mono and now - record.heartbeat_mono > heartbeat_timeout:
                problem = f"heartbeat {now - record.heartbeat_mono:.1f} s old (limit {heartbeat_timeout:g} s)"
                distrust = Distrust.STALE
            elif record.in_flight and record.last_step_mono and now - record.last_step_mono > stall_timeout:
                stalled_s = now - record.last_step_mono
                problem = f"{Distrust.STALLED.value} for {stalled_s:.1f} s (limit {stall_timeout:g} s)"
                distrust = Distrust.STALLED
        views.append(WorkerView(slot, record, problem, distrust))
    return views


class Gate(enum.Enum):
    """Whether a worker takes new connections from the socket every worker of the container shares
    (docs/architecture.md §14). A worker that is not READY would only answer 503 to the requests the kernel
    hands it, so it leaves them to a worker that is, as long as there is one."""

    SERVES = "serves"  # READY: accepts
    STANDS_IN = "stands_in"  # not READY, and no other worker is: accepts, to answer probes and refuse work
    STANDS_BY = "stands_by"  # not READY while another worker is: accepts nothing

    @property
    def accepts(self) -> bool:
        return self is not Gate.STANDS_BY


def gate(
    records: Sequence[SlotRecord],
    slot: int,
    now: float,
    heartbeat_timeout: float,
    stall_timeout: float = math.inf,
    is_alive: Callable[[int], bool] = pid_alive,
) -> Gate:
    """The gate of the worker in ``slot``: READY serves; otherwise it stands by while another worker is
    READY and can be trusted (its pid alive, its heartbeat fresh, no generation stalled), and stands in when
    none is, so a container always has a worker accepting."""
    if records[slot].state is State.READY:
        return Gate.SERVES
    others = view_workers(records, now, heartbeat_timeout, stall_timeout, is_alive)
    if any(worker.ready for worker in others if worker.slot != slot):
        return Gate.STANDS_BY
    return Gate.STANDS_IN


def judge(
    records: Sequence[SlotRecord],
    now: float,
    required_ready: int,
    heartbeat_timeout: float,
    stall_timeout: float = math.inf,
    crash_limit: int = 2**31,
    shutting_down: bool = False,
    master_alive: bool = True,
    is_alive: Callable[[int], bool] = pid_alive,
) -> Verdict:
    """Apply the readiness policy (``required_ready`` READY workers needed) and the liveness rule to the board."""
    workers = view_workers(records, now, heartbeat_timeout, stall_timeout, is_alive)
    ready_count = sum(w.ready for w in workers)
    live = [w for w in workers if w.record.state is not State.DEAD]

    broken = [w for w in live if w.record.state in (State.FAILED, State.UNHEALTHY) and not w.problem]
    stalled = [w for w in live if w.distrust is Distrust.STALLED]
    looping = [w for w in workers if w.record.crashes >= crash_limit]
    alive_brief = ""
    if not master_alive:
        alive, alive_reason = False, "the gunicorn master is gone"
    elif broken:
        first = broken[0]
        alive = False
        alive_reason = f"worker {first.slot} is {first.record.state.name}: {first.record.error or 'no message'}"
        alive_brief = f"worker {first.slot} is {first.record.state.name}"
    elif stalled:
        alive, alive_reason = False, f"worker {stalled[0].slot} {stalled[0].problem}"
        alive_brief = f"worker {stalled[0].slot}: a denoising step stalled"
    elif looping:
        first = looping[0]
        alive = False
        alive_reason = (
            f"slot {first.slot} crash loop: its workers died {first.record.crashes} times in a row before READY"
        )
    else:
        alive, alive_reason = True, "every worker is ready or can still become ready"

    if not master_alive:
        ready, reason = False, "the gunicorn master is gone"
    elif shutting_down:
        ready, reason = False, "the server is shutting down"
    elif ready_count >= required_ready:
        ready, reason = True, f"{ready_count} of {required_ready} required workers ready"
    else:
        ready, reason = False, _not_ready_reason(workers, ready_count, required_ready)
    brief = (
        reason if ready or not master_alive or shutting_down else _brief_reason(workers, ready_count, required_ready)
    )
    return Verdict(ready, reason, alive, alive_reason, workers, required_ready, brief, alive_brief or alive_reason)


def judge_board(board: Board, settings: Settings, now: float) -> Verdict:
    """Judge the live board under ``settings``."""
    return judge(
        board.read_all(),
        now=now,
        required_ready=settings.required_ready(board.expected_workers),
        heartbeat_timeout=settings.heartbeat_timeout,
        stall_timeout=settings.stall_timeout,
        crash_limit=settings.crash_loop_limit,
        shutting_down=board.shutting_down,
        master_alive=pid_alive(board.master_pid),
    )


def observe(board: Board, settings: Settings) -> Verdict:
    """Judge the live board now, and record (count, log) a change of the container's readiness if this
    is the first process to see it: changes are counted when they happen, not only when someone probes."""
    verdict = judge_board(board, settings, time.monotonic())
    if board.record_readiness(verdict.ready):
        log.info("readiness_changed", ready=verdict.ready, reason=verdict.ready_reason)
    return verdict


def _brief_reason(workers: list[WorkerView], ready_count: int, required_ready: int) -> str:
    """The not-ready reason with each worker's state alone: no pid, device, attempt or error text."""
    details = [
        f"worker {worker.slot} {worker.record.state.name}" + (" (untrusted)" if worker.problem else "")
        for worker in workers
        if not worker.ready
    ]
    head = f"{ready_count} of {required_ready} required workers ready"
    return head + "; " + "; ".join(details or [f"{required_ready - ready_count} worker(s) not started yet"])


def _not_ready_reason(workers: list[WorkerView], ready_count: int, required_ready: int) -> str:
    details = []
    for worker in workers:
        if worker.ready:
            continue
        if worker.problem:
            details.append(f"worker {worker.slot} {worker.problem}")
        elif worker.record.state is State.LOADING:
            suffix = f": {worker.record.error}" if worker.record.error else ""
            details.append(
                f"worker {worker.slot} LOADING (attempt {worker.record.attempt}/{worker.record.max_attempts}){suffix}"
            )
        else:
            details.append(f"worker {worker.slot} {worker.record.state.name}")
    missing = required_ready - ready_count
    head = f"{ready_count} of {required_ready} required workers ready"
    if not details:
        details.append(f"{missing} worker(s) not started yet")
    return head + "; " + "; ".join(details)
