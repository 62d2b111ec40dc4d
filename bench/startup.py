"""Measure what the core promises: how fast the port answers, when /readyz turns 200, and how fast a
killed worker shows on /readyz. Prints a markdown table. Run from the repository root:

    .venv/bin/python bench/startup.py --workers 2 --runs 3
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(url: str, until, deadline_s: float) -> tuple[float, requests.Response]:
    """Poll ``url`` as fast as it answers until ``until(response)``; return (monotonic time, response)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            response = requests.get(url, timeout=5)
        except requests.ConnectionError:
            continue
        if until(response):
            return time.monotonic(), response
    raise TimeoutError(f"{url} never satisfied the condition within {deadline_s} s")


def one_run(workers: int, cache: str, log_dir: str) -> dict[str, float]:
    port = free_port()
    env = dict(
        os.environ,
        HOST="127.0.0.1",
        PORT=str(port),
        WEB_CONCURRENCY=str(workers),
        HF_HUB_OFFLINE="1",
        MODEL_CACHE_DIR=cache,
        ACCESS_LOG="0",
    )
    url = f"http://127.0.0.1:{port}"
    with open(Path(log_dir) / f"gunicorn-{port}.log", "wb") as log:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            answered, _ = poll(url + "/healthz", lambda r: r.status_code == 200, 60)
            ready, response = poll(url + "/readyz", lambda r: r.status_code == 200, 300)
            victim = response.json()["workers"][0]["pid"]
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            flipped, _ = poll(url + "/readyz", lambda r: r.status_code == 503, 30)
            healed, _ = poll(url + "/readyz", lambda r: r.status_code == 200, 300)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    return {
        "start_to_healthz_s": answered - start,
        "start_to_readyz_200_s": ready - start,
        "sigkill_to_readyz_503_ms": (flipped - killed) * 1000,
        "sigkill_to_readyz_200_s": healed - killed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        runs = [one_run(args.workers, scratch, scratch) for _ in range(args.runs)]
    print(f"\n{args.workers} gthread workers, tiny offline model, {args.runs} runs, {os.cpu_count()} CPUs\n")
    print("| measure | median | min | max |")
    print("|---|---|---|---|")
    for key in runs[0]:
        values = [run[key] for run in runs]
        print(f"| {key} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")


if __name__ == "__main__":
    main()
