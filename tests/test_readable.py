"""The liveness check's poll (`precog_db._readable`): every implementation gives the same answer.

The libc one keeps the GIL (the reason it exists, docs/PERFORMANCE.md); the
`select` ones are the fallbacks. Each is checked on a real socket pair and on a
real PostgreSQL connection: nothing waiting, data waiting, the peer gone.
"""

from __future__ import annotations

import functools
import select
import socket
import sys
from collections.abc import Callable, Iterator

import psycopg
import pytest

from precog_db import _readable
from precog_db._conn_state import state
from precog_db._pool_base import connection_is_usable
from tests._helpers.server import Server

IMPLEMENTATIONS = ["libc", "select.poll", "select.select"]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`poller_for` forced onto one implementation."""
    name: str = request.param
    if name == "libc" and _readable._LIBC is None:
        pytest.fail("libc's poll is not available through ctypes here; the GIL-holding check is not in use")
    if name != "libc":
        monkeypatch.setattr(_readable, "_LIBC", None)
    if name == "select.select":
        monkeypatch.setattr(_readable, "_HAS_POLL", False)
    yield name


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_the_gil_holding_poll_is_used_where_libc_has_poll() -> None:
    """On Linux and macOS the check is libc's poll through ctypes.PyDLL (which keeps the GIL), not select."""
    if sys.platform.startswith(("linux", "darwin")):
        assert _readable._LIBC is not None
        check = _readable.poller_for(0)
        assert isinstance(check, functools.partial) and check.func is _readable._LIBC[0]


class TestSocketPair:
    def test_idle_socket_is_not_readable(self, implementation: str, pair: tuple[socket.socket, socket.socket]) -> None:
        check = _readable.poller_for(pair[0].fileno())
        assert not check()
        assert not check()  # built once, asked many times

    def test_data_then_drained(self, implementation: str, pair: tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        check = _readable.poller_for(a.fileno())
        b.sendall(b"N")
        assert check()
        assert a.recv(1) == b"N"
        assert not check()

    def test_peer_closed_is_readable(self, implementation: str, pair: tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        check = _readable.poller_for(a.fileno())
        b.close()
        assert check()


@pytest.fixture
def conn(pg_server: Server, test_db: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(pg_server.conninfo(test_db), autocommit=True) as c:
        yield c


def _fresh(conn: psycopg.Connection[tuple[object, ...]]) -> Callable[[], bool]:
    state(conn).poller = None  # rebuilt with the implementation under test
    return lambda: connection_is_usable(conn)


class TestPostgresConnection:
    def test_idle_connection_is_usable(self, implementation: str, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        usable = _fresh(conn)
        assert usable() and usable()

    def test_notify_arrived_while_idle_is_not_usable(
        self, implementation: str, conn: psycopg.Connection[tuple[object, ...]], pg_server: Server, test_db: str
    ) -> None:
        """A NOTIFY the borrower did not read would reach the next one: the connection is not handed out."""
        usable = _fresh(conn)
        conn.execute("LISTEN precog_readable")
        with psycopg.connect(pg_server.conninfo(test_db), autocommit=True) as other:
            other.execute("NOTIFY precog_readable")
        _until_readable(conn)
        assert not usable()

    def test_terminated_backend_is_not_usable(
        self, implementation: str, conn: psycopg.Connection[tuple[object, ...]], pg_server: Server, test_db: str
    ) -> None:
        usable = _fresh(conn)
        with psycopg.connect(pg_server.conninfo(test_db), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        _until_readable(conn)
        assert not usable()


def _until_readable(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Wait (bounded) for the server's message to reach the socket, without reading it."""
    ready, _, _ = select.select([conn.pgconn.socket], [], [], 10.0)
    assert ready, "the server's message did not arrive within 10 s"
