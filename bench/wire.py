"""A loopback TCP proxy that counts round trips on the wire.

The PostgreSQL protocol ends every client request cycle with one
``ReadyForQuery`` (``Z``) message from the server, whether the driver used the
simple or the extended protocol. Counting ``Z`` messages that the server sends
through this proxy therefore counts round trips, for any driver, without
trusting the driver about what it sends. Connections must not use TLS
(``sslmode=disable``) so the stream can be read.

With ``delay`` (seconds) the proxy also holds every chunk that much before
passing it on, in each direction: ``delay=0.0005`` adds about 1 ms to every
round trip, as a network between an application and its database would
(issue 16). Python's sleep is not exact: on a busy machine a chunk may wait
a little longer (docs/PERFORMANCE.md reports what was measured).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
from types import TracebackType

_BUFFER = 65536


class RoundTripCounter:
    """Listen on 127.0.0.1:<port> and forward to ``(host, port)``, counting ``ReadyForQuery`` messages."""

    def __init__(self, host: str, port: int, *, delay: float = 0.0) -> None:
        self.upstream = (host, port)
        self.delay = max(0.0, delay)
        self._lock = threading.Lock()
        self._ready_for_query = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="rt-proxy-accept", daemon=True)

    def __enter__(self) -> RoundTripCounter:
        self._acceptor.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._closing.set()
        self._acceptor.join(timeout=5)
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv (close alone does not)
            with contextlib.suppress(OSError):
                s.close()
        self._listener.close()
        for t in self._threads:
            t.join(timeout=5)

    def reset(self) -> None:
        with self._lock:
            self._ready_for_query = 0

    @property
    def round_trips(self) -> int:
        with self._lock:
            return self._ready_for_query

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.upstream, timeout=10)
            server.settimeout(None)
            client.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            for target, args in ((self._pump, (client, server)), (self._pump_counting, (server, client))):
                if self.delay:
                    late: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
                    writer = threading.Thread(target=self._deliver, args=(late, args[1]), daemon=True)
                    writer.start()
                    self._threads.append(writer)
                    args = (args[0], _Delayed(late, self.delay))  # type: ignore[assignment]
                t = threading.Thread(target=target, args=args, daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _deliver(late: queue.SimpleQueue[tuple[float, bytes] | None], dst: socket.socket) -> None:
        """Send each chunk once its delay has passed (the delaying proxy's writer)."""
        with contextlib.suppress(OSError):
            while (item := late.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(_BUFFER):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _pump_counting(self, src: socket.socket, dst: socket.socket) -> None:
        pending = b""
        first = True
        with contextlib.suppress(OSError):
            while data := src.recv(_BUFFER):
                pending += data
                if first and pending[:1] in (b"N", b"S") and len(pending) >= 1:
                    # Answer to an SSLRequest/GSSENCRequest: one byte, no length.
                    # 'S' would mean TLS follows and nothing more can be parsed.
                    pending = pending[1:]
                first = False
                count = 0
                while len(pending) >= 5:
                    kind = pending[:1]
                    (length,) = struct.unpack("!I", pending[1:5])
                    if len(pending) < 1 + length:
                        break
                    if kind == b"Z":
                        count += 1
                    pending = pending[1 + length :]
                if count:
                    with self._lock:
                        self._ready_for_query += count
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class _Delayed:
    """Stands in for the destination socket: queues each chunk with the time it may leave."""

    def __init__(self, late: queue.SimpleQueue[tuple[float, bytes] | None], delay: float) -> None:
        self._late = late
        self._delay = delay

    def sendall(self, data: bytes) -> None:
        self._late.put((time.monotonic() + self._delay, bytes(data)))

    def shutdown(self, how: int) -> None:
        self._late.put(None)
