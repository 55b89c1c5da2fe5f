"""Issue 16 in precog_db.aio: BEGIN with the first statement, and pipeline=True, awaited.

Round trips are counted on the wire by `bench.wire.RoundTripCounter` (the server's
``ReadyForQuery`` messages): exact counts, never timings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest
import pytest_asyncio

from bench.wire import RoundTripCounter
from precog_db import CommitOutcomeUnknownError, ConfigurationError, ConnectionLostError, ReadOnlyWriteError, aio
from precog_db._aconnection import PrecogAsyncConnection
from precog_db.apool import AsyncPrecogPool
from precog_db.settings import DatabaseSettings
from tests._helpers.fault_proxy import fault_proxy
from tests._helpers.server import Server

INSERT = "INSERT INTO apipe_items (id, qty) VALUES (%s, %s)"

pytestmark = pytest.mark.asyncio


@pytest.fixture
def table(pg_server: Server, test_db: str) -> str:
    with pg_server.connect(test_db) as admin:
        admin.execute("DROP TABLE IF EXISTS apipe_items")
        admin.execute("CREATE TABLE apipe_items (id int PRIMARY KEY, qty int NOT NULL CHECK (qty >= 0))")
        admin.execute("INSERT INTO apipe_items VALUES (0, 0)")
    return "apipe_items"


@pytest_asyncio.fixture
async def apool(test_settings: DatabaseSettings, table: str) -> AsyncIterator[AsyncPrecogPool]:
    pool = await aio.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
    await pool.wait(timeout=10)
    try:
        yield pool
    finally:
        await aio.close_pool()


@pytest_asyncio.fixture
async def counter(test_settings: DatabaseSettings, table: str) -> AsyncIterator[RoundTripCounter]:
    """A pool of one asyncio connection that talks to the server through the round-trip counting proxy."""
    with RoundTripCounter(test_settings.host, int(test_settings.port)) as proxy:
        pool = await aio.initialize_pool(settings=test_settings.replace(port=proxy.port, pool_min=1, pool_max=1))
        await pool.wait(timeout=10)
        async with aio.get_cursor() as cur:  # warm: the connection is open, its setup done
            await cur.execute("SELECT 1")
        try:
            yield proxy
        finally:
            await aio.close_pool()  # before the proxy goes


async def _trips(proxy: RoundTripCounter, block: Callable[[], Awaitable[None]]) -> int:
    proxy.reset()
    await block()
    return proxy.round_trips


def assert_clean(pool: AsyncPrecogPool, pg_server: Server, dbname: str) -> None:
    """Every connection the pool counts is back in it, and none is idle in a transaction on the server."""
    stats = pool.get_stats()
    assert stats["pool_available"] == stats["pool_size"], stats
    with pg_server.connect(dbname) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'precog-test' "
            "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
        ).fetchone()
    assert row == (0,)


def _rows(pg_server: Server, test_db: str) -> list[tuple[int, int]]:
    with pg_server.connect(test_db) as admin:
        return [(int(a), int(b)) for a, b in admin.execute("SELECT id, qty FROM apipe_items WHERE id > 0 ORDER BY id")]


class TestRoundTripsOnTheWire:
    async def test_one_statement_committed_block_costs_two(self, counter: RoundTripCounter) -> None:
        """aio.get_cursor(commit=True) with one INSERT: BEGIN+INSERT, then COMMIT (it cost 3 before)."""

        async def block() -> None:
            async with aio.get_cursor(commit=True) as cur:
                await cur.execute(INSERT, (1, 1))

        assert await _trips(counter, block) == 2

    async def test_txn3_costs_four(self, counter: RoundTripCounter) -> None:
        """SELECT (fetched), UPDATE, INSERT: 4 round trips instead of 5."""

        async def block() -> None:
            async with aio.get_cursor(commit=True) as cur:
                await cur.execute("SELECT qty FROM apipe_items WHERE id = %s", (0,))
                assert await cur.fetchone() == {"qty": 0}
                await cur.execute("UPDATE apipe_items SET qty = qty + %s WHERE id = %s", (1, 0))
                await cur.execute(INSERT, (3, 3))

        assert await _trips(counter, block) == 4

    async def test_empty_committed_block_costs_nothing(self, counter: RoundTripCounter) -> None:
        async def block() -> None:
            async with aio.get_cursor(commit=True):
                pass

        assert await _trips(counter, block) == 0

    async def test_pipelined_batch_of_ten_costs_one(self, counter: RoundTripCounter) -> None:
        """pipeline=True: BEGIN, ten INSERTs and COMMIT in one round trip."""

        async def block() -> None:
            async with aio.get_cursor(commit=True, pipeline=True) as cur:
                for i in range(10):
                    await cur.execute(INSERT, (10 + i, i))

        assert await _trips(counter, block) == 1

    async def test_connection_first_costs_the_old_three(self, counter: RoundTripCounter) -> None:
        """A statement through cur.connection first: BEGIN alone, the statement, COMMIT (as before issue 16)."""

        async def block() -> None:
            async with aio.get_cursor(commit=True) as cur:
                await cur.connection.execute(INSERT, (40, 1))

        assert await _trips(counter, block) == 3


class TestTransparent:
    async def test_error_is_raised_by_the_failing_execute(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        raised_by: list[str] = []
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with aio.get_cursor(commit=True) as cur:
                try:
                    await cur.execute(INSERT, (0, 1))
                except psycopg.errors.UniqueViolation:
                    raised_by.append("execute")
                    raise
        assert raised_by == ["execute"]
        assert _rows(pg_server, test_db) == []
        assert_clean(apool, pg_server, test_db)

    async def test_fetch_and_rowcount_after_the_first_statement(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        async with aio.get_cursor(commit=True) as cur:
            await cur.execute(INSERT + " RETURNING id, qty", (5, 7))
            assert await cur.fetchone() == {"id": 5, "qty": 7}
            assert cur.rowcount == 1
        assert _rows(pg_server, test_db) == [(5, 7)]

    async def test_one_read_write_transaction(self, apool: AsyncPrecogPool) -> None:
        async with aio.get_cursor(commit=True) as cur:
            await cur.execute("SELECT current_setting('transaction_read_only') AS ro, txid_current() AS x")
            first = await cur.fetchone()
            await cur.execute("SELECT txid_current() AS x")
            later = await cur.fetchone()
        assert first is not None and later is not None
        assert first["ro"] == "off" and first["x"] == later["x"]

    async def test_exception_after_the_first_statement_rolls_back(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        with pytest.raises(RuntimeError, match="boom"):
            async with aio.get_cursor(commit=True) as cur:
                await cur.execute(INSERT, (6, 6))
                raise RuntimeError("boom")
        assert _rows(pg_server, test_db) == []
        assert_clean(apool, pg_server, test_db)

    async def test_wrong_parameters_refused_block_still_usable(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        """A statement refused before it is queued (wrong parameters): raised, BEGIN still ran, rolled back."""
        conn_ids = set()
        for params in (5, (1,)):
            with pytest.raises((TypeError, psycopg.ProgrammingError)):
                async with aio.get_cursor(commit=True) as cur:
                    conn_ids.add(cur._conn.info.backend_pid)
                    await cur.execute(INSERT, params)  # type: ignore[arg-type]
        async with aio.get_cursor(commit=True) as cur:
            conn_ids.add(cur._conn.info.backend_pid)
            await cur.execute(INSERT, (7, 7))
        assert len(conn_ids) == 1  # never closed and replaced
        assert _rows(pg_server, test_db) == [(7, 7)]
        assert_clean(apool, pg_server, test_db)

    async def test_everything_reached_before_the_first_execute_is_inside(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        """cur.connection statements, a nested transaction(), COPY and a server cursor: all inside, all rolled back."""
        undo = RuntimeError("undo")
        with pytest.raises(RuntimeError, match=r"^undo$") as raised:
            async with aio.get_cursor(commit=True) as cur:
                conn = cur.connection
                async with conn.transaction():  # a savepoint inside the block's transaction, not its own
                    await conn.execute(INSERT, (11, 1))
                async with cur.copy("COPY apipe_items (id, qty) FROM STDIN") as copy:
                    await copy.write_row((12, 2))
                async with conn.cursor("named") as named:
                    await named.execute("SELECT id FROM apipe_items ORDER BY id")
                    assert [r[0] for r in await named.fetchall()] == [0, 11, 12]
                raise undo
        assert raised.value is undo  # the test's own exception, not one the library raised on the way
        assert _rows(pg_server, test_db) == []
        assert_clean(apool, pg_server, test_db)

    async def test_stream_first_commits(self, apool: AsyncPrecogPool, pg_server: Server, test_db: str) -> None:
        async with aio.get_cursor(commit=True) as cur:
            got = [row async for row in cur.stream("INSERT INTO apipe_items VALUES (13, 3) RETURNING id")]
        assert got == [{"id": 13}]
        assert _rows(pg_server, test_db) == [(13, 3)]

    async def test_executemany_first_and_several_statements(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        async with aio.get_cursor(commit=True) as cur:
            await cur.executemany(INSERT, [(20, 1), (21, 2)])
        async with aio.get_cursor(commit=True) as cur:
            await cur.execute("INSERT INTO apipe_items VALUES (22, 2); INSERT INTO apipe_items VALUES (23, 3)")
        assert _rows(pg_server, test_db) == [(20, 1), (21, 2), (22, 2), (23, 3)]

    async def test_rollback_exception_is_swallowed(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        async with aio.get_cursor(commit=True) as cur:
            await cur.execute(INSERT, (24, 1))
            raise psycopg.Rollback()
        async with aio.get_cursor(commit=True):
            raise psycopg.Rollback()
        assert _rows(pg_server, test_db) == []

    async def test_unbegun_block_leaves_nothing_for_the_next_borrower(self, apool: AsyncPrecogPool) -> None:
        """Attack: a block that ran nothing must not leave its pending BEGIN on the connection.

        With one connection in the pool, the next borrower gets the same one: its read-only cursor
        must still refuse a write, and its raw connection must run outside any transaction.
        """
        async with aio.get_cursor(commit=True) as cur:
            conn = cur._conn
        assert isinstance(conn, PrecogAsyncConnection) and conn._precog_pending_begin is None
        with pytest.raises(ReadOnlyWriteError):
            async with aio.get_cursor() as cur:
                await cur.execute(INSERT, (25, 1))
        async with aio.get_connection() as raw:
            await raw.execute("SELECT 1")
            assert raw.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE

    async def test_cancelled_first_statement_loses_nothing(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        """A task cancelled while its BEGIN+first statement is in flight: cancelled, not committed, no leak."""

        async def slow() -> None:
            async with aio.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO apipe_items SELECT 30, 1 FROM pg_sleep(5)")

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _rows(pg_server, test_db) == []
        async with aio.get_cursor(commit=True) as cur:  # the pool lends a working connection
            await cur.execute(INSERT, (31, 1))
        assert _rows(pg_server, test_db) == [(31, 1)]
        assert_clean(apool, pg_server, test_db)

    async def test_plain_connection_class_refused(self, test_settings: DatabaseSettings) -> None:
        """The deferred BEGIN lives in PrecogAsyncConnection.wait: a plain class is refused, with what to do."""
        with pytest.raises(ConfigurationError, match=r"subclass of precog_db\.aio\.PrecogAsyncConnection"):
            await aio.initialize_pool(settings=test_settings, connection_class=psycopg.AsyncConnection)


class TestPipelined:
    async def test_batch_is_committed(self, apool: AsyncPrecogPool, pg_server: Server, test_db: str) -> None:
        async with aio.get_cursor(commit=True, pipeline=True) as cur:
            for i in range(10):
                await cur.execute(INSERT, (100 + i, i))
        assert _rows(pg_server, test_db) == [(100 + i, i) for i in range(10)]
        assert_clean(apool, pg_server, test_db)

    async def test_failure_anywhere_rolls_back_the_whole_block(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with aio.get_cursor(commit=True, pipeline=True) as cur:
                for i in range(10):
                    await cur.execute(INSERT, (0 if i == 2 else 200 + i, i))
        assert _rows(pg_server, test_db) == []
        assert_clean(apool, pg_server, test_db)
        async with aio.get_cursor(commit=True, pipeline=True) as cur:
            await cur.execute(INSERT, (299, 1))
        assert _rows(pg_server, test_db) == [(299, 1)]

    async def test_fetch_mid_block(self, apool: AsyncPrecogPool, pg_server: Server, test_db: str) -> None:
        async with aio.get_cursor(commit=True, pipeline=True) as cur:
            await cur.execute(INSERT + " RETURNING id", (400, 4))
            assert await cur.fetchone() == {"id": 400}
            await cur.execute(INSERT, (401, 4))
        assert _rows(pg_server, test_db) == [(400, 4), (401, 4)]

    async def test_exception_in_block_rolls_back(self, apool: AsyncPrecogPool, pg_server: Server, test_db: str) -> None:
        with pytest.raises(KeyError):
            async with aio.get_cursor(commit=True, pipeline=True) as cur:
                await cur.execute(INSERT, (500, 5))
                raise KeyError("stop")
        async with aio.get_cursor(commit=True, pipeline=True) as cur:
            await cur.execute(INSERT, (501, 5))
            raise psycopg.Rollback()
        assert _rows(pg_server, test_db) == []
        assert_clean(apool, pg_server, test_db)

    async def test_cancelled_at_the_end_is_ambiguous(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        """Cancelled while the block (COMMIT included) is in flight: CommitOutcomeUnknownError, connection replaced."""

        async def slow() -> None:
            async with aio.get_cursor(commit=True, pipeline=True) as cur:
                await cur.execute("INSERT INTO apipe_items SELECT 600, 1 FROM pg_sleep(5)")

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(CommitOutcomeUnknownError):
            await task
        async with aio.get_cursor(commit=True) as cur:
            await cur.execute(INSERT, (601, 1))
        assert (601, 1) in _rows(pg_server, test_db)
        assert_clean(apool, pg_server, test_db)

    async def test_long_batch_whose_replies_overflow_the_socket_buffers(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        """Attack: 20,000 queued statements, replies (~5 MB) far past the socket buffers: no deadlock."""
        async with asyncio.timeout(60), aio.get_cursor(commit=True, pipeline=True) as cur:
            for i in range(20_000):
                await cur.execute(INSERT + " RETURNING id, repeat('x', 200) AS pad", (1_000 + i, 1))
        with pg_server.connect(test_db) as admin:
            assert admin.execute("SELECT count(*) FROM apipe_items WHERE id >= 1000").fetchone() == (20_000,)
        assert_clean(apool, pg_server, test_db)

    async def test_pipeline_needs_commit(self) -> None:
        with pytest.raises(ValueError, match="commit=True"):
            aio.get_cursor(pipeline=True)


@pytest.mark.fault
class TestSilentPath:
    """The reply bound and CommitOutcomeUnknownError hold when aio statements are pipelined."""

    async def _pool(self, test_settings: DatabaseSettings, port: int) -> None:
        pool = await aio.initialize_pool(
            settings=test_settings.replace(
                port=port, pool_min=1, pool_max=1, statement_timeout_ms=300, tcp_user_timeout_ms=700
            )
        )
        await pool.wait(timeout=10)

    async def test_first_statement_on_a_silent_path_is_bounded(
        self, test_settings: DatabaseSettings, table: str, pg_server: Server, test_db: str
    ) -> None:
        """BEGIN+first statement into a silent path: ConnectionLostError (not committed) after the bound."""
        with fault_proxy(test_settings.host, int(test_settings.port)) as proxy:
            await self._pool(test_settings, proxy.port)
            try:
                with pytest.raises(ConnectionLostError, match="no reply") as caught:
                    async with asyncio.timeout(15):
                        async with aio.get_cursor(commit=True) as cur:
                            proxy.go_deaf()
                            await cur.execute(INSERT, (800, 1))
                assert not isinstance(caught.value, CommitOutcomeUnknownError)
                proxy.forward()
            finally:
                await aio.close_pool()  # before the proxy goes
        assert _rows(pg_server, test_db) == []

    async def test_pipelined_block_lost_in_flight_is_ambiguous(
        self, test_settings: DatabaseSettings, table: str
    ) -> None:
        """pipeline=True: the block travels with its COMMIT, so a silent path raises CommitOutcomeUnknownError."""
        with fault_proxy(test_settings.host, int(test_settings.port)) as proxy:
            await self._pool(test_settings, proxy.port)
            try:
                with pytest.raises(CommitOutcomeUnknownError):
                    async with asyncio.timeout(15):
                        async with aio.get_cursor(commit=True, pipeline=True) as cur:
                            proxy.go_deaf()
                            await cur.execute(INSERT, (801, 1))
                proxy.forward()
            finally:
                await aio.close_pool()
