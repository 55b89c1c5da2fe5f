"""Server-side faults on a real PostgreSQL: restarts under load, terminated backends, idle timeouts.

Each test owns a throwaway cluster (see `faults.own_server`) so it may stop,
restart or reconfigure it. Measured results are printed with a
``RELIABILITY`` prefix (run with ``-s``) and quoted in docs/RELIABILITY.md.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

import psycopg
import pytest

import precog_db._pool_base as pool_base
from precog_db import (
    CommitOutcomeUnknownError,
    ConnectionLostError,
    DatabaseUnavailableError,
    PrecogDBError,
    get_cursor,
    get_pool,
    initialize_pool,
)
from tests._helpers.faults import APP, Workload, own_server, pool_sessions, report, settled_pool_stats, wait_until
from tests._helpers.server import Server

pytestmark = pytest.mark.fault

#: Errors a caller may see while the server restarts: each says what happened and what to do.
CLEAR_ERRORS = {ConnectionLostError, CommitOutcomeUnknownError, DatabaseUnavailableError}


def _ledger(server: Server) -> None:
    with server.connect("precog_test") as conn:
        conn.execute("CREATE TABLE ledger (id bigint PRIMARY KEY, writer int NOT NULL)")
        conn.execute("CREATE TABLE ledger_mirror (id bigint PRIMARY KEY)")


def _on_disk(server: Server) -> tuple[set[int], set[int]]:
    with server.connect("precog_test") as conn:
        ledger = {r[0] for r in conn.execute("SELECT id FROM ledger").fetchall()}
        mirror = {r[0] for r in conn.execute("SELECT id FROM ledger_mirror").fetchall()}
    return ledger, mirror


def _mixed_call(thread: int, seq: int) -> tuple[str, int] | None:
    """Odd threads write (two rows, one transaction); even threads read."""
    if thread % 2:
        row_id = thread * 1_000_000 + seq
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO ledger (id, writer) VALUES (%s, %s)", (row_id, thread))
            cur.execute("INSERT INTO ledger_mirror (id) VALUES (%s)", (row_id,))
        return ("write", row_id)
    with get_cursor() as cur:
        cur.execute("SELECT count(*) AS n FROM pg_class")
        cur.fetchone()
    return None


class TestRestartUnderLoad:
    @pytest.mark.slow
    @pytest.mark.parametrize("mode", ["fast", "immediate"])
    def test_restart_during_steady_workload(self, mode: str) -> None:
        """Restart mid-load: in-flight calls fail clearly and fast, the pool recovers alone, no leak, no lost commit."""
        with own_server() as server:
            _ledger(server)
            assert server.cluster is not None
            timeout, connect_timeout = 1.5, 2
            initialize_pool(
                settings=server.settings(pool_min=4, pool_max=4, pool_timeout=timeout, connect_timeout=connect_timeout)
            )
            attempted: dict[int, str] = {}
            lock = threading.Lock()

            def body(thread: int, seq: int) -> Any:
                if thread % 2:
                    row_id = thread * 1_000_000 + seq
                    with lock:
                        attempted[row_id] = "pending"
                    try:
                        result = _mixed_call(thread, seq)
                    except CommitOutcomeUnknownError:
                        with lock:
                            attempted[row_id] = "unknown"
                        raise
                    except Exception:
                        with lock:
                            attempted[row_id] = "failed"
                        raise
                    with lock:
                        attempted[row_id] = "committed"
                    return result
                return _mixed_call(thread, seq)

            load = Workload(body, threads=6, max_seconds=60, pause=0.002).start()
            try:
                assert load.wait_for_successes(after=0, per_thread=20, timeout=15)
                stopped_at = time.monotonic()
                server.cluster.stop(mode)
                down_at = time.monotonic()
                time.sleep(2.0)
                server.cluster.start()
                up_at = time.monotonic()
                recovered = load.wait_for_successes(after=up_at, per_thread=10, timeout=30)
            finally:
                hung = load.stop(join_timeout=timeout + connect_timeout + 10)
            assert hung == [], f"threads did not finish: {hung}"
            assert recovered, f"pool did not recover within 30s: {load.outcomes(since=up_at)}"

            failures = load.failures()
            unclear = [c for c in failures if type(c.error) not in CLEAR_ERRORS]
            assert unclear == [], [f"{c.outcome}: {c.error}" for c in unclear]
            for call in failures:
                assert isinstance(call.error, PrecogDBError) and isinstance(call.error, psycopg.OperationalError)
            # Bounded: no call waited much longer than the checkout timeout plus one connect attempt.
            longest = max(c.duration for c in load.calls)
            assert longest < timeout + connect_timeout + 2.0, longest

            # No leak: every connection is back in the pool, idle, and the server sees exactly those.
            stats = settled_pool_stats()
            assert stats["pool_available"] == stats["pool_size"] == 4, stats
            assert stats.get("requests_waiting", 0) == 0
            sessions = pool_sessions(server)
            assert len(sessions) == 4 and all(state == "idle" for _, state in sessions), sessions

            # Data: every reported commit is on disk (in both tables), every failed one is not.
            ledger, mirror = _on_disk(server)
            assert ledger == mirror, "a transaction was half-applied"
            committed = {i for i, s in attempted.items() if s == "committed"}
            failed = {i for i, s in attempted.items() if s == "failed"}
            unknown = {i for i, s in attempted.items() if s == "unknown"}
            assert committed <= ledger, f"reported committed but missing: {sorted(committed - ledger)[:5]}"
            assert not (failed & ledger), f"reported failed but on disk: {sorted(failed & ledger)[:5]}"
            assert ledger <= committed | unknown

            first_ok = min(c.ended for c in load.calls if c.outcome == "ok" and c.started >= up_at)
            report(
                f"restart_{mode}",
                stop_s=round(down_at - stopped_at, 2),
                outage_s=round(up_at - stopped_at, 2),
                recovered_after_up_s=round(first_ok - up_at, 2),
                calls=len(load.calls),
                failed={k: v for k, v in load.outcomes().items() if k != "ok"},
                longest_call_s=round(longest, 2),
                commits_reported=len(committed),
                commits_failed=len(failed),
                commits_unknown=len(unknown),
                unknown_on_disk=len(unknown & ledger),
            )


class TestReconnectBackoff:
    @pytest.mark.slow
    def test_reconnect_attempts_are_capped_during_a_long_outage(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """While the server is down the pool retries at least every MAX_RECONNECT_DELAY s, so it recovers promptly."""
        monkeypatch.setattr(pool_base, "MAX_RECONNECT_DELAY", 1.0)
        with own_server() as server:
            assert server.cluster is not None
            initialize_pool(settings=server.settings(pool_min=1, pool_max=1, pool_timeout=1.0, connect_timeout=2))
            with get_cursor() as cur:
                cur.execute("SELECT 1")
            attempts: list[float] = []

            class Recorder(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    if record.getMessage().startswith("error connecting in"):
                        attempts.append(time.monotonic())

            handler = Recorder(level=logging.WARNING)
            pool_logger = logging.getLogger("psycopg.pool")
            pool_logger.addHandler(handler)
            try:
                server.cluster.stop("fast")
                down_at = time.monotonic()
                # The dead connection is noticed at the next checkout.
                with pytest.raises(DatabaseUnavailableError, match="cannot be reached"), get_cursor() as cur:
                    cur.execute("SELECT 1")
                time.sleep(8.0)
                server.cluster.start()
                up_at = time.monotonic()
                assert wait_until(lambda: get_pool().get_stats().get("pool_available", 0) == 1, timeout=10)
                recovered_at = time.monotonic()
            finally:
                pool_logger.removeHandler(handler)
            gaps = [b - a for a, b in itertools.pairwise(attempts)]
            # Uncapped, psycopg_pool waits 1, 2, 4, 8 s between attempts.
            assert len(attempts) >= 5, attempts
            assert max(gaps) < 1.0 * 1.1 + 0.5, gaps
            assert recovered_at - up_at < 1.0 * 1.1 + 1.5
            report(
                "reconnect_backoff",
                outage_s=round(up_at - down_at, 1),
                cap_s=1.0,
                failed_attempts=len(attempts),
                max_gap_s=round(max(gaps), 2),
                recovered_after_up_s=round(recovered_at - up_at, 2),
            )

    def test_timeout_while_connections_are_reopened_is_not_exhaustion(self) -> None:
        """A caller timing out while some connections still wait out their reconnect back-off is not told "all busy".

        After an outage the pool comes back one connection at a time. Here one of its three connections
        is open and busy, one was just re-opened and is busy, and the third is still in psycopg_pool's
        reconnect back-off: the caller that times out must get DatabaseUnavailableError, not
        PoolExhaustedError ("3 of at most 3 connections are busy", which is false). This is what made
        TestRestartUnderLoad fail on a busy machine.
        """
        with own_server() as server:
            pool = initialize_pool(settings=server.settings(pool_min=3, pool_max=3, pool_timeout=5.0))
            settled_pool_stats()
            held, dead_held, dead_idle = pool.checkout(), pool.checkout(), pool.checkout()
            pool.checkin(dead_idle)
            failures: list[float] = []

            class Recorder(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    if record.getMessage().startswith("error connecting in"):
                        failures.append(time.monotonic())

            handler = Recorder(level=logging.WARNING)
            pool_logger = logging.getLogger("psycopg.pool")
            pool_logger.addHandler(handler)
            admin = server.connect()
            try:
                # The server stays up; the database refuses new connections, open ones keep working.
                for conn in (dead_held, dead_idle):
                    admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
                admin.execute("ALTER DATABASE precog_test ALLOW_CONNECTIONS false")
                pool.check()  # finds the idle connection dead: its replacement fails and is retried
                # Back-off: retried ~1 s, ~2 s, then ~4 s later: after the third failure the next retry is
                # at least 3.6 s away, ample time for the steps below even on a loaded machine.
                assert wait_until(lambda: len(failures) >= 3, timeout=20), failures
                admin.execute("ALTER DATABASE precog_test ALLOW_CONNECTIONS true")

                holding, release = threading.Event(), threading.Event()

                def waiter() -> None:
                    conn = pool.checkout(timeout=10)
                    holding.set()
                    release.wait(30)
                    pool.checkin(conn)

                thread = threading.Thread(target=waiter, daemon=True)
                thread.start()
                assert wait_until(lambda: pool.get_stats().get("requests_waiting", 0) == 1, timeout=10)
                # The waiter gets the dead connection, drops it, and a replacement opens at once.
                pool.checkin(dead_held)
                assert holding.wait(10), "the waiter got no connection"
                assert len(failures) == 3, "the back-off retry ran already: the scenario did not happen"
                with pytest.raises(PrecogDBError) as info:
                    pool.checkout(timeout=0.3)
                assert len(failures) == 3 and pool.get_stats()["pool_available"] == 0
            finally:
                pool_logger.removeHandler(handler)
                admin.execute("ALTER DATABASE precog_test ALLOW_CONNECTIONS true")
                admin.close()
            release.set()
            thread.join(10)
            pool.checkin(held)
            assert isinstance(info.value, DatabaseUnavailableError), str(info.value)
            message = str(info.value)
            assert "still re-opening 1 of its connections" in message and "not currently accepting" in message
            assert "DB_POOL_MAX_CONN" not in message
            # The retry still comes, and the pool is whole again.
            assert wait_until(lambda: pool.get_stats().get("pool_available", 0) == 3, timeout=15), pool.get_stats()

    def test_outage_error_names_the_reason_not_pool_size(self) -> None:
        """A caller timing out while the server is down gets DatabaseUnavailableError with the reason."""
        with own_server() as server:
            assert server.cluster is not None
            initialize_pool(settings=server.settings(pool_min=2, pool_max=2, pool_timeout=1.0, connect_timeout=1))
            with get_cursor() as cur:
                cur.execute("SELECT 1")
            server.cluster.stop("fast")
            with pytest.raises(DatabaseUnavailableError) as info, get_cursor() as cur:
                cur.execute("SELECT 1")
            message = str(info.value)
            assert "precog-test" in message and "cannot be reached" in message
            assert "Connection refused" in message, "the server's reason, not only libpq's generic hint"
            assert "DB_POOL_MAX_CONN" not in message
            assert isinstance(info.value, psycopg.OperationalError)


class TestTerminatedBackends:
    def _terminate_all(self, server: Server) -> list[int]:
        with server.connect() as admin:
            pids = [
                r[0]
                for r in admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = 'precog_test'", (APP,)
                ).fetchall()
            ]
            for pid in pids:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert wait_until(
                lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchone(),
                timeout=10,
            )
        return pids

    def test_idle_backends_terminated(self) -> None:
        """pg_terminate_backend on every idle pooled backend: at most one caller sees an error, then all succeed."""
        with own_server() as server:
            initialize_pool(settings=server.settings(pool_min=4, pool_max=4))
            settled_pool_stats()
            killed = self._terminate_all(server)
            assert len(killed) == 4
            load = Workload(_read_backend_pid, threads=8, max_seconds=30)
            load.start()
            assert load.wait_for_successes(after=0, per_thread=5, timeout=20)
            assert load.stop() == []
            failures = load.failures()
            assert len(failures) <= 1, [str(c.error) for c in failures]
            assert all(isinstance(c.error, ConnectionLostError) for c in failures)
            survivors = {c.payload for c in load.calls if c.outcome == "ok"}
            assert not survivors & set(killed), "a terminated backend answered"
            report("terminate_idle", terminated=len(killed), calls=len(load.calls), failed=len(failures))

    def test_busy_backends_terminated(self) -> None:
        """Backends killed mid-statement: only statements in flight fail (ConnectionLostError), then service resumes."""
        with own_server() as server:
            initialize_pool(settings=server.settings(pool_min=4, pool_max=4))
            settled_pool_stats()

            def slow(thread: int, seq: int) -> int:
                with get_cursor() as cur:
                    cur.execute("SELECT pg_backend_pid() AS pid, pg_sleep(0.2)")
                    row = cur.fetchone()
                    assert row is not None
                    return int(row["pid"])

            load = Workload(slow, threads=4, max_seconds=30).start()
            try:
                assert load.wait_for_successes(after=0, per_thread=2, timeout=10)
                killed_at = time.monotonic()
                killed = self._terminate_all(server)
                assert load.wait_for_successes(after=time.monotonic(), per_thread=3, timeout=15)
            finally:
                assert load.stop() == []
            failures = load.failures()
            assert 1 <= len(failures) <= len(killed) == 4, [str(c.error) for c in failures]
            assert all(isinstance(c.error, ConnectionLostError) for c in failures), [c.outcome for c in failures]
            assert all(c.started < killed_at + 0.5 for c in failures), "a call failed after the terminate settled"
            assert settled_pool_stats()["pool_available"] == 4
            report("terminate_busy", terminated=len(killed), in_flight_failed=len(failures), calls=len(load.calls))


def _read_backend_pid(thread: int, seq: int) -> int:
    with get_cursor() as cur:
        cur.execute("SELECT pg_backend_pid() AS pid")
        row = cur.fetchone()
        assert row is not None
        return int(row["pid"])


class TestIdleSessionTimeout:
    def test_idle_pooled_connections_killed_by_server(self) -> None:
        """The server's idle_session_timeout closes idle pooled connections; the next callers all succeed."""
        with own_server() as server:
            with server.connect() as admin:
                admin.execute("ALTER DATABASE precog_test SET idle_session_timeout = '500ms'")
            initialize_pool(settings=server.settings(pool_min=4, pool_max=4))
            settled_pool_stats()
            first_pids = {pid for pid, _ in pool_sessions(server)}
            assert len(first_pids) == 4
            assert wait_until(lambda: not pool_sessions(server), timeout=10), "server did not time the sessions out"
            load = Workload(_read_backend_pid, threads=4, max_seconds=30)
            load.start()
            assert load.wait_for_successes(after=0, per_thread=5, timeout=20)
            assert load.stop() == []
            assert load.failures() == []
            assert not {c.payload for c in load.calls} & first_pids
            report(
                "idle_session_timeout",
                killed_idle=len(first_pids),
                calls_after=len(load.calls),
                failed=len(load.failures()),
                discarded=get_pool().get_stats().get("returns_bad", 0),
            )
