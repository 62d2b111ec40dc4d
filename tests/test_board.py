"""The readiness board: layout, permissions, seqlock consistency across processes, torn records."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

from webapp.board import _HEADER_SIZE, _SEQ, RECORD_SIZE, Board, State


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
    assert record.error.endswith("...") and len(record.error.encode()) <= 400
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


def test_remove_deletes_the_file_and_its_folder(tmp_path):
    board = Board.create(tmp_path, capacity=1, expected_workers=1)
    folder = board.path.parent
    board.remove()
    assert not folder.exists()
