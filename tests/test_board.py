"""The readiness board: layout, permissions, seqlock consistency across processes, torn records."""

from __future__ import annotations

import multiprocessing
import os
import stat
import time

import pytest

from webapp.board.readiness import judge_board
from webapp.board.slots import _BODY, _CRC, _HEADER_SIZE, _SEQ, ERROR_BYTES, RECORD_SIZE, Board, State
from webapp.settings import Settings


@pytest.fixture
def board(tmp_path):
    board = Board.create(tmp_path, capacity=4, expected_workers=2)
    yield board
    board.remove()


def test_board_is_private_and_starts_empty(board):
    assert stat.S_IMODE(os.stat(board.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(board.path.parent).st_mode) == 0o700
    assert board.capacity == 4
    assert board.expected_workers == 2
    assert board.master_pid == os.getpid()
    assert [r.state for r in board.read_all()] == [State.EMPTY] * 4


def test_a_write_is_read_back_by_another_mapping(board):
    board.write(2, state=State.LOADING, pid=1234, attempt=2, device="cuda:1", error="boom " * 200)
    other = Board.attach(board.path)
    record = other.read(2)
    assert (record.state, record.pid, record.attempt, record.device) == (State.LOADING, 1234, 2, "cuda:1")
    assert record.error.endswith("...") and len(record.error.encode()) <= ERROR_BYTES
    assert record.state_since_mono > 0
    other.set_expected_workers(3)
    assert board.expected_workers == 3
    other.close()


def test_reset_clears_the_previous_worker(board):
    board.write(0, state=State.FAILED, pid=99, error="old", served=7)
    record = board.reset(0, state=State.STARTING)
    assert (record.state, record.pid, record.error, record.served) == (State.STARTING, 0, "", 0)


def test_free_slot_skips_live_records_and_taken_slots(board):
    board.write(0, state=State.READY, pid=1)
    board.write(1, state=State.DEAD, pid=2)
    assert board.free_slot(taken=set()) == 1
    assert board.free_slot(taken={1}) == 2


def _hammer(path, slot, rounds):
    writer = Board.attach(path)
    for i in range(rounds):
        # Every numeric field carries the same value: a torn read would mix two of them.
        writer.write(slot, pid=i, attempt=i % 65536, served=i, failed=i, queued=i, heartbeat_mono=float(i))
    writer.close()


def test_a_reader_never_sees_a_torn_record_while_another_process_writes(board):
    writer = multiprocessing.get_context("fork").Process(target=_hammer, args=(board.path, 1, 20000))
    writer.start()
    reads = 0
    try:
        while writer.is_alive() or reads == 0:
            record = board.read(1)
            assert not record.torn
            values = {record.pid, record.served, record.failed, record.queued, int(record.heartbeat_mono)}
            assert len(values) == 1, f"torn read: {record}"
            assert record.attempt == record.pid % 65536
            reads += 1
    finally:
        writer.join(timeout=60)
    assert writer.exitcode == 0
    assert reads > 100


def test_a_writer_that_died_mid_write_leaves_a_torn_record_that_the_next_write_repairs(board):
    board.write(3, state=State.READY, pid=5)
    offset = _HEADER_SIZE + 3 * RECORD_SIZE
    seq = _SEQ.unpack_from(board._map, offset)[0]
    _SEQ.pack_into(board._map, offset, seq + 1)  # odd: as if the writer was SIGKILLed mid-write
    assert board.read(3).torn
    board.write(3, state=State.DEAD)
    record = board.read(3)
    assert not record.torn and record.state is State.DEAD


def _body_at(slot: int) -> int:
    return _HEADER_SIZE + slot * RECORD_SIZE + _SEQ.size


def test_a_record_torn_under_an_even_counter_is_never_believed(board):
    """What a reader on a weakly ordered CPU (arm64) can see: the counter even and unchanged, but a body that
    mixes two writes. The checksum must catch it; the counter alone would not."""
    board.write(2, state=State.READY, pid=4242, served=10)
    at = _body_at(2)
    board._map[at] = int(State.FAILED)  # the new state's byte seen, the rest of the new write not yet
    record = board.read(2)
    assert record.torn, record  # not READY, not FAILED: a record nobody wrote is not reported as either
    board.write(2, state=State.FAILED, error="load failed")
    record = board.read(2)
    assert not record.torn and record.state is State.FAILED and record.pid == 4242


def test_a_new_body_is_not_believed_before_its_checksum_lands(board):
    board.write(1, state=State.LOADING, pid=7, attempt=1)
    newer = Board.attach(board.path)
    newer.write(1, attempt=2)
    at = _body_at(1)
    crc_at = at + _BODY.size
    new_body, new_crc = bytes(board._map[at:crc_at]), bytes(board._map[crc_at : crc_at + _CRC.size])
    board.write(1, attempt=1)  # back to the old record, then replay the new one out of order:
    board._map[at:crc_at] = new_body  # body stores visible, checksum store not yet
    assert board.read(1).torn
    board._map[crc_at : crc_at + _CRC.size] = new_crc
    record = board.read(1)
    assert not record.torn and record.attempt == 2
    newer.close()


def test_a_torn_record_makes_its_worker_untrusted_in_the_verdict(board):
    settings = Settings.from_env({"WEB_CONCURRENCY": "1", "HEARTBEAT_TIMEOUT": "60"})
    board.set_expected_workers(1)
    board.write(0, state=State.READY, pid=os.getpid(), heartbeat_mono=time.monotonic())
    assert judge_board(board, settings, time.monotonic()).ready
    board._map[_body_at(0) + 1] ^= 0xFF  # a byte of padding: the fields unpack the same, the checksum does not
    verdict = judge_board(board, settings, time.monotonic())
    assert not verdict.ready
    assert "torn" in verdict.workers[0].problem


def test_remove_deletes_the_file_and_its_folder(tmp_path):
    board = Board.create(tmp_path, capacity=1, expected_workers=1)
    folder = board.path.parent
    board.remove()
    assert not folder.exists()
