"""gunicorn's hooks for one server instance. gunicorn.conf.py makes one ``ServerHooks`` and calls a method
of it in each hook, in one line; the logic lives here to be tested.

Master: on_starting removes boards left by dead masters, creates this one and makes the shutdown signals
flag it at once; gunicorn then binds the port, and when_ready imports the app (``APP_MODULE``) for every
worker to inherit; pre_fork gives the new worker a free slot (``lifecycle.assign``); child_exit marks a dead
worker's slot DEAD (it runs for every death, SIGKILL included; ``lifecycle.bury``) and folds its metrics;
on_exit removes the board. Worker: post_fork starts the worker (``runtime.start_worker``) and returns at
once; post_worker_init makes SIGTERM drain it first. Each worker inherits that object, with the board
and the slot it was given, at the fork; nothing is kept on gunicorn's objects.

gunicorn executes the config file again on SIGHUP (a reload), so that object cannot live in the config
file's namespace: ``server_hooks()`` keeps the one of this process, and a reload gets it back with the
board and slots of the workers still running.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from webapp.board import lifecycle, metric_files
from webapp.board.readiness import Gate
from webapp.board.slots import DIR_PREFIX, Board, master_holds
from webapp.queue import open_store
from webapp.queue.store import StoreUnavailable, lease_owner
from webapp.settings import Settings, SettingsError, refusal
from webapp.telemetry import logs

if TYPE_CHECKING:
    from flask import Flask

    from webapp.runtime import Runtime

log = logs.get(__name__)

# The app and everything a worker runs (Flask, the routes, the engine; not the model code): imported by the
# master once its port is bound (when_ready), before the first fork, so that each worker inherits it and
# connections sent meanwhile wait in the listen queue instead of being refused (docs/architecture.md §13).
# This module imports none of it.
APP_MODULE = "webapp.app"


def board_capacity(workers: int) -> int:
    """Slots for the workers plus a full second generation: a reload (SIGHUP) forks new workers before the
    old ones have exited, and each needs its own slot."""
    return 2 * workers + 2


# A board folder without a lock file may be one a master is making right now (the lock follows its folder by
# microseconds): one older than this is left by an earlier version or is not a board at all.
LOCKLESS_GRACE_S = 60.0


def remove_stale_boards(directory: Path) -> None:
    """Delete the board folders in ``directory`` whose master is gone (a crashed earlier run): they are never
    trusted or reused. A master proves it lives by the lock it holds (``slots.master_holds``), not by a pid.
    BOARD_DIR is /dev/shm by default, which any local user may write: every entry is input, and whatever it
    holds (an empty file, a short or garbage board, a symlink, a fifo, another user's folder) is skipped or
    removed with a warning; nothing found there stops the server."""
    try:
        entries = [entry for entry in os.scandir(directory) if entry.name.startswith(DIR_PREFIX)]
    except OSError as exc:
        log.warning("stale_board_sweep_skipped", path=str(directory), reason=repr(exc))
        return
    for entry in entries:
        try:
            reason = _stale(entry)
        except Exception as exc:  # noqa: BLE001 - whatever the entry is, the server starts
            log.warning("stale_board_skipped", path=entry.path, reason=f"cannot be judged: {exc!r}")
            continue
        if reason is None:
            continue
        if reason.startswith("skip: "):
            log.warning("stale_board_skipped", path=entry.path, reason=reason.removeprefix("skip: "))
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if os.path.lexists(entry.path):
            log.warning("stale_board_skipped", path=entry.path, reason=f"{reason}, but it could not be removed")
        else:
            log.warning("stale_board_removed", path=entry.path, reason=reason)


def _stale(entry: os.DirEntry[str]) -> str | None:
    """Why ``entry`` is a stale board folder to remove; ``skip: why`` for one left alone with a warning; None
    for a live board."""
    if entry.is_symlink():
        return "skip: a symlink (never followed)"
    if not entry.is_dir(follow_symlinks=False):
        return "skip: not a folder"
    info = entry.stat(follow_symlinks=False)
    if info.st_uid != os.geteuid():
        return f"skip: another user's (uid {info.st_uid})"
    try:
        return None if master_holds(Path(entry.path)) else "no master holds its lock"
    except FileNotFoundError:
        if time.time() - info.st_mtime < LOCKLESS_GRACE_S:
            return "skip: no lock yet (a master may be making it now)"
        return "no lock file: an earlier version's board, or none"
    except ValueError as exc:
        return f"its lock is not a lock ({exc})"


_current: ServerHooks | None = None


def server_hooks(settings: Settings) -> ServerHooks:
    """This process's ServerHooks, made on the first call; a later one (a reload) hands it ``settings``,
    read again, for the workers it forks from then on."""
    global _current
    if _current is None:
        _current = ServerHooks(settings)
    else:
        _current.settings = settings
    return _current


class ServerHooks:
    """What the hooks of one instance share: the board (made in the master), each live worker's slot by
    its gunicorn age, and, inside a worker, that worker's runtime."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.board: Board | None = None
        self.slots: dict[int, int] = {}  # worker.age -> slot, for the workers alive now
        self.runtime: Runtime | None = None  # in a worker, from post_fork on
        self.body_limits: Callable[[str], int] | None = None  # in a worker, once its app is built
        self.forks = 0  # workers forked by this master
        self.preimported = False  # the master has imported the model code (or tried)
        self._app: Flask | None = None  # in a worker, once built

    # -- master ---------------------------------------------------------------------------------------

    def on_starting(self, server: Any) -> None:
        workers = server.cfg.workers  # gunicorn's own count: WEB_CONCURRENCY, or -w on the command line
        try:
            self.settings = settings = self.settings.for_workers(workers)
        except SettingsError as exc:
            sys.exit(refusal(exc))
        logs.configure(settings.log_format)
        logs.route_app_logs(server.log, settings.log_level)
        settings.board_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_boards(settings.board_dir)
        self.board = Board.create(settings.board_dir, board_capacity(workers), workers)
        metrics_folder = metric_files.prepare_multiprocess(self.board)
        log.info("board_created", path=str(self.board.path), slots=self.board.capacity, metrics=str(metrics_folder))
        for name in ("term", "int", "quit"):
            self._flag_shutdown_first(server, name)
        self._preimport_after_first_fork(server)
        # Nothing runs yet: a job stored as running was held by a worker of the last start (docs/architecture.md §17).
        self._release_jobs("the container stopped while it ran")

    def when_ready(self, server: Any) -> None:
        """The port is bound: import the app for the workers to inherit, before the first fork."""
        started = time.monotonic()
        modules = len(sys.modules)
        importlib.import_module(APP_MODULE)
        log.info("app_imported", seconds=round(time.monotonic() - started, 3), modules=len(sys.modules) - modules)
        from webapp.api import auth  # imported with the app, just now

        warning = auth.open_warning(self.settings)
        if warning:
            log.warning("api_keys_off", bind=self.settings.bind, message=warning)

    def _preimport_after_first_fork(self, server: Any) -> None:
        """Once the first worker is forked (it answers probes and imports on its own), the master imports
        the model code, so every later fork, a replacement after a crash included, inherits it and only loads
        weights (docs/architecture.md §13). It happens in the master's main thread, between forks: before the
        second worker of the first generation (``pre_fork``), or after the arbiter's first round of forks
        when there is one worker. The arbiter calls ``manage_workers`` on each pass of its loop."""
        original = server.manage_workers

        def manage_workers() -> None:
            original()
            if self.forks and not self.preimported:
                self.preimport()

        server.manage_workers = manage_workers

    def preimport(self) -> None:
        """Import the model code in the master (``loader.preimport``), with no device touched and no thread
        left running; a failure is logged and leaves the workers to import it themselves."""
        self.preimported = True
        if not self.settings.master_preimport:
            return
        started = time.monotonic()
        modules = len(sys.modules)
        from webapp.engine import loader  # imported with the app (when_ready)

        try:
            classes = loader.preimport(self.settings)
        except Exception as exc:  # the master must keep running: each worker will import (and fail) itself
            log.exception("master_preimport_failed", error=repr(exc))
            return
        torch = sys.modules.get("torch")
        log.info(
            "master_preimported",
            seconds=round(time.monotonic() - started, 3),
            modules=len(sys.modules) - modules,
            classes=",".join(classes),
            threads=threading.active_count(),
            cuda_initialized=bool(torch is not None and torch.cuda.is_initialized()),
        )

    def _flag_shutdown_first(self, server: Any, name: str) -> None:
        """Make the master's SIGTERM/SIGINT/SIGQUIT handler mark the board as shutting down before it stops
        the workers, so /readyz turns 503 at once rather than when each worker gets around to it. The
        arbiter looks its handlers up by name on each signal, so an instance attribute takes their place."""
        original = getattr(server, f"handle_{name}")

        def handler() -> None:
            if self.board is not None:
                self.board.set_shutting_down()
                log.info("shutdown_begins", signal=name.upper())
            original()

        setattr(server, f"handle_{name}", handler)

    def pre_fork(self, server: Any, worker: Any) -> None:
        assert self.board is not None, "on_starting did not run"
        if self.forks and not self.preimported:
            self.preimport()  # this fork and every later one inherit the model code
        self.forks += 1
        slot = self.board.free_slot(set(self.slots.values()))
        self.slots[worker.age] = slot
        lifecycle.assign(self.board, slot)

    def child_exit(self, server: Any, worker: Any) -> None:
        metric_files.fold_exited(worker.pid)  # its counts join the exited totals, whatever its slot shows
        slot = self.slots.pop(worker.age, None)
        if self.board is not None and slot is not None:
            lifecycle.bury(self.board, slot, worker.pid)
        stopping = self.board is not None and self.board.shutting_down
        holder = lease_owner(self.settings, worker.pid)
        self._release_jobs(f"worker pid {worker.pid} died", holder, counted=not stopping)

    def _release_jobs(self, reason: str, holder: str | None = None, counted: bool = True) -> None:
        """Put the stored jobs of a dead holder (``holder``, or every one) back in the queue at once, rather
        than when their leases lapse; as a death (``counted``), or not, when the server is stopping and its
        workers were killed past GRACEFUL_TIMEOUT (docs/architecture.md §17)."""
        store = open_store(self.settings)
        if not store.exists():
            return
        try:
            released = store.release(reason, lease_owner=holder) if counted else store.requeue(holder)
        except StoreUnavailable as exc:  # their leases lapse instead
            log.warning("job_store_unavailable", error=str(exc))
            return
        if released:
            log.info("jobs_released", jobs=released, reason=reason)

    def nworkers_changed(self, server: Any, new_value: int, old_value: int | None) -> None:
        if self.board is not None:
            self.board.set_expected_workers(new_value)

    def on_exit(self, server: Any) -> None:
        # A stop on purpose (SIGTERM, SIGINT): every worker is gone, and gunicorn SIGKILLed those still busy
        # past GRACEFUL_TIMEOUT, often before child_exit saw them. Their jobs go back to the queue without
        # counting an attempt (docs/architecture.md §17). A master that is SIGKILLed never gets here: its
        # jobs are released at the next start, as deaths.
        store = open_store(self.settings)
        if store.exists():
            try:
                requeued = store.requeue()
            except StoreUnavailable as exc:
                log.warning("job_store_unavailable", error=str(exc))
            else:
                if requeued:
                    log.info("jobs_requeued", jobs=requeued, reason="the server stopped")
        if self.board is not None:
            self.board.remove()
            self.board = None

    # -- worker ---------------------------------------------------------------------------------------

    def post_fork(self, server: Any, worker: Any) -> None:
        assert self.board is not None, "on_starting did not run"
        from webapp.runtime import start_worker  # inherited from the master (when_ready)

        self.runtime = start_worker(self.settings, self.board, self.slots[worker.age])

    def app(self) -> Flask:
        """The worker's WSGI app, built with its runtime (``webapp.server.gthread`` calls this instead of importing
        an app by name)."""
        assert self.runtime is not None, "post_fork did not run"
        from webapp.api import bodies  # inherited from the master (when_ready)
        from webapp.app import create_app

        app = self._app = create_app(self.runtime)
        self.body_limits = bodies.of(app)
        return app

    def body_limit(self, path: str) -> int:
        """The largest body a request to ``path`` may send: the worker's app's (``webapp.api.bodies``), which
        ``webapp.server.gthread`` asks as a request's headers arrive (gunicorn builds the app before it
        serves, so MAX_BODY_BYTES, the smaller, is never the answer in practice)."""
        return self.body_limits(path) if self.body_limits is not None else self.settings.max_body_bytes

    def gate(self) -> Gate:
        """Whether this worker takes new connections now (``webapp.server.gthread`` asks on each pass of its
        event loop): its runtime's gate, docs/architecture.md §14."""
        return self.runtime.gate() if self.runtime is not None else Gate.STANDS_IN

    def post_worker_init(self, worker: Any) -> None:
        """Make the worker's SIGTERM (from the master, or its own when UNHEALTHY) drain it first."""
        previous = signal.getsignal(signal.SIGTERM)

        def drain_then_exit(signum: int, frame: Any) -> None:
            if self.runtime is not None:
                self.runtime.drain()
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, drain_then_exit)

    def worker_int(self, worker: Any) -> None:
        """SIGINT/SIGQUIT: the worker is about to exit at once."""
        if self.runtime is not None:
            self.runtime.drain()

    def worker_exit(self, server: Any, worker: Any) -> None:
        if self.runtime is not None:
            self.runtime.stop()
        if self._app is not None:
            from webapp.api import job_routes  # inherited from the master (when_ready)

            job_routes.shutdown(self._app)
