"""The readiness board: a shared-memory file with one fixed-width record per worker slot.

The gunicorn master creates it before forking; every worker inherits the mapping, writes its own slot
and reads all of them, so any worker can answer /readyz for the whole container. The master writes a
slot only before the worker exists (pre_fork) and after it died (child_exit): one writer at a time.

Readers never lock. Each record starts with a sequence counter (a seqlock): the writer makes it odd,
writes the body and its CRC-32, then makes it even again; a reader copies the body between two reads of
the counter and retries if they differ or are odd, or if the body does not match its CRC-32. The counter
alone is enough only where stores are seen in the order they were made (x86-64); on arm64 (Grace Hopper,
Graviton) a reader can see the new counter with part of the old body, and the checksum is what turns
that into a retry instead of a state no worker wrote. A writer never waits.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import mmap
import os
import shutil
import stat
import struct
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path

MAGIC = b"HDBOARD1"
VERSION = 5
BOARD_FILE = "board"
DIR_PREFIX = "honest-diffusion-"
# The master holds an exclusive flock on this file in its board's folder for as long as it (or a worker it
# forked, which inherits the descriptor) lives: how a later master tells a live board from a stale one, in any
# pid namespace (a pid can be reused, or belong to another container sharing /dev/shm).
LOCK_FILE = "master.lock"

# magic, version, capacity, expected workers, shutting down, master pid, created (wall clock)
_HEADER = struct.Struct("<8sHHHBxid")
_EXPECTED_AT, _SHUTDOWN_AT = 12, 14
# The container's readiness as last observed (0 not ready, 1 ready), how many times it turned each way, and
# when (wall clock) it last turned: written under an flock by whichever worker sees it change first.
_READINESS = struct.Struct("<BxxxIId")
_READINESS_AT = 32
_HEADER_SIZE = 64
_SEQ = struct.Struct("<Q")
ERROR_BYTES = 332
DEVICE_BYTES = 16
MODEL_BYTES = 64  # the loaded model's profile in one line (webapp.model.profile.ModelProfile.summary)
# state, crashes, pid, attempt, max attempts, device, model, started, state since, ready, heartbeat, next
# retry, last step (monotonic), started (wall), in flight, queued, served, failed, shed, error
_BODY = struct.Struct(f"<BxHiHH{DEVICE_BYTES}s{MODEL_BYTES}s7d5I{ERROR_BYTES}s")
_CRC = struct.Struct("<I")  # zlib.crc32 of the body, right after it
RECORD_SIZE = 512
assert _SEQ.size + _BODY.size + _CRC.size <= RECORD_SIZE
_READ_TRIES = 10_000


class State(enum.IntEnum):
    """A worker's life (docs/architecture.md §2). DEAD slots are free for the next worker."""

    EMPTY = 0
    STARTING = 1
    LOADING = 2
    WARMING = 3
    READY = 4
    FAILED = 5
    UNHEALTHY = 6
    DRAINING = 7
    DEAD = 8


FREE_STATES = frozenset({State.EMPTY, State.DEAD})


@dataclass(frozen=True)
class SlotRecord:
    """One worker's row. Times ending in ``_mono`` are time.monotonic() seconds (system-wide on Linux)."""

    state: State = State.EMPTY
    crashes: int = 0  # consecutive deaths of this slot's workers before READY (the master counts them)
    pid: int = 0
    attempt: int = 0
    max_attempts: int = 0
    device: str = ""
    model: str = ""  # the profile's summary, once the model is loaded
    started_mono: float = 0.0
    state_since_mono: float = 0.0
    ready_mono: float = 0.0
    heartbeat_mono: float = 0.0
    next_retry_mono: float = 0.0
    last_step_mono: float = 0.0
    started_wall: float = 0.0
    in_flight: int = 0
    queued: int = 0
    served: int = 0
    failed: int = 0
    shed: int = 0
    error: str = ""
    torn: bool = False  # True when no consistent copy could be read (a writer died mid-write, or corruption)


@dataclass(frozen=True)
class Readiness:
    """The container's /readyz verdict as last recorded on the board, and how often it flipped."""

    ready: bool
    to_ready: int
    to_not_ready: int
    changed_wall: float  # 0.0 until the first change


_FIELD_NAMES = [f.name for f in fields(SlotRecord) if f.name != "torn"]


def _pack(record: SlotRecord) -> bytes:
    values = [getattr(record, name) for name in _FIELD_NAMES]
    values[0] = int(record.state)
    values[5] = record.device.encode()[:DEVICE_BYTES]
    values[6] = _clip_utf8(record.model, MODEL_BYTES)
    values[-1] = _clip_utf8(record.error, ERROR_BYTES)
    return _BODY.pack(*values)


def _unpack(body: bytes) -> SlotRecord:
    values = list(_BODY.unpack_from(body))
    values[0] = State(values[0]) if values[0] in State._value2member_map_ else State.EMPTY
    values[5] = values[5].rstrip(b"\0").decode(errors="replace")
    values[6] = values[6].rstrip(b"\0").decode(errors="replace")
    values[-1] = values[-1].rstrip(b"\0").decode(errors="replace")
    return SlotRecord(**dict(zip(_FIELD_NAMES, values, strict=True)))


def _clip_utf8(text: str, limit: int) -> bytes:
    data = text.encode()
    if len(data) <= limit:
        return data
    return data[: limit - 3].decode(errors="ignore").encode() + b"..."


class Board:
    """A mapped board file. ``create`` in the master, inherited (or ``attach``) in workers."""

    def __init__(self, path: Path, mapping: mmap.mmap, owner: bool) -> None:
        self.path = path
        self._map = mapping
        self._owner = owner
        self._write_lock = threading.Lock()  # a worker's threads take turns; other processes never wait
        magic, version, capacity, _, _, master_pid, _ = _HEADER.unpack_from(mapping, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"{path} is not a readiness board of version {VERSION}")
        self.capacity = capacity
        self.master_pid = master_pid
        self._held: int | None = None  # the master's lock on LOCK_FILE (``create``), inherited by its workers

    @classmethod
    def create(cls, directory: Path, capacity: int, expected_workers: int) -> Board:
        """Make a private 0700 folder in ``directory`` holding a 0600 board of ``capacity`` empty slots."""
        private = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=directory))
        held = os.open(private / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a folder of its own: nobody else can hold it yet
        path = private / BOARD_FILE
        size = _HEADER_SIZE + capacity * RECORD_SIZE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        _HEADER.pack_into(mapping, 0, MAGIC, VERSION, capacity, expected_workers, 0, os.getpid(), time.time())
        board = cls(path, mapping, owner=True)
        board._held = held
        for slot in range(capacity):
            board.reset(slot)  # an all-zero record does not match its checksum: give each a valid empty one
        return board

    @classmethod
    def attach(cls, path: Path) -> Board:
        """Map an existing board (for tools and tests; workers inherit the master's mapping)."""
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(Path(path), mapping, owner=False)

    @property
    def expected_workers(self) -> int:
        """The worker count gunicorn is configured for now (the master updates it on TTIN/TTOU)."""
        return struct.unpack_from("<H", self._map, _EXPECTED_AT)[0]

    def set_expected_workers(self, count: int) -> None:
        struct.pack_into("<H", self._map, _EXPECTED_AT, count)

    @property
    def shutting_down(self) -> bool:
        """Set by the master the moment it handles SIGTERM/SIGINT/SIGQUIT: nothing here takes traffic."""
        return bool(self._map[_SHUTDOWN_AT])

    def set_shutting_down(self) -> None:
        self._map[_SHUTDOWN_AT] = 1

    @property
    def readiness(self) -> Readiness:
        ready, to_ready, to_not_ready, changed_wall = _READINESS.unpack_from(self._map, _READINESS_AT)
        return Readiness(bool(ready), to_ready, to_not_ready, changed_wall)

    def record_readiness(self, ready: bool) -> bool:
        """Record the container's readiness as just judged; True if this call recorded a change. Every
        worker judges on its own, so the change is counted under an exclusive flock, once."""
        if self.readiness.ready == ready:
            return False  # the common case: no lock, no I/O
        fd = os.open(self.path, os.O_RDWR)
        try:
            try:
                # Never wait: the holder may be a SIGSTOPped worker, and a probe must not hang on it.
                # The next judgement (a heartbeat later at most) records the change instead.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            seen = self.readiness
            if seen.ready == ready:
                return False  # another worker recorded it first
            to_ready = seen.to_ready + ready
            to_not_ready = seen.to_not_ready + (not ready)
            _READINESS.pack_into(self._map, _READINESS_AT, ready, to_ready, to_not_ready, time.time())
            return True
        finally:
            os.close(fd)  # releases the flock

    def _offset(self, slot: int) -> int:
        if not 0 <= slot < self.capacity:
            raise IndexError(f"slot {slot} is outside 0..{self.capacity - 1}")
        return _HEADER_SIZE + slot * RECORD_SIZE

    def read(self, slot: int) -> SlotRecord:
        """A consistent copy of one slot, without locking; ``torn`` if none could be had (its writer died
        mid-write, or the record does not match its checksum)."""
        offset = self._offset(slot)
        body_at = offset + _SEQ.size
        crc_at = body_at + _BODY.size
        for attempt in range(_READ_TRIES):
            before = _SEQ.unpack_from(self._map, offset)[0]
            if before % 2 == 0:
                body = self._map[body_at:crc_at]
                (crc,) = _CRC.unpack_from(self._map, crc_at)
                if _SEQ.unpack_from(self._map, offset)[0] == before and zlib.crc32(body) == crc:
                    return _unpack(body)
            if attempt % 100 == 99:
                time.sleep(0)  # let a descheduled writer finish
        return replace(_unpack(self._map[body_at:crc_at]), torn=True)

    def read_all(self) -> list[SlotRecord]:
        return [self.read(slot) for slot in range(self.capacity)]

    def write(self, slot: int, **changes: object) -> SlotRecord:
        """Change fields of ``slot`` (its single writer only); ``state`` changes stamp ``state_since_mono``."""
        offset = self._offset(slot)
        with self._write_lock:
            seq = _SEQ.unpack_from(self._map, offset)[0]
            seq += seq % 2  # a previous writer died mid-write: step past its odd value
            current = _unpack(self._map[offset + _SEQ.size : offset + _SEQ.size + _BODY.size])
            if "state" in changes and changes["state"] != current.state and "state_since_mono" not in changes:
                changes["state_since_mono"] = time.monotonic()
            record = replace(current, **changes)
            body = _pack(record)
            body_at = offset + _SEQ.size
            _SEQ.pack_into(self._map, offset, seq + 1)
            self._map[body_at : body_at + len(body)] = body
            _CRC.pack_into(self._map, body_at + len(body), zlib.crc32(body))
            _SEQ.pack_into(self._map, offset, seq + 2)
            return record

    def reset(self, slot: int, **fields_: object) -> SlotRecord:
        """Replace ``slot`` with a fresh record (a new worker takes it over)."""
        fresh = {name: getattr(SlotRecord(), name) for name in _FIELD_NAMES}
        fresh.update(fields_)
        return self.write(slot, **fresh)

    def free_slot(self, taken: set[int]) -> int:
        """The lowest slot that is neither taken by a live worker nor holding a live record."""
        for slot in range(self.capacity):
            if slot not in taken and self.read(slot).state in FREE_STATES:
                return slot
        for slot in range(self.capacity):  # every record busy: fall back to any slot no live worker holds
            if slot not in taken:
                return slot
        raise RuntimeError(f"all {self.capacity} board slots are held by live workers")

    def close(self) -> None:
        self._map.close()
        if self._held is not None:
            os.close(self._held)  # the lock goes with the last descriptor: a forked worker may still hold it
            self._held = None

    @property
    def folder(self) -> Path:
        """The board's private folder; other per-instance files (the metrics) live in it too."""
        return self.path.parent

    def remove(self) -> None:
        """Unmap, delete the file and its private folder with all in it (the master, at exit)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self.folder.name.startswith(DIR_PREFIX):  # never delete a folder this module did not make
            shutil.rmtree(self.folder, ignore_errors=True)


def master_holds(folder: Path) -> bool:
    """Whether a live master (or a worker it forked) still holds the lock of the board in ``folder``
    (``LOCK_FILE``). FileNotFoundError when there is no lock file; ValueError when it is not a regular file
    (a symlink, a fifo: never followed or opened for reading); OSError when it cannot be opened."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{LOCK_FILE} is a symlink") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{LOCK_FILE} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False  # taken at once: nobody holds it; closing the descriptor lets it go again
    finally:
        os.close(fd)
