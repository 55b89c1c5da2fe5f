"""precog_db.aio: the asyncio API keeps the sync API's rules, against a real server."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any, assert_type

import psycopg
import pytest
import pytest_asyncio
from psycopg import AsyncConnection, AsyncCursor
from psycopg.rows import dict_row, tuple_row

from precog_db import ConfigurationError, ReadOnlyWriteError, aio
from precog_db.apool import AsyncPrecogPool
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server


@pytest_asyncio.fixture
async def apool(test_settings: DatabaseSettings) -> AsyncIterator[AsyncPrecogPool]:
    """The process-wide asyncio pool on the test database, full before the test starts, closed after it."""
    pool = await aio.initialize_pool(settings=test_settings)
    await pool.wait(timeout=10)
    try:
        yield pool
    finally:
        await aio.close_pool()


@pytest_asyncio.fixture
async def items(apool: AsyncPrecogPool) -> str:
    """An empty table aio_items(id, name)."""
    async with aio.get_cursor(commit=True) as cur:
        await cur.execute("DROP TABLE IF EXISTS aio_items")
        await cur.execute("CREATE TABLE aio_items (id serial PRIMARY KEY, name text NOT NULL)")
    return "aio_items"


async def count(table: str) -> int:
    async with aio.get_cursor() as cur:
        await cur.execute(f"SELECT count(*) AS n FROM {table}")
        row = await cur.fetchone()
        assert row is not None
        return int(row["n"])


def server_sessions(pg_server: Server, dbname: str) -> tuple[int, int]:
    """(sessions of the test's pools, of which idle in a transaction), seen by the server."""
    with pg_server.connect(dbname) as admin:
        row = admin.execute(
            "SELECT count(*), count(*) FILTER (WHERE state LIKE 'idle in transaction%') "
            "FROM pg_stat_activity WHERE application_name = 'precog-test' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def assert_clean(pool: AsyncPrecogPool, pg_server: Server, dbname: str) -> None:
    """Every connection the pool counts is back in it, and none is idle in a transaction on the server."""
    stats = pool.get_stats()
    assert stats["pool_available"] == stats["pool_size"], stats
    assert server_sessions(pg_server, dbname)[1] == 0


@pytest.mark.asyncio
class TestCursor:
    async def test_rows_are_dicts(self, apool: AsyncPrecogPool) -> None:
        """Rows come back as dicts by default."""
        async with aio.get_cursor() as cur:
            await cur.execute("SELECT 1 AS a, 'x' AS b")
            assert await cur.fetchone() == {"a": 1, "b": "x"}

    async def test_row_factory_can_be_changed(self, apool: AsyncPrecogPool) -> None:
        """A row_factory argument overrides the dict default."""
        async with aio.get_cursor(row_factory=tuple_row) as cur:
            await cur.execute("SELECT 1, 2")
            assert await cur.fetchone() == (1, 2)

    async def test_keyword_only_and_typed(self, apool: AsyncPrecogPool) -> None:
        """As in the sync API: aio.get_cursor(True) is a TypeError, and the cursor's row type is known."""
        with pytest.raises(TypeError):
            aio.get_cursor(True)  # type: ignore[call-overload]
        async with aio.get_cursor() as cur:
            assert_type(cur, AsyncCursor[dict[str, Any]])
        async with aio.get_cursor(commit=True, row_factory=tuple_row) as tcur:
            assert_type(tcur, AsyncCursor[tuple[Any, ...]])
            await tcur.execute("SELECT 1, 2")
            assert await tcur.fetchone() == (1, 2)

    async def test_plain_cursor_is_read_only(self, items: str) -> None:
        """A write outside commit=True raises ReadOnlyWriteError and writes nothing."""
        with pytest.raises(ReadOnlyWriteError, match="commit=True"):
            async with aio.get_cursor() as cur:
                await cur.execute("INSERT INTO aio_items (name) VALUES ('x')")
        assert await count(items) == 0

    async def test_commit_true_commits(self, items: str) -> None:
        """commit=True commits the block's writes."""
        async with aio.get_cursor(commit=True) as cur:
            await cur.execute("INSERT INTO aio_items (name) VALUES ('a'), ('b')")
        assert await count(items) == 2

    async def test_commit_true_rolls_back_when_the_block_raises(
        self, items: str, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        """An exception in a commit=True block rolls back and propagates; the connection goes back idle."""
        with pytest.raises(ZeroDivisionError):
            async with aio.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO aio_items (name) VALUES ('a')")
                raise ZeroDivisionError
        assert await count(items) == 0
        assert_clean(apool, pg_server, test_db)

    async def test_a_read_costs_no_reset(self, apool: AsyncPrecogPool) -> None:
        """A plain read leaves the connection clean: it goes back without a reset and is lent again."""
        async with aio.get_connection() as conn:
            first = conn
        async with aio.get_cursor() as cur:
            await cur.execute("SELECT 1")
            assert cur.connection is first
            assert not cur.connection._precog_dirty  # type: ignore[attr-defined]

    async def test_get_connection_transaction(self, items: str) -> None:
        """get_connection lends the raw connection; its transaction() writes."""
        async with aio.get_connection() as conn, conn.transaction():
            await conn.execute("INSERT INTO aio_items (name) VALUES ('x')")
        assert await count(items) == 1

    async def test_cursor_is_closed_after_the_block(self, apool: AsyncPrecogPool) -> None:
        """The cursor cannot be used once its block ended (its connection may be someone else's)."""
        async with aio.get_cursor() as cur:
            await cur.execute("SELECT 1")
        with pytest.raises(psycopg.InterfaceError):
            await cur.execute("SELECT 2")


@pytest.mark.asyncio
class TestIsolation:
    async def test_a_set_does_not_reach_the_next_borrower(self, apool: AsyncPrecogPool) -> None:
        """A borrower's SET (even turning read-only off) is undone by DISCARD ALL before the next one."""
        async with aio.get_connection() as conn:
            async with conn.transaction():  # outside one, turning read-only off is refused unsent (21.7)
                await conn.execute("SET default_transaction_read_only = off")
            await conn.execute("SET application_name = 'changed'")
            first = conn
        async with aio.get_cursor() as cur:
            assert cur.connection is first
            await cur.execute("SHOW default_transaction_read_only")
            assert await cur.fetchone() == {"default_transaction_read_only": "on"}
            await cur.execute("SHOW application_name")
            assert await cur.fetchone() == {"application_name": "precog-test"}

    async def test_a_temp_table_does_not_reach_the_next_borrower(self, apool: AsyncPrecogPool) -> None:
        """A temporary table is dropped before the connection is lent again."""
        async with aio.get_cursor(commit=True) as cur:
            await cur.execute("CREATE TEMP TABLE mine (x int) ON COMMIT PRESERVE ROWS")
        async with aio.get_cursor() as cur:
            await cur.execute("SELECT to_regclass('pg_temp.mine') IS NULL AS gone")
            assert await cur.fetchone() == {"gone": True}

    async def test_client_attributes_are_restored(self, apool: AsyncPrecogPool) -> None:
        """Autocommit, read_only and row_factory changed by a borrower are put back."""
        async with aio.get_connection() as conn:
            await conn.set_autocommit(False)
            await conn.set_read_only(True)
            conn.row_factory = dict_row
            await conn.execute("SELECT 1")  # leaves a transaction open
        async with aio.get_connection() as conn:
            assert conn.autocommit is True
            assert conn.read_only is False
            assert conn.row_factory is not dict_row
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE


@pytest.mark.asyncio
class TestSharedSessionRules:
    """The sync pool's session rules (precog_db.session) hold on the asyncio pool too."""

    async def test_a_hand_built_cursor_in_a_get_cursor_block_is_tracked(self, apool: AsyncPrecogPool) -> None:
        """A hand-built cursor on the lent connection bypasses cursor_factory; the prepare tracker sees its SET."""
        async with aio.get_cursor() as cur:
            first = cur.connection
            await psycopg.AsyncCursor(first).execute("SET application_name = 'leaked'")
        async with aio.get_cursor() as cur:
            assert cur.connection is first
            await cur.execute("SHOW application_name")
            assert await cur.fetchone() == {"application_name": "precog-test"}

    async def test_a_raw_connection_always_pays_the_reset(self, apool: AsyncPrecogPool) -> None:
        """A get_connection() borrower may send what no tracker sees, so its return runs DISCARD ALL."""
        async with aio.get_connection() as conn:
            first = conn
            await conn.execute("SELECT 1")
            assert conn._precog_dirty is True  # type: ignore[attr-defined]
        async with aio.get_cursor() as cur:
            assert cur.connection is first
            assert first._precog_dirty is False  # type: ignore[attr-defined]

    async def test_adapters_registered_by_a_borrower_are_undone(self, apool: AsyncPrecogPool) -> None:
        """A loader a borrower registers on the connection does not reach the next borrower."""
        from psycopg.adapt import Loader

        class TextInt(Loader):
            def load(self, data: Any) -> str:
                return "loaded:" + bytes(data).decode()

        async with aio.get_connection() as conn:
            first = conn
            conn.adapters.register_loader("int4", TextInt)
            cur = await conn.execute("SELECT 1::int4 AS n")
            assert await cur.fetchone() == ("loaded:1",)
        async with aio.get_cursor() as cur:
            assert cur.connection is first
            await cur.execute("SELECT 1::int4 AS n")
            assert await cur.fetchone() == {"n": 1}

    async def test_pool_metrics_include_the_asyncio_pool(self, apool: AsyncPrecogPool) -> None:
        """pool_metrics() reports the asyncio pool: its uses and the connections it created."""
        from precog_db.metrics import pool_metrics

        for _ in range(3):
            async with aio.get_cursor() as cur:
                await cur.execute("SELECT 1")
        snapshots = [s for s in pool_metrics() if s.pool_name == apool.name]
        assert len(snapshots) == 1
        snap = snapshots[0]
        assert sum(snap.use_time.counts) >= 3
        assert sum(snap.create_time.counts) >= 1
        assert snap.max == apool.max_size


class TestTopologyRefusals:
    @pytest.mark.asyncio
    async def test_a_transaction_mode_pooler_is_refused(self, test_settings: DatabaseSettings) -> None:
        """DB_POOLER=transaction is sync-only: the asyncio pool refuses it before connecting, saying what to do."""
        settings = test_settings.replace(pooler="transaction")
        with pytest.raises(ConfigurationError, match="DB_POOLER=transaction"):
            await aio.initialize_pool(settings=settings)
        assert aio_pool_is_closed()


class TestParity:
    @pytest.mark.parametrize(
        "name",
        ["get_cursor", "get_connection", "initialize_pool", "get_pool", "close_pool", "truncate_tables", "delete_all"],
    )
    def test_aio_accepts_every_keyword_of_its_sync_twin(self, name: str) -> None:
        """Same parameter names, kinds and defaults as the sync function (issue 22: replica= was missing)."""
        import precog_db

        def shape(fn: Any) -> list[tuple[str, Any, Any]]:
            return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

        assert shape(getattr(aio, name)) == shape(getattr(precog_db, name))

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"pipeline": True},
            {"replica": True, "commit": True},
            {"replica": True, "commit": True, "pipeline": True},
            {"replica": True, "pipeline": True},
        ],
    )
    def test_aio_refuses_what_its_sync_twin_refuses(self, kwargs: dict[str, bool]) -> None:
        """22.17: get_cursor's keyword combinations that cannot work are refused alike in both layers (same class,
        same words but for the ``aio.`` prefix), before anything is borrowed."""
        import precog_db

        outcomes = []
        for fn in (precog_db.get_cursor, aio.get_cursor):
            with pytest.raises((ValueError, ConfigurationError)) as info:
                fn(**kwargs)
            outcomes.append((type(info.value), str(info.value).removeprefix("aio.")))
        assert outcomes[0] == outcomes[1], outcomes


def aio_pool_is_closed() -> bool:
    from precog_db.apool import active_pool

    return active_pool() is None


class TestPoolArguments:
    @pytest.mark.parametrize("key", ["kwargs", "conninfo"])
    def test_arguments_that_would_bypass_the_rules_are_refused(self, test_settings: DatabaseSettings, key: str) -> None:
        """kwargs=/conninfo= (they would replace the settings) raise ConfigurationError; check=/reset= are
        accepted, with the sync pool's meaning (tests/test_pool_psycopg_semantics.py)."""
        value: Any = {}
        with pytest.raises(ConfigurationError, match=f"{key}="):
            AsyncPrecogPool(test_settings, **{key: value})

    @pytest.mark.asyncio
    async def test_configure_runs_after_the_library_setup(self, test_settings: DatabaseSettings) -> None:
        """An async configure= runs on each connection after the library's setup, which it cannot undo."""
        seen: list[bool] = []

        async def configure(conn: AsyncConnection[Any]) -> None:
            seen.append(conn.read_only is False)
            await conn.execute("SET application_name = 'configured'")

        pool = await aio.initialize_pool(settings=test_settings, configure=configure)
        try:
            async with aio.get_cursor() as cur:
                await cur.execute("SHOW application_name")
                assert await cur.fetchone() == {"application_name": "configured"}
            with pytest.raises(ReadOnlyWriteError):
                async with aio.get_cursor() as cur:
                    await cur.execute("CREATE TABLE never_created (x int)")
            assert seen and all(seen)
            assert pool.get_stats()["pool_size"] >= 1
        finally:
            await aio.close_pool()
