"""CPU priority per thread: the work a client can make long (generation, decoding an upload) runs below the
request threads, so a probe or a request being read is scheduled first when the CPU is short
(docs/architecture.md §5)."""

from __future__ import annotations

import os
import threading

from webapp.telemetry import logs

log = logs.get(__name__)


def lower_thread_priority(steps: int) -> None:
    """Run the calling thread, and the threads it will start (a new thread takes its creator's nice value),
    ``steps`` nice steps lower than now; 0 leaves it as it is. Where threads have no priorities of their own,
    it says so once per thread and runs at the same priority."""
    if not steps:
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + steps)
    except (AttributeError, OSError) as exc:
        log.warning("thread_priority_unchanged", thread=threading.current_thread().name, error=repr(exc))
