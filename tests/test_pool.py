"""The pool on a real server: opening, idempotence, the production guard, dead connections, exhaustion."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.pq import Trace
from structlog.testing import capture_logs

from precog_db import (
    ConfigurationError,
    DatabaseUnavailableError,
    Environment,
    PoolExhaustedError,
    PoolStateError,
    ProductionAccessError,
    close_pool,
    get_connection,
    get_cursor,
    get_pool,
    initialize_pool,
    stamp_database,
)
from precog_db.local.cluster import free_port
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server

SECRET = "pw-Sentinel-77x"


class TestOpening:
    def test_named_pool_and_application_name(self, test_settings: DatabaseSettings, pg_server: Server) -> None:
        """The pool is named precog-<env> and pg_stat_activity shows the environment."""
        pool = initialize_pool(settings=test_settings)
        assert pool.name == "precog-test"
        with get_cursor() as cur:
            cur.execute("SELECT current_setting('application_name') AS app")
            assert cur.fetchone() == {"app": "precog-test"}
        with pg_server.connect() as admin:
            apps = {r[0] for r in admin.execute("SELECT application_name FROM pg_stat_activity").fetchall()}
        assert "precog-test" in apps

    def test_conninfo_does_not_hold_password(self, pg_server: Server, test_db: str) -> None:
        """The pool's conninfo string and repr carry no password."""
        settings = pg_server.settings(test_db).replace(password=SECRET)
        pool_repr = ""
        try:
            pool = initialize_pool(settings=settings)
            pool_repr = repr(pool) + str(pool.conninfo)
        except DatabaseUnavailableError:
            pass  # trust auth may still accept; either way check what we built
        assert SECRET not in pool_repr

    def test_idempotent_for_same_target(self, test_settings: DatabaseSettings) -> None:
        """Initializing twice for the same target returns the same pool."""
        assert initialize_pool(settings=test_settings) is initialize_pool(settings=test_settings)
        assert get_pool() is initialize_pool(settings=test_settings)

    def test_thread_safe_initialization(self, test_settings: DatabaseSettings) -> None:
        """Concurrent initializations produce exactly one pool."""
        pools = []
        barrier = threading.Barrier(8)

        def init() -> None:
            barrier.wait()
            pools.append(initialize_pool(settings=test_settings))

        threads = [threading.Thread(target=init) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(pools) == 8 and len({id(p) for p in pools}) == 1

    def test_other_environment_without_close_is_an_error(
        self, test_settings: DatabaseSettings, pg_server: Server
    ) -> None:
        """Initializing for a different environment while a pool is open raises PoolStateError."""
        initialize_pool(settings=test_settings)
        dev = pg_server.settings("scratch", env=Environment.DEV)
        with pytest.raises(PoolStateError, match="close_pool"):
            initialize_pool(settings=dev)
        close_pool()
        close_pool()  # idempotent

    def test_unreachable_server_is_one_clear_error(self) -> None:
        """No server listening: one DatabaseUnavailableError naming host, port and database, quickly."""
        port = free_port()
        settings = DatabaseSettings(
            env=Environment.TEST, host="127.0.0.1", port=port, dbname="precog_test", password=SECRET, connect_timeout=2
        )
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError) as info:
            initialize_pool(settings=settings)
        assert time.monotonic() - started < 10
        message = str(info.value)
        assert f"127.0.0.1:{port}" in message and "precog_test" in message
        assert SECRET not in message and SECRET not in repr(info.value)
        assert isinstance(info.value, psycopg.OperationalError)

    def test_missing_database_is_named(self, pg_server: Server) -> None:
        """A database that does not exist is reported with the server's reason."""
        with pytest.raises(DatabaseUnavailableError, match="does not exist"):
            initialize_pool(settings=pg_server.settings("precog_test_missing"))

    def test_lazy_initialization_from_environment(
        self, monkeypatch: pytest.MonkeyPatch, pg_server: Server, test_db: str
    ) -> None:
        """get_cursor opens the pool from PRECOG_ENV and DB_* on first use."""
        monkeypatch.setenv("PRECOG_ENV", "test")
        for key, value in pg_server.env_vars(test_db).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("DB_SSLMODE", "disable")
        with get_cursor() as cur:
            cur.execute("SELECT current_database() AS db")
            assert cur.fetchone() == {"db": test_db}
        assert get_pool().env is Environment.TEST


class TestProductionGuard:
    def prod_settings(self, pg_server: Server) -> DatabaseSettings:
        pg_server.fresh_database("trading_live") if not _exists(pg_server, "trading_live") else None
        settings = pg_server.settings("trading_live", env=Environment.PROD)
        stamp_database("prod", settings=settings)  # an unstamped prod database is refused (test_stamp.py)
        return settings

    @pytest.mark.parametrize("value", [None, "", "YES", "yes ", "true", "1"])
    def test_refused_without_exact_confirmation(
        self, value: str | None, monkeypatch: pytest.MonkeyPatch, pg_server: Server
    ) -> None:
        """Anything but PRECOG_PROD_CONFIRMED=yes refuses production, before connecting."""
        if value is not None:
            monkeypatch.setenv("PRECOG_PROD_CONFIRMED", value)
        # Port with nothing listening: if a connection were attempted we would
        # get DatabaseUnavailableError instead of the refusal.
        settings = DatabaseSettings(env=Environment.PROD, host="127.0.0.1", port=free_port(), dbname="trading_live")
        with pytest.raises(ProductionAccessError, match="PRECOG_PROD_CONFIRMED=yes"):
            initialize_pool(settings=settings)

    def test_confirmed_access_is_logged_without_password(
        self, monkeypatch: pytest.MonkeyPatch, pg_server: Server
    ) -> None:
        """Confirmed production access opens the pool and logs a warning with who and where."""
        monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        settings = self.prod_settings(pg_server).replace(password=SECRET)
        with capture_logs() as logs:
            try:
                initialize_pool(settings=settings)
            except DatabaseUnavailableError:
                pytest.fail("trust-auth server refused the connection")
        events = [e for e in logs if e["event"] == "production_access"]
        assert len(events) == 1
        event = events[0]
        assert event["log_level"] == "warning"
        for key in ("os_user", "host", "port", "dbname", "pid", "env"):
            assert key in event
        assert event["env"] == "prod" and event["dbname"] == "trading_live"
        assert SECRET not in repr(logs)


def _exists(server: Server, name: str) -> bool:
    with server.connect() as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


class TestDeadConnections:
    def _terminate_pool_backends(self, pg_server: Server, app: str = "precog-test") -> int:
        with pg_server.connect() as admin:
            rows = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app,)
            ).fetchall()
        time.sleep(0.2)
        return len(rows)

    def test_terminated_backends_cost_no_failed_call(self, pg_server: Server, test_db: str) -> None:
        """After pg_terminate_backend on every pooled backend, calls keep working (at most one may fail)."""
        initialize_pool(settings=pg_server.settings(test_db, pool_min=4, pool_max=4))
        for _ in range(8):
            with get_cursor() as cur:
                cur.execute("SELECT 1")
        assert self._terminate_pool_backends(pg_server) >= 1
        failures = 0
        for _ in range(20):
            try:
                with get_cursor() as cur:
                    cur.execute("SELECT 1 AS one")
                    assert cur.fetchone() == {"one": 1}
            except psycopg.OperationalError:
                failures += 1
        assert failures <= 1

    def test_no_round_trip_added_to_checkout(self, test_settings: DatabaseSettings, tmp_path: Path) -> None:
        """libpq's protocol trace shows one round trip per read and BEGIN/INSERT/COMMIT per committed write."""
        initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
        with get_cursor(commit=True) as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS rt_probe (x int)")
        trace = tmp_path / "trace.txt"
        with trace.open("w") as fh:
            with get_cursor() as cur:  # a get_connection() block would add its own reset to the trace
                conn = cur.connection
                conn.pgconn.trace(fh.fileno())
                conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
            for _ in range(3):
                with get_cursor() as cur:
                    cur.execute("SELECT 1")
            with get_cursor(commit=True) as cur:
                cur.execute("INSERT INTO rt_probe VALUES (1)")
            with get_cursor() as cur:
                cur.connection.pgconn.untrace()
        lines = trace.read_text().splitlines()
        round_trips = [line for line in lines if "\tReadyForQuery" in line and line.startswith("B")]
        sent = [line.split("\t")[3] for line in lines if line.startswith("F") and "\tQuery\t" in line]
        assert len(round_trips) == 3 + 3, lines
        assert sent == [
            ' "SELECT 1"',
            ' "SELECT 1"',
            ' "SELECT 1"',
            ' "BEGIN READ WRITE"',
            ' "INSERT INTO rt_probe VALUES (1)"',
            ' "COMMIT"',
        ], sent


class TestExhaustion:
    def test_waiter_gets_clear_timeout(self, test_settings: DatabaseSettings) -> None:
        """With every connection held, a waiter gets PoolExhaustedError naming pool, environment and setting."""
        initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1, pool_timeout=0.5))
        with get_cursor(), pytest.raises(PoolExhaustedError) as info, get_cursor():
            pass
        message = str(info.value)
        assert "precog-test" in message and "(test)" in message and "DB_POOL_MAX_CONN" in message
        with get_cursor() as cur:  # the held connection came back
            cur.execute("SELECT 1")
        assert get_pool().get_stats()["pool_available"] == 1


class TestPoolArguments:
    def test_configure_runs_after_the_librarys_own_setup(self, test_settings: DatabaseSettings) -> None:
        """A configure= callback runs on every connection without replacing the library's setup."""
        seen: list[int] = []

        def configure(conn: psycopg.Connection[Any]) -> None:
            seen.append(conn.info.backend_pid)
            conn.execute("SET application_name = 'configured'")

        initialize_pool(
            settings=test_settings.replace(pool_min=1, pool_max=1, statement_timeout_ms=5000), configure=configure
        )
        with get_cursor(commit=True) as cur:  # explicit transactions are still read-write
            cur.execute("CREATE TABLE IF NOT EXISTS cfg_probe (x int)")
            cur.execute("INSERT INTO cfg_probe VALUES (1)")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), get_cursor() as cur:
            cur.execute("INSERT INTO cfg_probe VALUES (2)")  # plain blocks are still read-only
        with get_connection() as conn:
            assert getattr(conn, "reply_timeout", None) is not None  # the stalled-server bound is kept
            assert conn.execute("SHOW application_name").fetchone() == ("configured",)
        assert len(set(seen)) == 1  # the pool's one connection, set up by configure

    def test_configure_is_run_again_after_a_reset(self, test_settings: DatabaseSettings) -> None:
        """After a block that changed the session is reset, the caller's configure= setup is in place again."""

        def configure(conn: psycopg.Connection[Any]) -> None:
            conn.execute("SET application_name = 'configured'")

        initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1), configure=configure)
        with get_cursor() as cur:
            cur.execute("SET application_name = 'changed'")
        with get_cursor() as cur:
            cur.execute("SHOW application_name")
            assert cur.fetchone() == {"application_name": "configured"}

    @pytest.mark.parametrize("key", ["kwargs", "conninfo"])
    def test_connection_arguments_are_refused_clearly(self, key: str, test_settings: DatabaseSettings) -> None:
        """kwargs= or conninfo= in the pool arguments is a ConfigurationError pointing at DatabaseSettings."""
        value: Any = {"options": "-c default_transaction_read_only=off"} if key == "kwargs" else "dbname=x"
        with pytest.raises(ConfigurationError, match="DatabaseSettings") as info:
            initialize_pool(settings=test_settings.replace(password=SECRET), **{key: value})
        assert key in str(info.value) and SECRET not in str(info.value)


class TestStatistics:
    def test_a_timed_out_request_is_counted_once(self, test_settings: DatabaseSettings) -> None:
        """A request that times out counts in requests_num, once."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1, pool_timeout=0.2))
        held = pool.checkout()
        before = pool.get_stats().get("requests_num", 0)
        with pytest.raises(PoolExhaustedError):
            pool.checkout()
        assert pool.get_stats().get("requests_num", 0) == before + 1
        pool.checkin(held)

    def test_a_request_that_discarded_a_dead_connection_is_counted_once(
        self, test_settings: DatabaseSettings, pg_server: Server
    ) -> None:
        """A request that found its connection dead and waited for another counts in requests_num once."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
        conn = pool.checkout()
        pid = conn.info.backend_pid
        pool.checkin(conn)
        with pg_server.connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.2)
        before = pool.get_stats().get("requests_num", 0)
        with get_cursor() as cur:
            cur.execute("SELECT pg_backend_pid() AS pid")
            row = cur.fetchone()
            assert row is not None and row["pid"] != pid
        assert pool.get_stats().get("requests_num", 0) == before + 1
