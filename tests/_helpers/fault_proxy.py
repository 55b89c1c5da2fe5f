"""A small TCP proxy on 127.0.0.1 that tests use to break the network path on purpose.

Test helper only (not shipped). Threads and plain sockets, one thread per
proxied connection. Modes:

* ``forward()``: normal operation, bytes flow both ways;
* ``stop_accepting()`` / ``start_accepting()``: close and reopen the listening
  socket (new connections are refused, existing ones keep working);
* ``drop_all()``: reset every proxied connection (RST, as a crashed middlebox);
* ``go_deaf()``: keep every socket open but forward nothing, in either
  direction, and accept new connections without ever answering them — the
  path looks alive to the kernel (it still ACKs) but no byte gets through;
* ``stall_after_handshake()``: new connections complete their startup
  (authentication up to the server's first ReadyForQuery) and then go deaf:
  the first query is never delivered, so its reply never comes;
* ``hold_replies(seconds)``: for the next ``seconds``, deliver what the client
  sends but hold what the server answers (delivered late, nothing lost): a
  statement such as a ``COMMIT`` reaches the server and is done there while
  the client still waits for its reply.

The deaf mode models a stalled middlebox (a hung pgbouncer, a frozen
load balancer): TCP is healthy, the application data is not delivered.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

_CHUNK = 65536


class FaultProxy:
    """Forward 127.0.0.1:<port> to ``target``; break it on demand."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._deaf = threading.Event()
        self._stall_after_ready = threading.Event()
        self._hold_until = 0.0  # time.monotonic() until which server replies are held
        self.sent_while_held = 0  # client bytes delivered to the server while replies were held
        self._closing = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket | None]] = []
        self._servers: dict[socket.socket, threading.Thread] = {}
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self.port = 0
        self.accepted = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> FaultProxy:
        self.start_accepting()
        return self

    def close(self) -> None:
        self._closing.set()
        self.stop_accepting()
        self.drop_all()
        for t in list(self._threads):
            t.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- modes -----------------------------------------------------------------

    def start_accepting(self) -> None:
        """Listen on the proxy port (the same port again after `stop_accepting`)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accept_thread = self._spawn(self._accept_loop, listener)

    def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None

    def go_deaf(self) -> None:
        """Stop forwarding in both directions without closing anything."""
        self._deaf.set()

    def stall_after_handshake(self) -> None:
        """Let each new connection finish its startup, then deliver nothing more (in either direction)."""
        self._stall_after_ready.set()

    def hold_replies(self, seconds: float) -> None:
        """Hold every server reply for the next ``seconds`` (client bytes still go through at once).

        ``sent_while_held`` counts the client bytes delivered meanwhile (reset here): once it is not
        0, what the client sent after this call (a COMMIT) is at the server, its reply held.
        """
        self.sent_while_held = 0
        self._hold_until = time.monotonic() + seconds

    def forward(self) -> None:
        """Forward again (bytes held while deaf are delivered late)."""
        self._deaf.clear()

    def drop_all(self) -> int:
        """Reset every open proxied connection; return how many were dropped.

        Returns once the resets are on the wire: a socket closed while its
        serving thread sits in select() is only released when select returns,
        so the serving threads are joined.
        """
        with self._lock:
            pairs, self._pairs = self._pairs, []
            servers = [self._servers.pop(client, None) for client, _ in pairs]
        for client, upstream in pairs:
            for sock in (client, upstream):
                if sock is None:
                    continue
                with contextlib.suppress(OSError):
                    # linger 0: close sends RST, as a crashed middlebox would.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                with contextlib.suppress(OSError):
                    sock.close()
        for server in servers:
            if server is not None and server is not threading.current_thread():
                server.join(timeout=5)
        return len(pairs)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    # -- internals ---------------------------------------------------------------

    def _spawn(self, target: object, *args: object) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True, name="fault-proxy")  # type: ignore[arg-type]
        self._threads = [x for x in self._threads if x.is_alive()]
        self._threads.append(t)
        t.start()
        return t

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closing.is_set():
            try:
                ready, _, _ = select.select([listener], [], [], 0.05)
            except (OSError, ValueError):
                return
            if not ready:
                if self._listener is not listener:
                    return
                continue
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.accepted += 1
            with self._lock:
                self._servers[client] = self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        # A deaf proxy accepts but never even connects upstream: the client's
        # startup packet goes nowhere.
        while self._deaf.is_set() and not self._closing.is_set():
            self._register(client, None)
            if self._wait_closed([client], 0.05):
                self._discard(client, None)  # closed here too when the proxy closes (else: ResourceWarning later)
                return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._discard(client, None)
            return
        upstream.settimeout(None)
        self._register(client, upstream)
        peers = {client: upstream, upstream: client}
        startup = _StartupWatch() if self._stall_after_ready.is_set() else None
        try:
            while not self._closing.is_set():
                if self._deaf.is_set() or (startup is not None and startup.ready):
                    if self._wait_closed([client, upstream], 0.05):
                        return
                    continue
                held = self._hold_until - time.monotonic()
                readable = [client] if held > 0 else [client, upstream]
                ready, _, _ = select.select(readable, [], [], min(0.05, held) if held > 0 else 0.05)
                for sock in ready:
                    data = sock.recv(_CHUNK)
                    if not data:
                        return
                    peers[sock].sendall(data)
                    if sock is client and self._hold_until > time.monotonic():  # now, not as select began
                        self.sent_while_held += len(data)
                    if startup is not None and sock is upstream:
                        startup.feed(data)
        except (OSError, ValueError):
            return
        finally:
            self._discard(client, upstream)

    def _wait_closed(self, socks: list[socket.socket], timeout: float) -> bool:
        """Sleep up to ``timeout``; True when one of ``socks`` was closed by us (drop_all/close)."""
        try:
            select.select([], [], socks, timeout)
        except (OSError, ValueError):
            return True
        return any(s.fileno() == -1 for s in socks) or self._closing.is_set()

    def _register(self, client: socket.socket, upstream: socket.socket | None) -> None:
        with self._lock:
            self._pairs = [p for p in self._pairs if p[0] is not client]
            self._pairs.append((client, upstream))

    def _discard(self, client: socket.socket, upstream: socket.socket | None) -> None:
        with self._lock:
            self._pairs = [p for p in self._pairs if p[0] is not client]
            self._servers.pop(client, None)
        for sock in (client, upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


class _StartupWatch:
    """Follows the server's side of a connection until its first ReadyForQuery ('Z') message.

    Server messages are a type byte and a 4-byte length (which counts itself);
    the only unframed byte is the one-letter answer to an SSLRequest, which the
    tests avoid with sslmode=disable.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.ready = False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 5 and not self.ready:
            kind = self.buffer[:1]
            length = struct.unpack("!I", self.buffer[1:5])[0]
            if len(self.buffer) < 1 + length:
                return
            self.buffer = self.buffer[1 + length :]
            self.ready = kind == b"Z"


@contextlib.contextmanager
def fault_proxy(target_host: str, target_port: int) -> Iterator[FaultProxy]:
    """A started `FaultProxy`, closed afterwards."""
    proxy = FaultProxy(target_host, target_port).start()
    try:
        yield proxy
    finally:
        proxy.close()
