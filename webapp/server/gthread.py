"""The gunicorn worker class: gthread, except that a request thread only ever gets a request that has arrived.

gunicorn's gthread worker hands a new connection to a request thread at once, and the thread then blocks
reading the request. A client that sends half its headers, or a body shorter than its Content-Length, or
nothing at all, holds that thread for as long as it likes: forty of them took every thread of two workers,
and /healthz and /readyz timed out (docs/architecture.md §10). Here the worker's event loop,
which already watches kept-alive connections, reads every request without blocking and frames it with h11,
and only a whole request (headers and body) goes to a thread, whose parser then reads it from memory.

A request that has not fully arrived within CLIENT_TIMEOUT seconds is answered 408 and closed (a connection
that sent nothing is closed silently, as gunicorn closes idle kept-alive ones). Headers h11 cannot parse,
or larger than its limit, are answered 400/431 from here. A body declared or sent larger than its route's
limit (``webapp.api.bodies``: MAX_BODY_BYTES, or room for two uploads on the routes that take images) goes
to the app at once (which answers 413) and the connection is closed after the answer, so no thread waits to
drain it, and no connection holds more than its route's limit in memory. The
sockets request threads use carry CLIENT_TIMEOUT as their kernel send and receive timeouts, so a client that
stops reading its answer holds a thread that long at most.

TLS and HTTP/2 prior knowledge are left to gunicorn's own path: their bytes cannot be framed before a thread
has done the handshake. (TLS is the platform's job in every deployment in docker/.)
"""

from __future__ import annotations

import contextlib
import json
import math
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from typing import Any

import h11
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

from webapp import errors
from webapp.board.readiness import Gate
from webapp.telemetry import logs
from webapp.telemetry.recorder import recorder

log = logs.get(__name__)
MAX_HEADER_BYTES = 64 * 1024  # h11 refuses (431) a header block larger than this
CHUNK = 64 * 1024
STOP_LINGER_S = 2.0  # as gunicorn's STOP_KEEPALIVE_LINGER for kept-alive connections
GATE_POLL_S = 0.02  # how often a worker that is not READY looks at the board to open or close its gate


@dataclass
class _Arrival:
    """A request still arriving on ``conn``: its bytes so far, h11's view of them, and its deadline."""

    conn: TConn
    deadline: float
    framing: h11.Connection = field(default_factory=lambda: h11.Connection(h11.SERVER, MAX_HEADER_BYTES))
    data: bytearray = field(default_factory=bytearray)
    body_bytes: int = 0
    body_limit: int = 0  # its route's (webapp.api.bodies), known once its headers have arrived
    polled: bool = False  # registered with the worker's poller


class _HeadersWithBody:
    """A connection's socket as gunicorn's Response writes to it, holding the header block back until the
    body's first bytes so that both leave in one send. gunicorn sends them in two, and a worker killed
    between the two (another thread may hold the interpreter in between) left a client, or a load balancer,
    holding headers with no body: a proxy retries a request that got nothing, never one that got headers.
    Everything else is the socket's own."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._held = b""
        self._sent = False

    def sendall(self, data: bytes, *args: Any) -> None:
        if not self._sent and not self._held and bytes(data[:5]) == b"HTTP/":
            self._held = bytes(data)  # the status line and headers: wait for the body
            return
        self._sent = True
        if self._held:
            data, self._held = self._held + bytes(data), b""
        self._sock.sendall(data, *args)

    def release(self) -> None:
        """Send what is still held (an answer without a body); a closed socket has nothing left to send."""
        if self._held:
            held, self._held = self._held, b""
            with contextlib.suppress(OSError):
                self._sock.sendall(held)

    def fileno(self) -> int:
        self.release()  # whoever writes to the descriptor itself must find the headers sent
        return self._sock.fileno()

    def send(self, data: bytes, *args: Any) -> int:
        self.release()
        return self._sock.send(data, *args)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        self.release()  # a file's body goes straight from the descriptor: the headers must go first
        return self._sock.sendfile(file, offset, count)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _target(data: bytes) -> str:
    """The path of a request line that has arrived (``POST /v1/images/generations HTTP/1.1``), else ''."""
    line = bytes(data[:8192]).split(b"\r\n", 1)[0].split(b" ")
    return line[1].decode("latin-1") if len(line) >= 2 else ""


def _answer(status: int, code: str, message: str, extra: str = "", path: str = "") -> bytes:
    """A complete HTTP/1.1 answer with the app's JSON error body (in the shape of the route ``path``
    names), for the few refused before the app."""
    body = json.dumps(errors.shaped_body(path, status, code, message)).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n{extra}\r\n"
    )
    return head.encode() + body


class BufferedThreadWorker(ThreadWorker):
    """gthread, handing a request thread only requests that have fully arrived. The limits and the app
    factory are class attributes: ``buffered_worker`` makes the subclass gunicorn runs, with the values
    from settings."""

    client_timeout: float  # CLIENT_TIMEOUT
    body_limit: Callable[[str], int]  # the largest body a request to a path may send (webapp.api.bodies)
    make_app: Callable[[], Any]  # builds this worker's WSGI app, once its runtime exists (after post_fork)
    gate: Callable[[], Gate]  # whether this worker takes new connections now (docs/architecture.md §14)

    def load_wsgi(self) -> None:
        """The app comes from ``make_app`` (ServerHooks.app, with this worker's runtime), not from an
        import path."""
        self.wsgi = self.make_app()

    def handle_request(self, req: Any, conn: TConn) -> bool:
        """gunicorn's, with the answer's headers sent together with its first body bytes (see
        ``_HeadersWithBody``)."""
        real = conn.sock
        conn.sock = _HeadersWithBody(real)
        try:
            return super().handle_request(req, conn)
        finally:
            conn.sock.release()
            conn.sock = real

    def _kernel_timeout(self) -> bytes:
        seconds = self.client_timeout
        return struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))  # a struct timeval

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arriving: dict[TConn, _Arrival] = {}  # insertion order is deadline order
        self.complete: set[TConn] = set()  # whole requests on their way to a thread
        self.close_after: set[TConn] = set()  # oversized: close after the answer, never drain
        self.stopped_at: float | None = None  # when the worker began to stop
        self.gate_now = Gate.STANDS_IN  # the gate as last read (it decides how often it is read again)
        self.gate_read_at = -math.inf

    def set_accept_enabled(self, enabled: bool) -> None:
        """gunicorn's, through the gate: a worker that is not READY while another is accepts nothing, so
        the kernel hands the shared socket's connections to a worker that can serve them (§14)."""
        now = time.monotonic()
        if enabled and now - self.gate_read_at >= GATE_POLL_S:
            self.gate_read_at = now
            try:
                gate = self.gate()
            except Exception:  # the board unreadable: accept, as gunicorn would (the probes say the rest)
                log.exception("gate_unreadable")
                gate = Gate.STANDS_IN
            if gate is not self.gate_now:
                log.info("gate", gate=gate.value, was=self.gate_now.value, pid=self.pid)
                self.gate_now = gate
        super().set_accept_enabled(enabled and self.gate_now.accepts)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """gunicorn's, with the gate read again on each pass while the worker runs, every GATE_POLL_S
        while this worker is not READY: it opens within that when the READY worker dies, and closes when
        another becomes READY."""
        if self.alive:
            self.set_accept_enabled(self.nr_conns < self.worker_connections)
            if self.gate_now is not Gate.SERVES:
                timeout = min(timeout, GATE_POLL_S)
        super().wait_for_and_dispatch_events(timeout)

    def enqueue_req(self, conn: TConn) -> None:
        """Every path to a request thread comes here: only a whole request passes."""
        if conn in self.complete:
            self.complete.discard(conn)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._kernel_timeout())
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._kernel_timeout())
            super().enqueue_req(conn)
            return
        if self.cfg.is_ssl or negotiation.prior_knowledge_allowed(self.cfg, conn.client):
            super().enqueue_req(conn)
            return
        # A kept-alive connection may hold bytes its parser read ahead: the next request, or part of it.
        ahead = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        arrival = _Arrival(conn, time.monotonic() + self.client_timeout)
        conn.sock.setblocking(False)
        self.arriving[conn] = arrival
        if ahead and self._take(arrival, ahead):
            return
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._readable, arrival))
        arrival.polled = True

    def _readable(self, arrival: _Arrival, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client left (or reset) before its request was complete
            self._drop(arrival)
            return
        self._take(arrival, data)

    def _take(self, arrival: _Arrival, data: bytes) -> bool:
        """Add bytes; True once the connection has left the arriving set (dispatched or refused)."""
        arrival.data += data
        framing = arrival.framing
        framing.receive_data(data)
        while True:
            try:
                event = framing.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(arrival, exc.error_status_hint, errors.BAD_REQUEST, f"malformed request: {exc}")
                return True
            if event is h11.NEED_DATA:
                if framing.they_are_waiting_for_100_continue:
                    self._send(arrival.conn, b"HTTP/1.1 100 Continue\r\n\r\n")
                    framing.client_is_waiting_for_100_continue = False
                return False
            if isinstance(event, h11.Request):
                arrival.body_limit = self.body_limit(event.target.split(b"?", 1)[0].decode("latin-1"))
                declared = dict(event.headers).get(b"content-length")
                if declared is not None and declared.isdigit() and int(declared) > arrival.body_limit:
                    self.close_after.add(arrival.conn)
                    return self._dispatch(arrival)  # the app answers 413 from the header alone
            elif isinstance(event, h11.Data):
                arrival.body_bytes += len(event.data)
                if arrival.body_bytes > arrival.body_limit:  # chunked, past the limit: the app sees enough
                    self.close_after.add(arrival.conn)
                    return self._dispatch(arrival)
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                return self._dispatch(arrival)
            else:  # ConnectionClosed
                self._drop(arrival)
                return True

    def _leave(self, arrival: _Arrival) -> bool:
        """Take ``arrival`` out of the arriving set and the poller; False if it had already left."""
        if self.arriving.pop(arrival.conn, None) is None:
            return False
        if arrival.polled:
            self.poller.unregister(arrival.conn.sock)
            arrival.polled = False
        return True

    def _dispatch(self, arrival: _Arrival) -> bool:
        conn = arrival.conn
        self._leave(arrival)
        if conn.parser is None:
            conn.init()  # plain HTTP/1: makes the parser, reads nothing
        conn.parser.unreader.unread(bytes(arrival.data))
        conn.data_ready = True
        self.complete.add(conn)
        self.enqueue_req(conn)
        return True

    def _send(self, conn: TConn, data: bytes) -> None:
        with contextlib.suppress(OSError):  # non-blocking, best effort: a few bytes into an empty buffer
            conn.sock.send(data)

    def _refuse(self, arrival: _Arrival, status: int, code: str, message: str, extra: str = "") -> None:
        self._send(arrival.conn, _answer(status, code, message, extra, _target(arrival.data)))
        self._drop(arrival)

    def _drop(self, arrival: _Arrival) -> None:
        if self._leave(arrival):
            self.nr_conns -= 1
            arrival.conn.close()

    def murder_pending(self) -> None:
        """gunicorn's sweep of its pending connections, and ours of requests past CLIENT_TIMEOUT. Once
        the worker stops, a request still arriving gets STOP_LINGER_S more, then a 503: another worker
        (or instance) can take it, and the worker's exit does not wait out CLIENT_TIMEOUT for it."""
        super().murder_pending()
        now = time.monotonic()
        if not self.alive and self.stopped_at is None:
            self.stopped_at = now
        for arrival in list(self.arriving.values()):
            if arrival.deadline > now and self.alive:
                break  # in deadline order
            if not arrival.data:
                self._drop(arrival)  # sent nothing: closed silently, like an idle kept-alive connection
            elif arrival.deadline <= now:
                recorder().client_timeouts.inc()
                log.debug("client_timeout", bytes=len(arrival.data), remote=str(arrival.conn.client))
                message = f"the request did not arrive within CLIENT_TIMEOUT={self.client_timeout:g} s"
                self._refuse(arrival, 408, errors.REQUEST_TIMEOUT, message)
            elif self.stopped_at is not None and now - self.stopped_at >= STOP_LINGER_S:
                message = "this worker is shutting down; send the request elsewhere"
                self._refuse(arrival, 503, errors.NOT_READY, message, "Retry-After: 1\r\n")

    def _keepalive_after(self, conn: TConn, keepalive: bool) -> bool:
        if conn in self.close_after:
            self.close_after.discard(conn)
            return False  # the rest of an oversized body is never read
        return super()._keepalive_after(conn, keepalive)


def buffered_worker(
    client_timeout: float,
    body_limit: Callable[[str], int],
    make_app: Callable[[], Any],
    gate: Callable[[], Gate],
) -> type[BufferedThreadWorker]:
    """The worker class for gunicorn's ``worker_class``: the limits from settings, the function that
    builds each worker's app, and the one that reads its gate."""
    attributes = {
        "client_timeout": client_timeout,
        "body_limit": staticmethod(body_limit),
        "make_app": staticmethod(make_app),
        "gate": staticmethod(gate),
    }
    return type("BufferedThreadWorker", (BufferedThreadWorker,), attributes)
