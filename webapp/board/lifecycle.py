"""A worker's state on the board, and the one place that changes it (docs/architecture.md §2).

``TRANSITIONS`` declares each transition once: from which states, to which, made by whom and when (the table
in docs/architecture.md §2 is written from it, and ``ALLOWED`` is derived from it). Each transition is written
to the board, logged once (event ``state``; level error for FAILED and UNHEALTHY, warning for a death that was
not a shutdown) and counted once (``worker_state_changes_total``). A transition the table does not allow is
refused and changes nothing: a load that ends during shutdown must not turn a DRAINING worker READY again.

The crash streak (deaths in a row of a slot's workers before READY) lives here too: ``bury`` grows it,
``assign`` carries it to the slot's next worker, ``ready`` ends it, and ``respawn_delay`` turns it into the
wait before that next worker loads.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from webapp.board.slots import Board, SlotRecord, State
from webapp.telemetry import logs
from webapp.telemetry.recorder import recorder

log = logs.get(__name__)

LOADING_STATES = frozenset({State.STARTING, State.LOADING, State.WARMING})


@dataclass(frozen=True)
class Transition:
    """Any of ``sources`` may become ``to``, written by ``by`` (the master or the worker, through the function
    named) ``when`` it says."""

    sources: tuple[State, ...]
    to: State
    by: str
    when: str


TRANSITIONS: tuple[Transition, ...] = (
    Transition(
        (State.EMPTY, State.DEAD),
        State.STARTING,
        "master `assign()`",
        "pre_fork: a fresh record; the crash streak stays",
    ),
    Transition((State.STARTING,), State.LOADING, "worker `loading()`", "attempt 1 begins (after any respawn backoff)"),
    Transition(
        (State.LOADING, State.WARMING), State.LOADING, "worker `loading()`", "the next attempt, after a transient error"
    ),
    Transition((State.LOADING,), State.WARMING, "worker `warming()`", "loaded; the one-step warm-up runs"),
    Transition((State.WARMING,), State.READY, "worker `ready()`", "the warm-up passed; the crash streak ends"),
    Transition(
        (*LOADING_STATES,),
        State.FAILED,
        "worker `failed()`",
        "the load cannot succeed (or the worker could not start): it stays alive, answering 503 with its error",
    ),
    Transition(
        (State.READY, State.DRAINING),
        State.UNHEALTHY,
        "worker `unhealthy()`",
        "fatal device error, failure streak, stalled step: it exits through its own SIGTERM",
    ),
    Transition(
        (*LOADING_STATES, State.READY),
        State.DRAINING,
        "worker `draining()`",
        "shutdown: finish what is held, take nothing new (a load that ends now is refused READY)",
    ),
    Transition(
        tuple(state for state in State if state not in (State.EMPTY, State.DEAD)),
        State.DEAD,
        "master `bury()`",
        "child_exit; a death before READY grows the crash streak",
    ),
)
# What each state may become: a transition not in TRANSITIONS is refused and changes nothing.
ALLOWED: dict[State, frozenset[State]] = {
    state: frozenset(t.to for t in TRANSITIONS if state in t.sources) for state in State
}
_SHOWN = ("attempt", "error", "device", "model")  # the fields a state line carries when they change


def _write(board: Board, slot: int, was: SlotRecord, to: State, **fields: object) -> SlotRecord | None:
    """Write one transition, or refuse it (None) when the table does not allow it."""
    if to not in ALLOWED[was.state]:
        if to is not was.state:  # asking twice (two signals both drain) is no news
            log.info("state_refused", slot=slot, pid=was.pid, state=was.state.name, refused=to.name)
        return None
    return board.write(slot, state=to, **fields)


def _transition(board: Board, slot: int, was: SlotRecord, to: State, **fields: object) -> SlotRecord | None:
    """Write one transition and announce it, or refuse it (None)."""
    record = _write(board, slot, was, to, **fields)
    if record is not None:
        _announce(slot, was.state, record, fields)
    return record


def _announce(slot: int, was: State, record: SlotRecord, fields: dict[str, object]) -> None:
    """The one log line and the one count of a transition."""
    recorder().state_changes.labels(record.state.name).inc()
    shown = {key: value for key, value in fields.items() if key in _SHOWN}
    if record.state in (State.FAILED, State.UNHEALTHY):  # what an operator's log alert should match
        emit = log.error
    elif record.state is State.DEAD and was is not State.DRAINING:  # a crash, not a shutdown or reload
        emit = log.warning
    else:
        emit = log.info
    emit("state", slot=slot, pid=record.pid, state=record.state.name, was=was.name, **shown)


def respawn_delay(crashes: int, initial: float, longest: float) -> float:
    """How long a slot's new worker waits before loading after ``crashes`` deaths in a row before READY:
    ``initial`` doubled per crash after the first, at most ``longest``."""
    if crashes <= 0:
        return 0.0
    return min(longest, initial * 2 ** (crashes - 1))


# -- master side: before a worker exists and after it died ----------------------------------------------


def assign(board: Board, slot: int) -> SlotRecord:
    """pre_fork: give ``slot`` a fresh STARTING record for the worker about to be forked; the slot's crash
    streak carries over to it. (When every slot is busy, ``Board.free_slot`` may hand over a stale one.)"""
    was = board.read(slot)
    now = time.monotonic()
    fields = {"started_mono": now, "started_wall": time.time(), "heartbeat_mono": now}
    record = board.reset(slot, state=State.STARTING, crashes=was.crashes, **fields)
    _announce(slot, was.state, record, fields)
    return record


def bury(board: Board, slot: int, pid: int) -> SlotRecord | None:
    """child_exit: mark the slot of dead worker ``pid`` DEAD, keeping the state it died in and its last error
    in the message. A death before READY, outside a shutdown, grows the crash streak. None when the slot
    already belongs to another worker."""
    was = board.read(slot)
    if was.pid not in (0, pid) or was.state is State.DEAD:
        return None
    detail = f"pid {pid} exited while {was.state.name}"  # gunicorn passes no exit status to the hook
    if was.error:
        detail += f"; last error: {was.error}"
    crashes = was.crashes + (was.state in LOADING_STATES and not board.shutting_down)
    return _transition(board, slot, was, State.DEAD, error=detail, in_flight=0, queued=0, crashes=crashes)


# -- worker side: the live worker writes its own slot ---------------------------------------------------


class Lifecycle:
    """One worker's side of its slot: the state transitions it makes, and the other fields it publishes
    (heartbeat, load counters, progress). Every thread of the worker writes through this object."""

    def __init__(self, board: Board, slot: int) -> None:
        self.board = board
        self.slot = slot
        self._lock = threading.Lock()  # one transition at a time: engine, heartbeat and signal handler race
        record = board.write(slot, pid=os.getpid(), heartbeat_mono=time.monotonic())
        self.state = record.state
        self.crashes = record.crashes  # of the slot's workers before this one; READY ends the streak
        self.attempt = record.attempt
        self.next_retry_mono = record.next_retry_mono

    def _move(self, to: State, **fields: object) -> bool:
        with self._lock:
            was = self.board.read(self.slot)
            record = _write(self.board, self.slot, was, to, **fields)
            if record is None:
                return False
            # The worker's own view follows the board at once, before the log line: a board that says READY
            # while submit still sees WARMING refuses a request the probes sent here.
            self.state, self.attempt, self.next_retry_mono = record.state, record.attempt, record.next_retry_mono
            _announce(self.slot, was.state, record, fields)
            return True

    def loading(self, attempt: int, max_attempts: int, error: str = "", retry_in_s: float = 0.0) -> bool:
        """Load attempt ``attempt`` begins now, or (``retry_in_s`` > 0) after the wait that ``error`` caused."""
        retry_at = time.monotonic() + retry_in_s if retry_in_s else 0.0
        fields: dict[str, object] = {"attempt": attempt, "max_attempts": max_attempts, "next_retry_mono": retry_at}
        if error:
            fields["error"] = error
        return self._move(State.LOADING, **fields)

    def warming(self, device: str, model: str = "") -> bool:
        """The model is loaded on ``device`` (``model``: its profile in one line) and warms up."""
        return self._move(State.WARMING, device=device, model=model)

    def ready(self) -> bool:
        return self._move(State.READY, ready_mono=time.monotonic(), next_retry_mono=0.0, crashes=0)

    def failed(self, error: str) -> bool:
        return self._move(State.FAILED, error=error, next_retry_mono=0.0)

    def unhealthy(self, reason: str) -> bool:
        """READY or DRAINING -> UNHEALTHY; False when it was neither (already UNHEALTHY, or never READY)."""
        return self._move(State.UNHEALTHY, error=reason)

    def draining(self) -> bool:
        return self._move(State.DRAINING)

    def respawn_wait(self, delay: float) -> None:
        """STARTING, waiting ``delay`` s before loading because the slot's workers crashed before READY."""
        message = f"respawn backoff {delay:g} s after {self.crashes} crash(es) in a row before READY"
        log.warning("respawn_backoff", slot=self.slot, crashes=self.crashes, delay_s=delay)
        self.next_retry_mono = time.monotonic() + delay
        self.board.write(self.slot, error=message, next_retry_mono=self.next_retry_mono)

    def publish(self, **fields: object) -> None:
        """Fields that are not the state: heartbeat, last step, the scheduler's counters."""
        self.board.write(self.slot, **fields)
