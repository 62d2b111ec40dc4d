"""Jobs on a fleet: Redis as the shared store against SQLite, one replica against two, and what kills lose.
Prints a markdown table; run from the repository root (Debian's redis-server must be installed: the README's
test command installs it):

    .venv/bin/python bench/fleet.py

1. A job's added latency: one client, one job at a time (submit, then a long poll until it is done), --jobs
   times, against /generate with the same body on the same server, with JOB_STORE on SQLite and on Redis.
2. Images per second through jobs (8 closed-loop clients, each submitting to one replica and following its
   jobs at the other) with one replica, then two, sharing one Redis; --seconds each, --rounds times.
3. Nothing lost: --jobs jobs submitted to replica A; A's worker SIGKILLed while it runs one; then, once its
   replacement is ready, all of A (master and worker) SIGKILLed with whatever it holds, and Redis restarted
   (SIGTERM, then started on the same folder) while B works: jobs that did not succeed.
   JOB_LEASE_SECONDS=5 (--lease), so B takes over what A ran after 5 s; JOB_MAX_ATTEMPTS=3, since a job may die
   with A's worker and again with the whole of A.

Each replica: one worker, MAX_ONGOING=4, THREADS=24 (a long poll's place for each client),
TORCH_THREADS=1 (one CPU each: on this 2-CPU machine two replicas
have a CPU each, and a third would only share them). Tiny model, 64x64, 10 steps. Redis: redis-server on a
free loopback port in a temporary folder, append-only with an fsync every second.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import jobs
import requests
import traffic
from servers import RedisServer, poll, server

# THREADS 24: room for every client's long poll (THREADS - MAX_ONGOING - MAX_QUEUED - 2 = 10 waiting places).
# JOB_MAX_ATTEMPTS 3: a job may die with A's worker and again with the whole of A (as in bench/jobs.py).
REPLICA = {"WEB_CONCURRENCY": "1", "MAX_ONGOING": "4", "TORCH_THREADS": "1", "THREADS": "24",
           "JOB_MAX_ATTEMPTS": "3"}  # fmt: skip
DONE = jobs.DONE


@contextlib.contextmanager
def replica(cache: str, store: str, name: str, lease_s: float) -> Iterator[tuple[str, object]]:
    env = {**REPLICA, "JOB_STORE": store, "REPLICA_NAME": name, "JOB_LEASE_SECONDS": f"{lease_s:g}"}
    with server(cache, **env) as (url, proc, _):
        poll(url + "/readyz", lambda r: r.status_code == 200, 300)
        yield url, proc


def one_at_a_time(url: str, count: int) -> dict[str, float]:
    """Median seconds of /generate, of a job from submit to done (long poll), and of a submit alone."""
    generate, job, submit = [], [], []
    session = requests.Session()
    for seed in range(count):
        sent = time.monotonic()
        assert session.post(url + "/generate", json={**jobs.JOB, "seed": seed}, timeout=60).status_code == 200
        generate.append(time.monotonic() - sent)
        sent = time.monotonic()
        answer = session.post(url + "/v1/jobs", json={**jobs.JOB, "seed": seed}, timeout=60)
        submit.append(time.monotonic() - sent)
        location = url + answer.headers["Location"]
        while session.get(location, headers={"Prefer": "wait=60"}, timeout=90).json()["status"] not in DONE:
            pass
        job.append(time.monotonic() - sent)
    return {name: statistics.median(values) for name, values in (("generate", generate), ("job", job),
                                                                  ("submit", submit))}  # fmt: skip


def status(urls: list[str], job_id: str) -> str:
    """A job's status, asked of the first replica that answers."""
    for url in urls:
        with contextlib.suppress(requests.RequestException):
            response = requests.get(f"{url}/v1/jobs/{job_id}", timeout=10)
            if response.status_code == 200:
                return response.json()["status"]
    return "unknown"


def kills(a: tuple[str, object], b_url: str, redis_server: RedisServer, count: int) -> dict[str, int]:
    """``count`` jobs to A; A's worker SIGKILLed while it runs one, then all of A, then Redis restarted."""
    a_url, a_proc = a
    ids = [requests.post(a_url + "/v1/jobs", json={**jobs.JOB, "seed": 500 + n}, timeout=30).json()["id"]
           for n in range(count)]  # fmt: skip
    _, ready = poll(a_url + "/readyz", lambda r: any(w["in_flight"] for w in r.json()["workers"]), 60, 0.01)
    busy = ready.json()["workers"][0]["pid"]
    os.kill(busy, signal.SIGKILL)
    poll(a_url + "/readyz", lambda r: r.status_code == 200 and busy not in [w["pid"] for w in r.json()["workers"]],
         120)  # fmt: skip
    workers = [int(pid) for pid in Path(f"/proc/{a_proc.pid}/task/{a_proc.pid}/children").read_text().split()]
    for pid in (a_proc.pid, *workers):
        os.kill(pid, signal.SIGKILL)
    a_proc.wait(30)
    redis_server.stop()
    redis_server.start()
    end = time.monotonic() + 600
    while time.monotonic() < end and not all(status([b_url], job_id) in DONE for job_id in ids):
        time.sleep(0.2)
    final = [status([b_url], job_id) for job_id in ids]
    return {"jobs": count, "lost": sum(s != "succeeded" for s in final)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs of each")
    parser.add_argument("--jobs", type=int, default=20, help="one-at-a-time jobs, and jobs through the kills")
    parser.add_argument("--lease", type=float, default=5.0, help="JOB_LEASE_SECONDS: when B takes over A's jobs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        redis_server = RedisServer(Path(cache) / "redis")
        try:
            with replica(cache, f"sqlite:///{cache}/jobs.sqlite3", "sqlite", args.lease) as (url, _):
                traffic.drive(url, 2, min(2.0, args.seconds))  # warm up
                on_sqlite = one_at_a_time(url, args.jobs)
            alone, pair = [], []
            with replica(cache, redis_server.url, "a", args.lease) as a:
                traffic.drive(a[0], 2, min(2.0, args.seconds))  # warm up
                on_redis = one_at_a_time(a[0], args.jobs)
                for _ in range(args.rounds):
                    alone.append(jobs.job_clients([a[0]], jobs.CLIENTS, args.seconds))
                with replica(cache, redis_server.url, "b", args.lease) as b:
                    for _ in range(args.rounds):
                        pair.append(jobs.job_clients([a[0], b[0]], jobs.CLIENTS, args.seconds))
                    killed = kills(a, b[0], redis_server, args.jobs)
        finally:
            redis_server.stop()
    one = statistics.median(run["images_per_s"] for run in alone)
    two = statistics.median(run["images_per_s"] for run in pair)
    failed = [f for run in alone + pair for f in run["failed"]]
    print(
        f"\n{os.cpu_count()} CPUs; replicas of 1 worker, MAX_ONGOING 4, torch on 1 thread; tiny model 64x64, "
        f"{jobs.JOB['num_inference_steps']} steps; {args.jobs} jobs one at a time; {jobs.CLIENTS} clients, "
        f"{args.seconds:g} s a run, {args.rounds} runs each\n"
    )
    print("| measure | value | compared to | ratio |")
    print("|---|---|---|---|")
    for name, measured in (("SQLite", on_sqlite), ("Redis", on_redis)):
        added = (measured["job"] - measured["generate"]) * 1000
        print(
            f"| a job through {name}, submit to done (median) | {measured['job'] * 1000:.1f} ms (submit "
            f"{measured['submit'] * 1000:.1f} ms) | /generate, same body: {measured['generate'] * 1000:.1f} ms | "
            f"+{added:.1f} ms |"
        )
    each_pair = ", ".join(f"{run['images_per_s']:.2f}" for run in pair)
    each_alone = ", ".join(f"{run['images_per_s']:.2f}" for run in alone)
    print(
        f"| images/s through jobs, two replicas on one Redis | {two:.2f} ({each_pair}) | one replica alone: "
        f"{one:.2f} ({each_alone}) | {two / one:.2f}x (2 CPUs: one each) |"
    )
    print(
        f"| jobs lost through a worker SIGKILL, a whole-replica SIGKILL and a Redis restart | {killed['lost']} "
        f"of {killed['jobs']} | goal 0 | {'pass' if not killed['lost'] else 'FAIL'} |"
    )
    if killed["lost"] or failed:
        print(f"\nFAILED: {killed['lost']} jobs lost, {len(failed)} jobs failed under load: {failed[:5]}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
