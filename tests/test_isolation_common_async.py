"""Borrower isolation in both layers: no block leaves session state (or a writable session) to the next borrower.

The asyncio source: tests/test_isolation_common.py is generated from it
(tools/async_to_sync.py), so every scenario runs over `precog_db.aio` here and
over the sync API there. Every test uses a pool of one connection, so the next
borrower surely gets the same server session as the block that tried to leave
something behind. The statement classifier and the psycopg internals are
checked once, in tests/test_isolation.py.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio  # ASYNC-ONLY
from psycopg import IsolationLevel
from psycopg.pq import Trace

from precog_db import ReadOnlyWriteError
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server

if True:  # ASYNC
    from precog_db import aio as api

    fixture = pytest_asyncio.fixture
    Act = Callable[[Any], Awaitable[None]]
    Blocks = Callable[[], Awaitable[None]]

    @pytest_asyncio.fixture(autouse=True)
    async def _asyncio_pool_closed() -> AsyncIterator[None]:
        """The asyncio pool is closed after each test, on the test's own loop."""
        try:
            yield
        finally:
            await api.close_pool()
else:
    import precog_db as api

    fixture = pytest.fixture
    Act = Callable[[Any], None]
    Blocks = Callable[[], None]

pytestmark = pytest.mark.asyncio  # ASYNC-ONLY


@fixture
async def one(test_settings: DatabaseSettings, pg_server: Server, test_db: str) -> int:
    """A pool of exactly one connection; returns its backend pid."""
    with pg_server.connect(test_db) as admin:
        admin.execute("DROP TABLE IF EXISTS iso_items")
        admin.execute("CREATE TABLE iso_items (id int)")
        admin.execute("DROP FUNCTION IF EXISTS iso_sneaky_writable()")
        admin.execute(
            "CREATE FUNCTION iso_sneaky_writable() RETURNS int LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM set_config('default_transaction_read_only', 'off', false); RETURN 1; END $$"
        )
        if admin.execute("SELECT 1 FROM pg_roles WHERE rolname = 'iso_other_role'").fetchone() is None:
            admin.execute("CREATE ROLE iso_other_role NOLOGIN")
    pool = await api.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
    async with api.get_cursor() as cur:
        await cur.execute("SELECT pg_backend_pid() AS pid")
        row = await cur.fetchone()
        assert row is not None
    assert pool.get_stats()["pool_size"] == 1
    return int(row["pid"])


async def _one_value(sql: str) -> Any:
    async with api.get_cursor() as cur:
        await cur.execute(sql)
        row = await cur.fetchone()
        assert row is not None
        return next(iter(row.values()))


async def _same_session(pid: int) -> None:
    assert await _one_value("SELECT pg_backend_pid()") == pid, "the next borrower did not get the same session"


async def _plain_insert_is_refused() -> None:
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        async with api.get_cursor() as cur:
            await cur.execute("INSERT INTO iso_items VALUES (1)")


class TestReadOnlyPromise:
    @pytest.mark.parametrize(
        "statement",
        [
            "SET default_transaction_read_only = off",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "SELECT set_config('default_transaction_read_only', 'off', false)",
            "SELECT 1; SET default_transaction_read_only = off",
            "/* comment */ -- another\n SET default_transaction_read_only TO off",
            "RESET ALL",
        ],
    )
    async def test_a_block_cannot_leave_the_session_writable(self, one: int, statement: str) -> None:
        """A get_cursor() block that tries to turn read-only off is refused before sending it (21.7)."""
        with pytest.raises(ReadOnlyWriteError, match="refused before it was sent"):
            async with api.get_cursor() as cur:
                await cur.execute(statement)
        await _same_session(one)
        await _plain_insert_is_refused()
        assert await _one_value("SELECT count(*) FROM iso_items") == 0

    async def test_commit_block_cannot_leave_the_session_writable(self, one: int) -> None:
        """The same through a commit=True block: the next get_cursor() still refuses writes."""
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        await _same_session(one)
        await _plain_insert_is_refused()

    async def test_function_that_flips_read_only_is_caught(self, one: int) -> None:
        """A function that turns read-only off, called by a plain SELECT, is seen through the reported parameter."""
        async with api.get_cursor() as cur:
            await cur.execute("SELECT iso_sneaky_writable()")
        await _same_session(one)
        await _plain_insert_is_refused()

    async def test_raw_connection_cannot_leave_the_session_writable(self, one: int) -> None:
        """A get_connection() borrower that turns read-only off does not leave it off."""
        async with api.get_connection() as conn:
            with pytest.raises(ReadOnlyWriteError, match="refused before it was sent"):
                await conn.execute("SET default_transaction_read_only = off")  # outside a transaction: refused (21.7)
            async with conn.transaction():
                await conn.execute("SET default_transaction_read_only = off")  # inside one: allowed, then undone
        await _same_session(one)
        await _plain_insert_is_refused()

    async def test_cursor_factory_swapped_by_a_borrower_is_restored(self, one: int) -> None:
        """Swapping the connection's cursor class to dodge the tracking is undone, and the session reset."""
        async with api.get_connection() as conn:
            conn.cursor_factory = psycopg.AsyncCursor
            await conn.execute("SET search_path = pg_catalog")
        async with api.get_connection() as conn:
            assert conn.cursor_factory is not psycopg.AsyncCursor
        assert await _one_value("SHOW search_path") == '"$user", public'


def _state_cases() -> list[tuple[str, Act, str, Any]]:
    """(name, what the first borrower does with its cursor, probe SQL, expected probe value)."""

    def ex(sql: str) -> Act:
        async def act(cur: Any) -> None:
            await cur.execute(sql)

        return act

    default_path = '"$user", public'
    advisory = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    return [
        ("search_path", ex("SET search_path = pg_catalog"), "SHOW search_path", default_path),
        (
            "search_path_set_config",
            ex("SELECT set_config('search_path', 'pg_catalog', false)"),
            "SHOW search_path",
            default_path,
        ),
        ("timezone", ex("SET TimeZone = 'Asia/Tokyo'"), "SHOW TimeZone", None),
        ("statement_timeout", ex("SET statement_timeout = 1"), "SHOW statement_timeout", "0"),
        ("role", ex("SET ROLE iso_other_role"), "SELECT current_user", None),
        ("temp_table", ex("CREATE TEMP TABLE iso_tmp (x int)"), "SELECT to_regclass('pg_temp.iso_tmp') IS NULL", True),
        (
            "select_into_temp",
            ex("SELECT 1 AS x INTO TEMP iso_tmp2"),
            "SELECT to_regclass('pg_temp.iso_tmp2') IS NULL",
            True,
        ),
        (
            "prepared",
            ex("PREPARE iso_stmt AS SELECT 1"),
            "SELECT count(*) FROM pg_prepared_statements WHERE name = 'iso_stmt'",
            0,
        ),
        ("listen", ex("LISTEN iso_channel"), "SELECT count(*) FROM pg_listening_channels()", 0),
        ("advisory_lock", ex("SELECT pg_advisory_lock(4242)"), advisory, 0),
        ("try_advisory_lock", ex("SELECT pg_try_advisory_lock_shared(4243)"), advisory, 0),
        ("with_hold_cursor", ex("DECLARE iso_cur CURSOR WITH HOLD FOR SELECT 1"), "SELECT count(*) FROM pg_cursors", 0),
    ]


#: Temporary tables cannot be created in a read-only block: those cases run with commit=True only.
_WRITES = {"temp_table", "select_into_temp"}
_STATE_PARAMS = [
    pytest.param(commit, *case, id=f"{'commit' if commit else 'read'}-{case[0]}")
    for commit in (False, True)
    for case in _state_cases()
    if commit or case[0] not in _WRITES
]


class TestSessionState:
    @pytest.mark.parametrize(("commit", "case", "act", "probe", "expected"), _STATE_PARAMS)
    async def test_state_does_not_reach_the_next_borrower(
        self, one: int, commit: bool, case: str, act: Act, probe: str, expected: Any
    ) -> None:
        """Session state left by one get_cursor() block is gone for the next borrower of the same session."""
        if expected is None:  # the server's own default, read before the block changes it
            expected = await _one_value(probe)
        async with api.get_cursor(commit=commit) as cur:
            await act(cur)
        await _same_session(one)
        assert await _one_value(probe) == expected

    async def test_with_hold_server_cursor_left_open(self, one: int) -> None:
        """A named WITH HOLD cursor a get_connection() borrower leaves open is closed for the next one."""
        async with api.get_connection() as conn:
            cur = conn.cursor("iso_named", withhold=True)
            await cur.execute("SELECT generate_series(1, 10)")
            await cur.fetchone()
        await _same_session(one)
        assert await _one_value("SELECT count(*) FROM pg_cursors") == 0
        async with api.get_connection():
            with pytest.raises(psycopg.errors.InvalidCursorName):
                await cur.close()  # the borrower's leftover cursor no longer exists on the server
        with warnings.catch_warnings():  # the client object still believes it is open
            warnings.simplefilter("ignore", ResourceWarning)
            del cur
            gc.collect()

    async def test_advisory_lock_is_released_for_other_sessions(
        self, one: int, pg_server: Server, test_db: str
    ) -> None:
        """A session advisory lock taken in a block is released when the block ends: another session can take it."""
        async with api.get_cursor() as cur:
            await cur.execute("SELECT pg_advisory_lock(4244)")
        with pg_server.connect(test_db) as other:
            assert other.execute("SELECT pg_try_advisory_lock(4244)").fetchone() == (True,)

    async def test_isolation_level_set_on_a_raw_connection_is_restored(self, one: int) -> None:
        """isolation_level, read_only, deferrable and autocommit changed through get_connection() are restored."""
        async with api.get_connection() as conn:
            if True:  # ASYNC
                await conn.set_isolation_level(IsolationLevel.SERIALIZABLE)
                await conn.set_deferrable(True)
                await conn.set_read_only(True)
                await conn.set_autocommit(False)
            else:
                conn.isolation_level = IsolationLevel.SERIALIZABLE
                conn.deferrable = True
                conn.read_only = True
                conn.autocommit = False
        async with api.get_connection() as conn:
            assert conn.isolation_level is None and conn.deferrable is None
            assert conn.read_only is False and conn.autocommit is True
            async with conn.transaction():
                row = await (await conn.execute("SELECT current_setting('transaction_isolation')")).fetchone()
                assert row == ("read committed",)
                await conn.execute("INSERT INTO iso_items VALUES (1)")  # still read-write inside a transaction

    async def test_row_factory_set_on_a_raw_connection_is_restored(self, one: int) -> None:
        """A row_factory set through get_connection() does not change the rows the next borrower gets."""
        async with api.get_connection() as conn:
            before = await (await conn.execute("SELECT 1 AS a")).fetchone()
            conn.row_factory = psycopg.rows.dict_row
        async with api.get_connection() as conn:
            assert await (await conn.execute("SELECT 1 AS a")).fetchone() == before

    async def test_prepare_threshold_set_by_a_borrower_is_put_back(self, one: int) -> None:
        """A get_cursor() borrower's prepare_threshold does not reach the next borrower (21, closing attack)."""
        async with api.get_cursor() as cur:
            cur.connection.prepare_threshold = 0
        async with api.get_connection() as conn:
            assert conn.prepare_threshold == 5


class TestTempTableDataLoss:
    async def test_committed_inserts_reach_the_real_table(self, one: int, pg_server: Server, test_db: str) -> None:
        """A block creating TEMP TABLE trades does not swallow later committed inserts into public.trades."""
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS trades")
            admin.execute("CREATE TABLE trades (id int, qty int)")
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("CREATE TEMP TABLE trades (id int, qty int)")
            await cur.execute("INSERT INTO trades VALUES (0, 0)")
        for i in range(1, 4):
            await _same_session(one)
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO trades VALUES (%s, %s)", (i, i * 10))
        with pg_server.connect(test_db) as admin:
            assert admin.execute("SELECT count(*) FROM public.trades").fetchone() == (3,)


async def _traced(tmp_path: Path, blocks: Blocks) -> tuple[int, list[str]]:
    """Round trips (ReadyForQuery) and queries sent while ``blocks`` runs on the pool's one connection."""
    trace = tmp_path / "trace.txt"
    with trace.open("w") as fh:
        async with api.get_cursor() as cur:  # a get_connection() block would add its own reset to the trace
            conn = cur.connection
            conn.pgconn.trace(fh.fileno())
            conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
        await blocks()
        async with api.get_cursor() as cur:
            cur.connection.pgconn.untrace()
    lines = trace.read_text().splitlines()
    round_trips = [line for line in lines if "\tReadyForQuery" in line and line.startswith("B")]
    sent = [line.split("\t")[3] for line in lines if line.startswith("F") and "\tQuery\t" in line]
    return len(round_trips), sent


class TestResetBudget:
    async def test_plain_read_blocks_pay_no_reset(self, one: int, tmp_path: Path) -> None:
        """Reads, committed writes, SET LOCAL and SHOW keep their round trips: no reset is sent after them."""

        async def blocks() -> None:
            for _ in range(3):
                async with api.get_cursor() as cur:
                    await cur.execute("SELECT 1")
            async with api.get_cursor() as cur:
                await cur.execute("SELECT * FROM iso_items WHERE id = %s", (1,))
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("SET LOCAL statement_timeout = 5000")
                await cur.execute("INSERT INTO iso_items VALUES (%s)", (1,))

        trips, sent = await _traced(tmp_path, blocks)
        assert not any("DISCARD" in s for s in sent), sent
        assert trips == 3 + 1 + 3, sent  # the commit=True block: BEGIN with SET LOCAL, INSERT, COMMIT

    async def test_a_state_changing_block_pays_one_reset(self, one: int, tmp_path: Path) -> None:
        """A block that ran SET is followed by exactly one DISCARD ALL, and the next plain block by none."""

        async def blocks() -> None:
            async with api.get_cursor() as cur:
                await cur.execute("SET search_path = pg_catalog")
            async with api.get_cursor() as cur:
                await cur.execute("SELECT 1")

        trips, sent = await _traced(tmp_path, blocks)
        assert sent == [' "SET search_path = pg_catalog"', ' "DISCARD ALL"', ' "SELECT 1"'], sent
        assert trips == 3

    async def test_failed_reset_replaces_the_connection(self, one: int, pg_server: Server, test_db: str) -> None:
        """If the reset cannot run (the backend died), the connection is replaced, never handed out dirty."""
        async with api.get_cursor() as cur:
            await cur.execute("SET search_path = pg_catalog")
            with pg_server.connect(test_db) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (one,))
        assert await _one_value("SHOW search_path") == '"$user", public'
        assert await _one_value("SELECT pg_backend_pid()") != one
        assert (await api.get_pool()).get_stats()["pool_size"] == 1


class TestPreparedStatementCache:
    async def test_repeated_resets_keep_psycopgs_cache_in_step(self, one: int) -> None:
        """Prepared statements psycopg made itself keep working across many resets of the same session."""
        for i in range(20):
            async with api.get_cursor() as cur:
                await cur.execute("SELECT %s::int AS i", (i,))  # prepared by psycopg after 5 runs
                assert await cur.fetchone() == {"i": i}
            async with api.get_cursor() as cur:
                await cur.execute("SET search_path = public")  # dirty: DISCARD ALL at checkin
        await _same_session(one)
