"""The Prometheus multiprocess folder: one per server instance, every process's counted events in it.

Each process writes its own mmap'ed files there (``webapp.telemetry.recorder``) and a scrape sums them. When a worker
dies, the master folds its counter and histogram files into one ``*_exited.db`` file per type
(``fold_exited``), so totals never go down and the folder does not grow with every recycled worker. Scrapes
hold a shared flock on the folder and the fold an exclusive one, so no scrape sees a dead worker's counts
twice or not at all. The folder lives inside the board's private folder, so a new instance starts from an
empty one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from webapp.board.readiness import pid_alive
from webapp.board.slots import Board
from webapp.telemetry import logs

ENV = "PROMETHEUS_MULTIPROC_DIR"
FOLDER = "metrics"
_LOCK_FILE = ".scrape.lock"
_EXITED = "exited"  # the pid part of the files that hold dead workers' counts
_FOLDED_TYPES = ("counter", "histogram")

log = logs.get(__name__)


def folder() -> str | None:
    """This instance's folder, or None outside a server started with the hooks (no multiprocess mode)."""
    return os.environ.get(ENV)


def prepare_multiprocess(board: Board) -> Path:
    """Master, before any fork: make this instance's empty metrics folder and point prometheus_client at
    it. An operator's own PROMETHEUS_MULTIPROC_DIR is replaced: a folder shared with an earlier run would
    add that run's counts to this one's."""
    import sys

    folder = board.folder / FOLDER
    folder.mkdir(mode=0o700)
    os.environ[ENV] = str(folder)
    if "prometheus_client" in sys.modules:
        from prometheus_client import values

        if values.ValueClass.__name__ == "MutexValue":
            raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set")
    return folder


@contextlib.contextmanager
def scrape_lock(folder: str) -> Iterator[None]:
    """Held by a scrape while it reads the files: the master does not fold files under it."""
    fd = os.open(os.path.join(folder, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # only the master takes it exclusively, for milliseconds, never waiting
        yield
    finally:
        os.close(fd)


def fold_exited(pid: int, wait_s: float = 1.0) -> None:
    """Master, from child_exit: drop the dead worker's live gauges, then fold the counter and histogram
    files of every dead worker (this one, and any an earlier call had to leave) into the ``exited`` files
    and delete them. The master never blocks on the lock: a scrape held by a SIGSTOPped worker would
    freeze the whole arbiter. If the lock stays taken for ``wait_s``, the files stay (and are still
    counted, just not folded) until the next worker exits."""
    folder = os.environ.get(ENV)
    if not folder or not os.path.isdir(folder):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, folder)
    fd = os.open(os.path.join(folder, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("metrics_fold_deferred", pid=pid, reason="a scrape holds the metrics folder")
                    return
                time.sleep(0.01)
        for path in Path(folder).glob("*_*.db"):
            kind, _, owner = path.stem.rpartition("_")
            if kind in _FOLDED_TYPES and owner.isdigit() and (int(owner) == pid or not pid_alive(int(owner))):
                _fold(path, Path(folder) / f"{kind}_{_EXITED}.db")
    finally:
        os.close(fd)


def _fold(dead: Path, total_path: Path) -> None:
    from prometheus_client.mmap_dict import MmapedDict

    total = MmapedDict(str(total_path))
    try:
        for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(dead)):
            before, _ = total.read_value(key)
            total.write_value(key, before + value, timestamp)
    finally:
        total.close()
    dead.unlink()


class FolderCollector:
    """Every process's counted events, summed. Like prometheus_client's MultiProcessCollector, except that
    it skips a file of size 0: a worker starting right now has created its file but not yet sized it,
    and reading it would fail the whole scrape (seen here as a 500 when a replacement worker booted)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = []
        for path in self.folder.glob("*.db"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size > 0:
                    files.append(str(path))
        return MultiProcessCollector.merge(files, accumulate=True)
