"""Upload bombs against one worker: 40 clients at once each send an edit whose PNG is a few kilobytes but
declares just under MAX_UPLOAD_PIXELS, while /readyz is probed from another process. Run from the repository
root:

    .venv/bin/python bench/uploads.py

One worker of the embedded model, with the server's defaults otherwise. Each burst goes through a route:
``/generate`` (base64 in JSON), ``/v1/images/edits`` (multipart), and both at once, half each. Every burst
runs twice: at the default pixel limit ((4 x the model's largest side) squared: 1024x1024 here), and at the
16.7 MP an operator may set (MAX_UPLOAD_PIXELS=16777216, the old default), each bomb just under it.

Printed beside the idle figures: /readyz latency (p50, p99, max) and failures (an answer other than 200, or
none within 5 s) while the burst runs, the worker's peak resident memory (VmRSS, sampled every 20 ms)
against its idle size, how the 40 were answered (200, 503 with Retry-After, other), and the time an accepted
edit took under the burst against one alone. No test asserts these figures; tests/test_bench.py runs it short.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image
from servers import poll, server

from tests.conftest import rss_mb

PROMPT = "a blue circle on a white background"
STEPS = 4
SAMPLER = """
import json, sys, time
import requests
url, stop_file = sys.argv[1], sys.argv[2]
samples = []
with requests.Session() as session:
    while True:
        sent = time.perf_counter()
        try:
            status = session.get(url + "/readyz", timeout=5).status_code
        except requests.RequestException:
            status = 0
        samples.append((time.perf_counter() - sent, status))
        if open(stop_file).read():
            break
        time.sleep(0.01)
print(json.dumps(samples))
"""


def bomb(pixels: int) -> bytes:
    """A real PNG of one colour, just under ``pixels``: a few kilobytes that decode to every pixel."""
    side = int(pixels**0.5)
    height = pixels // side - 1
    buffer = io.BytesIO()
    Image.new("RGB", (side, height), (200, 30, 30)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def send(url: str, route: str, data: bytes) -> tuple[int, bool, float]:
    """One edit through ``route``: (status, whether it said Retry-After, seconds)."""
    started = time.perf_counter()
    if route == "/generate":
        body = {
            "prompt": PROMPT,
            "image": base64.b64encode(data).decode("ascii"),
            "width": 64,
            "height": 64,
            "num_inference_steps": STEPS,
            "seed": 1,
        }
        answer = requests.post(url + route, json=body, timeout=300)
    else:
        fields = {"prompt": PROMPT, "size": "64x64", "num_inference_steps": str(STEPS), "seed": "1"}
        answer = requests.post(url + route, data=fields, files={"image": ("bomb.png", data, "image/png")}, timeout=300)
    return answer.status_code, "Retry-After" in answer.headers, time.perf_counter() - started


def burst(url: str, pid: int, routes: list[str], data: bytes, clients: int) -> dict:
    """``clients`` edits at once, each through the next of ``routes``, with /readyz sampled from another
    process and the worker's memory every 20 ms."""
    with tempfile.NamedTemporaryFile("w", delete=False) as stop:
        stop_path = stop.name
    sampler = subprocess.Popen([sys.executable, "-c", SAMPLER, url, stop_path], stdout=subprocess.PIPE, text=True)
    peak = [rss_mb(pid)]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak.append(rss_mb(pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.3)  # probes already flowing when the burst lands
    try:
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda i: send(url, routes[i % len(routes)], data), range(clients)))
    finally:
        done.set()
        watcher.join()
        Path(stop_path).write_text("stop")
        out, _ = sampler.communicate(timeout=60)
        os.unlink(stop_path)
    probes = json.loads(out)
    return {"answers": answers, "probes": probes, "peak_mb": max(peak)}


def alone(url: str, route: str, data: bytes, runs: int) -> float:
    """The median seconds of one edit with nothing else running."""
    return statistics.median(send(url, route, data)[2] for _ in range(runs))


def row(label: str, limit: int, idle_mb: float, alone_s: float, result: dict) -> str:
    latencies = sorted(seconds * 1000 for seconds, _ in result["probes"])
    failed = sum(1 for _, status in result["probes"] if status != 200)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    answers = result["answers"]
    served = [seconds for status, _, seconds in answers if status == 200]
    shed = sum(1 for status, retry, _ in answers if status == 503 and retry)
    other = len(answers) - len(served) - shed
    under = statistics.median(served) if served else float("nan")
    peak = result["peak_mb"]
    return (
        f"| {label} | {limit} | {len(latencies)} | {statistics.median(latencies):.1f} / {p99:.1f} / "
        f"{latencies[-1]:.1f} | {failed} | {idle_mb:.0f} | {peak:.0f} (+{peak - idle_mb:.0f}) "
        f"| {len(served)} / {shed} / {other} | {under:.2f} s | {alone_s:.2f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3, help="edits alone, for the median time of one")
    parser.add_argument(
        "--limits", default="default,16777216", help="pixel limits to run at: default and/or numbers, comma-separated"
    )
    args = parser.parse_args()
    routes = {
        "/generate": ["/generate"],
        "/v1/images/edits": ["/v1/images/edits"],
        "both at once": ["/generate", "/v1/images/edits"],
    }
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for limit_text in args.limits.split(","):
            env = {} if limit_text == "default" else {"MAX_UPLOAD_PIXELS": limit_text}
            limit = 1024 * 1024 if limit_text == "default" else int(limit_text)
            data = bomb(limit)
            with server(cache, WEB_CONCURRENCY="1", **env) as (url, _, _):
                _, ready = poll(url + "/readyz", lambda r: r.status_code == 200, 600, 0.1)
                pid = ready.json()["workers"][0]["pid"]
                send(url, "/generate", data)  # warm: the first edit's allocations are not the burst's
                alone_s = alone(url, "/generate", data, args.runs)
                for label, chosen in routes.items():
                    time.sleep(1.0)  # the allocator settles after the last burst
                    idle = rss_mb(pid)
                    rows.append(row(label, limit, idle, alone_s, burst(url, pid, chosen, data, args.clients)))
    print(
        f"\none worker, embedded model; {args.clients} clients at once, each one edit of a {len(data)} B PNG declaring "
        f"just under the limit, asked at 64x64 with {STEPS} steps; /readyz every 10 ms from another process "
        f"(timeout 5 s); {os.cpu_count()} CPUs\n"
    )
    print(
        "| route | MAX_UPLOAD_PIXELS | probes | /readyz p50 / p99 / max ms | probes failed | idle RSS MB | "
        "peak RSS MB | served / shed 503+Retry-After / other | accepted edit, median | one edit alone |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for line in rows:
        print(line)


if __name__ == "__main__":
    main()
