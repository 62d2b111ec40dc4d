"""Shared fixtures: a real gunicorn server on a free loopback port, stopped by pid after each use."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.forkserver import Forked, ForkServer
from webapp.model import quiet_libraries

ROOT = Path(__file__).resolve().parent.parent
# No hub here: in-process loads (test_loading) must see offline mode whichever test module imports
# huggingface_hub first, since it reads the variable once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One torch thread per process, in this process and every one it starts (servers, benches, scripts): the suite
# runs on two processes (pytest-xdist) on two cores, and torch's default (a thread per core, per process,
# spinning while it waits) made concurrent generations several times slower than the same work one thread
# each. A server with two workers already gets one each (TORCH_THREADS=0 is cores / workers).
os.environ.setdefault("TORCH_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# webapp.model sets LIBRARY_ENV_DEFAULTS in the environment when it is imported, before the model libraries
# are; set here too, so that this process's environment, the fork server's and every server's agree whether or
# not a test has imported the model code yet (tests/forkserver.py starts a server fresh when they differ).
quiet_libraries()
READY_DEADLINE_S = 240  # this host is noisy: a cold `import diffusers` has taken 38 s here


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], deadline_s: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test with ``what`` at the deadline."""
    end = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < end:
        try:
            result = predicate()
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            last_error, result = exc, None  # a worker that died (or was killed) while answering
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {deadline_s} s waiting for {what} (last error: {last_error})")


def rss_mb(pid: int) -> float:
    """The resident memory (VmRSS) of process ``pid`` in MB; 0 once it is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_state(pid: int) -> str:
    """The kernel's state letter for ``pid`` ('Z' zombie), or '' when no such process exists."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return ""
    return data[data.rindex(b")") + 2 : data.rindex(b")") + 3].decode()


def terminate(proc: subprocess.Popen | Forked, deadline_s: float) -> None:
    """SIGTERM ``proc`` if it still runs, and SIGKILL it if it has not exited within ``deadline_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


class RedisServer:
    """Debian's ``redis-server`` on a free loopback port, its data in ``folder`` with append-only persistence on
    (fsync every second, as docs/deployment.md advises), stopped by pid. ``start`` again on the same folder
    is a restart: Redis loads what it appended."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
                   "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
                   "--logfile", str(self.folder / "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self.answers, 30, f"redis-server on port {self.port} to answer PING")

    def answers(self) -> bool:
        import redis

        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited: {(self.folder / 'redis.log').read_text()[-2000:]}")
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=2).ping())
        except (redis.ConnectionError, redis.BusyLoadingError):
            return False

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        """SIGTERM (Redis writes what it appended and exits), SIGKILL past a deadline."""
        if self.proc is not None:
            terminate(self.proc, 30)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own (tests/conftest.RedisServer)."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


class Metrics:
    """One /metrics scrape, parsed with prometheus_client's own text parser."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels`` (0 when none)."""
        return sum(
            s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


# This process's fork server (tests/forkserver.py): its process starts with the first server a test starts,
# and the session fixture below stops it.
class Receiver:
    """A webhook receiver on 127.0.0.1 (never anywhere else): answers each delivery with the next of
    ``statuses`` (then 200), keeps what it got, and verifies it with ``secret`` as a receiver would."""

    def __init__(self, secret: str, *statuses: int) -> None:
        import http.server
        import threading

        self.secret = secret
        self.statuses = list(statuses)
        self.got: list[tuple[dict[str, str], bytes, int]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.got.append((dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[dict]:
        """Every delivery, verified with the Standard Webhooks reference package as a receiver would."""
        from standardwebhooks.webhooks import Webhook

        verifier = Webhook(self.secret)
        return [{**verifier.verify(body, headers), "id": headers["webhook-id"], "answered": status}
                for headers, body, status in self.got]  # fmt: skip

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


FORKS: list[ForkServer] = []


class Server:
    """One gunicorn master started with gunicorn.conf.py, its log in ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = (), fresh: bool = False) -> None:
        """Start gunicorn with ``env``; ``args`` are gunicorn command-line options (they override the config).
        It is forked from the fork server, with the model libraries already imported, unless ``fresh`` asks
        for a new interpreter (a test of what the master imports) or ``env`` changes what they read."""
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.seen_pids: set[int] = set()
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc: subprocess.Popen | Forked
        forks = FORKS[0] if FORKS and not fresh else None
        if forks is not None and forks.takes(env):
            self.proc = forks.start(["-c", "gunicorn.conf.py", *args], env, ROOT, log_path)
        else:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *args],
                cwd=ROOT,
                env=env,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        response = requests.get(self.url + path, timeout=kwargs.pop("timeout", 10), **kwargs)
        if path == "/readyz" and response.headers.get("Content-Type", "").startswith("application/json"):
            self.seen_pids.update(w["pid"] for w in response.json()["workers"] if w["pid"])
        return response

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def readyz(self) -> tuple[int, dict[str, Any]]:
        response = self.get("/readyz")
        return response.status_code, response.json()

    def metrics(self) -> Metrics:
        response = self.get("/metrics")
        assert response.status_code == 200, response.text
        return Metrics(response.text)

    def log_lines(self) -> list[str]:
        self._log.flush()
        return self.log_path.read_text(errors="replace").splitlines()

    def workers(self) -> list[dict[str, Any]]:
        return self.readyz()[1]["workers"]

    def wait_ready(self, deadline_s: float = READY_DEADLINE_S) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            self.check_running()
            status, body = self.readyz()
            return body if status == 200 else None

        return wait_for(ready, deadline_s, f"{self.url}/readyz to be 200", interval=0.1)

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def children(self) -> set[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            return {int(pid) for pid in path.read_text().split()}
        return set()

    def stop(self) -> None:
        """SIGTERM the master, SIGKILL it after a deadline, then kill by pid any worker still running."""
        self.seen_pids |= self.children()
        terminate(self.proc, 60)
        for pid in self.seen_pids:
            if process_state(pid) not in ("", "Z"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture(scope="session", autouse=True)
def fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One fork server per pytest process, for every server it starts (tests/forkserver.py); it is stopped
    after the last of them, since the session fixtures that start servers are set up after this one."""
    FORKS.append(ForkServer(dict(os.environ, PYTHONPATH=str(ROOT)), ROOT, tmp_path_factory.mktemp("forks")))
    yield
    FORKS.pop().close()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session, so the tiny model is built once (by the first worker)."""
    return tmp_path_factory.mktemp("model-cache")


def server_env(model_cache: Path, workdir: Path, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HOST="127.0.0.1",
        PORT=str(free_port()),
        HF_HUB_OFFLINE="1",
        MODEL_CACHE_DIR=str(model_cache),
        BOARD_DIR=str(workdir),
        PYTHONPATH=str(ROOT),
        WEB_CONCURRENCY="2",
        LOAD_BACKOFF_INITIAL="0.2",
        LOAD_BACKOFF_MAX="1",
        GRACEFUL_TIMEOUT="5",
        JOB_STORE=f"sqlite:///{workdir / 'jobs.sqlite3'}",  # the test's own: never another server's jobs
        # The master's import of the model code after the first fork (docs/architecture.md §13) only pays off
        # when a worker is replaced; elsewhere it is a third process importing torch beside the two workers.
        # The tests that replace workers run with the default (1).
        MASTER_PREIMPORT="0",
    )
    env.update(overrides)
    return env


@pytest.fixture
def start_server(model_cache: Path, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers with environment overrides; every one started is stopped when the test ends."""
    started: list[Server] = []

    def start(fresh: bool = False, **overrides: str) -> Server:
        env = server_env(model_cache, tmp_path, **overrides)
        server = Server(env, tmp_path / f"gunicorn-{len(started)}.log", fresh=fresh)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@contextlib.contextmanager
def running_server(model_cache: Path, workdir: Path, **overrides: str) -> Iterator[Server]:
    """A server started with ``overrides``, READY, and stopped by pid when the block ends: for the
    module-scoped fixtures that share one server among read-only tests."""
    server = Server(server_env(model_cache, workdir, **overrides), workdir / "gunicorn.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ready_server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A two-worker server on the default model, READY, shared by every module's read-only tests (one start
    instead of one per module: no test that takes it may break a worker, and its counts only grow)."""
    with running_server(model_cache, tmp_path_factory.mktemp("ready-server")) as server:
        yield server


API_KEY = "test-key-0123456789abcdef"  # the key keyed_server accepts (API_KEYS); never a real secret


@pytest.fixture(scope="session")
def keyed_server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A one-worker server that needs API_KEY on the routes that generate, READY, shared by every module's
    read-only tests."""
    with running_server(
        model_cache, tmp_path_factory.mktemp("keyed-server"), WEB_CONCURRENCY="1", API_KEYS=f"{API_KEY},second-key"
    ) as server:
        yield server


# Modules whose tests watch timing (probes while clients stall, heartbeats a fraction of a second apart, a load
# balancer's checks, Prometheus' scrapes): under pytest-xdist they share one group, so they never run against
# each other.
TIMING_MODULES = frozenset({"test_slow_clients", "test_faults", "test_loadbalancer", "test_autoscaling"})


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """xdist groups: the timing modules share one; a module whose tests share a module-scoped server is one
    group, so that server starts once rather than in each process; any other test goes wherever is free."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        if module in TIMING_MODULES:
            item.add_marker(pytest.mark.xdist_group("timing"))
        elif _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(module))


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values() if defs)


def pytest_xdist_node_collection_finished(node: object, ids: list[str]) -> None:
    """Refuse to run when xdist has not put the groups above into the node ids (the timing modules' tests must
    end in "@timing"): pytest 9.2 made xdist's way of doing so a silent no-op (pytest-dev/pytest-xdist#1386),
    and then each process starts every module server for itself and the timing modules run against each
    other, which is slower and flakier but fails nothing."""
    lost = [nodeid for nodeid in ids if Path(nodeid.split("::")[0]).stem in TIMING_MODULES and "@" not in nodeid]
    if lost:
        raise pytest.UsageError(f"--dist loadgroup has no effect with pytest {pytest.__version__}: {lost[0]}")
