"""Starting and stopping a real gunicorn server for the benchmarks (loopback only, stopped by pid)."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the benchmarks run as scripts from bench/; the suite's helpers live in tests/

from tests.conftest import FORKS, Receiver, RedisServer, Server, free_port  # noqa: E402 - needs the path above
from tests.forkserver import Forked, ForkServer  # noqa: E402 - needs the path above

__all__ = ["ROOT", "Receiver", "RedisServer", "free_port", "poll", "server"]

# Run by the test suite (tests/test_bench.py), a benchmark forks its servers from the suite's fork server
# (tests/forkserver.py): the tests check that it runs end to end, not its figures, and each fresh interpreter
# would import torch again. Run from the README, it is not set, and every server is a fresh interpreter.
FORK_SERVER = os.environ.get("TEST_FORK_SERVER", "")
if FORK_SERVER:
    FORKS.append(ForkServer.attach(FORK_SERVER))


@functools.cache
def note_forked() -> None:
    """Say once, beside the table, that this run's figures are not a fresh start's."""
    print(
        "note: servers forked from the test suite's fork server (TEST_FORK_SERVER): their start times and memory "
        "are not a fresh start's",
        flush=True,
    )


def poll(
    url: str, until: Callable[[requests.Response], bool], deadline_s: float, interval: float = 0.05
) -> tuple[float, requests.Response]:
    """Poll ``url`` until ``until(response)``, every ``interval`` s; return (monotonic time, response).
    Polling flat out (``interval=0``) takes CPU from the worker being waited on: a one-worker start took
    13 s instead of 7 with /readyz polled flat out. Only a measurement that needs the resolution does so."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            response = requests.get(url, timeout=5)
        except requests.ConnectionError:
            time.sleep(interval)
            continue
        if until(response):
            return time.monotonic(), response
        time.sleep(interval)
    raise TimeoutError(f"{url} never satisfied the condition within {deadline_s} s")


@contextlib.contextmanager
def server(cache: str, *args: str, **env: str) -> Iterator[tuple[str, subprocess.Popen, float]]:
    """Start gunicorn.conf.py on a free loopback port with ``env`` (and gunicorn command-line ``args``, which
    override the config file); yield (url, process, start time). The start and the stop by pid are the test
    suite's own (``tests.conftest.Server``)."""
    port = free_port()
    full_env = dict(
        os.environ, HOST="127.0.0.1", PORT=str(port), HF_HUB_OFFLINE="1", MODEL_CACHE_DIR=cache, ACCESS_LOG="0", **env
    )
    with tempfile.TemporaryDirectory() as folder:
        full_env.setdefault("JOB_STORE", f"sqlite:///{folder}/jobs.sqlite3")
        started = time.monotonic()
        running = Server(full_env, Path(folder) / "gunicorn.log", args)
        if isinstance(running.proc, Forked):
            note_forked()
        try:
            yield running.url, running.proc, started
        finally:
            running.stop()
