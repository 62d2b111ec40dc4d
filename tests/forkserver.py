"""A fork server for the suite's gunicorn masters: one process per pytest process that imports torch, diffusers,
transformers and peft once (about 7 CPU-seconds each time, docs/development.md) and then forks a gunicorn
master for each server a test starts, so that neither the master nor its workers import them again.

Only those libraries are imported here, never gunicorn or the project's own modules, so what those do at
import (gunicorn's default number of workers from WEB_CONCURRENCY, prometheus_client's metrics folder, the
loader's `model_code` line) happens in each forked server as in a fresh one. A server whose environment
differs from this process's in a variable that the imported libraries read at import (HF_*,
TRANSFORMERS_*, TORCH*, OMP_*...) is started fresh instead (`Server`, tests/conftest.py), and so is one a
test asks to start fresh (the tests of the master's own import, test_worker_death).

The server listens on a Unix socket, `<exits>/socket`, so that a process the tests start can fork its servers
from it too: a benchmark run by test_bench.py attaches through `TEST_FORK_SERVER` (bench/servers.py). A
connection carries one JSON line each way: {"argv", "env", "cwd", "log"} in, {"pid"} out; or {"describe":
true} in, and what the server imported with out. The server reaps its children and writes each one's exit
status to `<exits>/<pid>` (a number, as `Popen.returncode` has it). It ends when its standard input closes
(the pytest process that started it is done), once every child has gone.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Read by those libraries at import: a server whose values differ cannot use this process.
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH", "OMP_", "MKL_",
                        "PYTHON", "CUDA", "PEFT_", "ACCELERATE_", "XDG_", "HOME")  # fmt: skip


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith(IMPORT_TIME_PREFIXES)}


def _child(request: dict, base_path: list[str], inherited: list[int]) -> None:
    """In the forked child: become `python -m gunicorn` with the request's argv, env, cwd and log."""
    code = 1
    try:
        for fd in inherited:  # the server's listening socket and this request's connection
            os.close(fd)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [request["cwd"], *extra, *base_path]  # as `python -m` starts: the working folder first
        sys.argv = ["gunicorn", *request["argv"]]
        from gunicorn.app.wsgiapp import run

        run()
        code = 0
    except SystemExit as stop:  # as the interpreter ends: a number is the status, anything else is printed
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported in the server's log, as an interpreter would
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(exits: Path) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        partial = exits / f".{pid}"
        partial.write_text(str(code))
        partial.rename(exits / str(pid))


def serve(exits: Path) -> None:
    # The environment is the suite's, with webapp.model's LIBRARY_ENV_DEFAULTS set (tests/conftest.py).
    started_env = import_time_env(dict(os.environ))
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import (  # noqa: F401 - the classes the loader imports
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
        DiffusionPipeline,
    )
    # Not gunicorn: gunicorn.config reads WEB_CONCURRENCY at import, as the default number of workers.

    threads = len(os.listdir("/proc/self/task"))
    # With what the imports set themselves (torch: TORCHINDUCTOR_CACHE_DIR), as a fresh server would have it.
    described = {"threads": threads, "started_env": started_env, "env": import_time_env(dict(os.environ))}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(exits / "socket"))
    listener.listen(16)
    print(json.dumps(described), flush=True)
    if threads != 1:
        return  # forking a process with threads is not safe: the clients fall back to fresh starts
    base_path = [p for p in sys.path if p]
    while True:
        _reap(exits)
        readable, _, _ = select.select([sys.stdin, listener], [], [], 0.05)
        if sys.stdin in readable and not sys.stdin.readline():
            break
        if listener not in readable:
            continue
        connection, _ = listener.accept()
        with connection, connection.makefile("rw") as stream:
            request = json.loads(stream.readline())
            if request.get("describe"):
                stream.write(json.dumps(described) + "\n")
                continue
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(request, base_path, [listener.fileno(), connection.fileno()])
            stream.write(json.dumps({"pid": pid}) + "\n")
    listener.close()
    while True:  # stdin closed: the suite is done; reap what is left until every child has gone
        _reap(exits)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


class Forked:
    """A gunicorn master forked by the fork server, with the part of `subprocess.Popen` the tests use."""

    def __init__(self, pid: int, exits: Path) -> None:
        self.pid = pid
        self._exit_file = exits / str(pid)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self._exit_file.exists():
            self.returncode = int(self._exit_file.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The client: starts the fork server with `env` when first asked for a server (the fast lane asks for
    none), and forks gunicorn masters from it; or, made by `attach`, forks them from one another process
    started."""

    def __init__(self, env: dict[str, str], cwd: Path, exits: Path) -> None:
        self.env, self.cwd, self.exits = env, cwd, exits
        self.proc: subprocess.Popen | None = None
        self.described: dict | None = None

    @classmethod
    def attach(cls, address: str) -> ForkServer:
        """The client of a fork server another process started, at its `address`."""
        return cls({}, Path.cwd(), Path(address).parent)

    @property
    def address(self) -> str:
        return str(self.exits / "socket")

    def ready(self) -> bool:
        """Start the fork server if it is not started (or ask the one attached to), and wait until it has
        imported the libraries."""
        if self.described is None:
            if self.env:
                command = [sys.executable, "-m", "tests.forkserver", str(self.exits)]
                pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
                self.proc = subprocess.Popen(command, cwd=self.cwd, env=self.env, **pipes)
                line = self.proc.stdout.readline() if self.proc.stdout else ""
                self.described = json.loads(line) if line else {}
            else:
                try:
                    self.described = self._ask({"describe": True})
                except OSError:
                    self.described = {}
        return self.described.get("threads") == 1

    def takes(self, env: dict[str, str]) -> bool:
        """Whether a server with ``env`` would import those libraries as the fork server did: the same values
        of what they read at import, less what they set themselves (which a fresh server's import sets alike)."""
        if not self.ready():
            return False
        assert self.described is not None
        imported, started = self.described["env"], self.described["started_env"]
        theirs = import_time_env(env)
        for name in imported.keys() - started.keys():
            theirs.setdefault(name, imported[name])
        return theirs == imported

    def start(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Forked:
        answer = self._ask({"argv": argv, "env": env, "cwd": str(cwd), "log": str(log)})
        return Forked(answer["pid"], self.exits)

    def _ask(self, request: dict) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, sock.makefile("rw") as stream:
            sock.connect(self.address)
            stream.write(json.dumps(request) + "\n")
            stream.flush()
            return json.loads(stream.readline())

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
