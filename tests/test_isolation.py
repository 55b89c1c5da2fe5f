"""Borrower isolation: no block leaves session state (or a writable session) to the next borrower.

Every test uses a pool of one connection, so the next borrower surely gets the
same server session as the block that tried to leave something behind.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import IsolationLevel
from psycopg.pq import Trace

from precog_db import ReadOnlyWriteError, get_connection, get_cursor, get_pool, initialize_pool
from precog_db.session import changes_session
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server


@pytest.fixture
def one(test_settings: DatabaseSettings, pg_server: Server, test_db: str) -> int:
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
    pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
    with get_cursor() as cur:
        cur.execute("SELECT pg_backend_pid() AS pid")
        row = cur.fetchone()
        assert row is not None
    assert pool.get_stats()["pool_size"] == 1
    return int(row["pid"])


def _one_value(sql: str) -> Any:
    with get_cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
        assert row is not None
        return next(iter(row.values()))


def _same_session(pid: int) -> None:
    assert _one_value("SELECT pg_backend_pid()") == pid, "the next borrower did not get the same session"


def _plain_insert_is_refused() -> None:
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), get_cursor() as cur:
        cur.execute("INSERT INTO iso_items VALUES (1)")


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
    def test_a_block_cannot_leave_the_session_writable(self, one: int, statement: str) -> None:
        """A get_cursor() block that tries to turn read-only off is refused before sending it (21.7)."""
        with pytest.raises(ReadOnlyWriteError, match="refused before it was sent"), get_cursor() as cur:
            cur.execute(statement)
        _same_session(one)
        _plain_insert_is_refused()
        assert _one_value("SELECT count(*) FROM iso_items") == 0

    def test_commit_block_cannot_leave_the_session_writable(self, one: int) -> None:
        """The same through a commit=True block: the next get_cursor() still refuses writes."""
        with get_cursor(commit=True) as cur:
            cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        _same_session(one)
        _plain_insert_is_refused()

    def test_function_that_flips_read_only_is_caught(self, one: int) -> None:
        """A function that turns read-only off, called by a plain SELECT, is seen through the reported parameter."""
        with get_cursor() as cur:
            cur.execute("SELECT iso_sneaky_writable()")
        _same_session(one)
        _plain_insert_is_refused()

    def test_raw_connection_cannot_leave_the_session_writable(self, one: int) -> None:
        """A get_connection() borrower that turns read-only off does not leave it off."""
        with get_connection() as conn:
            with pytest.raises(ReadOnlyWriteError, match="refused before it was sent"):
                conn.execute("SET default_transaction_read_only = off")  # outside a transaction: refused (21.7)
            with conn.transaction():
                conn.execute("SET default_transaction_read_only = off")  # inside one: allowed, then undone
        _same_session(one)
        _plain_insert_is_refused()

    def test_cursor_factory_swapped_by_a_borrower_is_restored(self, one: int) -> None:
        """Swapping the connection's cursor class to dodge the tracking is undone, and the session reset."""
        with get_connection() as conn:
            conn.cursor_factory = psycopg.Cursor
            conn.execute("SET search_path = pg_catalog")
        with get_connection() as conn:
            assert conn.cursor_factory is not psycopg.Cursor
        assert _one_value("SHOW search_path") == '"$user", public'


def _state_cases() -> list[tuple[str, Callable[[Any], None], str, Any]]:
    """(name, what the first borrower does with its cursor, probe SQL, expected probe value)."""

    def ex(sql: str) -> Callable[[Any], None]:
        return lambda cur: cur.execute(sql)

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
    def test_state_does_not_reach_the_next_borrower(
        self, one: int, commit: bool, case: str, act: Callable[[Any], None], probe: str, expected: Any
    ) -> None:
        """Session state left by one get_cursor() block is gone for the next borrower of the same session."""
        if expected is None:  # the server's own default, read before the block changes it
            expected = _one_value(probe)
        with get_cursor(commit=commit) as cur:
            act(cur)
        _same_session(one)
        assert _one_value(probe) == expected

    def test_with_hold_server_cursor_left_open(self, one: int) -> None:
        """A named WITH HOLD cursor a get_connection() borrower leaves open is closed for the next one."""
        with get_connection() as conn:
            cur = conn.cursor("iso_named", withhold=True)
            cur.execute("SELECT generate_series(1, 10)")
            cur.fetchone()
        _same_session(one)
        assert _one_value("SELECT count(*) FROM pg_cursors") == 0
        with get_connection(), pytest.raises(psycopg.errors.InvalidCursorName):
            cur.close()  # the borrower's leftover cursor no longer exists on the server
        with warnings.catch_warnings():  # the client object still believes it is open
            warnings.simplefilter("ignore", ResourceWarning)
            del cur
            gc.collect()

    def test_advisory_lock_is_released_for_other_sessions(self, one: int, pg_server: Server, test_db: str) -> None:
        """A session advisory lock taken in a block is released when the block ends: another session can take it."""
        with get_cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(4244)")
        with pg_server.connect(test_db) as other:
            assert other.execute("SELECT pg_try_advisory_lock(4244)").fetchone() == (True,)

    def test_isolation_level_set_on_a_raw_connection_is_restored(self, one: int) -> None:
        """isolation_level, read_only, deferrable and autocommit changed through get_connection() are restored."""
        with get_connection() as conn:
            conn.isolation_level = IsolationLevel.SERIALIZABLE
            conn.deferrable = True
            conn.read_only = True
            conn.autocommit = False
        with get_connection() as conn:
            assert conn.isolation_level is None and conn.deferrable is None
            assert conn.read_only is False and conn.autocommit is True
            with conn.transaction():
                row = conn.execute("SELECT current_setting('transaction_isolation')").fetchone()
                assert row == ("read committed",)
                conn.execute("INSERT INTO iso_items VALUES (1)")  # still read-write inside a transaction

    def test_row_factory_set_on_a_raw_connection_is_restored(self, one: int) -> None:
        """A row_factory set through get_connection() does not change the rows the next borrower gets."""
        with get_connection() as conn:
            before = conn.execute("SELECT 1 AS a").fetchone()
            conn.row_factory = psycopg.rows.dict_row
        with get_connection() as conn:
            assert conn.execute("SELECT 1 AS a").fetchone() == before


class TestTempTableDataLoss:
    def test_committed_inserts_reach_the_real_table(self, one: int, pg_server: Server, test_db: str) -> None:
        """A block creating TEMP TABLE trades does not swallow later committed inserts into public.trades."""
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS trades")
            admin.execute("CREATE TABLE trades (id int, qty int)")
        with get_cursor(commit=True) as cur:
            cur.execute("CREATE TEMP TABLE trades (id int, qty int)")
            cur.execute("INSERT INTO trades VALUES (0, 0)")
        for i in range(1, 4):
            _same_session(one)
            with get_cursor(commit=True) as cur:
                cur.execute("INSERT INTO trades VALUES (%s, %s)", (i, i * 10))
        with pg_server.connect(test_db) as admin:
            assert admin.execute("SELECT count(*) FROM public.trades").fetchone() == (3,)


def _traced(tmp_path: Path, blocks: Callable[[], None]) -> tuple[int, list[str]]:
    """Round trips (ReadyForQuery) and queries sent while ``blocks`` runs on the pool's one connection."""
    trace = tmp_path / "trace.txt"
    with trace.open("w") as fh:
        with get_cursor() as cur:  # a get_connection() block would add its own reset to the trace
            conn = cur.connection
            conn.pgconn.trace(fh.fileno())
            conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
        blocks()
        with get_cursor() as cur:
            cur.connection.pgconn.untrace()
    lines = trace.read_text().splitlines()
    round_trips = [line for line in lines if "\tReadyForQuery" in line and line.startswith("B")]
    sent = [line.split("\t")[3] for line in lines if line.startswith("F") and "\tQuery\t" in line]
    return len(round_trips), sent


class TestResetBudget:
    def test_plain_read_blocks_pay_no_reset(self, one: int, tmp_path: Path) -> None:
        """Reads, committed writes, SET LOCAL and SHOW keep their round trips: no reset is sent after them."""

        def blocks() -> None:
            for _ in range(3):
                with get_cursor() as cur:
                    cur.execute("SELECT 1")
            with get_cursor() as cur:
                cur.execute("SELECT * FROM iso_items WHERE id = %s", (1,))
            with get_cursor(commit=True) as cur:
                cur.execute("SET LOCAL statement_timeout = 5000")
                cur.execute("INSERT INTO iso_items VALUES (%s)", (1,))

        trips, sent = _traced(tmp_path, blocks)
        assert not any("DISCARD" in s for s in sent), sent
        assert trips == 3 + 1 + 3, sent  # the commit=True block: BEGIN with SET LOCAL, INSERT, COMMIT

    def test_a_state_changing_block_pays_one_reset(self, one: int, tmp_path: Path) -> None:
        """A block that ran SET is followed by exactly one DISCARD ALL, and the next plain block by none."""

        def blocks() -> None:
            with get_cursor() as cur:
                cur.execute("SET search_path = pg_catalog")
            with get_cursor() as cur:
                cur.execute("SELECT 1")

        trips, sent = _traced(tmp_path, blocks)
        assert sent == [' "SET search_path = pg_catalog"', ' "DISCARD ALL"', ' "SELECT 1"'], sent
        assert trips == 3

    def test_failed_reset_replaces_the_connection(self, one: int, pg_server: Server, test_db: str) -> None:
        """If the reset cannot run (the backend died), the connection is replaced, never handed out dirty."""
        with get_cursor() as cur:
            cur.execute("SET search_path = pg_catalog")
            with pg_server.connect(test_db) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (one,))
        assert _one_value("SHOW search_path") == '"$user", public'
        assert _one_value("SELECT pg_backend_pid()") != one
        assert get_pool().get_stats()["pool_size"] == 1


class TestClassifier:
    """The cheap look at a statement's text that decides whether its connection needs a reset."""

    @pytest.mark.parametrize(
        "sql",
        [
            "SELECT 1",
            "  select * from t where id = $1",
            "/* hint */ -- note\nSELECT 1;",
            "(SELECT 1) UNION (SELECT 2)",
            "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
            "INSERT INTO t VALUES ($1)",
            "UPDATE t SET x = 1",
            "DELETE FROM t",
            "MERGE INTO t USING s ON true WHEN MATCHED THEN DO NOTHING",
            "SET LOCAL statement_timeout = 5000",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SELECT pg_advisory_xact_lock(1)",
            "CREATE TABLE t (x int)",
            "COPY t FROM STDIN",
            "SHOW search_path",
            "SELECT pg_catalog.set_config('a.b', 'x', true)",
            "",
        ],
    )
    def test_clean_statements(self, sql: str) -> None:
        """Reads, writes, transaction-scoped SET and plain DDL leave no session state: no reset."""
        assert not changes_session(sql.encode())

    @pytest.mark.parametrize(
        "sql",
        [
            "SET search_path = x",
            "set  session characteristics as transaction read write",
            "RESET ALL",
            "SELECT set_config('search_path', 'x', false)",
            "SELECT pg_catalog.set_config('a.b', 'x', $1)",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_try_advisory_lock_shared(1)",
            "SELECT 1; SET search_path = x",
            "SELECT * INTO TEMP t FROM x",
            "CREATE TEMP TABLE t (x int)",
            "create temporary view v as select 1",
            "CREATE TABLE pg_temp.t (x int)",
            "PREPARE p AS SELECT 1",
            "LISTEN c",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "DISCARD ALL",
            "DO $$ BEGIN PERFORM 1; END $$",
            "CALL p()",
            "BEGIN",
            "/* unclosed /* nested */ SELECT 1 */ SET x = 1",
            "SELECT ts_rewrite('a'::tsquery, 'SELECT 1')",
        ],
    )
    def test_session_changing_statements(self, sql: str) -> None:
        """Anything that may change the session, or cannot be told apart quickly, needs a reset."""
        assert changes_session(sql.encode())


class TestPreparedStatementCache:
    def test_repeated_resets_keep_psycopgs_cache_in_step(self, one: int) -> None:
        """Prepared statements psycopg made itself keep working across many resets of the same session."""
        for i in range(20):
            with get_cursor() as cur:
                cur.execute("SELECT %s::int AS i", (i,))  # prepared by psycopg after 5 runs
                assert cur.fetchone() == {"i": i}
            with get_cursor() as cur:
                cur.execute("SET search_path = public")  # dirty: DISCARD ALL at checkin
        _same_session(one)


class TestPsycopgInternals:
    def test_the_private_names_borrower_isolation_relies_on_exist(self, one: int) -> None:
        """Every psycopg internal listed in precog_db/session.py exists: an upgrade that renames one fails here."""
        assert callable(getattr(psycopg.Cursor, "_convert_query", None))
        assert callable(getattr(psycopg.ServerCursor, "_make_declare_statement", None))
        assert callable(getattr(psycopg.AsyncCursor, "_convert_query", None))
        assert callable(getattr(psycopg.AsyncServerCursor, "_make_declare_statement", None))
        # The reset generator both layers run (_session_base.restore_gen), on the connections' common base.
        for cls in (psycopg.Connection, psycopg.AsyncConnection):
            for gen in (
                "_rollback_gen",
                "_set_autocommit_gen",
                "_set_read_only_gen",
                "_set_isolation_level_gen",
                "_set_deferrable_gen",
                "_exec_command",
            ):
                assert callable(getattr(cls, gen, None)), (cls.__name__, gen)
        with get_connection() as conn:
            for name in (
                "_autocommit",
                "_read_only",
                "_isolation_level",
                "_deferrable",
                "_notice_handlers",
                "_notify_handlers",
                "_num_transactions",
                "_pipeline",
            ):
                assert hasattr(conn, name), name
            for name in ("_counts", "_names", "_to_flush"):
                assert hasattr(conn._prepared, name), name
            with conn.cursor("iso_internals") as cur:
                assert hasattr(cur, "_withhold")


def test_prepare_threshold_set_by_a_borrower_is_put_back(one: int) -> None:
    """A get_cursor() borrower's prepare_threshold does not reach the next borrower (21, closing attack)."""
    with get_cursor() as cur:
        cur.connection.prepare_threshold = 0
    with get_connection() as conn:
        assert conn.prepare_threshold == 5
