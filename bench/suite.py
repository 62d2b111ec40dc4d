"""The benchmark suite: every figure the server promises, each beside what it is compared to, as one
markdown table. Run from the repository root (about four minutes on 2 CPUs):

    .venv/bin/python bench/suite.py

1. The bare pipeline in a fresh process (bench/bare.py): import + load + warm-up, and per-image latency.
2. One worker: start to /healthz and to /readyz 200 against (1); per-image latency through HTTP against (1).
3. Two workers, with a checker sending /readyz and then /generate all along: /healthz idle and while both
   workers generate; a worker SIGKILLed and one SIGSTOPped, to /readyz 503; false-ready time.
4. One worker under closed-loop load, batching off and on: throughput and shed latency (bench/traffic.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests
import traffic
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


def bare_start(cache: str) -> dict:
    """Import + load + warm-up of the bare pipeline in a fresh process."""
    with bare_process(cache) as bare:
        header = json.loads(bare.stdout.readline())
        bare.stdin.close()
    return header


def one_worker_start(cache: str) -> dict:
    """Start to /healthz 200 and to /readyz 200 of a one-worker server."""
    with server(cache, WEB_CONCURRENCY="1") as (url, _, start):
        answered, _ = poll(url + "/healthz", lambda r: r.status_code == 200, 60)
        # Every 50 ms, like an eager probe: polling flat out would take CPU from the load being timed.
        ready, _ = poll(url + "/readyz", lambda r: r.status_code == 200, 600, interval=0.05)
    return {"healthz_s": answered - start, "readyz_s": ready - start}


def paired_images(cache: str, images: int) -> dict:
    """``images`` single-image calls each to the bare pipeline and through a one-worker server, alternated,
    so both see the same host; the same seeds and arguments on both sides."""
    bare_s, http_s = [], []
    with bare_process(cache) as bare, server(cache, WEB_CONCURRENCY="1") as (url, _, _), requests.Session() as http:
        size = json.loads(bare.stdout.readline())["size"]
        poll(url + "/readyz", lambda r: r.status_code == 200, 600, interval=0.05)
        for seed in range(images):
            bare.stdin.write(f"{seed}\n")
            bare.stdin.flush()
            bare_s.append(float(bare.stdout.readline()))
            job = {"prompt": PROMPT, "num_inference_steps": STEPS, "seed": seed}
            sent = time.perf_counter()
            http.post(url + "/generate", json=job, timeout=120).raise_for_status()
            http_s.append(time.perf_counter() - sent)
        bare.stdin.close()
    return {"bare_s": bare_s, "http_s": http_s, "size": size}


@dataclass
class Checker:
    """Sends /readyz, and after each 200 at once a one-step /generate, until stopped. A /generate refused
    for want of a loaded pipeline right after a 200 is false readiness: the time from that 200 to the
    refusal is added up. Requests cut off by a kill are counted apart (the worker was ready when asked)."""

    url: str
    checks: int = 0
    ready_checks: int = 0
    false_ready_s: float = 0.0
    false_ready: list[str] = field(default_factory=list)
    cut_off: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        session = requests.Session()
        job = {"prompt": "check", "num_inference_steps": 1, "timeout_s": 30}
        while not self._stop.is_set():
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

    def __enter__(self) -> Checker:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)


def healthz_latencies(url: str, samples: int) -> list[float]:
    out = []
    with requests.Session() as session:
        for _ in range(samples):
            sent = time.perf_counter()
            assert session.get(url + "/healthz", timeout=10).status_code == 200
            out.append(time.perf_counter() - sent)
    return out


def two_workers(cache: str, samples: int) -> dict:
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

        victim = response.json()["workers"][0]["pid"]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        flipped, _ = poll(url + "/readyz", lambda r: r.status_code == 503, 30)
        healed, response = poll(url + "/readyz", lambda r: r.status_code == 200, 600)
        result["sigkill_503_s"] = flipped - killed
        result["sigkill_200_s"] = healed - killed

        frozen = response.json()["workers"][0]["pid"]
        stopped = time.monotonic()
        os.kill(frozen, signal.SIGSTOP)
        try:
            flipped, _ = poll(url + "/readyz", lambda r: r.status_code == 503, 60)
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
        bare_start(cache)  # builds the tiny model into the cache, so no measured run pays for that
        # Startup is noisy here (the import alone varies by seconds): alternate several starts of each.
        bare_starts, server_starts = [], []
        for _ in range(args.runs):
            bare_starts.append(bare_start(cache))
            server_starts.append(one_worker_start(cache))
        images = paired_images(cache, args.images)
        pair = two_workers(cache, args.samples)
        rows = {name: traffic.run_server(cache, size, 8, args.seconds) for name, size in (("off", 1), ("on", 4))}
    return {"bare_starts": bare_starts, "server_starts": server_starts, "images": images, "pair": pair, **rows}


def start_rows(measured: dict[str, Any], runs: int) -> list[tuple[str, str, str, str]]:
    bare_starts = measured["bare_starts"]
    bare_total = spread([b["total_s"] for b in bare_starts])
    healthz_s = spread([r["healthz_s"] for r in measured["server_starts"]])
    readyz_s = spread([r["readyz_s"] for r in measured["server_starts"]])
    parts = {key: statistics.median(b[key] for b in bare_starts) for key in ("import_s", "load_s", "warmup_s")}
    return [
        (
            f"start to /healthz 200 (median of {runs})",
            healthz_s.text,
            f"bare import + load + warm-up {bare_total.text}",
            f"{healthz_s.median / bare_total.median:.2f}x",
        ),
        (
            f"start to /readyz 200, 1 worker (median of {runs})",
            readyz_s.text,
            f"bare {bare_total.median:.2f} s: import {parts['import_s']:.2f} + load {parts['load_s']:.2f} + "
            f"warm-up {parts['warmup_s']:.2f} s",
            f"{readyz_s.median / bare_total.median:.2f}x ({readyz_s.median - bare_total.median:+.2f} s)",
        ),
    ]


def fault_rows(measured: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    pair = measured["pair"]
    checker: Checker = pair["checker"]
    one_worker_ready = spread([r["readyz_s"] for r in measured["server_starts"]]).median
    idle, busy = pair["healthz_idle"], pair["healthz_busy"]
    return [
        (
            "false-ready time (2 workers, start + kill + stop)",
            f"{checker.false_ready_s:.3f} s",
            f"must be 0; {checker.ready_checks} /readyz 200s of {checker.checks} each followed by a /generate",
            "pass" if not checker.false_ready else "FAIL: " + "; ".join(checker.false_ready[:3]),
        ),
        ("requests cut off by the SIGKILL", str(checker.cut_off), "in flight on the killed worker", "expected: 0 or 1"),
        (
            "SIGKILL of a worker to /readyz 503",
            ms(pair["sigkill_503_s"]),
            f"HEARTBEAT_TIMEOUT {HEARTBEAT_TIMEOUT_S:g} s (the pid check comes first)",
            f"{pair['sigkill_503_s'] / HEARTBEAT_TIMEOUT_S:.3f}x",
        ),
        (
            "SIGKILL to /readyz 200 again (replacement loaded)",
            f"{pair['sigkill_200_s']:.2f} s",
            f"one-worker start to /readyz 200 {one_worker_ready:.2f} s",
            f"{pair['sigkill_200_s'] / one_worker_ready:.2f}x",
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
    parser.add_argument("--runs", type=int, default=3, help="starts of the bare pipeline and of one worker")
    args = parser.parse_args()

    measured = measure(args)
    table = start_rows(measured, args.runs) + fault_rows(measured) + traffic_rows(measured)
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
    if errors or checker.false_ready:
        print(f"\nFAILED: {len(checker.false_ready)} false-ready answers, {errors} traffic errors other than 503")
        sys.exit(1)


if __name__ == "__main__":
    main()
