"""HAProxy, steered only by /readyz, in front of two instances of the server: does any client request
fail while the other instance is ready? Prints a markdown report. Run from the repository root:

    .venv/bin/python bench/loadbalancer.py          (needs Debian's haproxy on PATH)

Scenario, with steady client traffic through HAProxy all along:
1. instance A is ready; instance B loads slowly (its load waits on a gate): HAProxy must keep it out;
2. B's gate opens: HAProxy brings B in once its /readyz says 200;
3. a worker of A is SIGKILLed: A leaves the pool until its replacement has loaded (held by A's gate until
   HAProxy has marked A down);
4. B is drained with SIGTERM: it leaves the pool and exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests
from servers import ROOT, free_port, poll, server

HAPROXY_CONFIG = """\
global
    stats socket {socket} mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # A request that found a dying worker (connection reset, empty answer) or a 503 goes to the other server.
    option http-buffer-request
    retries 3
    retry-on conn-failure empty-response response-timeout 503
    option redispatch 1
frontend front
    bind 127.0.0.1:{front}
    default_backend instances
backend instances
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter {inter_ms}ms fall 2 rise 2
    server a 127.0.0.1:{port_a} check
    server b 127.0.0.1:{port_b} check
"""
JOB = {"prompt": "through the balancer", "num_inference_steps": 2}


@dataclass
class Traffic:
    """Closed-loop clients through HAProxy; every outcome is kept with its time."""

    url: str
    outcomes: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, clients: int) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        return threads

    def _client(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            try:
                response = session.post(self.url + "/generate", json=JOB, timeout=60)
                outcome = "ok" if response.status_code == 200 else f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            self.outcomes.append((time.monotonic(), outcome))

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, str]]:
        return [o for o in self.outcomes if o[1] != "ok" and since <= o[0] <= until]


class HAProxy:
    def __init__(self, workdir: Path, port_a: int, port_b: int, inter_ms: int) -> None:
        self.socket = workdir / "haproxy.sock"
        self.front = free_port()
        config = workdir / "haproxy.cfg"
        config.write_text(
            HAPROXY_CONFIG.format(socket=self.socket, front=self.front, inter_ms=inter_ms, port_a=port_a, port_b=port_b)
        )
        self.url = f"http://127.0.0.1:{self.front}"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def status(self) -> dict[str, str]:
        """Each server's state as HAProxy sees it now (UP, DOWN, ...), from its stats socket."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.socket))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {
            r["svname"]: r["status"].split()[0]
            for r in rows
            if r.get("pxname") == "instances" and r["svname"] in ("a", "b")
        }

    def wait_status(self, name: str, wanted: str, deadline_s: float) -> float:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            with contextlib.suppress(OSError, IndexError, KeyError):
                if self.status().get(name) == wanted:
                    return time.monotonic()
            time.sleep(0.02)
        raise TimeoutError(f"HAProxy never marked {name} {wanted} within {deadline_s} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def ready(url: str) -> dict:
    return poll(url + "/readyz", lambda r: r.status_code == 200, 300)[1].json()


@contextlib.contextmanager
def scenario_servers(cache: str, workdir: Path) -> Iterator[tuple[tuple, tuple, Path, Path]]:
    """A and B, each loading through a gate file: B's starts closed (a slow load), A's open; A's is closed
    before its worker is killed, so the replacement's load lasts until the scenario opens it (with the model
    code inherited from the master it would otherwise take well under HAProxy's two checks)."""
    gate_a, gate_b = workdir / "gate-a", workdir / "gate-b"
    gate_a.touch()
    env = {
        "WEB_CONCURRENCY": "2",
        "PYTHONPATH": str(ROOT),
        "GRACEFUL_TIMEOUT": "20",
        "MODEL_LOADER": "tests.loaders:gated",
    }
    with server(cache, **env, GATE_FILE=str(gate_a)) as a, server(cache, **env, GATE_FILE=str(gate_b)) as b:
        yield a, b, gate_a, gate_b


def run(inter_ms: int = 300, clients: int = 2) -> dict[str, object]:
    """Play the scenario; return the counts and the times HAProxy took to mark servers down and up."""
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        with scenario_servers(scratch, workdir) as ((url_a, _, _), (url_b, proc_b, _), gate_a, gate):
            a_workers = ready(url_a)["workers"]
            port_a, port_b = int(url_a.rsplit(":", 1)[1]), int(url_b.rsplit(":", 1)[1])
            haproxy = HAProxy(workdir, port_a, port_b, inter_ms)
            try:
                haproxy.wait_status("a", "UP", 30)
                # HAProxy 2.6 starts every server as UP until `fall` checks fail (there is no init-state
                # before 3.x), so traffic starts once it has judged B, as it would for a server added later.
                report["HAProxy start -> B DOWN while loading (s)"] = (
                    haproxy.wait_status("b", "DOWN", 30) - haproxy.started
                )
                traffic = Traffic(haproxy.url)
                threads = traffic.run(clients)

                # 1. B loads slowly: it must stay out of the pool while its /readyz says 503.
                poll(url_b + "/healthz", lambda r: r.status_code == 200, 60)
                loading_since = time.monotonic()
                while time.monotonic() - loading_since < 3:
                    assert haproxy.status()["b"] != "UP", "HAProxy routed to an instance that is still loading"
                    time.sleep(0.05)

                # 2. B becomes ready: HAProxy brings it in.
                gate.touch()
                b_ready = time.monotonic()
                ready(url_b)
                report["B ready -> HAProxy UP (s)"] = haproxy.wait_status("b", "UP", 60) - b_ready

                # 3. SIGKILL one of A's workers: A out until its replacement loads, B carries the traffic.
                gate_a.unlink()
                killed = time.monotonic()
                os.kill(a_workers[0]["pid"], signal.SIGKILL)
                report["worker SIGKILL -> A DOWN (s)"] = haproxy.wait_status("a", "DOWN", 30) - killed
                gate_a.touch()
                opened = time.monotonic()
                report["A's replacement may load -> A UP again (s)"] = haproxy.wait_status("a", "UP", 300) - opened

                # 4. Drain B with SIGTERM: it leaves the pool; A carries the traffic.
                drained = time.monotonic()
                proc_b.send_signal(signal.SIGTERM)
                report["SIGTERM -> B DOWN (s)"] = haproxy.wait_status("b", "DOWN", 30) - drained
                proc_b.wait(timeout=60)
                poll(haproxy.url + "/readyz", lambda r: r.status_code == 200, 30)
                traffic.stop.set()
                for thread in threads:
                    thread.join(90)
                report["client requests"] = len(traffic.outcomes)
                report["failed requests"] = len(traffic.failures())
                report["failures"] = traffic.failures()
            finally:
                haproxy.stop()
    return report


def main() -> None:
    report = run()
    print(f"\nHAProxy health check GET /readyz every 300 ms, fall 2, rise 2; {os.cpu_count()} CPUs\n")
    print("| measure | value |")
    print("|---|---|")
    for key, value in report.items():
        if key != "failures":
            print(f"| {key} | {value:.2f} |" if isinstance(value, float) else f"| {key} | {value} |")
    for when, what in report["failures"]:
        print(f"failure at {when:.2f}: {what}", file=sys.stderr)


if __name__ == "__main__":
    main()
