"""A TCP proxy on loopback in front of the S3 server that can take the network away for real.

`FlakyProxy(target_port).outage_on(b"00003.tar", seconds=12)`: the first request whose first
bytes contain the pattern is cut, and for `seconds` the proxy refuses every connection (its
listening socket is closed) and drops the open ones, like a store that went unreachable.
"""

from __future__ import annotations

import socket
import threading
import time


class FlakyProxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.rules: list[tuple[bytes, float]] = []
        self.outages: list[tuple[bytes, float]] = []  # (pattern, when it started)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def outage_on(self, pattern: bytes, seconds: float) -> None:
        with self._lock:
            self.rules.append((pattern, seconds))

    def close(self) -> None:
        self._stop.set()
        self._drop_all()

    # --- internals ------------------------------------------------------------------------------
    def _listen(self) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.2)
        return s

    def _serve(self) -> None:
        self._listener = self._listen()
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:  # an outage: nothing listens, connections are refused
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                time.sleep(0.05)
                continue
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()
        if self._listener is not None:
            self._listener.close()

    def _down(self, seconds: float) -> None:
        """Close the listener (connections are refused) and every open connection."""
        listener, self._listener = self._listener, None
        listener.close()
        self._drop_all()
        time.sleep(seconds)
        self._listener = self._listen()

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _handle(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        with self._lock:
            self._conns.update((client, upstream))
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, src: socket.socket, dst: socket.socket, inspect: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if inspect:
                    with self._lock:
                        hit = next(((p, s) for p, s in self.rules if p in data[:4096]), None)
                        if hit is not None:
                            self.rules.remove(hit)
                            self.outages.append((hit[0], time.time()))
                    if hit is not None:
                        self._conns.discard(src)
                        src.close()
                        dst.close()
                        # the outage runs in the background; this request's connection is gone
                        threading.Thread(target=self._down, args=(hit[1],), daemon=True).start()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
