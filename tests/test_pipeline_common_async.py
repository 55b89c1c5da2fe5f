"""Committed writes in fewer round trips (issue 16) in both layers: BEGIN with the first statement, and pipeline=True.

The asyncio source: tests/test_pipeline_common.py is generated from it
(tools/async_to_sync.py), so every scenario runs over `precog_db.aio` here and
over the sync API there. Round trips are counted on the wire by
`bench.wire.RoundTripCounter`, a proxy that counts the server's
``ReadyForQuery`` messages (one per request cycle): exact counts, never timings.
Cancellation and signal interrupts of pipelined blocks are layer-specific:
tests/test_aio_pipeline.py and tests/test_pipeline.py.
"""

from __future__ import annotations

import asyncio  # ASYNC-ONLY
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, assert_type

import psycopg
import pytest
import pytest_asyncio  # ASYNC-ONLY
from psycopg import AsyncCursor

from bench.wire import RoundTripCounter
from precog_db import CommitOutcomeUnknownError, ConnectionLostError, ReadOnlyWriteError
from precog_db.settings import DatabaseSettings
from tests._helpers.fault_proxy import fault_proxy
from tests._helpers.server import Server

if True:  # ASYNC
    from precog_db import aio as api

    fixture = pytest_asyncio.fixture
    Block = Callable[[], Awaitable[None]]

    @pytest_asyncio.fixture(autouse=True)
    async def _asyncio_pool_closed() -> AsyncIterator[None]:
        """The asyncio pool is closed after each test, on the test's own loop."""
        try:
            yield
        finally:
            await api.close_pool()
else:
    import precog_db as api
    from tests._helpers.contexts import in_thread

    fixture = pytest.fixture
    Block = Callable[[], None]

pytestmark = pytest.mark.asyncio  # ASYNC-ONLY

INSERT = "INSERT INTO pipe_items (id, qty) VALUES (%s, %s)"


@pytest.fixture
def table(pg_server: Server, test_db: str) -> str:
    with pg_server.connect(test_db) as admin:
        admin.execute("DROP TABLE IF EXISTS pipe_items")
        admin.execute("CREATE TABLE pipe_items (id int PRIMARY KEY, qty int NOT NULL CHECK (qty >= 0))")
        admin.execute("INSERT INTO pipe_items VALUES (0, 0)")
    return "pipe_items"


@fixture
async def one(test_settings: DatabaseSettings, table: str) -> None:
    """The process-wide pool of the layer, one connection, open before the test starts."""
    pool = await api.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
    await pool.wait(timeout=10)


@fixture
async def counter(test_settings: DatabaseSettings, table: str) -> AsyncIterator[RoundTripCounter]:
    """A pool of one connection that talks to the server through the round-trip counting proxy."""
    with RoundTripCounter(test_settings.host, int(test_settings.port)) as proxy:
        pool = await api.initialize_pool(settings=test_settings.replace(port=proxy.port, pool_min=1, pool_max=1))
        await pool.wait(timeout=10)
        async with api.get_cursor() as cur:  # warm: the connection is open, its setup done
            await cur.execute("SELECT 1")
        try:
            yield proxy
        finally:
            await api.close_pool()  # before the proxy goes


async def _trips(proxy: RoundTripCounter, block: Block) -> int:
    proxy.reset()
    await block()
    return proxy.round_trips


def _rows(pg_server: Server, test_db: str) -> list[tuple[int, int]]:
    with pg_server.connect(test_db) as admin:
        return [(int(a), int(b)) for a, b in admin.execute("SELECT id, qty FROM pipe_items WHERE id > 0 ORDER BY id")]


async def _pool_idle(pg_server: Server, test_db: str) -> None:
    """Every connection the pool counts is back in it, and none is idle in a transaction on the server."""
    stats = (await api.get_pool()).get_stats()
    assert stats["pool_available"] == stats["pool_size"], stats
    with pg_server.connect(test_db) as admin:
        stuck = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'precog-test' "
            "AND datname = current_database() AND state LIKE 'idle in transaction%'"
        ).fetchone()
    assert stuck == (0,)


class TestRoundTripsOnTheWire:
    """The counts issue 16 promises, pinned exactly."""

    async def test_one_statement_committed_block_costs_two(self, counter: RoundTripCounter) -> None:
        """get_cursor(commit=True) with one INSERT: BEGIN+INSERT, then COMMIT (it cost 3 before)."""

        async def block() -> None:
            async with api.get_cursor(commit=True) as cur:
                await cur.execute(INSERT, (1, 1))

        assert await _trips(counter, block) == 2

    async def test_one_literal_statement_costs_two(self, counter: RoundTripCounter) -> None:
        """A statement without parameters (sent with the simple protocol before) also carries the BEGIN."""

        async def block() -> None:
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO pipe_items VALUES (2, 2)")

        assert await _trips(counter, block) == 2

    async def test_txn3_costs_four(self, counter: RoundTripCounter) -> None:
        """SELECT (fetched), UPDATE, INSERT in one committed block: 4 round trips instead of 5."""

        async def block() -> None:
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("SELECT qty FROM pipe_items WHERE id = %s", (0,))
                assert await cur.fetchone() == {"qty": 0}
                await cur.execute("UPDATE pipe_items SET qty = qty + %s WHERE id = %s", (1, 0))
                await cur.execute(INSERT, (3, 3))

        assert await _trips(counter, block) == 4

    async def test_empty_committed_block_costs_nothing(self, counter: RoundTripCounter) -> None:
        """A commit=True block that runs no statement sends no BEGIN and no COMMIT."""

        async def block() -> None:
            async with api.get_cursor(commit=True):
                pass

        assert await _trips(counter, block) == 0

    async def test_pipelined_batch_of_ten_costs_one(self, counter: RoundTripCounter) -> None:
        """pipeline=True: BEGIN, ten INSERTs and COMMIT in one round trip."""

        async def block() -> None:
            async with api.get_cursor(commit=True, pipeline=True) as cur:
                for i in range(10):
                    await cur.execute(INSERT, (10 + i, i))

        assert await _trips(counter, block) == 1

    async def test_pipelined_txn3_costs_one_sync(self, counter: RoundTripCounter) -> None:
        """pipeline=True txn3: one request cycle; the fetch waits for a flush, not for a sync."""

        async def block() -> None:
            async with api.get_cursor(commit=True, pipeline=True) as cur:
                await cur.execute("SELECT qty FROM pipe_items WHERE id = %s", (0,))
                assert await cur.fetchone() == {"qty": 0}
                await cur.execute("UPDATE pipe_items SET qty = qty + %s WHERE id = %s", (1, 0))
                await cur.execute(INSERT, (30, 3))

        assert await _trips(counter, block) == 1

    async def test_reads_keep_one_round_trip(self, counter: RoundTripCounter) -> None:
        """A get_cursor() read is untouched: one round trip."""

        async def block() -> None:
            async with api.get_cursor() as cur:
                await cur.execute("SELECT qty FROM pipe_items WHERE id = %s", (0,))
                await cur.fetchone()

        assert await _trips(counter, block) == 1

    async def test_connection_first_costs_the_old_three(self, counter: RoundTripCounter) -> None:
        """A statement through cur.connection first: BEGIN alone, the statement, COMMIT (as before issue 16)."""

        async def block() -> None:
            async with api.get_cursor(commit=True) as cur:
                await cur.connection.execute(INSERT, (40, 1))

        assert await _trips(counter, block) == 3


class TestTransparent:
    """commit=True looks exactly as before to the caller."""

    async def test_error_is_raised_by_the_failing_execute(self, one: None, pg_server: Server, test_db: str) -> None:
        """A duplicate key in the first statement is raised by that execute, and the block rolls back."""
        raised_by: list[str] = []
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with api.get_cursor(commit=True) as cur:
                try:
                    await cur.execute(INSERT, (0, 1))
                except psycopg.errors.UniqueViolation:
                    raised_by.append("execute")
                    raise
        assert raised_by == ["execute"]
        assert _rows(pg_server, test_db) == []
        await _pool_idle(pg_server, test_db)

    async def test_fetch_after_the_first_statement(self, one: None, pg_server: Server, test_db: str) -> None:
        """INSERT … RETURNING as the first statement: the row is there to fetch, and it is committed."""
        async with api.get_cursor(commit=True) as cur:
            await cur.execute(INSERT + " RETURNING id, qty", (5, 7))
            assert await cur.fetchone() == {"id": 5, "qty": 7}
            assert cur.rowcount == 1
        assert _rows(pg_server, test_db) == [(5, 7)]

    async def test_exception_after_the_first_statement_rolls_back(
        self, one: None, pg_server: Server, test_db: str
    ) -> None:
        """An exception raised in the block after a pipelined first statement rolls everything back."""
        with pytest.raises(RuntimeError, match="boom"):
            async with api.get_cursor(commit=True) as cur:
                await cur.execute(INSERT, (6, 6))
                await cur.execute(INSERT, (7, 7))
                raise RuntimeError("boom")
        assert _rows(pg_server, test_db) == []
        await _pool_idle(pg_server, test_db)

    async def test_the_transaction_is_read_write(self, one: None) -> None:
        """The first statement already runs inside BEGIN READ WRITE, not in the read-only session."""
        async with api.get_cursor(commit=True) as cur:
            await cur.execute(
                "SELECT current_setting('transaction_read_only') AS ro, now() = statement_timestamp() AS first"
            )
            row = await cur.fetchone()
            await cur.execute("SELECT now() = statement_timestamp() AS same")
            later = await cur.fetchone()
        assert row is not None and row["ro"] == "off"
        assert later == {"same": False}  # a later statement sees the transaction's start time: one transaction

    async def test_one_read_write_transaction(self, one: None) -> None:
        """The first statement and the next one run in the same read-write transaction."""
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("SELECT current_setting('transaction_read_only') AS ro, txid_current() AS x")
            first = await cur.fetchone()
            await cur.execute("SELECT txid_current() AS x")
            later = await cur.fetchone()
        assert first is not None and later is not None
        assert first["ro"] == "off" and first["x"] == later["x"]

    async def test_several_statements_in_one_string(self, one: None, pg_server: Server, test_db: str) -> None:
        """A parameterless string with two statements still works (its BEGIN goes alone) and commits."""
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("INSERT INTO pipe_items VALUES (8, 8); INSERT INTO pipe_items VALUES (9, 9)")
        assert _rows(pg_server, test_db) == [(8, 8), (9, 9)]

    async def test_connection_used_before_any_execute_is_inside_the_transaction(
        self, one: None, pg_server: Server, test_db: str
    ) -> None:
        """Statements run through cur.connection before the first execute are part of the block's transaction."""
        undo = RuntimeError("undo")
        with pytest.raises(RuntimeError, match=r"^undo$") as raised:
            async with api.get_cursor(commit=True) as cur:
                await cur.connection.execute(INSERT, (11, 1))
                async with cur.connection.cursor("named") as named:
                    await named.execute("SELECT id FROM pipe_items ORDER BY id")
                    assert [r[0] for r in await named.fetchall()] == [0, 11]
                raise undo
        assert raised.value is undo  # the test's own exception, not one the library raised on the way
        assert _rows(pg_server, test_db) == []

    async def test_everything_reached_before_the_first_execute_is_inside(
        self, one: None, pg_server: Server, test_db: str
    ) -> None:
        """cur.connection statements, a nested transaction(), COPY and a server cursor: all inside, all rolled back."""
        undo = RuntimeError("undo")
        with pytest.raises(RuntimeError, match=r"^undo$") as raised:
            async with api.get_cursor(commit=True) as cur:
                conn = cur.connection
                async with conn.transaction():  # a savepoint inside the block's transaction, not its own
                    await conn.execute(INSERT, (11, 1))
                async with cur.copy("COPY pipe_items (id, qty) FROM STDIN") as copy:
                    await copy.write_row((12, 2))
                async with conn.cursor("named") as named:
                    await named.execute("SELECT id FROM pipe_items ORDER BY id")
                    assert [r[0] for r in await named.fetchall()] == [0, 11, 12]
                raise undo
        assert raised.value is undo
        assert _rows(pg_server, test_db) == []
        await _pool_idle(pg_server, test_db)

    async def test_executemany_and_copy(self, one: None, pg_server: Server, test_db: str) -> None:
        """executemany as the first statement carries the BEGIN; COPY gets a BEGIN of its own; both commit."""
        async with api.get_cursor(commit=True) as cur:
            await cur.executemany(INSERT, [(20, 1), (21, 2)])
        async with api.get_cursor(commit=True) as cur, cur.copy("COPY pipe_items (id, qty) FROM STDIN") as copy:
            await copy.write_row((22, 3))
        assert _rows(pg_server, test_db) == [(20, 1), (21, 2), (22, 3)]

    async def test_stream_first_commits(self, one: None, pg_server: Server, test_db: str) -> None:
        """A stream() as the first statement carries the BEGIN, and the block commits."""
        async with api.get_cursor(commit=True) as cur:
            got = [row async for row in cur.stream("INSERT INTO pipe_items VALUES (13, 3) RETURNING id")]
        assert got == [{"id": 13}]
        assert _rows(pg_server, test_db) == [(13, 3)]

    async def test_refused_first_statement_keeps_the_connection(
        self, one: None, pg_server: Server, test_db: str
    ) -> None:
        """Parameters psycopg refuses before sending (TypeError, wrong count): raised as ever, connection kept."""
        conn_ids = set()
        for params in (5, (1,)):
            with pytest.raises((TypeError, psycopg.ProgrammingError)):
                async with api.get_cursor(commit=True) as cur:
                    conn_ids.add(cur._conn.info.backend_pid)
                    await cur.execute(INSERT, params)  # type: ignore[arg-type]
        async with api.get_cursor(commit=True) as cur:
            conn_ids.add(cur._conn.info.backend_pid)
            await cur.execute(INSERT, (24, 4))
        assert len(conn_ids) == 1  # the pool's one connection was never closed and replaced
        assert _rows(pg_server, test_db) == [(24, 4)]
        await _pool_idle(pg_server, test_db)

    async def test_executemany_returning_first(self, one: None, pg_server: Server, test_db: str) -> None:
        """executemany(returning=True) as the first statement: every result is there, and committed."""
        async with api.get_cursor(commit=True) as cur:
            await cur.executemany(INSERT + " RETURNING id", [(25, 1), (26, 2)], returning=True)
            ids = []
            while True:
                row = await cur.fetchone()
                assert row is not None
                ids.append(row["id"])
                if not cur.nextset():
                    break
        assert ids == [25, 26]
        assert _rows(pg_server, test_db) == [(25, 1), (26, 2)]

    async def test_rollback_exception_is_swallowed(self, one: None, pg_server: Server, test_db: str) -> None:
        """psycopg.Rollback raised after the first statement, or before any, ends the block quietly."""
        async with api.get_cursor(commit=True) as cur:
            await cur.execute(INSERT, (23, 1))
            raise psycopg.Rollback()
        async with api.get_cursor(commit=True):
            raise psycopg.Rollback()
        assert _rows(pg_server, test_db) == []

    async def test_unbegun_block_leaves_nothing_for_the_next_borrower(self, one: None) -> None:
        """Attack: a block that ran nothing must not leave its pending BEGIN on the connection.

        With one connection in the pool, the next borrower gets the same one: its read-only cursor
        must still refuse a write, and its raw connection must run outside any transaction.
        """
        async with api.get_cursor(commit=True) as cur:
            conn = cur._conn
        assert conn._precog.pending_begin is None  # type: ignore[attr-defined]
        with pytest.raises(ReadOnlyWriteError):
            async with api.get_cursor() as cur:
                await cur.execute(INSERT, (25, 1))
        async with api.get_connection() as raw:
            assert raw is conn
            await raw.execute("SELECT 1")
            assert raw.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE


class TestPipelined:
    """commit=True, pipeline=True: one round trip, errors surface late, a failure rolls everything back."""

    async def test_batch_is_committed(self, one: None, pg_server: Server, test_db: str) -> None:
        """Ten queued INSERTs are committed when the block ends."""
        async with api.get_cursor(commit=True, pipeline=True) as cur:
            for i in range(10):
                await cur.execute(INSERT, (100 + i, i))
        assert _rows(pg_server, test_db) == [(100 + i, i) for i in range(10)]
        await _pool_idle(pg_server, test_db)

    async def test_failure_anywhere_rolls_back_the_whole_block(
        self, one: None, pg_server: Server, test_db: str
    ) -> None:
        """A duplicate key in statement 3 of 10 surfaces by the block's end at the latest; nothing is committed."""
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with api.get_cursor(commit=True, pipeline=True) as cur:
                for i in range(10):
                    await cur.execute(INSERT, (0 if i == 2 else 200 + i, i))
        assert _rows(pg_server, test_db) == []
        await _pool_idle(pg_server, test_db)
        async with api.get_cursor(commit=True, pipeline=True) as cur:  # the connection is reusable
            await cur.execute(INSERT, (299, 1))
        assert _rows(pg_server, test_db) == [(299, 1)]

    async def test_failure_caught_by_the_caller_still_rolls_back(
        self, one: None, pg_server: Server, test_db: str
    ) -> None:
        """A caller that catches a surfaced error and goes on cannot commit the rest: the block end raises."""
        with pytest.raises(psycopg.Error):
            async with api.get_cursor(commit=True, pipeline=True) as cur:
                await cur.execute("UPDATE pipe_items SET qty = -1 WHERE id = 0")  # violates the CHECK
                try:
                    await cur.execute("SELECT 1 AS one")
                    await cur.fetchone()  # waits: the CHECK violation surfaces here
                except psycopg.errors.CheckViolation:
                    pass
                await cur.execute(INSERT, (300, 1))
        assert _rows(pg_server, test_db) == []
        await _pool_idle(pg_server, test_db)

    async def test_fetch_mid_block(self, one: None, pg_server: Server, test_db: str) -> None:
        """A fetch waits for the queued results and returns the row; the block still commits at the end."""
        async with api.get_cursor(commit=True, pipeline=True) as cur:
            await cur.execute(INSERT + " RETURNING id", (400, 4))
            assert await cur.fetchone() == {"id": 400}
            await cur.execute(INSERT, (401, 4))
        assert _rows(pg_server, test_db) == [(400, 4), (401, 4)]

    async def test_exception_in_block_rolls_back(self, one: None, pg_server: Server, test_db: str) -> None:
        """The caller's own exception rolls back every queued statement, and propagates unchanged."""
        with pytest.raises(KeyError):
            async with api.get_cursor(commit=True, pipeline=True) as cur:
                await cur.execute(INSERT, (500, 5))
                raise KeyError("stop")
        async with api.get_cursor(commit=True, pipeline=True) as cur:
            await cur.execute(INSERT, (501, 5))
            raise psycopg.Rollback()
        assert _rows(pg_server, test_db) == []
        await _pool_idle(pg_server, test_db)

    async def test_long_batch_whose_replies_overflow_the_socket_buffers(
        self, one: None, pg_server: Server, test_db: str
    ) -> None:
        """Attack: 20,000 queued statements, replies (~5 MB) far past the socket buffers: no deadlock, all committed."""

        async def batch() -> None:
            async with api.get_cursor(commit=True, pipeline=True) as cur:
                for i in range(20_000):
                    await cur.execute(INSERT + " RETURNING id, repeat('x', 200) AS pad", (1_000 + i, 1))

        assert await _bounded(batch, timeout=60) is None
        with pg_server.connect(test_db) as admin:
            assert admin.execute("SELECT count(*) FROM pipe_items WHERE id >= 1000").fetchone() == (20_000,)
        await _pool_idle(pg_server, test_db)

    async def test_pipeline_needs_commit(self) -> None:
        """pipeline=True on a read-only block is refused with what to do."""
        with pytest.raises(ValueError, match="commit=True"):
            api.get_cursor(pipeline=True)

    async def test_typing(self, one: None) -> None:
        """The overloads type pipeline=True blocks like any other (dict rows by default)."""
        async with api.get_cursor(commit=True, pipeline=True) as cur:
            assert_type(cur, AsyncCursor[dict[str, Any]])
            await cur.execute("SELECT 1 AS one")
            assert await cur.fetchone() == {"one": 1}


async def _outcome(block: Block) -> BaseException | None:
    """What ``block()`` raised, or None."""
    try:
        await block()
    except Exception as exc:
        return exc
    return None


async def _bounded(block: Block, timeout: float) -> BaseException | None:
    """What ``block()`` raised, or None; fails the test if it has not ended within ``timeout`` seconds.

    In asyncio the bound is `asyncio.timeout`; in the sync layer ``block`` runs in a thread of its own.
    """
    if True:  # ASYNC
        async with asyncio.timeout(timeout) as bound:
            try:
                return await _outcome(block)
            finally:
                assert not bound.expired(), f"{block!r} did not end within {timeout:.0f}s"
    else:
        return in_thread(lambda: _outcome(block), timeout)


@pytest.mark.fault
class TestSilentPath:
    """The reply bound and CommitOutcomeUnknownError hold when statements are pipelined."""

    async def _pool(self, test_settings: DatabaseSettings, port: int) -> None:
        pool = await api.initialize_pool(
            settings=test_settings.replace(
                port=port, pool_min=1, pool_max=1, statement_timeout_ms=300, tcp_user_timeout_ms=700
            )
        )
        await pool.wait(timeout=10)

    async def test_first_statement_on_a_silent_path_is_bounded(
        self, test_settings: DatabaseSettings, table: str, pg_server: Server, test_db: str
    ) -> None:
        """BEGIN+first statement sent into a silent path: ConnectionLostError (not committed) after the bound."""
        with fault_proxy(test_settings.host, int(test_settings.port)) as proxy:
            await self._pool(test_settings, proxy.port)

            async def write() -> None:
                async with api.get_cursor(commit=True) as cur:
                    proxy.go_deaf()
                    await cur.execute(INSERT, (600, 1))

            try:
                started = time.monotonic()
                error = await _bounded(write, timeout=15)
                assert time.monotonic() - started < 10
                assert isinstance(error, ConnectionLostError), repr(error)
                assert not isinstance(error, CommitOutcomeUnknownError), repr(error)
                assert "no reply" in str(error)
                proxy.forward()
            finally:
                await api.close_pool()  # before the proxy goes
        assert _rows(pg_server, test_db) == []

    async def test_pipelined_block_lost_in_flight_is_ambiguous(
        self, test_settings: DatabaseSettings, table: str
    ) -> None:
        """pipeline=True: the whole block travels with its COMMIT, so a silent path raises CommitOutcomeUnknownError."""
        with fault_proxy(test_settings.host, int(test_settings.port)) as proxy:
            await self._pool(test_settings, proxy.port)

            async def write() -> None:
                async with api.get_cursor(commit=True, pipeline=True) as cur:
                    proxy.go_deaf()
                    await cur.execute(INSERT, (700, 1))

            try:
                assert isinstance(await _bounded(write, timeout=15), CommitOutcomeUnknownError)
                proxy.forward()
            finally:
                await api.close_pool()  # before the proxy goes


class TestAttacks:
    """What the review of issue 16 found (tests/test_pipeline_attacks.py has the layer-specific ones)."""

    async def test_failed_first_statement_leaves_no_phantom_prepared_statement(
        self, one: None, pg_server: Server, test_db: str
    ) -> None:
        """The 6th execution (psycopg prepares it) fails at Parse inside the first-statement pipeline.

        In pipeline mode psycopg records ``_pg3_0`` before the reply and never checks it for a query it
        had already counted; the caller catches the error, the block ends cleanly (COMMIT of an aborted
        transaction: no cache reset). The NEXT borrower's same query then binds ``_pg3_0``: "prepared
        statement does not exist". With the BEGIN sent alone (cur.connection first) it does not happen.
        """
        for i in range(5):
            async with api.get_cursor(commit=True) as cur:
                await cur.execute(INSERT, (i + 1, 1))
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE pipe_items")
        async with api.get_cursor(commit=True) as cur:
            with pytest.raises(psycopg.errors.UndefinedTable):
                await cur.execute(INSERT, (6, 1))
        with pg_server.connect(test_db) as admin:
            admin.execute("CREATE TABLE pipe_items (id int PRIMARY KEY, qty int NOT NULL CHECK (qty >= 0))")
        async with api.get_cursor(commit=True) as cur:  # another borrower: no "prepared statement does not exist"
            await cur.execute(INSERT, (7, 1))
        assert _rows(pg_server, test_db) == [(7, 1)]

    @pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # psycopg's, when collected
    async def test_unexited_nested_pipeline_is_not_lent(self, one: None) -> None:
        """_exit_mode sets conn._pipeline = None although the pipeline's level is still 1 (libpq still in it)."""
        kept = []
        try:
            with contextlib.suppress(psycopg.Error):
                async with api.get_cursor(commit=True, pipeline=True) as cur:
                    await cur.execute(INSERT, (1, 1))
                    nested = cur.connection.pipeline()
                    await nested.__aenter__()
                    kept.append(nested)
            async with api.get_cursor() as cur:
                assert cur._conn.pgconn.pipeline_status == 0
                await cur.execute("SELECT 1")
        finally:
            await api.close_pool()
            for nested in kept:  # finish the abandoned generator now, not when some later test collects it
                with contextlib.suppress(BaseException):
                    await nested.__aexit__(None, None, None)
