"""Files on disk are input too: the stale-board sweep at start (``hooks.remove_stale_boards``) meets whatever
BOARD_DIR holds (by default /dev/shm, which every local user may write), and no entry in it may stop the
server. A board's liveness is proven by the lock its master holds, never by a pid."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webapp.board.slots import Board, master_holds
from webapp.server.hooks import LOCKLESS_GRACE_S, remove_stale_boards

NOBODY = 65534


def hostile_entries(folder: Path, elsewhere: Path) -> dict[str, Path]:
    """One entry of each kind the sweep may find, named by what it is."""
    made: dict[str, Path] = {}

    def entry(name: str) -> Path:
        made[name] = folder / f"honest-diffusion-{name}"
        return made[name]

    entry("empty-file").touch()
    entry("garbage-file").write_bytes(os.urandom(300))
    for name, data in {"short-board": b"HDBOA", "garbage-board": os.urandom(700), "empty-board": b""}.items():
        entry(name).mkdir()
        (made[name] / "board").write_bytes(data)
        (made[name] / "master.lock").touch()
        os.utime(made[name], (time.time() - 2 * LOCKLESS_GRACE_S,) * 2)
    entry("lock-is-a-fifo").mkdir()
    os.mkfifo(made["lock-is-a-fifo"] / "master.lock")
    entry("lock-is-a-symlink").mkdir()
    (made["lock-is-a-symlink"] / "master.lock").symlink_to(elsewhere / "kept.lock")
    entry("no-lock-old").mkdir()
    os.utime(made["no-lock-old"], (time.time() - 2 * LOCKLESS_GRACE_S,) * 2)
    entry("no-lock-new").mkdir()
    entry("symlink").symlink_to(elsewhere, target_is_directory=True)
    os.mkfifo(entry("fifo"))
    entry("unreadable").mkdir(mode=0)
    (elsewhere / "kept.lock").touch()
    return made


def test_no_entry_stops_the_sweep_and_each_is_removed_or_skipped_with_a_warning(tmp_path, capsys):
    """Before this change a board file of a few bytes raised struct.error out of on_starting, and the master
    died. Now: stale folders of ours are removed, whatever their board holds; what is not ours to remove
    (a symlink, a fifo, a plain file, another user's folder) is skipped; nothing raises."""
    boards, elsewhere = tmp_path / "boards", tmp_path / "elsewhere"
    boards.mkdir()
    elsewhere.mkdir()
    made = hostile_entries(boards, elsewhere)
    live = Board.create(boards, capacity=2, expected_workers=1)
    others = None
    if os.geteuid() == 0:  # a folder another user owns: only root can make one here
        others = boards / "honest-diffusion-another-user"
        others.mkdir()
        os.chown(others, NOBODY, NOBODY)
    try:
        remove_stale_boards(boards)
        left = {path.name for path in boards.iterdir()}
        removed = {"short-board", "garbage-board", "empty-board", "lock-is-a-fifo", "lock-is-a-symlink", "no-lock-old"}
        skipped = {"empty-file", "garbage-file", "no-lock-new", "symlink", "fifo", "unreadable"}
        assert not {made[name].name for name in removed} & left
        assert {made[name].name for name in skipped} <= left
        assert live.folder.name in left and (elsewhere / "kept.lock").exists()  # nothing followed out of BOARD_DIR
        if others is not None:
            assert others.name in left
        said = capsys.readouterr()
        lines = (said.out + said.err).splitlines()
        for name in removed | skipped:
            event = "stale_board_removed" if name in removed else "stale_board_skipped"
            assert any(event in line and made[name].name in line for line in lines), (name, lines)
    finally:
        live.remove()


def test_a_board_is_live_while_its_master_holds_its_lock_whatever_its_pid_says(tmp_path):
    """The master's pid in the header may be another namespace's, or reused: the lock decides. A forked
    worker shares the master's lock, so a board whose master died while a worker lives stays live."""
    board = Board.create(tmp_path, capacity=2, expected_workers=1)
    assert master_holds(board.folder)
    remove_stale_boards(tmp_path)
    assert board.path.exists()
    pid = os.fork()
    if pid == 0:  # the worker: it holds the inherited lock until it exits
        time.sleep(2)
        os._exit(0)
    board.close()  # the master goes; its worker still holds the lock
    assert master_holds(board.folder)
    os.waitpid(pid, 0)
    assert not master_holds(board.folder)
    remove_stale_boards(tmp_path)
    assert not board.folder.exists()


@pytest.mark.slow
def test_gunicorn_starts_ready_with_every_hostile_entry_in_board_dir(start_server, tmp_path):
    """The whole server, master included, starts and turns READY over a BOARD_DIR full of hostile entries."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    boards = tmp_path / "boards"
    boards.mkdir()
    made = hostile_entries(boards, elsewhere)
    server = start_server(WEB_CONCURRENCY="1", BOARD_DIR=str(boards))
    server.wait_ready()
    log = server.log_tail(400)
    assert "stale_board_removed" in log and "stale_board_skipped" in log
    assert not made["short-board"].exists() and made["symlink"].is_symlink()


entries = st.lists(
    st.tuples(
        st.sampled_from(["file", "folder", "folder+lock", "symlink", "fifo"]),
        st.binary(max_size=900),  # the board's bytes (or the file's)
        st.booleans(),  # aged past the grace for a folder without a lock
    ),
    max_size=6,
)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(found=entries)
def test_the_sweep_survives_any_bytes_in_any_entry(tmp_path_factory, found):
    """The fuzzer's side of the sweep: any mix of entries with any bytes, and a live board beside them; the
    sweep never raises and never removes the live board."""
    boards = tmp_path_factory.mktemp("sweep")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    for index, (kind, data, aged) in enumerate(found):
        path = boards / f"honest-diffusion-{index}"
        if kind == "file":
            path.write_bytes(data)
        elif kind == "symlink":
            path.symlink_to(elsewhere, target_is_directory=True)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            path.mkdir()
            (path / "board").write_bytes(data)
            if kind == "folder+lock":
                (path / "master.lock").write_bytes(data[:7])
            if aged:
                os.utime(path, (time.time() - 2 * LOCKLESS_GRACE_S,) * 2)
    live = Board.create(boards, capacity=2, expected_workers=1)
    try:
        remove_stale_boards(boards)
        assert live.path.exists() and elsewhere.exists()
    finally:
        live.remove()
