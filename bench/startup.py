"""Measure what the core promises: how fast the port answers, when /readyz turns 200, and how fast a
killed worker shows on /readyz. Prints a markdown table. Run from the repository root:

    .venv/bin/python bench/startup.py --workers 2 --runs 3
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time

from servers import poll, server


def one_run(workers: int, cache: str) -> dict[str, float]:
    with server(cache, WEB_CONCURRENCY=str(workers)) as (url, _, start):
        answered, _ = poll(url + "/healthz", lambda r: r.status_code == 200, 60)
        ready, response = poll(url + "/readyz", lambda r: r.status_code == 200, 300)
        victim = response.json()["workers"][0]["pid"]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        flipped, _ = poll(url + "/readyz", lambda r: r.status_code == 503, 30)
        healed, _ = poll(url + "/readyz", lambda r: r.status_code == 200, 300)
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
        runs = [one_run(args.workers, scratch) for _ in range(args.runs)]
    print(f"\n{args.workers} gthread workers, tiny offline model, {args.runs} runs, {os.cpu_count()} CPUs\n")
    print("| measure | median | min | max |")
    print("|---|---|---|---|")
    for key in runs[0]:
        values = [run[key] for run in runs]
        print(f"| {key} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")


if __name__ == "__main__":
    main()
