"""Probe latency while slow and idle clients hold connections. Prints a markdown table.

    .venv/bin/python bench/slowclients.py --seconds 30 --connections 200

A two-worker server on the tiny model (THREADS=16 each). For ``--seconds``, one prober sends /healthz and
/readyz in turn (one at a time, 2 s timeout, 10 ms apart) and records each answer's latency; meanwhile holders keep
``--connections`` connections of each kind open, opening a new one whenever the server closes one:
- slow headers: half a request line and headers, then a byte every 2 s;
- slow body: whole headers with Content-Length: 64, then 5 bytes of the body and a byte every 2 s;
- idle: connected, nothing sent.
Rows: no held connections (the baseline); the held connections against this server's worker
(webapp/server/gthread.py); the same against gunicorn's stock gthread worker (`-k gthread`), the design before.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import threading
import time

import requests
from servers import poll, server
from traffic import percentile

HEAD = b"POST /generate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
KINDS = {
    "slow headers": HEAD[:30],
    "slow body": HEAD + b"Content-Length: 64\r\n\r\n" + b'{"pro',
    "idle": b"",
}


def hold(port: int, first: bytes, count: int, stop: threading.Event, opened: list[int]) -> None:
    """Keep ``count`` connections that sent ``first`` open until ``stop``, replacing any the server closes."""
    socks: list[socket.socket] = []
    try:
        while not stop.is_set():
            socks = [s for s in socks if _still_open(s)]
            while len(socks) < count and not stop.is_set():
                with contextlib.suppress(OSError):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                    sock.setblocking(False)
                    if first:
                        sock.send(first)
                    socks.append(sock)
                    opened[0] += 1
            for sock in socks:
                if first:
                    with contextlib.suppress(OSError):
                        sock.send(b"x")  # still sending: never finished, never silent
            stop.wait(2.0)
    finally:
        for sock in socks:
            sock.close()


def _still_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536, socket.MSG_PEEK) != b""  # data (a 408) or EOF means the server let it go
    except BlockingIOError:
        return True
    except OSError:
        return False


def probe(url: str, seconds: float) -> dict[str, dict[str, float]]:
    """/healthz and /readyz in turn, one at a time, every 20 ms: count, failures, p50 and p99 of each."""
    latencies: dict[str, list[float]] = {"/healthz": [], "/readyz": []}
    failures = dict.fromkeys(latencies, 0)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for path, seen in latencies.items():
            started = time.perf_counter()
            try:
                ok = requests.get(url + path, timeout=2).status_code == 200
            except requests.RequestException:
                ok = False
            seen.append((time.perf_counter() - started) * 1000)
            failures[path] += not ok
            time.sleep(0.01)
    return {
        path: {
            "probes": len(seen),
            "failures": failures[path],
            "p50": percentile(seen, 0.5),
            "p99": percentile(seen, 0.99),
        }
        for path, seen in latencies.items()
    }


def run(cache: str, label: str, seconds: float, connections: tuple[int, ...], *args: str) -> str:
    """The probes' latency on one server with each number of ``connections`` of each kind held open in turn
    (0: none), one table row per probe and number."""
    rows = []
    with server(cache, *args, WEB_CONCURRENCY="2", THREADS="16") as (url, _, _):
        poll(url + "/readyz", lambda r: r.status_code == 200, 300, interval=0.1)
        port = int(url.rsplit(":", 1)[1])
        for count in connections:
            stop = threading.Event()
            opened = [0]
            holders = [
                threading.Thread(target=hold, args=(port, first, count, stop, opened), daemon=True)
                for first in (KINDS.values() if count else [])
            ]
            for thread in holders:
                thread.start()
            if holders:
                deadline = time.monotonic() + 60
                while opened[0] < count * len(KINDS) and time.monotonic() < deadline:
                    time.sleep(0.05)  # wait until every connection is open before timing the probes
            result = probe(url, seconds)
            stop.set()
            for thread in holders:
                thread.join(timeout=10)
            held = f"{count} of each kind ({opened[0]} opened)" if count else "none"
            rows += [
                f"| {label} | {held} | {path} | {r['probes']:.0f} | {r['failures']:.0f} | {r['p50']:.1f} | "
                f"{r['p99']:.1f} |"
                for path, r in result.items()
            ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--connections", type=int, default=200, help="held connections of each kind")
    parser.add_argument("--skip-stock", action="store_true", help="leave out the stock gthread row")
    options = parser.parse_args()
    cache = os.environ.get("MODEL_CACHE_DIR") or tempfile.mkdtemp(prefix="bench-cache-")
    print("| worker | held connections | probe | sent | failed | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    ours = "this server's (webapp/server/gthread.py)"
    print(run(cache, ours, options.seconds, (0, options.connections)), flush=True)
    if not options.skip_stock:
        stock = run(cache, "gunicorn's stock gthread", options.seconds, (options.connections,), "-k", "gthread")
        print(stock, flush=True)


if __name__ == "__main__":
    main()
