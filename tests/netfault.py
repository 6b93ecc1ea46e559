"""One HTTP-aware TCP relay on loopback in front of the S3 server, with small per-request hooks.

    relay = Relay(target_port)            clients use relay.url as their endpoint
    relay.requests                        every request seen: Request(method, path, headers, line)
    relay.delay = 0.2                     hold each request this long (or a function of the Request)
    relay.answer_503 = fn                 fn(request) true: answer `503 SlowDown` without passing it on
    relay.drop_answer = fn                fn(request) true: pass it on, then cut the connection as the
                                          store's answer arrives (applied, answer lost)
    relay.outage_on(b"00003.tar", 12)     the first request holding the pattern is cut, and for 12 s
                                          every connection is refused and the open ones dropped
    relay.cut_on(pattern); relay.restore()   the same outage, until restore()

Counters: `connections`, `open`, `peak` (connections), `waiting`, `most_waiting` (requests held by
`delay`), `ranges` (byte ranges asked for), `outages`, `answered_503`, `dropped_answers`.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import time
from typing import Callable
from urllib.parse import unquote, urlsplit

SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>")


@dataclasses.dataclass
class Request:
    method: str
    path: str  # unquoted, without the query
    headers: dict[str, str]  # lower-case names
    line: bytes  # the request line, as sent
    head: bytes  # the request line and headers, as sent

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


class Relay:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.requests: list[Request] = []
        self.delay: float | Callable[[Request], float] = 0.0
        self.answer_503: Callable[[Request], bool] | None = None
        self.drop_answer: Callable[[Request], bool] | None = None
        self.connections = self.open = self.peak = 0
        self.waiting = self.most_waiting = 0
        self.ranges: list[tuple[int, int]] = []
        self.rules: list[tuple[bytes, float]] = []
        self.outages: list[tuple[bytes, float]] = []  # (pattern, when it started)
        self.answered_503 = self.dropped_answers = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = self._listen(0)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- hooks and questions ---------------------------------------------------------------------
    def outage_on(self, pattern: bytes, seconds: float) -> None:
        with self._lock:
            self.rules.append((pattern, seconds))

    def cut_on(self, pattern: bytes) -> None:
        """Cut the first request whose head holds `pattern`; the network stays down until restore()."""
        self.outage_on(pattern, float("inf"))

    def restore(self) -> None:
        """End the outage: the relay listens again when this returns."""
        with self._lock:
            if self._listener is None and not self._stop.is_set():
                self._listener = self._listen(self.port)

    def fetched(self, key: str) -> int:
        """Bytes of object `key` asked for with ranged GETs, over every client so far."""
        total = 0
        for r in self.gets():
            if r[0].endswith("/" + key):
                start, end = r[1].removeprefix("bytes=").split("-")
                total += int(end) - int(start) + 1
        for r in list(self.requests):
            assert not (r.method == "GET" and r.path.endswith("/" + key) and r.range is None), \
                f"unranged GET of {r.path}"
        return total

    def gets(self) -> list[tuple[str, str | None]]:
        """(path, range) of each ranged GET."""
        return [(r.path, r.range) for r in list(self.requests) if r.method == "GET" and r.range]

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._drop_all()

    # --- internals ------------------------------------------------------------------------------
    def _listen(self, port: int) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        s.settimeout(0.2)
        return s

    def _serve(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:  # an outage: nothing listens, connections are refused
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _down(self, seconds: float) -> None:
        """Close the listener (connections are refused) and every open connection, at once;
        listen again after `seconds` (never, for inf)."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._drop_all()
        if seconds != float("inf"):
            def later() -> None:
                time.sleep(seconds)
                self.restore()
            threading.Thread(target=later, daemon=True).start()

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            _close(c)

    def _handle(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        with self._lock:
            self._conns.update((client, upstream))
            self.open += 1
            self.peak = max(self.peak, self.open)
        conn = _Conn(client, upstream)
        threading.Thread(target=self._answers, args=(conn,), daemon=True).start()
        try:
            self._requests(conn)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)
            with self._lock:
                self.open -= 1
                self._conns.discard(client)
                self._conns.discard(upstream)

    def _requests(self, conn: _Conn) -> None:
        """Client -> store, a request at a time: its head, the hooks, then its body."""
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.client.recv(65536)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            head += b"\r\n\r\n"
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
            req = Request(parts[0], unquote(urlsplit(parts[1] if len(parts) > 1 else "").path), headers,
                          head.split(b"\r\n", 1)[0], head)
            with self._lock:
                self.requests.append(req)
                self.ranges += [(int(a), int(b)) for a, b in re.findall(rb"bytes=(\d+)-(\d+)", head)]
                hit = next(((p, s) for p, s in self.rules if p in head), None)
                if hit is not None:
                    self.rules.remove(hit)
                    self.outages.append((hit[0], time.time()))
            if hit is not None:  # the request never reaches the store
                self._down(hit[1])
                return
            delay = self.delay(req) if callable(self.delay) else self.delay
            if delay:
                with self._lock:
                    self.waiting += 1
                    self.most_waiting = max(self.most_waiting, self.waiting)
                time.sleep(delay)
                with self._lock:
                    self.waiting -= 1
            if self.answer_503 is not None and self.answer_503(req):
                with self._lock:
                    self.answered_503 += 1
                conn.send(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                          + f"Content-Length: {len(SLOW_DOWN)}\r\n\r\n".encode() + SLOW_DOWN)
                return  # closed: a client that awaits `100 Continue` sends no body
            if self.drop_answer is not None and self.drop_answer(req):
                conn.drop_answer.set()
            conn.upstream.sendall(head)
            buf = self._body(conn, headers, buf)

    def _body(self, conn: _Conn, headers: dict[str, str], buf: bytes) -> bytes:
        """Pass the request's body on (Content-Length or chunked); returns what follows it."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                while b"\r\n" not in buf:
                    buf += _recv(conn.client)
                size_line, rest = buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                need = size + 2
                while len(rest) < need:
                    rest += _recv(conn.client)
                conn.upstream.sendall(size_line + b"\r\n" + rest[:need])
                buf = rest[need:]
                if size == 0:  # (no trailers: S3 clients send none)
                    return buf
        left = int(headers.get("content-length", 0) or 0)
        while left > 0:
            if not buf:
                buf = _recv(conn.client)
            chunk, buf = buf[:left], buf[left:]
            conn.upstream.sendall(chunk)
            left -= len(chunk)
        return buf

    def _answers(self, conn: _Conn) -> None:
        """Store -> client; a dropped answer cuts both connections as its first bytes arrive."""
        try:
            while data := conn.upstream.recv(65536):
                if conn.drop_answer.is_set() and not data.startswith(b"HTTP/1.1 100"):
                    with self._lock:
                        self.dropped_answers += 1
                    break
                conn.send(data)
        except OSError:
            pass
        finally:
            _close(conn.client)
            _close(conn.upstream)


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.drop_answer = threading.Event()
        self._send = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._send:
            self.client.sendall(data)


def _recv(s: socket.socket) -> bytes:
    data = s.recv(65536)
    if not data:
        raise OSError("closed mid-request")
    return data


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass

