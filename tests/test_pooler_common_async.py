"""Behind Debian's real PgBouncer (DB_POOLER=transaction, and session), over both layers (docs/TOPOLOGY.md).

Written once, for asyncio, in tests/test_pooler_common_async.py, from which
tools/async_to_sync.py generates tests/test_pooler_common.py: each scenario runs
on `precog_db.aio`'s pool in the first and on the sync pool in the second.
tests/test_pooler.py keeps what has one layer only (the settings rules, the
tools' and the CLI's direct connections); `TestCancellation` is asyncio's.

PgBouncer runs with ONE server connection, so every client shares the same
server session: whatever leaks, another client sees.
"""

# The two branches of `if True:  # ASYNC` below import the same names from each layer, which mypy,
# reading both, would call a redefinition.
# mypy: disable-error-code="no-redef"

from __future__ import annotations

import re
import socket
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.pq import Trace

from bench.wire import RoundTripCounter
from precog_db import ConfigurationError, ReadOnlyWriteError, SessionStateError
from precog_db.settings import DatabaseSettings
from precog_db.stamp import read_stamp, stamp_database
from tests._helpers.server import TEST_DB, Server
from tests._helpers.topology import pgbouncer

if True:  # ASYNC
    import asyncio
    from collections.abc import Awaitable, Callable

    from pytest_asyncio import fixture

    from precog_db._connection_async import connect
    from precog_db.aio import close_pool, get_connection, get_cursor, initialize_pool
else:
    import threading
    from collections.abc import Callable

    from pytest import fixture

    from precog_db import close_pool, get_connection, get_cursor, initialize_pool
    from precog_db.connection import connect

pytestmark = pytest.mark.asyncio  # ASYNC-ONLY


@pytest.fixture(scope="module")
def bouncer(pg_server: Server, test_db: str) -> Iterator[int]:
    """A transaction-mode PgBouncer with ONE server connection in front of the session's server."""
    with pgbouncer(pg_server, pool_mode="transaction", pool_size=1) as port:
        yield port


@pytest.fixture
def tx_settings(pg_server: Server, bouncer: int) -> DatabaseSettings:
    """Settings that reach the session's test database through the transaction-mode PgBouncer, direct server set."""
    return pg_server.settings(
        port=bouncer, pooler="transaction", direct_host=pg_server.host, direct_port=pg_server.port
    )


@fixture(autouse=True)
async def _pool_closed() -> AsyncGenerator[None, None]:
    """The pool a test opened is closed when it ends (for aio, on the test's own event loop)."""
    yield
    await close_pool()


if True:  # ASYNC

    async def _together(work: Callable[[int], Awaitable[None]], n: int) -> None:
        """``work(0)`` .. ``work(n - 1)`` at the same time: tasks on the event loop."""
        await asyncio.gather(*(work(i) for i in range(n)))

else:

    def _together(work: Callable[[int], None], n: int) -> None:
        """``work(0)`` .. ``work(n - 1)`` at the same time: threads."""
        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)


def _raw(port: int) -> psycopg.Connection[Any]:
    """A plain sync client of the PgBouncer, sharing its one server connection with the pool."""
    return psycopg.connect(
        f"host=127.0.0.1 port={port} user=postgres dbname={TEST_DB}",
        autocommit=True,
        prepare_threshold=None,
        connect_timeout=10,
    )


def _one(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def _trace(path: Path) -> tuple[int, list[str]]:
    """(round trips, statements sent) in a libpq trace: one ReadyForQuery ends each round trip."""
    lines = path.read_text().splitlines()
    trips = sum(1 for line in lines if line.startswith("B") and "\tReadyForQuery" in line)
    sent = []
    for line in lines:
        fields = line.split("\t")
        if line.startswith("F") and fields[2] in ("Parse", "Query"):
            sent.append(re.findall(r'"([^"]*)"', fields[3])[-1 if fields[2] == "Parse" else 0])
    return trips, sent


async def _table(name: str) -> None:
    """An empty table ``name (x int)``, made through the pool (each layer's run starts afresh)."""
    async with get_cursor(commit=True) as cur:
        await cur.execute(f"DROP TABLE IF EXISTS {name}")
        await cur.execute(f"CREATE TABLE {name} (x int)")


async def _values(table: str) -> list[int]:
    async with get_cursor() as cur:
        await cur.execute(f"SELECT coalesce(array_agg(x ORDER BY x), '{{}}') AS xs FROM {table}")
        row = await cur.fetchone()
    assert row is not None
    return list(row["xs"])


class TestTransactionMode:
    async def test_no_prepared_statement_collides(self, tx_settings: DatabaseSettings, bouncer: int) -> None:
        """Four clients repeating a mix of queries far past psycopg's prepare threshold never collide on the server."""
        await initialize_pool(settings=tx_settings.replace(pool_min=4, pool_max=4))
        await _table("pooler_mix")
        errors: list[str] = []

        async def work(seed: int) -> None:
            for i in range(40):
                try:
                    async with get_cursor() as cur:
                        await cur.execute(f"SELECT %s::int + {(seed + i) % 5} AS v", (i,))
                        assert await cur.fetchone() == {"v": i + (seed + i) % 5}
                    async with get_cursor(commit=True) as cur:
                        await cur.execute("INSERT INTO pooler_mix VALUES (%s)", (i,))
                except Exception as exc:  # collected: every one of them is a failure
                    errors.append(f"{type(exc).__name__}: {exc}")

        await _together(work, 4)
        assert errors == []
        assert len(await _values("pooler_mix")) == 4 * 40
        with _raw(bouncer) as conn:
            assert _one(conn, "SELECT count(*) FROM pg_prepared_statements") == 0

    async def test_reads_stay_read_only_per_transaction(self, tx_settings: DatabaseSettings) -> None:
        """get_cursor() and get_connection() statements refuse writes, commit=True writes; no startup option."""
        await initialize_pool(settings=tx_settings)
        await _table("pooler_ro")
        with pytest.raises(ReadOnlyWriteError):
            async with get_cursor() as cur:
                await cur.execute("INSERT INTO pooler_ro VALUES (1)")
        with pytest.raises(ReadOnlyWriteError):
            async with get_connection() as conn:
                await conn.execute("INSERT INTO pooler_ro VALUES (2)")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            async with get_cursor() as cur, cur.copy("COPY pooler_ro FROM STDIN") as copy:
                await copy.write_row((3,))
        async with get_cursor(commit=True) as cur:
            await cur.execute("INSERT INTO pooler_ro VALUES (4)")
        assert await _values("pooler_ro") == [4]
        assert "options" not in tx_settings.connect_kwargs()

    async def test_one_round_trip_per_read(self, tx_settings: DatabaseSettings, tmp_path: Path) -> None:
        """The wire: BEGIN READ ONLY, the SELECT and ROLLBACK in one round trip; a write BEGIN+INSERT, then COMMIT."""
        await initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        await _table("pooler_rt")
        trace = tmp_path / "trace.txt"
        with trace.open("w") as fh:
            async with get_connection() as conn:
                conn.pgconn.trace(fh.fileno())
                conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
            async with get_cursor() as cur:
                await cur.execute("SELECT %s::int AS one", (1,))
                assert await cur.fetchone() == {"one": 1}
            async with get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO pooler_rt VALUES (1)")
            async with get_connection() as conn:
                conn.pgconn.untrace()
        trips, sent = _trace(trace)
        assert trips == 1 + 2, trace.read_text()  # issue 16: the BEGIN travels with the INSERT here too
        assert sent == [
            "BEGIN READ ONLY",
            "SELECT $1::int AS one",
            "ROLLBACK",
            "BEGIN READ WRITE",
            "INSERT INTO pooler_rt VALUES (1)",
            "COMMIT",
        ], sent

    async def test_committed_writes_round_trips_through_the_pooler(
        self, tx_settings: DatabaseSettings, bouncer: int, pg_server: Server, test_db: str
    ) -> None:
        """Issue 16 behind PgBouncer, counted between the client and PgBouncer: both modes keep their counts."""
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS pooler_rt16")
            admin.execute("CREATE TABLE pooler_rt16 (x int PRIMARY KEY)")
        trips: dict[str, int] = {}
        with RoundTripCounter("127.0.0.1", bouncer) as proxy:
            pool = await initialize_pool(settings=tx_settings.replace(port=proxy.port, pool_min=1, pool_max=1))
            await pool.wait(timeout=10)
            try:
                proxy.reset()
                async with get_cursor(commit=True) as cur:
                    await cur.execute("INSERT INTO pooler_rt16 VALUES (%s)", (1,))
                trips["one"] = proxy.round_trips

                proxy.reset()
                async with get_cursor(commit=True) as cur:
                    await cur.execute("SELECT count(*) AS n FROM pooler_rt16")
                    assert await cur.fetchone() == {"n": 1}
                    await cur.execute("UPDATE pooler_rt16 SET x = x + 1")
                    await cur.execute("INSERT INTO pooler_rt16 VALUES (%s)", (10,))
                trips["txn3"] = proxy.round_trips

                proxy.reset()
                async with get_cursor(commit=True, pipeline=True) as cur:
                    for i in range(10):
                        await cur.execute("INSERT INTO pooler_rt16 VALUES (%s)", (100 + i,))
                trips["batch"] = proxy.round_trips

                proxy.reset()
                async with get_cursor(commit=True):
                    pass
                trips["empty"] = proxy.round_trips
            finally:
                await close_pool()
        assert trips == {"one": 2, "txn3": 4, "batch": 1, "empty": 0}
        with pg_server.connect(test_db) as admin:
            rows = [r[0] for r in admin.execute("SELECT x FROM pooler_rt16 ORDER BY x")]
        assert rows == [2, 10, *range(100, 110)]

    async def test_session_state_refused_in_both_write_modes(self, tx_settings: DatabaseSettings, bouncer: int) -> None:
        """A session SET as a committed block's first statement, or inside pipeline=True, is refused unsent."""
        await initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        for pipeline in (False, True):
            with pytest.raises(SessionStateError, match="DB_POOLER=session"):
                async with get_cursor(commit=True, pipeline=pipeline) as cur:
                    await cur.execute("SET search_path TO pg_catalog")
            async with get_cursor(commit=True, pipeline=pipeline) as cur:  # the connection goes on working
                await cur.execute("SELECT current_setting('search_path') AS p")
                assert await cur.fetchone() == {"p": '"$user", public'}
        with _raw(bouncer) as other:
            assert _one(other, "SHOW search_path") == '"$user", public'

    async def test_a_typo_is_refused_with_its_own_words(self, tx_settings: DatabaseSettings, bouncer: int) -> None:
        """SQL the parser cannot read is not sent (it might change the shared session), and the error says to
        fix the SQL, not to use SET LOCAL; the connection goes on working."""
        await initialize_pool(settings=tx_settings)
        with pytest.raises(SessionStateError, match="Fix the SQL") as refused:
            async with get_cursor() as cur:
                await cur.execute("SELEC 1")
        assert "SET LOCAL" not in str(refused.value) and "syntax error" in str(refused.value)
        async with get_cursor() as cur:
            await cur.execute("SELECT 1 AS one")
            assert await cur.fetchone() == {"one": 1}

    async def test_session_state_does_not_leak(self, tx_settings: DatabaseSettings, bouncer: int) -> None:
        """A session SET is refused unsent and a set_config() in a read is rolled back: no other client sees them."""
        await initialize_pool(settings=tx_settings)
        with pytest.raises(SessionStateError, match="DB_POOLER=session"):
            async with get_cursor() as cur:
                await cur.execute("SET statement_timeout = 1234")
        with pytest.raises(SessionStateError):
            async with get_cursor(commit=True) as cur:
                await cur.execute("SELECT pg_advisory_lock(42)")
        with pytest.raises(SessionStateError, match="not a literal true"):
            async with get_cursor() as cur:
                # A bound third argument is not provably local (21.2): refused unsent, even in a read.
                await cur.execute("SELECT set_config(%s, %s, %s) AS v", ("statement_timeout", "4321", False))
        async with get_cursor() as cur:  # a literal true is transaction-local: allowed
            await cur.execute("SELECT set_config('statement_timeout', '4321', true) AS v")
            assert await cur.fetchone() == {"v": "4321ms"}
        with _raw(bouncer) as other:  # the same (single) server connection behind PgBouncer
            assert _one(other, "SHOW statement_timeout") == "0"
            advisory = _one(
                other,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            assert advisory == 0
        with pytest.raises(SessionStateError, match="WITH HOLD"):
            async with (
                get_connection() as conn,
                conn.transaction(),
                conn.cursor("held", withhold=True) as held,
            ):
                await held.execute("SELECT 1")
        async with get_cursor(commit=True) as cur:  # what is allowed: state that ends with the transaction
            await cur.execute("SET LOCAL statement_timeout = 5000")
            await cur.execute("SELECT pg_advisory_xact_lock(42)")

    async def test_transaction_local_state_is_undone(self, tx_settings: DatabaseSettings, bouncer: int) -> None:
        """A temporary table ON COMMIT DROP, SET LOCAL ROLE, set_config(..., true): gone when the block ends."""
        await initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        async with get_cursor(commit=True) as cur:
            await cur.execute("CREATE TEMP TABLE pooler_scratch (x int) ON COMMIT DROP")
            await cur.execute("INSERT INTO pooler_scratch VALUES (1)")
            await cur.execute("SELECT set_config('app.tenant', 'a', true)")
            await cur.execute("SET LOCAL ROLE pg_monitor")
            await cur.execute("SELECT current_user AS u, current_setting('app.tenant') AS t")
            assert await cur.fetchone() == {"u": "pg_monitor", "t": "a"}
        async with get_cursor() as cur:  # a read's own transaction is rolled back, its local state with it
            await cur.execute("SELECT set_config('role', 'pg_monitor', true) AS r")
            assert await cur.fetchone() == {"r": "pg_monitor"}
        async with get_cursor() as cur:
            await cur.execute("SELECT current_user AS u, current_setting('app.tenant', true) AS t")
            row = await cur.fetchone()
        assert row is not None and row["u"] == "postgres" and row["t"] in (None, "")
        with _raw(bouncer) as other:
            assert _one(other, "SELECT current_user") == "postgres"
            assert _one(other, "SELECT count(*) FROM pg_class WHERE relname = 'pooler_scratch'") == 0

    async def test_no_discard_all_behind_the_pooler(self, tx_settings: DatabaseSettings, tmp_path: Path) -> None:
        """A dirty block is not followed by DISCARD ALL, which would reset a server connection not ours."""
        await initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        trace = tmp_path / "trace.txt"
        with trace.open("w") as fh:
            async with get_connection() as conn:  # a raw connection: its return would always reset the session
                conn.pgconn.trace(fh.fileno())
                conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
            async with get_cursor() as cur:
                await cur.execute("EXPLAIN SELECT 1")
            async with get_connection() as conn:
                conn.pgconn.untrace()
        text = trace.read_text()
        assert "EXPLAIN SELECT 1" in text
        assert "DISCARD" not in text

    async def test_failed_read_leaves_the_connection_usable(self, tx_settings: DatabaseSettings) -> None:
        """An error inside the pipelined read-only transaction is raised and rolled back; the next block works."""
        await initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with get_cursor() as cur:
                await cur.execute("SELECT 1/0")
        async with get_cursor() as cur:
            await cur.execute("SELECT 2 AS two")
            assert await cur.fetchone() == {"two": 2}
            assert [r async for r in cur.stream("SELECT generate_series(1, 2) AS g")] == [{"g": 1}, {"g": 2}]

    async def test_a_stream_stopped_early_ends_its_own_transaction(
        self, tx_settings: DatabaseSettings, bouncer: int
    ) -> None:
        """A stream closed after its first row: the rest is discarded, its BEGIN READ ONLY rolled back."""
        await initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        await _table("pooler_stream")
        async with get_cursor() as cur:
            records: Any = cur.stream("SELECT g FROM generate_series(1, 100000) AS g")
            async for row in records:
                assert row == {"g": 1}
                break
            await records.aclose()
            assert cur.connection.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
            await cur.execute("SELECT 2 AS two")  # the same cursor goes on, one read at a time
            assert await cur.fetchone() == {"two": 2}
        async with get_cursor(commit=True) as cur:  # inside a block the stream is the block's
            records = cur.stream("INSERT INTO pooler_stream SELECT generate_series(1, 3) RETURNING x")
            async for row in records:
                assert row == {"x": 1}
                break
            await records.aclose()
            await cur.execute("INSERT INTO pooler_stream VALUES (4)")
        assert await _values("pooler_stream") == [1, 2, 3, 4]
        with _raw(bouncer) as other:
            assert _one(other, "SELECT 3") == 3


class TestCommitBlocks:
    async def test_a_first_statement_that_cannot_carry_the_begin_runs_inside(
        self, tx_settings: DatabaseSettings
    ) -> None:
        """COPY, stream, executemany, two statements in one string, cur.connection: inside the write transaction.

        The block's BEGIN is sent on its own first (aio: it was pending on the connection), so none of these
        gets the read-only wrapper's own BEGIN READ ONLY ... ROLLBACK, which would drop the write.
        """
        await initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        await _table("pooler_first")
        async with get_cursor(commit=True) as cur, cur.copy("COPY pooler_first FROM STDIN") as copy:
            await copy.write_row((1,))
        async with get_cursor(commit=True) as cur:
            rows = [r async for r in cur.stream("INSERT INTO pooler_first VALUES (2) RETURNING x")]
            assert rows == [{"x": 2}]
        async with get_cursor(commit=True) as cur:
            await cur.executemany("INSERT INTO pooler_first VALUES (%s)", [(3,), (4,)])
        async with get_cursor(commit=True) as cur:
            await cur.execute("INSERT INTO pooler_first VALUES (5); INSERT INTO pooler_first VALUES (6)")
        async with get_cursor(commit=True) as cur:
            await cur.connection.execute("INSERT INTO pooler_first VALUES (7)")
            await cur.execute("SELECT current_setting('transaction_read_only') AS ro")
            assert await cur.fetchone() == {"ro": "off"}
        with pytest.raises(ZeroDivisionError):
            async with get_cursor(commit=True) as cur:
                await cur.connection.execute("INSERT INTO pooler_first VALUES (8)")
                raise ZeroDivisionError  # rolled back: 8 never lands
        assert await _values("pooler_first") == [1, 2, 3, 4, 5, 6, 7]


class TestPreparedStatementsBehindThePooler:
    async def test_prepare_true_prepares_nothing(self, tx_settings: DatabaseSettings, bouncer: int) -> None:
        """prepare=True, on a block's first statement, a later one or a read, creates no server statement."""
        await initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        await _table("pooler_prepare")
        for _ in range(3):
            async with get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO pooler_prepare VALUES (%s)", (1,), prepare=True)
                await cur.execute("INSERT INTO pooler_prepare VALUES (%s)", (2,), prepare=True)
                await cur.execute("SELECT count(*) AS n FROM pg_prepared_statements", prepare=True)
                assert await cur.fetchone() == {"n": 0}
            async with get_cursor() as cur:
                await cur.execute("SELECT count(*) AS n FROM pg_prepared_statements", prepare=True)
                assert await cur.fetchone() == {"n": 0}
        with _raw(bouncer) as other:
            assert _one(other, "SELECT count(*) FROM pg_prepared_statements") == 0

    async def test_a_borrowers_prepare_threshold_prepares_nothing_and_is_put_back(
        self, tx_settings: DatabaseSettings, bouncer: int
    ) -> None:
        """prepare_threshold=0 set by a borrower creates no server statement and does not reach the next one."""
        await initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        await _table("pooler_prep")
        async with get_cursor(commit=True) as cur:
            cur.connection.prepare_threshold = 0
            await cur.executemany("INSERT INTO pooler_prep VALUES (%s)", [(1,), (2,)])
            await cur.execute("SELECT count(*) AS n FROM pg_prepared_statements")
            assert await cur.fetchone() == {"n": 0}
        async with get_connection() as conn:
            assert conn.prepare_threshold is None
        with _raw(bouncer) as other:
            assert _one(other, "SELECT count(*) FROM pg_prepared_statements") == 0


#: Each of these was sent and committed behind PgBouncer by the regular expressions (issue 21 item 2).
SESSION_ATTACKS: dict[str, tuple[str, tuple[Any, ...] | None]] = {
    "SET with a comment for a space": ("SET/**/search_path = evil", None),
    "SET as a second statement": ("SELECT 1; SET search_path = evil", None),
    "set_config with a bound false": ("SELECT set_config('app.tenant', 'a', %s)", (False,)),
    "set_config with 1=0": ("SELECT set_config('app.tenant', 'a', 1=0)", None),
    "set_config with 'off'": ("SELECT set_config('app.tenant', 'a', 'off')", None),
    "set_config with false::boolean": ("SELECT set_config('app.tenant', 'a', false::boolean)", None),
    "set_config spelled with U&": ("SELECT U&\"set\\005fconfig\"('app.tenant', 'a', false)", None),
    "a table in pg_temp": ("CREATE TABLE pg_temp.orders (ref int)", None),
    "SELECT INTO TEMP": ("SELECT 1 AS ref INTO TEMP orders", None),
    "a temporary view": ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", None),
    "WITH HOLD with a comment for a space": ("DECLARE c CURSOR WITH/**/HOLD FOR SELECT 1", None),
    "an advisory lock spelled with U&": ('SELECT U&"pg\\005fadvisory\\005flock"(4242)', None),
}


class TestParserBehindThePooler:
    @pytest.mark.parametrize("how", sorted(SESSION_ATTACKS))
    async def test_session_state_is_refused_unsent(
        self, tx_settings: DatabaseSettings, bouncer: int, pg_server: Server, test_db: str, how: str
    ) -> None:
        """Every spelling the regular expressions let through is refused before it is sent (21.2)."""
        sql, params = SESSION_ATTACKS[how]
        await initialize_pool(settings=tx_settings)
        with pytest.raises(SessionStateError, match="was not sent"):
            async with get_cursor(commit=True) as cur:
                await cur.execute(sql, params)
        with _raw(bouncer) as other:  # the one server connection every client shares
            assert _one(other, "SHOW search_path") == '"$user", public'
            assert _one(other, "SELECT current_setting('app.tenant', true)") in (None, "")
        with pg_server.connect(test_db) as admin:
            temp = admin.execute("SELECT count(*) FROM pg_class WHERE relpersistence = 't'").fetchone()
            locks = admin.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND d.datname = current_database()"
            ).fetchone()
        assert temp == (0,)
        assert locks == (0,)

    async def test_a_temp_table_cannot_swallow_other_clients_commits(
        self, tx_settings: DatabaseSettings, pg_server: Server, test_db: str
    ) -> None:
        """CREATE TABLE pg_temp.orders is refused, so five committed INSERTs all reach public.orders (21.2)."""
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS public.orders")
            admin.execute("CREATE TABLE public.orders (ref int)")
        await initialize_pool(settings=tx_settings)
        try:
            with pytest.raises(SessionStateError):
                async with get_cursor(commit=True) as cur:
                    await cur.execute("CREATE TABLE pg_temp.orders (ref int)")
            for ref in range(5):
                async with get_cursor(commit=True) as cur:
                    await cur.execute("INSERT INTO orders VALUES (%s)", (ref,))
            with pg_server.connect(test_db) as admin:
                assert admin.execute("SELECT count(*) FROM public.orders").fetchone() == (5,)
        finally:
            with pg_server.connect(test_db) as admin:
                admin.execute("DROP TABLE IF EXISTS public.orders")

    async def test_hand_built_cursors_cannot_write_past_the_read_only_default(
        self, tx_settings: DatabaseSettings, pg_server: Server, test_db: str
    ) -> None:
        """A hand-built cursor or a replaced cursor_factory is refused unsent behind the pooler (21.3)."""
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS pooler_raw")
            admin.execute("CREATE TABLE pooler_raw (x int)")
        await initialize_pool(settings=tx_settings)
        with pytest.raises(SessionStateError, match="hand-built"):
            async with get_connection() as conn:
                await psycopg.AsyncCursor(conn).execute("INSERT INTO pooler_raw VALUES (1)")
        with pytest.raises(SessionStateError, match="hand-built"):
            async with get_cursor() as cur:
                cur.connection.cursor_factory = psycopg.AsyncClientCursor
                await cur.connection.execute("INSERT INTO pooler_raw VALUES (2)")
        with pytest.raises(SessionStateError, match="hand-built"):
            async with get_cursor() as cur:
                async for _ in psycopg.AsyncCursor(cur.connection).stream(
                    "INSERT INTO pooler_raw VALUES (3) RETURNING x"
                ):
                    pass
        async with get_cursor() as cur:  # the pool's own cursors still read, and still refuse writes
            await cur.execute("SELECT count(*) AS n FROM pooler_raw")
            assert await cur.fetchone() == {"n": 0}
        with pytest.raises(ReadOnlyWriteError):
            async with get_connection() as conn:
                await conn.execute("INSERT INTO pooler_raw VALUES (4)")
        with pytest.raises(ReadOnlyWriteError, match="commit=True"):
            async with get_cursor() as cur, cur.copy("COPY pooler_raw FROM STDIN") as copy:
                await copy.write_row((5,))
        with pg_server.connect(test_db) as admin:
            assert admin.execute("SELECT count(*) FROM pooler_raw").fetchone() == (0,)


class TestQuietRefusals:
    async def test_refused_write_logs_no_pipeline_noise(
        self, tx_settings: DatabaseSettings, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A write refused by the read-only wrapper raises ReadOnlyWriteError and psycopg logs nothing (21.13)."""
        await initialize_pool(settings=tx_settings)
        await _table("pooler_quiet")
        with caplog.at_level("DEBUG", logger="psycopg"):
            for _ in range(3):
                with pytest.raises(ReadOnlyWriteError):
                    async with get_cursor() as cur:
                        await cur.execute("INSERT INTO pooler_quiet VALUES (1)")
        assert [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()] == []


class TestDirectConnections:
    async def test_refused_without_direct_host(self, pg_server: Server, bouncer: int) -> None:
        """A direct connection (migrations, backups) behind a transaction pooler needs DB_DIRECT_HOST."""
        settings = pg_server.settings(port=bouncer, pooler="transaction")
        with pytest.raises(ConfigurationError, match="migrate"):
            await connect(settings, operation="migrate", direct=True)

    async def test_direct_goes_to_the_server(self, tx_settings: DatabaseSettings, pg_server: Server) -> None:
        """connect(direct=True) reaches DB_DIRECT_HOST:PORT itself, not PgBouncer."""
        conn = await connect(tx_settings, operation="migrate", direct=True, verify=False)
        try:
            with socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as sock:  # a dup
                local_port = sock.getsockname()[1]
            cur = await conn.execute("SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            assert await cur.fetchone() == (local_port,)  # our own socket is the server's client: no PgBouncer
        finally:
            await conn.close()

    async def test_stamp_through_direct_then_pool_through_bouncer(self, tx_settings: DatabaseSettings) -> None:
        """The stamp is written over the direct connection and verified on the pool's connections through PgBouncer."""
        stamp_database("test", settings=tx_settings, force=True)
        stamp = read_stamp(settings=tx_settings)
        assert stamp is not None and stamp.env == "test"
        pool = await initialize_pool(settings=tx_settings)
        await pool.wait(timeout=10)
        async with get_cursor() as cur:
            await cur.execute("SELECT env FROM precog_meta.stamp")
            assert await cur.fetchone() == {"env": "test"}


if True:  # ASYNC

    async def _sessions(pg_server: Server, test_db: str, where: str) -> int:
        """Server sessions on the test database (PgBouncer's included) matching ``where``."""
        with pg_server.connect(test_db) as admin:
            row = admin.execute(
                f"SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                f"AND pid <> pg_backend_pid() AND {where}"
            ).fetchone()
        assert row is not None
        return int(row[0])

    async def _until(pg_server: Server, test_db: str, where: str, count: int) -> None:
        """Until exactly ``count`` sessions match ``where`` (bounded: 400 looks, 20 s)."""
        for _ in range(400):
            if await _sessions(pg_server, test_db, where) == count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"never {count} sessions with {where}")

    class TestCancellation:
        """aio only: a task cancelled mid-statement behind the pooler (sync: interrupts, tests/test_interrupts.py)."""

        @pytest.mark.parametrize("commit", [False, True])
        async def test_a_cancelled_statement_leaves_nothing_on_the_shared_server_connection(
            self, tx_settings: DatabaseSettings, bouncer: int, pg_server: Server, test_db: str, commit: bool
        ) -> None:
            """The server cancels the statement, no transaction stays open, the pool and other clients go on."""
            await initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
            await _table("pooler_cancel")

            async def block() -> None:
                async with get_cursor(commit=commit) as cur:
                    await cur.execute("SELECT count(*) FROM pooler_cancel")
                    await cur.execute("SELECT pg_sleep(60) AS pooler_cancel_sleep")

            sleeping = "query LIKE '%pooler_cancel_sleep%' AND state = 'active'"
            task = asyncio.create_task(block())
            await _until(pg_server, test_db, sleeping, 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _until(pg_server, test_db, sleeping, 0)
            assert await _sessions(pg_server, test_db, "state LIKE 'idle in transaction%'") == 0
            with _raw(bouncer) as other:  # the one server connection is free for every client
                assert _one(other, "SELECT 3") == 3
            async with get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO pooler_cancel VALUES (1)")
            assert await _values("pooler_cancel") == [1]


class TestSessionMode:
    async def test_read_only_and_timeout_without_startup_options(self, pg_server: Server, test_db: str) -> None:
        """Behind a session-mode PgBouncer (no startup options) reads stay read-only and the statement timeout holds."""
        with pgbouncer(pg_server, pool_mode="session", pool_size=2) as port:
            settings = pg_server.settings(port=port, pooler="session", statement_timeout_ms=4000)
            assert "options" not in settings.connect_kwargs()
            await initialize_pool(settings=settings)
            try:
                await _table("pooler_session")
                with pytest.raises(ReadOnlyWriteError):
                    async with get_cursor() as cur:
                        await cur.execute("INSERT INTO pooler_session VALUES (1)")
                async with get_cursor() as cur:  # a session SET is allowed here, and undone at checkin
                    await cur.execute("SET statement_timeout = 1234")
                async with get_cursor() as cur:
                    await cur.execute("SELECT current_setting('statement_timeout') AS t")
                    assert await cur.fetchone() == {"t": "4s"}
                with pytest.raises(ReadOnlyWriteError):
                    async with get_cursor() as cur:
                        await cur.execute("INSERT INTO pooler_session VALUES (2)")
            finally:
                await close_pool()  # before its PgBouncer goes
