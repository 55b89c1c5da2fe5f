"""Network faults through a real TCP proxy: a silent path, reset connections, a refused port.

The proxy (`fault_proxy.FaultProxy`) sits between the pool and a throwaway
cluster. "Deaf" means the proxy keeps every socket open but forwards nothing:
the kernel still acknowledges every packet, so TCP keepalives and
``tcp_user_timeout`` see a healthy connection. That is the case of a hung
pgbouncer or load balancer, and the one a plain psycopg connection never
recovers from.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from precog_db import (
    CommitOutcomeUnknownError,
    ConnectionLostError,
    DatabaseUnavailableError,
    get_cursor,
    initialize_pool,
)
from precog_db.settings import DatabaseSettings
from tests._helpers.fault_proxy import FaultProxy, fault_proxy
from tests._helpers.faults import own_server, report, settled_pool_stats, wait_until
from tests._helpers.server import Server

pytestmark = pytest.mark.fault


@pytest.fixture
def proxied() -> Iterator[tuple[Server, FaultProxy]]:
    """A throwaway cluster with a ``precog_test`` database and a proxy in front of it."""
    with own_server() as server, fault_proxy(server.host, server.port) as proxy:
        yield server, proxy


def _through(server: Server, proxy: FaultProxy, **fields: Any) -> DatabaseSettings:
    return server.settings(port=proxy.port, **fields)


def _select_one() -> int:
    with get_cursor() as cur:
        cur.execute("SELECT 1 AS one")
        row = cur.fetchone()
        assert row is not None
        return int(row["one"])


def _in_thread(func: Any, timeout: float) -> tuple[bool, float, BaseException | None]:
    """Run ``func`` in a daemon thread; return (finished within timeout, seconds taken, exception)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            func()
        except BaseException as exc:
            outcome["error"] = exc
        outcome["took"] = time.monotonic() - started

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    return (not worker.is_alive(), outcome.get("took", timeout), outcome.get("error"))


class TestSilentPath:
    def test_connect_timeout_is_honoured(self, proxied: tuple[Server, FaultProxy]) -> None:
        """Opening a pool through a deaf proxy fails with DatabaseUnavailableError after DB_CONNECT_TIMEOUT."""
        server, proxy = proxied
        proxy.go_deaf()
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError, match="timeout") as info:
            initialize_pool(settings=_through(server, proxy, connect_timeout=1))
        took = time.monotonic() - started
        assert took < 1 + 3.0, took
        assert f"127.0.0.1:{proxy.port}" in str(info.value)
        report("silent_connect", connect_timeout_s=1, failed_after_s=round(took, 2))

    def test_statement_in_flight_is_bounded(self, proxied: tuple[Server, FaultProxy]) -> None:
        """With DB_STATEMENT_TIMEOUT set, a statement on a silent path fails after statement + tcp_user timeout."""
        server, proxy = proxied
        initialize_pool(
            settings=_through(server, proxy, pool_min=2, pool_max=2, statement_timeout_ms=500, tcp_user_timeout_ms=1000)
        )
        assert _select_one() == 1
        proxy.go_deaf()
        finished, took, error = _in_thread(_select_one, timeout=15)
        assert finished, "the statement hung on a silent path"
        assert isinstance(error, ConnectionLostError), repr(error)
        assert "no reply" in str(error) and "DB_STATEMENT_TIMEOUT" in str(error)
        assert 1.5 <= took < 1.5 + 2.0, took
        proxy.forward()
        # Service resumes once the path is back: the closed connection was replaced.
        load_ok = [_select_one() for _ in range(10)]
        assert load_ok == [1] * 10
        assert settled_pool_stats()["pool_available"] == 2
        report("silent_statement", reply_bound_s=1.5, failed_after_s=round(took, 2), error=type(error).__name__)

    def test_commit_in_flight_on_silent_path_is_reported_ambiguous(self, proxied: tuple[Server, FaultProxy]) -> None:
        """A COMMIT whose reply never comes raises CommitOutcomeUnknownError, never success or "not committed"."""
        server, proxy = proxied
        with server.connect("precog_test") as admin:
            admin.execute("CREATE TABLE silent_commit (id int)")
        initialize_pool(
            settings=_through(server, proxy, pool_min=1, pool_max=1, statement_timeout_ms=300, tcp_user_timeout_ms=700)
        )

        def write() -> None:
            with get_cursor(commit=True) as cur:
                cur.execute("INSERT INTO silent_commit VALUES (1)")
                proxy.go_deaf()  # the COMMIT sent when the block exits goes nowhere

        finished, took, error = _in_thread(write, timeout=15)
        assert finished
        assert isinstance(error, CommitOutcomeUnknownError), repr(error)
        assert "may have committed" in str(error)
        proxy.forward()  # the proxy relays the client's close; the server rolls back
        with server.connect("precog_test") as admin:
            assert wait_until(
                lambda: (
                    admin.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%'"
                    ).fetchone()
                    == (0,)
                ),
                timeout=10,
            )
            rows = admin.execute("SELECT count(*) FROM silent_commit").fetchone()
        # The ambiguity is real: the stalled proxy delivered the COMMIT once the
        # path came back, so the server committed what the client saw fail.
        assert rows == (1,)
        report("silent_commit", failed_after_s=round(took, 2), committed_anyway=rows == (1,))

    @pytest.mark.xfail(
        strict=True,
        raises=AssertionError,  # only the statement that never finished, not a setup or library error
        reason="known limit: with DB_STATEMENT_TIMEOUT=0 (the default) nothing bounds a statement on a path that "
        "keeps TCP alive but delivers nothing; the library cannot tell it from a long query. Set "
        "DB_STATEMENT_TIMEOUT (docs/RELIABILITY.md).",
    )
    def test_statement_without_statement_timeout_hangs(self, proxied: tuple[Server, FaultProxy]) -> None:
        """Without a statement timeout, a statement on a silent path waits until the path closes (documented limit)."""
        server, proxy = proxied
        initialize_pool(settings=_through(server, proxy, pool_min=1, pool_max=1, tcp_user_timeout_ms=1000))
        assert _select_one() == 1
        proxy.go_deaf()
        try:
            finished, _, _ = _in_thread(_select_one, timeout=6)
        finally:
            proxy.drop_all()  # release the stuck thread
        assert finished


class TestBrokenPath:
    def test_reset_connections_fail_fast_and_recover(self, proxied: tuple[Server, FaultProxy]) -> None:
        """The proxy resets every connection mid-statement: callers get ConnectionLostError at once, then succeed."""
        server, proxy = proxied
        initialize_pool(settings=_through(server, proxy, pool_min=3, pool_max=3))
        settled_pool_stats()

        def slow() -> None:
            with get_cursor() as cur:
                cur.execute("SELECT pg_sleep(2)")

        results: list[tuple[bool, float, BaseException | None]] = []
        threads = [threading.Thread(target=lambda: results.append(_in_thread(slow, 10))) for _ in range(3)]
        for t in threads:
            t.start()
        assert wait_until(lambda: proxy.open_connections == 3, timeout=5)
        time.sleep(0.3)
        dropped = proxy.drop_all()
        for t in threads:
            t.join(15)
        assert dropped == 3
        assert all(finished for finished, _, _ in results)
        assert all(isinstance(error, ConnectionLostError) for _, _, error in results), results
        assert max(took for _, took, _ in results) < 1.5
        assert [_select_one() for _ in range(5)] == [1] * 5
        report("proxy_reset", in_flight=3, failed=len(results), slowest_failure_s=round(max(r[1] for r in results), 2))

    def test_refused_port_while_connected(self, proxied: tuple[Server, FaultProxy]) -> None:
        """When the proxy stops accepting, open pooled connections keep serving; new ones fail clearly."""
        server, proxy = proxied
        initialize_pool(settings=_through(server, proxy, pool_min=2, pool_max=2, pool_timeout=1.0, connect_timeout=1))
        settled_pool_stats()
        proxy.stop_accepting()
        assert [_select_one() for _ in range(20)] == [1] * 20
        dropped = proxy.drop_all()
        assert dropped == 2
        # The reset connections are noticed at checkout (no call is lost on them);
        # new ones are refused, so the caller learns the server cannot be reached.
        with pytest.raises(DatabaseUnavailableError, match="cannot be reached"):
            _select_one()
        proxy.start_accepting()
        assert wait_until(lambda: _safe_select(), timeout=15)


def _safe_select() -> bool:
    try:
        return _select_one() == 1
    except (ConnectionLostError, DatabaseUnavailableError):
        return False
