"""A loopback TCP proxy that delays every chunk by a fixed time in each direction: a network, emulated.

``bench.pipeline`` runs it in a process of its own. One thread, one ``select``
loop: every chunk read from one side is held until ``delay`` seconds after it
arrived, then written to the other side, in order. Compared with a thread per
direction and per connection (the earlier design, `bench.wire.RoundTripCounter`
with ``delay``), the proxy spends far less CPU per chunk and never hands the
GIL between threads, so on a small machine it competes less with the client
and the server it sits between, and the delay it adds stays close to the one
asked for. ``select`` takes its timeout in microseconds (``epoll`` and
``poll`` round it up to a millisecond, which would double a 0.5 ms delay).

This machine's kernel has no ``netem``, which would be the exact tool.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections import deque
from collections.abc import Callable
from time import monotonic

_BUFFER = 65536
_IDLE_WAKE = 0.2  # seconds between looks at the stop flag when nothing is due


def serve(upstream: tuple[str, int], delay: float, ready: Callable[[int], None], stopped: Callable[[], bool]) -> None:
    """Listen on 127.0.0.1 (port passed to ``ready``), forward to ``upstream`` with ``delay``, until ``stopped()``."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    ready(int(listener.getsockname()[1]))
    partner: dict[socket.socket, socket.socket] = {}
    late: dict[socket.socket, deque[tuple[float, bytes]]] = {}  # chunks waiting to be written to this socket
    try:
        while not stopped():
            timeout = _IDLE_WAKE
            now = monotonic()
            for dst, chunks in late.items():
                while chunks and chunks[0][0] <= now:
                    with contextlib.suppress(OSError):
                        dst.sendall(chunks.popleft()[1])
                if chunks:
                    timeout = min(timeout, chunks[0][0] - now)
            readable, _, _ = select.select([listener, *partner], [], [], max(0.0, timeout))
            arrived = monotonic()
            for sock in readable:
                if sock is listener:
                    _accept(listener, upstream, partner, late)
                    continue
                try:
                    data = sock.recv(_BUFFER)
                except OSError:
                    data = b""
                if data:
                    late[partner[sock]].append((arrived + delay, data))
                else:
                    _close_pair(sock, partner, late)
    finally:
        for sock in list(partner):
            with contextlib.suppress(OSError):
                sock.close()
        listener.close()


def _accept(
    listener: socket.socket,
    upstream: tuple[str, int],
    partner: dict[socket.socket, socket.socket],
    late: dict[socket.socket, deque[tuple[float, bytes]]],
) -> None:
    try:
        client, _ = listener.accept()
    except BlockingIOError:
        return
    client.setblocking(True)
    server = socket.create_connection(upstream, timeout=10)
    server.settimeout(None)
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    partner[client], partner[server] = server, client
    late[client], late[server] = deque(), deque()


def _close_pair(
    sock: socket.socket,
    partner: dict[socket.socket, socket.socket],
    late: dict[socket.socket, deque[tuple[float, bytes]]],
) -> None:
    other = partner.pop(sock)
    partner.pop(other, None)
    for s in (sock, other):
        late.pop(s, None)
        with contextlib.suppress(OSError):
            s.close()
