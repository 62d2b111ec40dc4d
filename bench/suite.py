"""The benchmark suite: every figure the server promises, each beside what it is compared to, as one
markdown table. Run from the repository root (about four minutes on 2 CPUs):

    .venv/bin/python bench/suite.py

1. The bare pipeline in a fresh process (bench/bare.py): import + load + warm-up, its first image, and
   per-image latency.
2. One and two workers: start to the port open, to /healthz, to /readyz 200 and to the first image against (1), and the
   memory of master and workers, with the master's imports (docs/architecture.md §13) and without;
   per-image latency through HTTP against (1), on the last one-worker server and bare process of (1).
3. Two workers, with a checker sending /readyz and then /generate all along, and a client sending one
   /generate at a time: /healthz idle and while both workers generate; a worker SIGKILLed (--runs times:
   to /readyz 503, to 200 again, requests failed) and one SIGSTOPped, to /readyz 503; false-ready time.
4. One worker under closed-loop load, batching off and on: throughput and shed latency (bench/traffic.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import requests
import traffic
from probes import healthz_latencies
from servers import ROOT, poll, server

PROMPT = "a quiet harbour"
STEPS = 10
HEARTBEAT_TIMEOUT_S = 2.0
NOT_LOADED = {"not_ready", "worker_unhealthy"}  # error codes of a /generate refused for want of a pipeline


def percentile(values: list[float], q: float) -> float:
    return traffic.percentile(values, q)


def bare_process(cache: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MODEL_CACHE_DIR=cache, WEB_CONCURRENCY="1")
    args = [sys.executable, str(ROOT / "bench" / "bare.py"), "--steps", str(STEPS), "--prompt", PROMPT]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@contextlib.contextmanager
def bare_start(cache: str) -> Iterator[tuple[dict, subprocess.Popen]]:
    """Import + load + warm-up of the bare pipeline in a fresh process, and its first image: the seconds
    the process reports, and the wall-clock times from its start (the same clock as a server's start).
    Yields them with the process, which draws more images while the block lasts (``paired_images``)."""
    spawned = time.monotonic()
    with bare_process(cache) as bare:
        header = json.loads(bare.stdout.readline())
        header["ready_s"] = time.monotonic() - spawned
        bare.stdin.write("0\n")
        bare.stdin.flush()
        bare.stdout.readline()
        header["first_image_s"] = time.monotonic() - spawned
        yield header, bare
        bare.stdin.close()


def first_image(url: str, deadline_s: float) -> float:
    """Send the suite's /generate every 50 ms until one is answered with an image, as a client that retries
    on 503 would; return when it was (monotonic)."""
    job = {"prompt": PROMPT, "num_inference_steps": STEPS, "seed": 0}
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with contextlib.suppress(requests.ConnectionError):
            if requests.post(url + "/generate", json=job, timeout=120).status_code == 200:
                return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"no image from {url} within {deadline_s} s")


def process_memory(pid: int) -> dict[str, float]:
    """Peak and present resident memory (VmHWM, Rss) and proportional set size (Pss: shared pages divided
    among the processes sharing them) of one process, in MB, from /proc."""
    fields = {}
    for name in ("status", "smaps_rollup"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "Rss", "Pss") and value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def server_memory(master: int) -> dict[str, Any]:
    """The memory of the master and of each of its workers (``process_memory``)."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {"master": process_memory(master), "workers": [process_memory(int(pid)) for pid in children]}


def port_open(url: str, deadline_s: float) -> float:
    """When a TCP connection to ``url``'s port first succeeds (a TCP probe's view), polled every 5 ms."""
    address = urllib.parse.urlsplit(url)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            socket.create_connection((address.hostname, address.port), timeout=1).close()
            return time.monotonic()
        except OSError:
            time.sleep(0.005)
    raise TimeoutError(f"{url} never accepted a connection within {deadline_s} s")


def server_start(cache: str, workers: int, then: Callable[[str], Any] | None = None, **env: str) -> dict:
    """Start to the port open, to /healthz 200, to /readyz 200 and to the first image of a server with
    ``workers`` workers, and its processes' memory once it has drawn that image and is ready; then
    ``then(url)``, if given, on the same server (its result under "then")."""
    with server(cache, WEB_CONCURRENCY=str(workers), **env) as (url, proc, start):
        opened = port_open(url, 60)
        answered, _ = poll(url + "/healthz", lambda r: r.status_code == 200, 60, interval=0)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            image = pool.submit(first_image, url, 600)
            # Every 50 ms, like an eager probe: polling flat out would take CPU from the load being timed.
            ready, _ = poll(url + "/readyz", lambda r: r.status_code == 200, 600)
            drawn = image.result()
        memory = server_memory(proc.pid)
        after = then(url) if then is not None else None
    return {
        "port_s": opened - start,
        "healthz_s": answered - start,
        "readyz_s": ready - start,
        "first_image_s": drawn - start,
        "memory": memory,
        "then": after,
    }


def paired_images(bare: subprocess.Popen, url: str, images: int) -> dict:
    """``images`` single-image calls each to a bare pipeline process and through a one-worker server,
    alternated, so both see the same host; the same seeds and arguments on both sides."""
    bare_s, http_s = [], []
    with requests.Session() as http:
        for seed in range(images):
            bare.stdin.write(f"{seed}\n")
            bare.stdin.flush()
            bare_s.append(float(bare.stdout.readline()))
            job = {"prompt": PROMPT, "num_inference_steps": STEPS, "seed": seed}
            sent = time.perf_counter()
            http.post(url + "/generate", json=job, timeout=120).raise_for_status()
            http_s.append(time.perf_counter() - sent)
    return {"bare_s": bare_s, "http_s": http_s}


class Background:
    """A client whose ``run`` loops on a thread of its own for the length of a ``with`` block, until
    ``stopped()``."""

    def run(self) -> None:
        raise NotImplementedError

    def stopped(self) -> bool:
        return self._stop.is_set()

    def __enter__(self) -> Self:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)


@dataclass
class Checker(Background):
    """Sends /readyz, and after each 200 at once a one-step /generate, until stopped. A /generate refused
    for want of a loaded pipeline right after a 200 is false readiness: the time from that 200 to the
    refusal is added up. Requests cut off by a kill are counted apart (the worker was ready when asked)."""

    url: str
    checks: int = 0
    ready_checks: int = 0
    false_ready_s: float = 0.0
    false_ready: list[str] = field(default_factory=list)
    cut_off: int = 0

    def run(self) -> None:
        session = requests.Session()
        job = {"prompt": "check", "num_inference_steps": 1, "timeout_s": 30}
        while not self.stopped():
            said_ready = time.monotonic()
            try:
                ready = session.get(self.url + "/readyz", timeout=10).status_code == 200
            except requests.RequestException:
                continue
            self.checks += 1
            if not ready:
                time.sleep(0.01)
                continue
            self.ready_checks += 1
            try:
                response = session.post(self.url + "/generate", json=job, timeout=60)
            except requests.RequestException:
                self.cut_off += 1
                continue
            if response.status_code == 503 and response.json()["error"]["code"] in NOT_LOADED:
                self.false_ready_s += time.monotonic() - said_ready
                self.false_ready.append(response.json()["error"]["message"])


@dataclass
class OneAtATime(Background):
    """A client sending one /generate at a time on a new connection each, until stopped (the peer harness's
    load): what it got back, an HTTP status or "cut off" (the connection died with a killed worker)."""

    url: str
    outcomes: list[int | str] = field(default_factory=list)

    def run(self) -> None:
        job = {"prompt": "one at a time", "num_inference_steps": 1, "timeout_s": 30}
        while not self.stopped():
            try:
                self.outcomes.append(requests.post(self.url + "/generate", json=job, timeout=60).status_code)
            except requests.RequestException:
                self.outcomes.append("cut off")

    def failed(self) -> list[int | str]:
        return [outcome for outcome in self.outcomes if outcome not in (200, "cut off")]


def two_workers(cache: str, samples: int, kills: int) -> dict:
    env = {"WEB_CONCURRENCY": "2", "HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S)}
    result: dict = {}
    with server(cache, **env) as (url, _, _), Checker(url) as checker:
        _, response = poll(url + "/readyz", lambda r: r.status_code == 200, 600)
        result["healthz_idle"] = healthz_latencies(url, samples)

        # Both workers busy: 8 clients keep each one's queue full while /healthz is sampled.
        stop = threading.Event()
        load = threading.Thread(target=traffic.drive, args=(url, 8, 600.0, stop))
        load.start()
        try:
            poll(url + "/readyz", lambda r: all(w["in_flight"] > 0 for w in r.json()["workers"]), 60)
            result["healthz_busy"] = healthz_latencies(url, samples)
            busy = requests.get(url + "/readyz", timeout=10).json()["workers"]
            result["busy_workers"] = sum(w["in_flight"] > 0 for w in busy)
        finally:
            stop.set()
            load.join(180)

        # SIGKILL one worker, `kills` times, each once the last replacement is READY and the one-at-a-time
        # client has had answers since; the checker and that client run all along.
        result["sigkill_503_s"], result["sigkill_200_s"] = [], []
        with OneAtATime(url) as client:
            for _ in range(kills):
                answered = len(client.outcomes)
                poll(url + "/readyz", lambda r, n=answered: len(client.outcomes) >= n + 3, 120)
                victim = response.json()["workers"][0]["pid"]
                killed = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                flipped, _ = poll(url + "/readyz", lambda r: r.status_code == 503, 30, interval=0)
                healed, response = poll(url + "/readyz", lambda r: r.status_code == 200, 600, interval=0.01)
                result["sigkill_503_s"].append(flipped - killed)
                result["sigkill_200_s"].append(healed - killed)
            answered = len(client.outcomes)
            poll(url + "/readyz", lambda r: len(client.outcomes) >= answered + 3, 120)
        result["one_at_a_time"] = client

        frozen = response.json()["workers"][0]["pid"]
        stopped = time.monotonic()
        os.kill(frozen, signal.SIGSTOP)
        try:
            flipped, _ = poll(url + "/readyz", lambda r: r.status_code == 503, 60, interval=0)
        finally:
            os.kill(frozen, signal.SIGCONT)
        result["sigstop_503_s"] = flipped - stopped
        poll(url + "/readyz", lambda r: r.status_code == 200, 60)
    result["checker"] = checker
    return result


@dataclass
class Spread:
    median: float
    text: str


def spread(values: list[float]) -> Spread:
    """The median of ``values`` (seconds), shown with its range."""
    middle = statistics.median(values)
    return Spread(middle, f"{middle:.2f} s ({min(values):.2f}-{max(values):.2f})")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every run the table needs, alternated where the host's noise would otherwise favour one side."""
    with tempfile.TemporaryDirectory() as cache:
        if args.runs > 1:  # a start to warm the page cache (and build a model that needs building) unmeasured
            with bare_start(cache):
                pass
        # Startup is noisy here (the import alone varies by seconds): alternate several starts of each. The
        # last bare process and one-worker server stay up for the per-image pairs, saving a start of each.
        bare_starts, server_starts, pair_starts = [], [], []
        for run in range(args.runs):
            with bare_start(cache) as (bare, process):
                bare_starts.append(bare)
                last = run == args.runs - 1
                pairs = functools.partial(paired_images, process, images=args.images) if last else None
                server_starts.append(server_start(cache, 1, then=pairs))
            pair_starts.append(server_start(cache, 2))
        unshared = server_start(cache, 2, MASTER_PREIMPORT="0")  # as before docs/architecture.md §13
        images = {**server_starts[-1]["then"], "size": bare_starts[-1]["size"]}
        pair = two_workers(cache, args.samples, args.runs)
        rows = {name: traffic.run_server(cache, size, 8, args.seconds) for name, size in (("off", 1), ("on", 4))}
    return {
        "bare_starts": bare_starts,
        "server_starts": server_starts,
        "pair_starts": pair_starts,
        "unshared": unshared,
        "images": images,
        "pair": pair,
        **rows,
    }


def start_rows(measured: dict[str, Any], runs: int) -> list[tuple[str, str, str, str]]:
    """Starts, each beside the bare process on the same clock (from the process's start, interpreter
    included): to /healthz, to /readyz and to the first image, with one and two workers."""
    bare = measured["bare_starts"]
    bare_ready = spread([b["ready_s"] for b in bare])
    bare_image = spread([b["first_image_s"] for b in bare])
    parts = {key: statistics.median(b[key] for b in bare) for key in ("import_s", "load_s", "warmup_s")}
    healthz_s = spread([r["healthz_s"] for r in measured["server_starts"]])
    port_s = spread([r["port_s"] for r in measured["server_starts"]])
    rows = [
        (
            f"start to the port open, a TCP probe passes (median of {runs})",
            port_s.text,
            "the master binds before it imports the app (docs/architecture.md §13)",
            f"{port_s.median / healthz_s.median:.2f}x start to /healthz",
        ),
        (
            f"start to /healthz 200 (median of {runs})",
            healthz_s.text,
            f"bare start to loaded and warmed up {bare_ready.text}",
            f"{healthz_s.median / bare_ready.median:.2f}x",
        ),
    ]
    for workers, starts in ((1, measured["server_starts"]), (2, measured["pair_starts"])):
        ready = spread([r["readyz_s"] for r in starts])
        image = spread([r["first_image_s"] for r in starts])
        rows.append(
            (
                f"start to /readyz 200, {workers} worker{'s' * (workers > 1)} (median of {runs})",
                ready.text,
                f"bare {bare_ready.text}: import {parts['import_s']:.2f} + load {parts['load_s']:.2f} + "
                f"warm-up {parts['warmup_s']:.2f} s",
                f"{ready.median / bare_ready.median:.2f}x ({ready.median - bare_ready.median:+.2f} s)",
            )
        )
        rows.append(
            (
                f"start to first image, {workers} worker{'s' * (workers > 1)} (median of {runs})",
                image.text,
                f"bare process to its first image {bare_image.text}",
                f"{image.median / bare_image.median:.2f}x ({image.median - bare_image.median:+.2f} s)",
            )
        )
    unshared = measured["unshared"]
    rows.append(
        (
            "start to /readyz 200 / first image, 2 workers, MASTER_PREIMPORT=0 (1 run)",
            f"{unshared['readyz_s']:.2f} s / {unshared['first_image_s']:.2f} s",
            "each worker imports for itself (before docs/architecture.md §13)",
            f"{unshared['readyz_s'] / bare_ready.median:.2f}x / {unshared['first_image_s'] / bare_image.median:.2f}x",
        )
    )
    return rows


def memory_rows(measured: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The memory of a ready two-worker server that has drawn an image, with the master's imports and
    without: Pss divides each shared page among its sharers, so the sum is what the container holds."""

    def text(memory: dict[str, Any]) -> tuple[str, float]:
        master, workers = memory["master"], memory["workers"]
        total = master["Pss"] + sum(w["Pss"] for w in workers)
        rss = " + ".join(f"{w['Rss']:.0f}" for w in workers)
        peak = max(w["VmHWM"] for w in workers)
        shown = (
            f"Pss total {total:.0f} MB; master Rss {master['Rss']:.0f} / Pss {master['Pss']:.0f} MB; workers Rss "
            f"{rss} MB, peak {peak:.0f} MB"
        )
        return shown, total

    shared, shared_total = text(measured["pair_starts"][-1]["memory"])
    unshared, unshared_total = text(measured["unshared"]["memory"])
    return [
        (
            "memory, 2 workers, master imports the model code",
            shared,
            f"MASTER_PREIMPORT=0: {unshared}",
            f"{shared_total / unshared_total:.2f}x Pss ({shared_total - unshared_total:+.0f} MB)",
        )
    ]


def fault_rows(measured: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    pair = measured["pair"]
    checker: Checker = pair["checker"]
    client: OneAtATime = pair["one_at_a_time"]
    one_worker_ready = spread([r["readyz_s"] for r in measured["server_starts"]]).median
    idle, busy = pair["healthz_idle"], pair["healthz_busy"]
    return [
        (
            "false-ready time (2 workers, start + kill + stop)",
            f"{checker.false_ready_s:.3f} s",
            f"must be 0; {checker.ready_checks} /readyz 200s of {checker.checks} each followed by a /generate",
            "pass" if not checker.false_ready else "FAIL: " + "; ".join(checker.false_ready[:3]),
        ),
        (
            "checker requests cut off by the SIGKILLs",
            str(checker.cut_off),
            "in flight on a killed worker",
            "at most one per kill",
        ),
        (
            "SIGKILL of a worker to /readyz 503",
            ms(max(pair["sigkill_503_s"])) + " (the slowest)",
            f"HEARTBEAT_TIMEOUT {HEARTBEAT_TIMEOUT_S:g} s (the pid check comes first)",
            f"{max(pair['sigkill_503_s']) / HEARTBEAT_TIMEOUT_S:.3f}x",
        ),
        (
            f"SIGKILL to /readyz 200 again (replacement loaded, median of {len(pair['sigkill_200_s'])})",
            spread(pair["sigkill_200_s"]).text,
            f"one-worker start to /readyz 200 {one_worker_ready:.2f} s",
            f"{spread(pair['sigkill_200_s']).median / one_worker_ready:.2f}x",
        ),
        (
            f"requests failed through {len(pair['sigkill_200_s'])} SIGKILLs, one client, one request at a time",
            f"{len(client.failed())} of {len(client.outcomes)}",
            f"must be 0 (a 503 from a loading worker counts); cut off in flight: {client.outcomes.count('cut off')}",
            "pass" if not client.failed() else "FAIL: " + ", ".join(map(str, client.failed()[:5])),
        ),
        (
            "SIGSTOP of a worker to /readyz 503",
            f"{pair['sigstop_503_s']:.2f} s",
            f"HEARTBEAT_TIMEOUT {HEARTBEAT_TIMEOUT_S:g} s",
            f"{pair['sigstop_503_s'] / HEARTBEAT_TIMEOUT_S:.2f}x",
        ),
        (
            f"/healthz p50 / p99, {pair['busy_workers']} of 2 workers generating",
            f"{ms(percentile(busy, 0.5))} / {ms(percentile(busy, 0.99))}",
            f"idle {ms(percentile(idle, 0.5))} / {ms(percentile(idle, 0.99))}",
            f"{percentile(busy, 0.5) / percentile(idle, 0.5):.1f}x / "
            f"{percentile(busy, 0.99) / percentile(idle, 0.99):.1f}x",
        ),
    ]


def traffic_rows(measured: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    images, off, on = measured["images"], measured["off"], measured["on"]
    bare_image = statistics.median(images["bare_s"])
    http_image = statistics.median(images["http_s"])
    overhead = statistics.median(h - b for h, b in zip(images["http_s"], images["bare_s"], strict=True))
    width, height = images["size"]
    return [
        (
            f"one image through HTTP, p50 ({width}x{height}, {STEPS} steps)",
            ms(http_image),
            f"bare pipeline call, same arguments, p50 {ms(bare_image)}",
            f"{http_image / bare_image:.2f}x; per pair p50 {overhead * 1000:+.1f} ms",
        ),
        (
            "throughput, 8 clients, batching on",
            f"{on['images_per_s']:.2f} images/s",
            f"batching off {off['images_per_s']:.2f} images/s",
            f"{on['images_per_s'] / off['images_per_s']:.2f}x",
        ),
        (
            "accepted p50 / p99, 8 clients, batching on",
            f"{on['accepted_p50_ms']:.0f} / {on['accepted_p99_ms']:.0f} ms",
            f"batching off {off['accepted_p50_ms']:.0f} / {off['accepted_p99_ms']:.0f} ms",
            f"{on['accepted_p99_ms'] / off['accepted_p99_ms']:.2f}x at p99",
        ),
        (
            "shed (503) answer p50 / p99, batching off / on",
            f"{traffic.ms_text(off['rejected_p50_ms'])} / {traffic.ms_text(off['rejected_p99_ms'])} ms; "
            f"{traffic.ms_text(on['rejected_p50_ms'])} / {traffic.ms_text(on['rejected_p99_ms'])} ms",
            f"accepted p50 off {off['accepted_p50_ms']:.0f} ms",
            f"{off['rejected']} / {on['rejected']} shed",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="single-image calls, bare and through HTTP")
    parser.add_argument("--samples", type=int, default=300, help="/healthz samples, idle and busy")
    parser.add_argument("--seconds", type=float, default=8.0, help="load time per traffic row")
    parser.add_argument("--runs", type=int, default=3, help="starts of each kind, and SIGKILLs")
    args = parser.parse_args()

    measured = measure(args)
    table = start_rows(measured, args.runs) + memory_rows(measured) + fault_rows(measured) + traffic_rows(measured)
    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, tiny offline model; "
        f"{args.images} images, {args.samples} /healthz samples, {args.seconds:g} s per traffic row, "
        f"{args.runs} starts\n"
    )
    print("| measure | value | compared to | ratio |")
    print("|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    checker: Checker = measured["pair"]["checker"]
    errors = measured["off"]["errors"] + measured["on"]["errors"]
    failed = measured["pair"]["one_at_a_time"].failed()
    if errors or checker.false_ready or failed:
        print(
            f"\nFAILED: {len(checker.false_ready)} false-ready answers, {errors} traffic errors other than 503, "
            f"{len(failed)} requests failed through a SIGKILL"
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
