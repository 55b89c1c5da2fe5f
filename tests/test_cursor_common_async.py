"""get_cursor and get_connection in both layers: read-only by default, transactional with commit=True.

The asyncio source: tests/test_cursor_common.py is generated from it
(tools/async_to_sync.py), so every scenario runs over `precog_db.aio` here and
over the sync API there. Where the layers differ (``conn.autocommit = False``
is ``await conn.set_autocommit(False)`` in asyncio) an ``if True:  # ASYNC``
branch says so.
"""

from __future__ import annotations

import typing  # ASYNC-ONLY
from typing import Any, assert_type

import psycopg
import pytest
import pytest_asyncio  # ASYNC-ONLY
from psycopg import AsyncCursor
from psycopg.adapt import Loader
from psycopg.rows import dict_row, tuple_row

if True:  # ASYNC
    import asyncio
    from collections.abc import Awaitable, Callable
else:
    import threading
    from collections.abc import Callable

if True:  # ASYNC
    from precog_db import aio as api
else:
    import precog_db as api
from precog_db import ReadOnlyWriteError, TransactionControlError
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server

if True:  # ASYNC

    @pytest_asyncio.fixture(autouse=True)
    async def _asyncio_pool_closed() -> typing.AsyncIterator[None]:
        """The asyncio pool is closed after each test, on the test's own loop."""
        try:
            yield
        finally:
            await api.close_pool()

    fixture = pytest_asyncio.fixture
else:
    fixture = pytest.fixture

pytestmark = pytest.mark.asyncio  # ASYNC-ONLY


@fixture
async def table(test_settings: DatabaseSettings) -> str:
    """An empty table cursor_items(id, name), on a pool that is full before the test starts.

    Wait for the pool's first connection before using it. Otherwise the first
    checkout queues, the pool grows by one (pool_size 2), and that second
    connection may still be opening in the background when a test checks that
    every connection is back (`assert_pool_clean`: pool_available 1 of 2).
    """
    pool = await api.initialize_pool(settings=test_settings)
    await pool.wait(timeout=test_settings.connect_timeout)
    async with api.get_cursor(commit=True) as cur:
        await cur.execute("DROP TABLE IF EXISTS cursor_items")
        await cur.execute("CREATE TABLE cursor_items (id serial PRIMARY KEY, name text NOT NULL)")
    return "cursor_items"


async def count(table: str) -> int:
    async with api.get_cursor() as cur:
        await cur.execute(f"SELECT count(*) AS n FROM {table}")
        row = await cur.fetchone()
        assert row is not None
        return int(row["n"])


async def assert_pool_clean(pg_server: Server, dbname: str) -> None:
    """Every connection the pool counts is back in it, and none is left idle in a transaction on the server.

    Exact only when no connection is being opened in the background, which the
    `table` fixture ensures: the pool starts full and these tests borrow one
    connection at a time, so it never grows.
    """
    stats = (await api.get_pool()).get_stats()
    assert stats["pool_available"] == stats["pool_size"], stats
    with pg_server.connect(dbname) as admin:
        stuck = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'precog-test' "
            "AND datname = current_database() AND state LIKE 'idle in transaction%'"  # not another run's
        ).fetchone()
    assert stuck == (0,)


class TestReadOnlyCursor:
    async def test_rows_are_dicts(self, table: str) -> None:
        """Rows come back as dicts by default."""
        async with api.get_cursor() as cur:
            await cur.execute("SELECT 1 AS a, 'x' AS b")
            assert await cur.fetchone() == {"a": 1, "b": "x"}

    async def test_row_factory_can_be_changed(self, table: str) -> None:
        """A row_factory argument overrides the dict default."""
        async with api.get_cursor(row_factory=tuple_row) as cur:
            await cur.execute("SELECT 1, 2")
            assert await cur.fetchone() == (1, 2)

    async def test_write_without_commit_fails_loudly_and_persists_nothing(
        self, table: str, pg_server: Server, test_db: str
    ) -> None:
        """A write in get_cursor() raises ReadOnlySqlTransaction; nothing is stored."""
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            async with api.get_cursor() as cur:
                await cur.execute("INSERT INTO cursor_items (name) VALUES ('lost')")
        assert await count(table) == 0
        await assert_pool_clean(pg_server, test_db)

    async def test_sql_error_leaves_connection_usable(self, table: str, pg_server: Server, test_db: str) -> None:
        """After a SQL error the connection returns to the pool idle and works."""
        with pytest.raises(psycopg.errors.UndefinedTable):
            async with api.get_cursor() as cur:
                await cur.execute("SELECT * FROM no_such_table")
        assert await count(table) == 0
        await assert_pool_clean(pg_server, test_db)

    async def test_a_read_costs_no_reset(self, table: str) -> None:
        """A plain read leaves the connection clean: it goes back without a reset and is lent again."""
        async with api.get_connection() as conn:
            first = conn
        async with api.get_cursor() as cur:
            await cur.execute("SELECT 1")
            assert cur.connection is first
            assert not cur.connection._precog.dirty  # type: ignore[attr-defined]

    async def test_cursor_is_closed_after_the_block(self, table: str) -> None:
        """The cursor cannot be used once its block ended (its connection may be someone else's)."""
        async with api.get_cursor() as cur:
            await cur.execute("SELECT 1")
        with pytest.raises(psycopg.InterfaceError):
            await cur.execute("SELECT 2")


class TestCommitCursor:
    async def test_clean_exit_commits(self, table: str) -> None:
        """commit=True commits when the block exits cleanly."""
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("INSERT INTO cursor_items (name) VALUES ('a'), ('b')")
        assert await count(table) == 2

    async def test_exception_rolls_back_and_propagates(self, table: str, pg_server: Server, test_db: str) -> None:
        """commit=True rolls back when the block raises, and the exception propagates."""

        class Boom(Exception):
            pass

        with pytest.raises(Boom):
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO cursor_items (name) VALUES ('gone')")
                raise Boom
        assert await count(table) == 0
        await assert_pool_clean(pg_server, test_db)

    async def test_sql_error_rolls_back_earlier_statements(self, table: str) -> None:
        """A failing statement rolls back the whole transaction."""
        with pytest.raises(psycopg.errors.NotNullViolation):
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO cursor_items (name) VALUES ('first')")
                await cur.execute("INSERT INTO cursor_items (name) VALUES (NULL)")
        assert await count(table) == 0

    async def test_transaction_is_atomic_and_isolated(self, table: str) -> None:
        """Other sessions do not see uncommitted rows of a commit=True block."""
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("INSERT INTO cursor_items (name) VALUES ('pending')")
            assert await count(table) == 0
        assert await count(table) == 1


class TestConnection:
    async def test_connection_is_autocommit_and_read_only_by_default(self, table: str) -> None:
        """get_connection yields an autocommit connection whose plain writes are refused."""
        async with api.get_connection() as conn:
            assert conn.autocommit
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                await conn.execute("INSERT INTO cursor_items (name) VALUES ('x')")

    async def test_transaction_block_writes(self, table: str) -> None:
        """conn.transaction() is a read-write transaction."""
        async with api.get_connection() as conn, conn.transaction():
            await conn.execute("INSERT INTO cursor_items (name) VALUES ('x')")
        assert await count(table) == 1

    async def test_state_changes_are_undone_on_return(
        self, table: str, pg_server: Server, test_settings: DatabaseSettings, test_db: str
    ) -> None:
        """A connection returned with autocommit off, read-only on, a row factory and a transaction open is restored."""
        await api.close_pool()
        await api.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
        async with api.get_connection() as conn:
            if True:  # ASYNC
                await conn.set_autocommit(False)
                await conn.set_read_only(True)
            else:
                conn.autocommit = False
                conn.read_only = True
            conn.row_factory = dict_row
            await conn.execute("SELECT 1")  # leaves a transaction open
        async with api.get_connection() as conn:
            assert conn.autocommit and conn.read_only is False
            assert conn.row_factory is not dict_row
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
        await assert_pool_clean(pg_server, test_db)


class TestHarness:
    async def test_table_fixture_leaves_a_full_pool_that_never_grew(self, table: str) -> None:
        """After the table fixture every connection the pool counts is open and idle, so assert_pool_clean is exact."""
        stats = (await api.get_pool()).get_stats()
        assert stats.get("requests_queued", 0) == 0, stats  # the first checkout did not wait, so no growth
        assert stats["pool_size"] == stats["pool_available"] == 1, stats


class TestForgottenCommit:
    async def test_write_in_a_read_block_says_to_use_commit_true(self, table: str) -> None:
        """An INSERT in get_cursor() raises ReadOnlyWriteError, still a ReadOnlySqlTransaction, naming the fix."""
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info:
            async with api.get_cursor() as cur:
                await cur.execute("INSERT INTO cursor_items (name) VALUES (%s)", ("x",))
        assert isinstance(info.value, ReadOnlyWriteError)
        message = str(info.value)
        assert "cannot execute INSERT in a read-only transaction" in message
        assert "get_cursor(commit=True)" in message
        assert info.value.sqlstate == "25006" and info.value.diag.sqlstate == "25006"
        assert await count(table) == 0

    async def test_nextval_in_a_read_block_says_to_use_commit_true(self, table: str) -> None:
        """nextval() in get_cursor() raises ReadOnlyWriteError naming get_cursor(commit=True)."""
        with pytest.raises(ReadOnlyWriteError, match=r"nextval\(\).*get_cursor\(commit=True\)"):
            async with api.get_cursor() as cur:
                await cur.execute("SELECT nextval('cursor_items_id_seq')")

    async def test_raw_connection_write_gets_the_same_hint(self, table: str) -> None:
        """A write through get_connection() outside a transaction gets the same error and hint."""
        async with api.get_connection() as conn:
            with pytest.raises(ReadOnlyWriteError, match=r"conn\.transaction\(\)"):
                await conn.execute("INSERT INTO cursor_items (name) VALUES ('x')")

    async def test_explicit_read_only_transaction_keeps_the_plain_error(self, table: str) -> None:
        """Inside a transaction the caller declared READ ONLY, the error is psycopg's own, without the hint."""
        async with api.get_connection() as conn:
            if True:  # ASYNC
                await conn.set_read_only(True)
            else:
                conn.read_only = True
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info:
                async with conn.transaction():
                    await conn.execute("INSERT INTO cursor_items (name) VALUES ('x')")
        assert not isinstance(info.value, ReadOnlyWriteError)


class TestPublicSignature:
    async def test_rows_are_typed_dicts_by_default(self, table: str) -> None:
        """get_cursor() is typed Cursor[dict[str, Any]] (checked by mypy over the tests) and yields dicts."""
        async with api.get_cursor() as cur:
            assert_type(cur, AsyncCursor[dict[str, Any]])
            await cur.execute("SELECT 1 AS one")
            row = await cur.fetchone()
        assert_type(row, dict[str, Any] | None)
        assert row == {"one": 1}

    async def test_a_row_factory_sets_the_row_type(self, table: str) -> None:
        """get_cursor(row_factory=tuple_row) is typed by its factory and yields tuples, with commit=True too."""
        async with api.get_cursor(row_factory=tuple_row) as cur:
            await cur.execute("SELECT 1, 'a'")
            row = await cur.fetchone()
        assert_type(row, tuple[Any, ...] | None)
        assert row == (1, "a")
        async with api.get_cursor(commit=True, row_factory=tuple_row) as tcur:
            assert_type(tcur, AsyncCursor[tuple[Any, ...]])
            await tcur.execute("SELECT 1, 2")
            assert await tcur.fetchone() == (1, 2)

    async def test_commit_is_keyword_only(self) -> None:
        """get_cursor(True) is a TypeError: a bare True does not say that it commits."""
        with pytest.raises(TypeError):
            api.get_cursor(True)  # type: ignore[call-overload]


class TestNextBorrower:
    """What one borrower changes in the session does not reach the next (precog_db.session, both pools)."""

    async def test_a_set_does_not_reach_the_next_borrower(self, table: str) -> None:
        """A borrower's SET (even turning read-only off) is undone by DISCARD ALL before the next one."""
        async with api.get_connection() as conn:
            async with conn.transaction():  # outside one, turning read-only off is refused unsent (21.7)
                await conn.execute("SET default_transaction_read_only = off")
            await conn.execute("SET application_name = 'changed'")
            first = conn
        async with api.get_cursor() as cur:
            assert cur.connection is first
            await cur.execute("SHOW default_transaction_read_only")
            assert await cur.fetchone() == {"default_transaction_read_only": "on"}
            await cur.execute("SHOW application_name")
            assert await cur.fetchone() == {"application_name": "precog-test"}

    async def test_a_temp_table_does_not_reach_the_next_borrower(self, table: str) -> None:
        """A temporary table is dropped before the connection is lent again."""
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("CREATE TEMP TABLE mine (x int) ON COMMIT PRESERVE ROWS")
        async with api.get_cursor() as cur:
            await cur.execute("SELECT to_regclass('pg_temp.mine') IS NULL AS gone")
            assert await cur.fetchone() == {"gone": True}

    async def test_a_hand_built_cursor_in_a_get_cursor_block_is_tracked(self, table: str) -> None:
        """A hand-built cursor on the lent connection bypasses cursor_factory; the prepare tracker sees its SET."""
        async with api.get_cursor() as cur:
            first = cur.connection
            await psycopg.AsyncCursor(first).execute("SET application_name = 'leaked'")
        async with api.get_cursor() as cur:
            assert cur.connection is first
            await cur.execute("SHOW application_name")
            assert await cur.fetchone() == {"application_name": "precog-test"}

    async def test_a_raw_connection_always_pays_the_reset(self, table: str) -> None:
        """A get_connection() borrower may send what no tracker sees, so its return runs DISCARD ALL."""
        async with api.get_connection() as conn:
            first = conn
            await conn.execute("SELECT 1")
            assert conn._precog.dirty is True  # type: ignore[attr-defined]
        async with api.get_cursor() as cur:
            assert cur.connection is first
            assert first._precog.dirty is False  # type: ignore[attr-defined]

    async def test_adapters_registered_by_a_borrower_are_undone(self, table: str) -> None:
        """A loader a borrower registers on the connection does not reach the next borrower."""

        class TextInt(Loader):
            def load(self, data: Any) -> str:
                return "loaded:" + bytes(data).decode()

        async with api.get_connection() as conn:
            first = conn
            conn.adapters.register_loader("int4", TextInt)
            cur = await conn.execute("SELECT 1::int4 AS n")
            assert await cur.fetchone() == ("loaded:1",)
        async with api.get_cursor() as cur:
            assert cur.connection is first
            await cur.execute("SELECT 1::int4 AS n")
            assert await cur.fetchone() == {"n": 1}


if True:  # ASYNC

    async def _within(block: Callable[[], Awaitable[None]], seconds: float) -> None:
        """Run ``block``; fail if it has not ended after ``seconds`` (a hang shows as a failure, not a stuck suite)."""
        await asyncio.wait_for(block(), seconds)
else:

    def _within(block: Callable[[], None], seconds: float) -> None:
        """Run ``block`` in a thread; fail if it has not ended after ``seconds``."""
        errors: list[BaseException] = []

        def run() -> None:
            try:
                block()
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(seconds)
        assert not worker.is_alive(), f"the block did not end within {seconds}s"
        if errors:
            raise errors[0]


class TestKeptStream:
    """A ``stream()`` its borrower keeps half-read when the block ends.

    psycopg holds the connection's lock between the rows of a stream, so the return's
    session reset, which takes that lock, used to wait for ever (22.18, found by the pooler
    attacks). The block ends, the connection is closed instead of restored (its state is
    unknown), and the next borrower is served.
    """

    async def test_a_half_read_stream_does_not_hang_a_read_block(self, table: str) -> None:
        kept: list[Any] = []

        async def block() -> None:
            async with api.get_cursor() as cur:
                stream = cur.stream("SELECT generate_series(1, 100000) AS n")
                assert await anext(stream) == {"n": 1}
                kept.append(stream)  # still referenced, half-read, when the block ends

        await _within(block, 15.0)
        assert await count(table) == 0  # the pool lends a working connection
        # The kept stream cannot go on reading from a connection the pool may lend again: it was closed.
        with pytest.raises(psycopg.OperationalError):
            await anext(kept[0])

    async def test_a_half_read_stream_in_a_commit_block_commits_nothing_and_says_why(self, table: str) -> None:
        kept: list[Any] = []

        async def block() -> None:
            with pytest.raises(TransactionControlError, match="stream"):
                async with api.get_cursor(commit=True) as cur:
                    await cur.execute(f"INSERT INTO {table} (name) VALUES ('kept')")
                    stream = cur.stream("SELECT generate_series(1, 100000) AS n")
                    assert await anext(stream) == {"n": 1}
                    kept.append(stream)

        await _within(block, 15.0)
        assert await count(table) == 0  # rolled back, and the pool lends a working connection
        with pytest.raises(psycopg.OperationalError):
            await anext(kept[0])
