"""An answer leaves the worker in one send: headers together with the body's first bytes. gunicorn sends
them in two, and a worker SIGKILLed between the two left the load balancer holding headers and no body, a
response it cannot retry (a client of tests/test_loadbalancer.py saw ChunkedEncodingError once in three
runs). Checked on a real socket pair: what the peer can read after each call."""

from __future__ import annotations

import socket

from gunicorn.http.wsgi import Response

from webapp.server.gthread import _HeadersWithBody

HEADERS = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


def readable(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return b""


def test_the_headers_wait_for_the_body_and_leave_with_it():
    ours, peer = socket.socketpair()
    with ours, peer:
        wrapped = _HeadersWithBody(ours)
        wrapped.sendall(HEADERS)
        assert readable(peer) == b"", "headers went out alone: a kill now leaves a response with no body"
        wrapped.sendall(b"hello")
        assert readable(peer) == HEADERS + b"hello"
        wrapped.sendall(b"more")
        assert readable(peer) == b"more"


def test_an_answer_without_a_body_is_sent_when_the_request_ends_and_sendfile_gets_the_headers_first():
    ours, peer = socket.socketpair()
    with ours, peer:
        wrapped = _HeadersWithBody(ours)
        wrapped.sendall(HEADERS)
        wrapped.release()
        assert readable(peer) == HEADERS
    ours, peer = socket.socketpair()
    with ours, peer:
        wrapped = _HeadersWithBody(ours)
        wrapped.sendall(HEADERS)
        assert wrapped.fileno() == ours.fileno()
        assert readable(peer) == HEADERS


class Recording:
    """A socket that records each send it is asked for."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends: list[bytes] = []

    def sendall(self, data: bytes, *args: object) -> None:
        self.sends.append(bytes(data))
        self.sock.sendall(data, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


class Request:
    version, method, headers, uri, path, query = (1, 1), "GET", [], "/", "/", ""

    def should_close(self) -> bool:
        return True


class Config:
    is_ssl, sendfile, header_map = False, False, "drop"


def answer(sock: object) -> None:
    """gunicorn's own Response, as the worker's handle_request makes it, writing a five-byte body."""
    response = Response(Request(), sock, Config())
    response.start_response("200 OK", [("Content-Length", "5")])
    response.write(b"hello")


def test_gunicorns_response_writes_through_it_in_one_send():
    ours, peer = socket.socketpair()
    with ours, peer:
        bare = Recording(ours)
        answer(bare)
        assert len(bare.sends) == 2, "gunicorn itself sends the headers and the body apart"
        readable(peer)
        through = Recording(ours)
        answer(_HeadersWithBody(through))
        assert len(through.sends) == 1
        data = readable(peer)
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nhello")


def test_a_file_answer_gets_its_headers_before_the_file(tmp_path):
    body = tmp_path / "static.js"
    body.write_bytes(b"console.log(1);")
    ours, peer = socket.socketpair()
    with ours, peer, body.open("rb") as file:
        wrapped = _HeadersWithBody(ours)
        wrapped.sendall(HEADERS)
        wrapped.sendfile(file, 0, 15)
        assert readable(peer) == HEADERS + b"console.log(1);"
