"""A real semilla server on a loopback port, in a thread of the test process, run as
`semilla serve` runs it (the same uvicorn configuration and protocol)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from semilla.serve.server import bind_socket, http_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, port: int | None = None):
    """Serve `app` (made by create_app) on 127.0.0.1; yields the base URL; stops it afterwards."""
    sock = bind_socket("127.0.0.1", port or 0)
    port = sock.getsockname()[1]
    config = http_config(app, app.state.settings, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def get_json(url: str, **kwargs) -> dict:
    r = httpx.get(url, timeout=10, **kwargs)
    r.raise_for_status()
    return r.json()


class RawConnection:
    """One keep-alive HTTP/1.1 connection driven byte by byte, for what clients will not send
    (ambiguous framing, slow headers) and to see whether the server kept the connection."""

    def __init__(self, url: str, timeout: float = 30):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> None:
        head = {"Host": "127.0.0.1", "Content-Length": str(len(body))} | (headers or {})
        lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
        self.send(f"{method} {path} HTTP/1.1\r\n{lines}\r\n".encode() + body)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of the next response; status 0 when the server closed."""
        status_line = self.reader.readline()
        if not status_line:
            return 0, {}, b""
        headers = {}
        while (line := self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.reader.read(int(headers.get("content-length", 0)))
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        """True when the server has closed its side (reads end) rather than waiting for us."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
