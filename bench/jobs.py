"""Asynchronous jobs beside the synchronous route on the same server, and what a SIGKILL loses. Prints a
markdown table; run from the repository root:

    .venv/bin/python bench/jobs.py

1. Throughput: 8 closed-loop clients on /generate, then 8 that each submit a job (POST /v1/jobs) and wait for
   it with a long poll (GET with Prefer: wait=60), for --seconds each, alternated --rounds times: images per
   second.
2. While every worker generates (the jobs run of 1): submit latency, and a plain GET of a job sent 10 times a
   second: p50 and p99.
3. Nothing lost: --jobs jobs with a webhook to a receiver on 127.0.0.1, then a worker SIGKILLed while it
   holds some, then the whole server (master and workers) SIGKILLed and started again on the same store:
   jobs that did not succeed, and completed webhooks received more than once; and the time from the new
   start to the first job of the old server running again. JOB_MAX_ATTEMPTS=3: a job may die with the
   worker and again with the server.

Two workers, tiny model, 64x64, 10 steps; WEBHOOK_ALLOW_PRIVATE=1 for the loopback receiver.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import requests
import traffic
from servers import Receiver, poll, server

JOB = {"prompt": "a quiet harbour", "num_inference_steps": 10}
SECRET = "whsec_" + "YmVuY2gtc2VjcmV0LW9mLXRoZS13ZWJob29rcy0wMTIzNDU="  # the bench's own
CLIENTS = 8
DONE = ("succeeded", "failed", "canceled")


def job_clients(urls: list[str], clients: int, seconds: float) -> dict[str, object]:
    """``clients`` closed-loop clients: submit a job, wait for it with a long poll, again, for ``seconds``.
    Client ``i`` submits to ``urls[i]`` and follows the job at the next one (round robin): with two
    replicas, every job is followed at the replica it was not submitted to."""
    submits: list[float] = []
    polls: list[float] = []
    images: list[float] = []
    failed: list[str] = []
    known_ids: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(index: int) -> None:
        session = requests.Session()
        seed = index * 100_000
        while time.monotonic() < end:
            seed += 1
            sent = time.monotonic()
            url, follow = urls[index % len(urls)], urls[(index + 1) % len(urls)]
            answer = session.post(url + "/v1/jobs", json={**JOB, "seed": seed}, timeout=60)
            submitted = time.monotonic() - sent
            if answer.status_code != 202:
                with lock:
                    failed.append(str(answer.status_code))
                continue
            location = follow + answer.headers["Location"]
            with lock:
                known_ids.append(answer.json()["id"])
            while True:  # a long poll: the answer comes when the job is done (or after 60 s)
                answer = session.get(location, headers={"Prefer": "wait=60"}, timeout=90)
                job = answer.json()
                if job["status"] in DONE:
                    break
                if "Preference-Applied" not in answer.headers:  # every waiting place taken: poll, politely
                    time.sleep(0.05)
            with lock:
                submits.append(submitted)
                (images if job["status"] == "succeeded" else failed).append(time.monotonic())

    def poller() -> None:  # a plain GET of a job 10 times a second, as a dashboard would
        session = requests.Session()
        while time.monotonic() < end:
            with lock:
                known = list(known_ids)
            if known:
                asked = time.monotonic()
                session.get(urls[0] + "/v1/jobs/" + known[-1], timeout=60)
                with lock:
                    polls.append(time.monotonic() - asked)
            time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=poller))
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "images_per_s": len(images) / (time.monotonic() - started),
        "submits": submits,
        "polls": polls,
        "failed": failed,
    }


def completed(receiver: Receiver) -> collections.Counter[str]:
    """The completed webhooks each job got, every delivery verified with its signature."""
    return collections.Counter(event["data"]["id"] for event in receiver.events() if event["type"] == "job.completed")


def statuses(url: str, ids: list[str]) -> list[dict]:
    return [requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json() for job_id in ids]


def server_env(store: str) -> dict[str, str]:
    # A job may be on the killed worker and then on the killed server: two deaths, so three attempts.
    return {"WEB_CONCURRENCY": "2", "JOB_STORE": store, "WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOW_PRIVATE": "1",
            "JOB_MAX_ATTEMPTS": "3"}  # fmt: skip


def kills(cache: str, url: str, proc: subprocess.Popen, store: str, jobs: int) -> dict[str, object]:
    """Jobs through a worker SIGKILL, then a whole-server SIGKILL (of ``proc``, serving ``url``) and a
    restart on the same store."""
    receiver = Receiver(SECRET)
    env = server_env(store)
    body = {**JOB, "webhook": receiver.url}
    ids = [
        requests.post(url + "/v1/jobs", json={**body, "seed": seed}, timeout=30).json()["id"] for seed in range(jobs)
    ]
    _, ready = poll(url + "/readyz", lambda r: any(w["in_flight"] for w in r.json()["workers"]), 60, 0.01)
    busy = next(w["pid"] for w in ready.json()["workers"] if w["in_flight"])
    os.kill(busy, signal.SIGKILL)
    poll(url + "/readyz", lambda r: r.status_code == 200 and busy not in [w["pid"] for w in r.json()["workers"]],
         120)  # fmt: skip
    poll(url + "/readyz", lambda r: any(w["in_flight"] for w in r.json()["workers"]), 60, 0.01)
    workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    for pid in (proc.pid, *workers):
        os.kill(pid, signal.SIGKILL)
    proc.wait(30)
    before = statuses_from_store(store, ids)
    held = [job_id for job_id, status in before.items() if status == "running"]
    with server(cache, **env) as (url, _, started):
        seen_running, _ = poll(
            url + "/readyz",
            lambda r: any(job["status"] in ("running", "succeeded") for job in statuses(url, held or ids)),
            300,
            0.01,
        )
        ready, _ = poll(url + "/readyz", lambda r: r.status_code == 200, 300)
        end = time.monotonic() + 600
        while time.monotonic() < end and not all(job["status"] in DONE for job in statuses(url, ids)):
            time.sleep(0.2)
        final = statuses(url, ids)
        sent_by = time.monotonic() + 30  # the last completed webhooks are sent as their jobs finish
        while time.monotonic() < sent_by and any(completed(receiver)[job_id] == 0 for job_id in ids):
            time.sleep(0.05)
    return {
        "jobs": jobs,
        "running_at_kill": len(held),
        "lost": sum(job["status"] != "succeeded" for job in final),
        "attempts": collections.Counter(job["attempt"] for job in final),
        "webhooks_missing": sum(completed(receiver)[job_id] == 0 for job_id in ids),
        "webhooks_duplicated": sum(max(0, completed(receiver)[job_id] - 1) for job_id in ids),
        "restart_to_requeued_running_s": seen_running - started,
        "restart_to_ready_s": ready - started,
    }


def statuses_from_store(store: str, ids: list[str]) -> dict[str, str]:
    """The jobs' statuses as the store holds them (the server is dead: asked of the file itself)."""
    import sqlite3

    with sqlite3.connect(store.removeprefix("sqlite:///")) as db:
        return dict(db.execute(f"SELECT id, status FROM jobs WHERE id IN ({','.join('?' * len(ids))})", ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternated")
    parser.add_argument("--jobs", type=int, default=20, help="jobs in flight through the kills")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        store = f"sqlite:///{cache}/jobs.sqlite3"
        sync_rates, job_runs = [], []
        with server(cache, **server_env(store)) as (url, proc, _):
            poll(url + "/readyz", lambda r: r.status_code == 200, 300)
            traffic.drive(url, 4, min(2.0, args.seconds))  # warm up
            for _ in range(args.rounds):
                sync_rates.append(traffic.drive(url, CLIENTS, args.seconds)["images_per_s"])
                job_runs.append(job_clients([url], CLIENTS, args.seconds))
            killed = kills(cache, url, proc, store, args.jobs)
    sync = statistics.median(sync_rates)
    through_jobs = statistics.median(run["images_per_s"] for run in job_runs)
    submits = [s for run in job_runs for s in run["submits"]]
    polls = [p for run in job_runs for p in run["polls"]]
    failed = [f for run in job_runs for f in run["failed"]]
    print(
        f"\n{os.cpu_count()} CPUs, 2 workers, tiny model 64x64, {JOB['num_inference_steps']} steps; {CLIENTS} clients, "
        f"{args.seconds:g} s a run, {args.rounds} runs each, alternated\n"
    )
    print("| measure | value | compared to | ratio |")
    print("|---|---|---|---|")
    each_job = ", ".join(f"{run['images_per_s']:.2f}" for run in job_runs)
    each_sync = ", ".join(f"{rate:.2f}" for rate in sync_rates)
    print(
        f"| images/s through jobs (submit, long poll) | {through_jobs:.2f} ({each_job}) | /generate, same "
        f"clients: {sync:.2f} ({each_sync}) | {through_jobs / sync:.3f}x (goal within 5%) |"
    )
    print(
        f"| submit p50 / p99, every worker generating | {traffic.percentile(submits, 0.5) * 1000:.1f} / "
        f"{traffic.percentile(submits, 0.99) * 1000:.1f} ms | poll p50 / p99 "
        f"{traffic.percentile(polls, 0.5) * 1000:.1f} / {traffic.percentile(polls, 0.99) * 1000:.1f} ms | "
        f"{len(submits)} submits, {len(polls)} polls |"
    )
    print(
        f"| jobs lost through a worker SIGKILL and a whole-server SIGKILL + restart | {killed['lost']} of "
        f"{killed['jobs']} | goal 0; {killed['running_at_kill']} running at the server's kill; attempts "
        f"{dict(sorted(killed['attempts'].items()))} | {'pass' if not killed['lost'] else 'FAIL'} |"
    )
    print(
        f"| completed webhooks duplicated / missing | {killed['webhooks_duplicated']} / "
        f"{killed['webhooks_missing']} | at least once: a duplicate is allowed, a missing one is not | "
        f"{'pass' if not killed['webhooks_missing'] else 'FAIL'} |"
    )
    print(
        f"| restart to the first job of the killed server running again | "
        f"{killed['restart_to_requeued_running_s']:.2f} s | start to /readyz 200 {killed['restart_to_ready_s']:.2f} s "
        "(the first worker claims once READY) | - |"
    )
    if killed["lost"] or killed["webhooks_missing"] or failed:
        print(f"\nFAILED: {killed['lost']} jobs lost, {killed['webhooks_missing']} webhooks missing, {failed[:5]}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
