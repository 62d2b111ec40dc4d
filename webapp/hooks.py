"""gunicorn hook functions. gunicorn.conf.py calls each in one line; the logic lives here to be tested.

Master: on_starting removes boards left by dead masters, creates this one and makes the shutdown signals
flag it at once; pre_fork gives the new worker a free slot; child_exit marks a dead worker's slot DEAD
(it runs for every death, SIGKILL included) and counts deaths before READY; on_exit removes the board.
Worker: post_fork records the pid and starts the engine thread, then returns at once; post_worker_init
makes SIGTERM drain the engine. Nothing may raise in post_fork: an exception there makes gunicorn halt
the whole server (worker boot error), so a failure is written to the board as FAILED instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from webapp import logs, metrics
from webapp.board import BOARD_FILE, DIR_PREFIX, Board, State
from webapp.engine import Engine
from webapp.readiness import pid_alive
from webapp.runtime import Runtime
from webapp.settings import Settings

log = logs.get(__name__)

_board: Board | None = None  # created in the master, inherited by every forked worker
_runtime: Runtime | None = None  # set in a worker by post_fork


def board() -> Board | None:
    """The board of this gunicorn instance, or None outside a server started with these hooks."""
    return _board


def current_runtime() -> Runtime | None:
    return _runtime


def board_capacity(workers: int) -> int:
    """Slots for the workers plus a full second generation: a reload (SIGHUP) forks new workers before the
    old ones have exited, and each needs its own slot."""
    return 2 * workers + 2


def on_starting(server: Any, settings: Settings) -> None:
    global _board
    logs.configure(settings.log_format)
    logs.route_app_logs(server.log, settings.log_level)
    settings.board_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_boards(settings.board_dir)
    _board = Board.create(settings.board_dir, board_capacity(settings.workers), settings.workers)
    metrics_folder = metrics.prepare_multiprocess(_board)
    log.info("board_created", path=str(_board.path), slots=_board.capacity, metrics=str(metrics_folder))
    for name in ("term", "int", "quit"):
        _flag_shutdown_first(server, name)


def _flag_shutdown_first(server: Any, name: str) -> None:
    """Make the master's SIGTERM/SIGINT/SIGQUIT handler mark the board as shutting down before it stops
    the workers, so /readyz turns 503 at once rather than when each worker gets around to it. The
    arbiter looks its handlers up by name on each signal, so an instance attribute takes their place."""
    original = getattr(server, f"handle_{name}")

    def handler() -> None:
        if _board is not None:
            _board.set_shutting_down()
            log.info("shutdown_begins", signal=name.upper())
        original()

    setattr(server, f"handle_{name}", handler)


def remove_stale_boards(directory: Path) -> None:
    """Delete boards whose master is gone (a crashed earlier run): they are never trusted or reused."""
    for folder in Path(directory).glob(DIR_PREFIX + "*"):
        try:
            board = Board.attach(folder / BOARD_FILE)
            master = board.master_pid
            board.close()
        except (OSError, ValueError):
            master = 0  # unreadable or not a board of ours: nothing can be trusted in it
        if master and pid_alive(master):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.warning("stale_board_removed", path=str(folder), master_pid=master)


def pre_fork(server: Any, worker: Any) -> None:
    assert _board is not None, "on_starting did not run"
    taken = {w.slot for w in server.WORKERS.values() if hasattr(w, "slot")}
    slot = _board.free_slot(taken)
    worker.slot = slot
    crashes = _board.read(slot).crashes  # the slot's crash streak carries over to its next worker
    now = time.monotonic()
    _board.reset(
        slot, state=State.STARTING, crashes=crashes, started_mono=now, started_wall=time.time(), heartbeat_mono=now
    )


def post_fork(server: Any, worker: Any, settings: Settings) -> None:
    global _runtime
    slot = getattr(worker, "slot", None)
    try:
        assert _board is not None and slot is not None, "on_starting/pre_fork did not run"
        _board.write(slot, pid=os.getpid(), heartbeat_mono=time.monotonic())
        engine = Engine(settings, _board, slot)
        engine.on_unhealthy = _exit_gracefully
        _runtime = Runtime(settings, _board, slot, engine)
        engine.start()
        log.info("worker_started", slot=slot, pid=os.getpid(), state=State.STARTING.name)
    except Exception as exc:  # raising here would halt gunicorn; report instead
        log.exception("worker_start_failed", slot=slot, pid=os.getpid(), state=State.FAILED.name)
        if _board is not None and slot is not None:
            _board.write(slot, pid=os.getpid(), state=State.FAILED, error=f"worker start failed: {exc!r}")
            _runtime = Runtime(settings, _board, slot, None)


def _exit_gracefully(reason: str) -> None:
    """An UNHEALTHY worker leaves through gunicorn's own graceful exit, so replies in flight still go out."""
    os.kill(os.getpid(), signal.SIGTERM)


def post_worker_init(worker: Any) -> None:
    """Make the worker's SIGTERM (from the master, or its own when UNHEALTHY) drain the engine first."""
    previous = signal.getsignal(signal.SIGTERM)

    def drain_then_exit(signum: int, frame: Any) -> None:
        _drain()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, drain_then_exit)


def worker_int(worker: Any) -> None:
    """SIGINT/SIGQUIT: the worker is about to exit at once."""
    _drain()


def _drain() -> None:
    if _runtime is None:
        return
    if _runtime.engine is not None:
        _runtime.engine.drain()
    elif _runtime.board.read(_runtime.slot).state is not State.FAILED:
        _runtime.board.write(_runtime.slot, state=State.DRAINING)


def worker_exit(server: Any, worker: Any) -> None:
    if _runtime is not None:
        _drain()
        engine = _runtime.engine
        if engine is not None:
            # An UNHEALTHY engine thread may be stuck in a step for good: do not wait for it.
            engine.stop(timeout=0 if engine.state is State.UNHEALTHY else 5)


def child_exit(server: Any, worker: Any) -> None:
    metrics.worker_exited(worker.pid)  # its counts join the exited totals, whatever its slot shows
    slot = getattr(worker, "slot", None)
    if _board is None or slot is None:
        return
    record = _board.read(slot)
    if record.pid not in (0, worker.pid):
        return  # the slot already belongs to another worker
    # gunicorn does not pass the exit status to this hook; the state the worker died in says more.
    detail = f"pid {worker.pid} exited while {record.state.name}"
    if record.error:
        detail += f"; last error: {record.error}"
    crashed_early = record.state in (State.STARTING, State.LOADING, State.WARMING) and not _board.shutting_down
    crashes = record.crashes + 1 if crashed_early else record.crashes
    _board.write(slot, state=State.DEAD, error=detail, in_flight=0, queued=0, crashes=crashes)
    expected = record.state is State.DRAINING  # a shutdown or reload, not a crash
    (log.info if expected else log.warning)(
        "worker_dead", slot=slot, pid=worker.pid, state=State.DEAD.name, was=record.state.name, crashes=crashes
    )


def nworkers_changed(server: Any, new_value: int, old_value: int | None) -> None:
    if _board is not None:
        _board.set_expected_workers(new_value)


def on_exit(server: Any) -> None:
    global _board
    if _board is not None:
        _board.remove()
        _board = None
