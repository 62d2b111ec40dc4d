"""A loader whose worker dies during every load, as under the OOM killer while weights load.

Kept apart from ``tests.loaders`` so it imports nothing heavy: each crash is then quick, and the time
between respawns shows the server's backoff rather than the cost of importing torch.
"""

from __future__ import annotations

import os
import signal


def crash(settings: object, slot: int) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # SIGKILL rather than SIGSEGV: no core files
