"""One worker process's life: ``start_worker`` starts it, ``Runtime.drain`` and ``Runtime.stop`` end it.
gunicorn's hooks call these (``webapp.server.hooks``), and so does a standalone app (``flask --app
webapp.app:standalone_app run``) or a test: one way to start a worker, whoever asks.

A worker's state changes are the lifecycle's (``webapp.board.lifecycle``); this module only wires the pieces:
the slot's lifecycle, the engine and its way out when it turns UNHEALTHY.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from webapp.board import lifecycle, readiness
from webapp.board.lifecycle import Lifecycle
from webapp.board.slots import Board, State
from webapp.engine import loader
from webapp.engine.core import Engine
from webapp.model.profile import Limits
from webapp.settings import Settings
from webapp.telemetry import logs

log = logs.get(__name__)


@dataclass
class Runtime:
    """What a worker's routes serve with. ``engine`` is None only if the worker could not start one (its
    slot then says FAILED with the reason)."""

    settings: Settings
    board: Board
    lifecycle: Lifecycle
    engine: Engine | None

    @property
    def slot(self) -> int:
        return self.lifecycle.slot

    def drain(self) -> None:
        """Shutdown begins: DRAINING, finish what is held, take nothing new."""
        if self.engine is not None:
            self.engine.drain()
        else:
            self.lifecycle.draining()

    def stop(self) -> None:
        """The worker exits now: drain, then give the engine's threads a moment to finish their step (none
        when UNHEALTHY: its engine thread may be stuck in a step for good)."""
        self.drain()
        if self.engine is not None:
            self.engine.stop(timeout=0 if self.engine.state is State.UNHEALTHY else 5)

    def gate(self) -> readiness.Gate:
        """Whether this worker takes new connections now (docs/architecture.md §14): its server's event
        loop asks, and stops accepting while another worker is READY and this one is not."""
        settings = self.settings
        return readiness.gate(
            self.board.read_all(), self.slot, time.monotonic(), settings.heartbeat_timeout, settings.stall_timeout
        )

    @property
    def limits(self) -> Limits:
        """What requests are held to, for the pages that describe them (the OpenAPI document, the demo's
        form): the loaded model's limits once this worker has loaded it, else ``Limits.before_load``."""
        loaded = self.engine.loaded_limits if self.engine is not None else None
        return loaded or Limits.before_load(self.settings)


def exit_gracefully(reason: str) -> None:
    """An UNHEALTHY worker leaves through its own SIGTERM: under gunicorn that is the graceful exit, so
    replies in flight still go out, and the master forks a replacement."""
    os.kill(os.getpid(), signal.SIGTERM)


def start_worker(
    settings: Settings, board: Board, slot: int, on_unhealthy: Callable[[str], None] = exit_gracefully
) -> Runtime:
    """Take ``slot`` for this process and start its engine threads; return at once, never raise (under
    gunicorn an exception in post_fork halts the whole server): a failure is written to the slot as FAILED."""
    worker = Lifecycle(board, slot)
    try:
        engine = Engine(settings, worker, on_unhealthy)
        # Said before the threads start: once they run, the loader may already have moved the state on.
        # model_code says whether this worker inherited MODEL_LOADER's module from the master (§13).
        log.info(
            "worker_started",
            slot=slot,
            pid=os.getpid(),
            state=worker.state.name,
            model_code="inherited" if loader.model_code_imported(settings) else "imports",
        )
        engine.start()
    except Exception as exc:
        log.exception("worker_start_failed", slot=slot, pid=os.getpid())
        worker.failed(f"worker start failed: {exc!r}")
        return Runtime(settings, board, worker, None)
    return Runtime(settings, board, worker, engine)


def standalone(settings: Settings) -> Runtime:
    """A one-slot board and one worker in this process, for the app without gunicorn. Production always
    goes through gunicorn, whose master owns the board and sees workers die."""
    logs.configure(settings.log_format)
    board = Board.create(Path(tempfile.gettempdir()), capacity=1, expected_workers=1)
    lifecycle.assign(board, 0)
    return start_worker(settings, board, 0)
