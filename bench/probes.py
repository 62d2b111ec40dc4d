"""/healthz latency while every worker generates, with the engine threads at a lower CPU priority than the
request threads (ENGINE_NICE, the default 10) and at the same priority (0), alternated in one run, beside
the images per second each drew. Run from the repository root:

    .venv/bin/python bench/probes.py

The probes are sent from a process of their own, one at a time every 10 ms on a kept-alive connection, so
the load generator's threads (in this process) do not add their own interpreter lock to what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading

import traffic
from servers import poll, server

SAMPLER = """
import json, sys, time
import requests
url, samples = sys.argv[1], int(sys.argv[2])
seconds = []
with requests.Session() as session:
    for _ in range(samples):
        sent = time.perf_counter()
        assert session.get(url + "/healthz", timeout=10).status_code == 200
        seconds.append(time.perf_counter() - sent)
        time.sleep(0.01)
print(json.dumps(seconds))
"""


def healthz_latencies(url: str, samples: int) -> list[float]:
    """``samples`` /healthz round trips, in seconds, measured from a separate process."""
    done = subprocess.run(
        [sys.executable, "-c", SAMPLER, url, str(samples)], capture_output=True, text=True, check=True, timeout=600
    )
    return json.loads(done.stdout)


def busy_probes(cache: str, samples: int, seconds: float, **env: str) -> dict:
    """Two workers, 8 clients generating for ``seconds`` while /healthz is sampled: latencies and images/s."""
    with server(cache, WEB_CONCURRENCY="2", **env) as (url, _, _):
        poll(url + "/readyz", lambda r: r.status_code == 200, 600)
        traffic.drive(url, 4, 2.0)  # warm up
        result: dict = {}
        stop = threading.Event()
        load = threading.Thread(target=lambda: result.update(traffic.drive(url, 8, seconds, stop)))
        load.start()
        try:
            poll(url + "/readyz", lambda r: all(w["in_flight"] > 0 for w in r.json()["workers"]), 60)
            result["healthz"] = healthz_latencies(url, samples)
        finally:
            stop.set()
            load.join(180)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting, alternated")
    parser.add_argument("--samples", type=int, default=600, help="/healthz samples per run")
    parser.add_argument("--seconds", type=float, default=20.0, help="load per run (longer than the sampling)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"10": [], "0": []}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.rounds):
            for nice in runs:
                runs[nice].append(busy_probes(cache, args.samples, args.seconds, ENGINE_NICE=nice))
    print(
        f"\ntwo workers, 8 clients generating (64x64, 10 steps); {args.samples} /healthz per run from another "
        f"process; {args.rounds} runs each, alternated; {os.cpu_count()} CPUs\n"
    )
    print("| ENGINE_NICE | /healthz p50 ms | /healthz p99 ms (each run) | images/s (each run) |")
    print("|---|---|---|---|")
    for nice, results in runs.items():
        all_samples = [s for r in results for s in r["healthz"]]
        p99s = ", ".join(f"{traffic.percentile(r['healthz'], 0.99) * 1000:.1f}" for r in results)
        rates = ", ".join(f"{r['images_per_s']:.2f}" for r in results)
        print(f"| {nice} | {traffic.percentile(all_samples, 0.5) * 1000:.1f} | {p99s} | {rates} |")
    for nice, results in runs.items():
        print(f"ENGINE_NICE={nice}: {sum(r['errors'] for r in results)} traffic errors other than 503")
    if any(r["errors"] for results in runs.values() for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
