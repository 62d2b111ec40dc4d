"""Throughput and latency under load, with and without dynamic batching. Prints a markdown table.

    .venv/bin/python bench/traffic.py --seconds 8

One worker on the tiny model; closed-loop clients at each concurrency send the same kind of job (64x64,
10 steps, one image, a different seed each time) for a fixed time. A shed request (503) is recorded and
the client pauses 50 ms before its next one. Batching off means MAX_BATCH_SIZE=1.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import requests
from servers import poll, server

JOB = {"prompt": "a quiet harbour", "num_inference_steps": 10}
CONCURRENCY = (1, 4, 8)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms_text(value: float) -> str:
    return "none" if value != value else f"{value:.1f}"  # NaN: nothing was shed


def drive(
    url: str, clients: int, seconds: float, stop: threading.Event | None = None, job: dict | None = None
) -> dict[str, float]:
    """``clients`` closed-loop clients sending ``job`` (JOB unless given) for ``seconds`` (or until ``stop``)."""
    job = JOB if job is None else job
    accepted: list[float] = []
    rejected: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds
    stop = stop or threading.Event()

    def client(index: int) -> None:
        session = requests.Session()
        seed = index * 100_000
        while time.monotonic() < end and not stop.is_set():
            seed += 1
            sent = time.monotonic()
            try:
                response = session.post(url + "/generate", json={**job, "seed": seed}, timeout=120)
            except requests.RequestException as exc:
                with lock:
                    errors.append(repr(exc))
                continue
            latency = time.monotonic() - sent
            with lock:
                (accepted if response.status_code == 200 else rejected).append(latency)
                if response.status_code not in (200, 503):
                    errors.append(str(response.status_code))
            if response.status_code == 503:
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return {
        "images_per_s": len(accepted) / elapsed,
        "accepted": len(accepted),
        "rejected": len(rejected),
        "errors": len(errors),
        "accepted_p50_ms": percentile(accepted, 0.5) * 1000,
        "accepted_p99_ms": percentile(accepted, 0.99) * 1000,
        "rejected_p50_ms": percentile(rejected, 0.5) * 1000,
        "rejected_p99_ms": percentile(rejected, 0.99) * 1000,
    }


def run_server(cache: str, batch_size: int, clients: int | tuple[int, ...], seconds: float) -> dict:
    """One worker (MAX_ONGOING=4, MAX_QUEUED=2) driven by each number of ``clients`` in turn; the results by
    number of clients, or the one result when ``clients`` is a number."""
    # One worker: the master's import of the model code (docs/architecture.md §13) only pays off for a
    # replacement, which this run never makes; without it, the model code is imported once, not twice.
    env = {"WEB_CONCURRENCY": "1", "MAX_BATCH_SIZE": str(batch_size), "MAX_ONGOING": "4", "MAX_QUEUED": "2",
           "MASTER_PREIMPORT": "0"}  # fmt: skip
    counts = (clients,) if isinstance(clients, int) else clients
    with server(cache, **env) as (url, _, _):
        poll(url + "/readyz", lambda r: r.status_code == 200, 300)
        drive(url, 2, min(2.0, seconds))  # warm the caches and the service-time estimate
        results = {count: drive(url, count, seconds) for count in counts}
    return results[clients] if isinstance(clients, int) else results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="load time per row")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for batching, batch_size in (("off", 1), ("on", 4)):
            results = run_server(cache, batch_size, CONCURRENCY, args.seconds)
            rows.extend((batching, clients, result) for clients, result in results.items())
    print(
        f"\none worker, tiny model, 64x64, 10 steps; MAX_ONGOING=4, MAX_QUEUED=2 (capacity 6); {os.cpu_count()} CPUs; "
        f"{args.seconds:g} s per row\n"
    )
    print(
        "| batching | clients | images/s | accepted | shed (503) | errors | accepted p50 / p99 ms | shed p50 / p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batching, clients, r in rows:
        print(
            f"| {batching} | {clients} | {r['images_per_s']:.1f} | {r['accepted']} | {r['rejected']} | {r['errors']} "
            f"| {r['accepted_p50_ms']:.0f} / {r['accepted_p99_ms']:.0f} "
            f"| {ms_text(r['rejected_p50_ms'])} / {ms_text(r['rejected_p99_ms'])} |"
        )
    if any(r["errors"] for _, _, r in rows):
        print("\nsome requests failed with errors other than 503: see the errors column")


if __name__ == "__main__":
    main()
