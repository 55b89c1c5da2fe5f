"""The pool of each layer on a real server: opening, idempotence, the production guard, dead connections, exhaustion.

The asyncio source: tests/test_pool_common.py is generated from it
(tools/async_to_sync.py), so every scenario runs over `precog_db.aio` /
`AsyncPrecogPool` here and over the sync API / `PrecogPool` there. Where the
layers differ (``lend``/``give_back`` here, ``checkout``/``checkin`` there) an
``if True:  # ASYNC`` branch says so. Threads against the sync pool stay in
tests/test_pool.py; cancellation against the asyncio pool in tests/test_aio_faults.py.
"""

from __future__ import annotations

import asyncio  # ASYNC-ONLY
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio  # ASYNC-ONLY
from psycopg import AsyncConnection
from psycopg.pq import Trace
from structlog.testing import capture_logs

from precog_db import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConnectionLostError,
    DatabaseUnavailableError,
    Environment,
    PoolExhaustedError,
    PoolStateError,
    ProductionAccessError,
    stamp_database,
)
from precog_db._conn_state import ConnState
from precog_db.local.cluster import free_port
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server

if True:  # ASYNC
    from precog_db import aio as api
    from precog_db.apool import AsyncPrecogPool as Pool

    @pytest_asyncio.fixture(autouse=True)
    async def _asyncio_pool_closed() -> AsyncIterator[None]:
        """The asyncio pool is closed after each test, on the test's own loop."""
        try:
            yield
        finally:
            await api.close_pool()
else:
    import precog_db as api
    from precog_db.pool import PrecogPool as Pool

pytestmark = pytest.mark.asyncio  # ASYNC-ONLY

SECRET = "pw-Sentinel-77x"


async def _take(pool: Pool, timeout: float | None = None) -> AsyncConnection[Any]:
    """A connection out of ``pool`` by the layer's own lending call (give it back with `_give`)."""
    if True:  # ASYNC
        return await pool.lend(timeout)
    else:
        return pool.checkout(timeout)


async def _give(pool: Pool, conn: AsyncConnection[Any]) -> None:
    if True:  # ASYNC
        await pool.give_back(conn)
    else:
        pool.checkin(conn)


async def _pause(seconds: float) -> None:
    if True:  # ASYNC
        await asyncio.sleep(seconds)
    else:
        time.sleep(seconds)


def _exists(server: Server, name: str) -> bool:
    with server.connect() as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def _sessions(pg_server: Server, dbname: str) -> tuple[int, int]:
    """(sessions of the test's pools on ``dbname``, of which not idle), seen by the server."""
    with pg_server.connect(dbname) as admin:
        row = admin.execute(
            "SELECT count(*), count(*) FILTER (WHERE state <> 'idle') FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = 'precog-test' AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def _settled(pool: Pool, timeout: float = 10.0) -> dict[str, int]:
    """The pool's stats once every connection it counts is back and idle (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = pool.get_stats()
        if stats.get("pool_available", 0) == stats.get("pool_size", -1) >= pool.min_size:
            break
        await _pause(0.05)
    return dict(pool.get_stats())


async def _assert_no_leak(pool: Pool, pg_server: Server, dbname: str) -> None:
    """Every connection is back in the pool, and the server sees exactly those, all idle."""
    stats = await _settled(pool)
    assert stats["pool_available"] == stats["pool_size"], stats
    assert _sessions(pg_server, dbname) == (stats["pool_size"], 0), stats


class TestOpening:
    async def test_named_pool_and_application_name(self, test_settings: DatabaseSettings, pg_server: Server) -> None:
        """The pool is named precog-<env> and pg_stat_activity shows the environment."""
        pool = await api.initialize_pool(settings=test_settings)
        assert pool.name == "precog-test"
        async with api.get_cursor() as cur:
            await cur.execute("SELECT current_setting('application_name') AS app")
            assert await cur.fetchone() == {"app": "precog-test"}
        with pg_server.connect() as admin:
            apps = {r[0] for r in admin.execute("SELECT application_name FROM pg_stat_activity").fetchall()}
        assert "precog-test" in apps

    async def test_conninfo_and_repr_do_not_hold_the_password(self, test_settings: DatabaseSettings) -> None:
        """The pool's conninfo string and repr carry no password (trust auth accepts any password)."""
        pool = await api.initialize_pool(settings=test_settings.replace(password=SECRET))
        text = repr(pool) + str(pool.conninfo)
        assert SECRET not in text and "precog-test" in text

    async def test_idempotent_for_same_target(self, test_settings: DatabaseSettings) -> None:
        """Initializing twice for the same target returns the same pool."""
        pool = await api.initialize_pool(settings=test_settings)
        assert await api.initialize_pool(settings=test_settings) is pool
        assert await api.get_pool() is pool

    async def test_other_environment_without_close_is_an_error(
        self, test_settings: DatabaseSettings, pg_server: Server
    ) -> None:
        """Initializing for a different environment while a pool is open raises PoolStateError."""
        await api.initialize_pool(settings=test_settings)
        dev = pg_server.settings("scratch", env=Environment.DEV)
        with pytest.raises(PoolStateError, match="close_pool"):
            await api.initialize_pool(settings=dev)
        await api.close_pool()
        await api.close_pool()  # idempotent

    async def test_unreachable_server_is_one_clear_error(self) -> None:
        """No server listening: one DatabaseUnavailableError naming host, port and database, quickly."""
        port = free_port()
        settings = DatabaseSettings(
            env=Environment.TEST, host="127.0.0.1", port=port, dbname="precog_test", password=SECRET, connect_timeout=2
        )
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError) as info:
            await api.initialize_pool(settings=settings)
        assert time.monotonic() - started < 10
        message = str(info.value)
        assert f"127.0.0.1:{port}" in message and "precog_test" in message
        assert SECRET not in message and SECRET not in repr(info.value)
        assert isinstance(info.value, psycopg.OperationalError)

    async def test_missing_database_is_named(self, pg_server: Server) -> None:
        """A database that does not exist is reported with the server's reason."""
        with pytest.raises(DatabaseUnavailableError, match="does not exist"):
            await api.initialize_pool(settings=pg_server.settings("precog_test_missing"))

    async def test_lazy_initialization_from_environment(
        self, monkeypatch: pytest.MonkeyPatch, pg_server: Server, test_db: str
    ) -> None:
        """get_cursor opens the pool from PRECOG_ENV and DB_* on first use."""
        monkeypatch.setenv("PRECOG_ENV", "test")
        for key, value in pg_server.env_vars(test_db).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("DB_SSLMODE", "disable")
        async with api.get_cursor() as cur:
            await cur.execute("SELECT current_database() AS db")
            assert await cur.fetchone() == {"db": test_db}
        assert (await api.get_pool()).env is Environment.TEST


class TestProductionGuard:
    def prod_settings(self, pg_server: Server) -> DatabaseSettings:
        pg_server.fresh_database("trading_live") if not _exists(pg_server, "trading_live") else None
        settings = pg_server.settings("trading_live", env=Environment.PROD)
        stamp_database("prod", settings=settings)  # an unstamped prod database is refused (test_stamp.py)
        return settings

    @pytest.mark.parametrize("value", [None, "", "YES", "yes ", "true", "1"])
    async def test_refused_without_exact_confirmation(
        self, value: str | None, monkeypatch: pytest.MonkeyPatch, pg_server: Server
    ) -> None:
        """Anything but PRECOG_PROD_CONFIRMED=yes refuses production, before connecting."""
        if value is not None:
            monkeypatch.setenv("PRECOG_PROD_CONFIRMED", value)
        # Port with nothing listening: if a connection were attempted we would
        # get DatabaseUnavailableError instead of the refusal.
        settings = DatabaseSettings(env=Environment.PROD, host="127.0.0.1", port=free_port(), dbname="trading_live")
        with pytest.raises(ProductionAccessError, match="PRECOG_PROD_CONFIRMED=yes"):
            await api.initialize_pool(settings=settings)

    async def test_confirmed_access_is_logged_without_password(
        self, monkeypatch: pytest.MonkeyPatch, pg_server: Server
    ) -> None:
        """Confirmed production access opens the pool and logs a warning with who and where."""
        monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        settings = self.prod_settings(pg_server).replace(password=SECRET)
        with capture_logs() as logs:
            try:
                await api.initialize_pool(settings=settings)
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


class TestDeadConnections:
    async def test_terminated_backends_cost_no_failed_call(self, pg_server: Server, test_db: str) -> None:
        """After pg_terminate_backend on every pooled backend, calls keep working (at most one may fail)."""
        await api.initialize_pool(settings=pg_server.settings(test_db, pool_min=4, pool_max=4))
        for _ in range(8):
            async with api.get_cursor() as cur:
                await cur.execute("SELECT 1")
        with pg_server.connect() as admin:
            terminated = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'precog-test'"
            ).fetchall()
        assert len(terminated) >= 1
        await _pause(0.2)
        failures = 0
        for _ in range(20):
            try:
                async with api.get_cursor() as cur:
                    await cur.execute("SELECT 1 AS one")
                    assert await cur.fetchone() == {"one": 1}
            except psycopg.OperationalError:
                failures += 1
        assert failures <= 1

    async def test_terminated_idle_connection_is_skipped_without_a_round_trip(
        self, test_settings: DatabaseSettings, pg_server: Server, test_db: str
    ) -> None:
        """An idle connection whose backend was terminated is discarded at checkout; the caller gets a live one."""
        pool = await api.initialize_pool(settings=test_settings.replace(pool_min=2, pool_max=2, pool_timeout=30.0))
        await pool.wait(timeout=10)
        async with api.get_cursor() as cur:
            await cur.execute("SELECT pg_backend_pid() AS pid")
            row = await cur.fetchone()
            assert row is not None
            victim = row["pid"]
        with pg_server.connect(test_db) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (victim,))
        await _pause(0.2)  # the FATAL message reaches the idle socket
        lost_before = pool.get_stats().get("connections_lost", 0)
        async with api.get_cursor() as cur:
            await cur.execute("SELECT pg_backend_pid() AS pid")
            row = await cur.fetchone()
        assert row is not None and row["pid"] != victim
        assert pool.get_stats().get("connections_lost", 0) == lost_before + 1
        await _assert_no_leak(pool, pg_server, test_db)

    async def test_backend_terminated_mid_block(
        self, test_settings: DatabaseSettings, pg_server: Server, test_db: str
    ) -> None:
        """A backend terminated while a block uses it raises ConnectionLostError; the pool replaces it."""
        pool = await api.initialize_pool(settings=test_settings.replace(pool_min=2, pool_max=2, pool_timeout=30.0))
        await pool.wait(timeout=10)
        with pytest.raises(ConnectionLostError, match="retry the operation") as info:
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("SELECT pg_backend_pid() AS pid")
                row = await cur.fetchone()
                assert row is not None
                with pg_server.connect(test_db) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (row["pid"],))
                await cur.execute("SELECT 1")
        assert not isinstance(info.value, CommitOutcomeUnknownError)
        await _assert_no_leak(pool, pg_server, test_db)

    async def test_no_round_trip_added_to_checkout(self, test_settings: DatabaseSettings, tmp_path: Path) -> None:
        """libpq's protocol trace shows one round trip per read, and BEGIN+INSERT then COMMIT per committed write."""
        await api.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("CREATE TABLE IF NOT EXISTS rt_probe (x int)")
        trace = tmp_path / "trace.txt"
        with trace.open("w") as fh:
            async with api.get_cursor() as cur:  # a get_connection() block would add its own reset to the trace
                conn = cur.connection
                conn.pgconn.trace(fh.fileno())
                conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
            for _ in range(3):
                async with api.get_cursor() as cur:
                    await cur.execute("SELECT 1")
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO rt_probe VALUES (1)")
            async with api.get_cursor() as cur:
                cur.connection.pgconn.untrace()
        lines = trace.read_text().splitlines()
        round_trips = [line for line in lines if "\tReadyForQuery" in line and line.startswith("B")]
        sent = [line.split("\t")[3] for line in lines if line.startswith("F") and "\tQuery\t" in line]
        parsed = [line.split("\t")[3] for line in lines if line.startswith("F") and "\tParse\t" in line]
        syncs = [line for line in lines if line.startswith("F") and "\tSync" in line]
        assert len(round_trips) == 3 + 2, lines
        assert sent == [' "SELECT 1"', ' "SELECT 1"', ' "SELECT 1"', ' "COMMIT"'], sent
        # BEGIN and the INSERT travel together, in one pipeline with one Sync.
        assert [p.split('"')[3] for p in parsed] == ["BEGIN READ WRITE", "INSERT INTO rt_probe VALUES (1)"], parsed
        assert len(syncs) == 1, lines


class TestExhaustion:
    async def test_waiter_gets_clear_timeout(self, test_settings: DatabaseSettings) -> None:
        """With every connection held, a waiter gets PoolExhaustedError naming pool, environment and setting."""
        pool = await api.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1, pool_timeout=0.5))
        async with api.get_cursor():
            with pytest.raises(PoolExhaustedError) as info:
                async with api.get_cursor():
                    pass
            with pytest.raises(PoolExhaustedError, match="DB_POOL_MAX_CONN"):  # a timeout of the call's own
                await _take(pool, timeout=0.1)
        message = str(info.value)
        assert "precog-test" in message and "(test)" in message and "DB_POOL_MAX_CONN" in message
        async with api.get_cursor() as cur:  # the held connection came back
            await cur.execute("SELECT 1")
        assert (await api.get_pool()).get_stats()["pool_available"] == 1


class TestPoolArguments:
    async def test_configure_runs_after_the_librarys_own_setup(self, test_settings: DatabaseSettings) -> None:
        """A configure= callback runs on every connection without replacing the library's setup."""
        seen: list[tuple[int, bool]] = []

        async def configure(conn: AsyncConnection[Any]) -> None:
            seen.append((conn.info.backend_pid, conn.read_only is False))
            await conn.execute("SET application_name = 'configured'")

        await api.initialize_pool(
            settings=test_settings.replace(pool_min=1, pool_max=1, statement_timeout_ms=5000), configure=configure
        )
        async with api.get_cursor(commit=True) as cur:  # explicit transactions are still read-write
            await cur.execute("CREATE TABLE IF NOT EXISTS cfg_probe (x int)")
            await cur.execute("INSERT INTO cfg_probe VALUES (1)")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            async with api.get_cursor() as cur:
                await cur.execute("INSERT INTO cfg_probe VALUES (2)")  # plain blocks are still read-only
        async with api.get_connection() as conn:
            assert getattr(conn, "reply_timeout", None) is not None  # the stalled-server bound is kept
            assert await (await conn.execute("SHOW application_name")).fetchone() == ("configured",)
        assert len({pid for pid, _ in seen}) == 1  # the pool's one connection, set up by configure
        assert all(writable for _, writable in seen)  # configure runs after the library's setup

    async def test_configure_is_run_again_after_a_reset(self, test_settings: DatabaseSettings) -> None:
        """After a block that changed the session is reset, the caller's configure= setup is in place again."""

        async def configure(conn: AsyncConnection[Any]) -> None:
            await conn.execute("SET application_name = 'configured'")

        await api.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1), configure=configure)
        async with api.get_cursor() as cur:
            await cur.execute("SET application_name = 'changed'")
        async with api.get_cursor() as cur:
            await cur.execute("SHOW application_name")
            assert await cur.fetchone() == {"application_name": "configured"}

    @pytest.mark.parametrize("key", ["kwargs", "conninfo"])
    async def test_connection_arguments_are_refused_clearly(self, key: str, test_settings: DatabaseSettings) -> None:
        """kwargs= or conninfo= in the pool arguments is a ConfigurationError pointing at DatabaseSettings."""
        value: Any = {"options": "-c default_transaction_read_only=off"} if key == "kwargs" else "dbname=x"
        with pytest.raises(ConfigurationError, match="DatabaseSettings") as info:
            await api.initialize_pool(settings=test_settings.replace(password=SECRET), **{key: value})
        assert key in str(info.value) and SECRET not in str(info.value)


class TestStatistics:
    async def test_a_timed_out_request_is_counted_once(self, test_settings: DatabaseSettings) -> None:
        """A request that times out counts in requests_num, once."""
        pool = await api.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1, pool_timeout=0.2))
        held = await _take(pool)
        before = pool.get_stats().get("requests_num", 0)
        with pytest.raises(PoolExhaustedError):
            await _take(pool)
        assert pool.get_stats().get("requests_num", 0) == before + 1
        await _give(pool, held)

    async def test_a_request_that_discarded_a_dead_connection_is_counted_once(
        self, test_settings: DatabaseSettings, pg_server: Server
    ) -> None:
        """A request that found its connection dead and waited for another counts in requests_num once."""
        pool = await api.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
        conn = await _take(pool)
        pid = conn.info.backend_pid
        await _give(pool, conn)
        with pg_server.connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await _pause(0.2)
        before = pool.get_stats().get("requests_num", 0)
        async with api.get_cursor() as cur:
            await cur.execute("SELECT pg_backend_pid() AS pid")
            row = await cur.fetchone()
            assert row is not None and row["pid"] != pid
        assert pool.get_stats().get("requests_num", 0) == before + 1


class TestConnState:
    async def test_a_pooled_connection_carries_its_state_as_one_object(self, test_settings: DatabaseSettings) -> None:
        """precog_db's per-connection state is one `ConnState` at ``conn._precog``, no loose ``_precog_*`` attribute."""
        pool = await api.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("SELECT 1")
            conn: Any = cur.connection
            assert conn._precog.pending_begin is None  # the block's BEGIN went with its first statement
        conn = await _take(pool)
        try:
            st = conn._precog
            assert isinstance(st, ConnState)
            assert st.lent is not None and st.writer is True and not st.busy and not st.shared
            assert st.factories is not None and conn.cursor_factory is st.factories[0]  # adopted
            assert [name for name in vars(conn) if name.startswith("_precog_")] == []
        finally:
            await _give(pool, conn)
        assert conn._precog is st and st.lent is None  # the same object, through the return
