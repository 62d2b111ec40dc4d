"""What one worker process serves with: its settings, the board, its slot and its engine."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from webapp.board import Board, State
from webapp.engine import Engine
from webapp.settings import Settings


@dataclass
class Runtime:
    """The pieces the routes read. ``engine`` is None only if the worker could not start one (the board
    then says FAILED with the reason)."""

    settings: Settings
    board: Board
    slot: int
    engine: Engine | None

    @classmethod
    def standalone(cls, settings: Settings) -> Runtime:
        """A one-slot board and engine in this process, for running the app without gunicorn's hooks
        (``flask --app webapp run``). Production always goes through the gunicorn hooks."""
        board = Board.create(Path(tempfile.gettempdir()), capacity=1, expected_workers=1)
        now = time.monotonic()
        board.reset(
            0, state=State.STARTING, pid=os.getpid(), started_mono=now, started_wall=time.time(), heartbeat_mono=now
        )
        engine = Engine(settings, board, 0)
        engine.start()
        return cls(settings, board, 0, engine)
