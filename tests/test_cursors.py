"""get_cursor and get_connection: read-only by default, transactional with commit=True."""

from __future__ import annotations

from typing import Any, assert_type

import psycopg
import pytest
from psycopg.rows import tuple_row

from precog_db import ReadOnlyWriteError, close_pool, get_connection, get_cursor, get_pool, initialize_pool
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server


@pytest.fixture
def table(test_settings: DatabaseSettings) -> str:
    # Wait for the pool's first connection before using it. Otherwise the first
    # checkout queues, the pool grows by one (pool_size 2), and that second
    # connection may still be opening in the background when a test checks
    # that every connection is back (`assert_pool_clean`: pool_available 1 of 2).
    initialize_pool(settings=test_settings).wait(timeout=test_settings.connect_timeout)
    with get_cursor(commit=True) as cur:
        cur.execute("DROP TABLE IF EXISTS cursor_items")
        cur.execute("CREATE TABLE cursor_items (id serial PRIMARY KEY, name text NOT NULL)")
    return "cursor_items"


def count(table: str) -> int:
    with get_cursor() as cur:
        cur.execute(f"SELECT count(*) AS n FROM {table}")
        row = cur.fetchone()
        assert row is not None
        return int(row["n"])


def assert_pool_clean(pg_server: Server, dbname: str) -> None:
    """Every connection the pool counts is back in it, and none is left idle in a transaction on the server.

    Exact only when no connection is being opened in the background, which the
    `table` fixture ensures: the pool starts full and these tests borrow one
    connection at a time, so it never grows.
    """
    stats = get_pool().get_stats()
    assert stats["pool_available"] == stats["pool_size"], stats
    with pg_server.connect(dbname) as admin:
        stuck = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'precog-test' "
            "AND datname = current_database() AND state LIKE 'idle in transaction%'"  # not another run's
        ).fetchone()
    assert stuck == (0,)


class TestReadOnlyCursor:
    def test_rows_are_dicts(self, table: str) -> None:
        """Rows come back as dicts by default."""
        with get_cursor() as cur:
            cur.execute("SELECT 1 AS a, 'x' AS b")
            assert cur.fetchone() == {"a": 1, "b": "x"}

    def test_row_factory_can_be_changed(self, table: str) -> None:
        """A row_factory argument overrides the dict default."""
        with get_cursor(row_factory=tuple_row) as cur:
            cur.execute("SELECT 1, 2")
            assert cur.fetchone() == (1, 2)

    def test_write_without_commit_fails_loudly_and_persists_nothing(
        self, table: str, pg_server: Server, test_db: str
    ) -> None:
        """A write in get_cursor() raises ReadOnlySqlTransaction; nothing is stored."""
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), get_cursor() as cur:
            cur.execute("INSERT INTO cursor_items (name) VALUES ('lost')")
        assert count(table) == 0
        assert_pool_clean(pg_server, test_db)

    def test_sql_error_leaves_connection_usable(self, table: str, pg_server: Server, test_db: str) -> None:
        """After a SQL error the connection returns to the pool idle and works."""
        with pytest.raises(psycopg.errors.UndefinedTable), get_cursor() as cur:
            cur.execute("SELECT * FROM no_such_table")
        assert count(table) == 0
        assert_pool_clean(pg_server, test_db)


class TestCommitCursor:
    def test_clean_exit_commits(self, table: str) -> None:
        """commit=True commits when the block exits cleanly."""
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO cursor_items (name) VALUES ('a'), ('b')")
        assert count(table) == 2

    def test_exception_rolls_back_and_propagates(self, table: str, pg_server: Server, test_db: str) -> None:
        """commit=True rolls back when the block raises, and the exception propagates."""

        class Boom(Exception):
            pass

        with pytest.raises(Boom), get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO cursor_items (name) VALUES ('gone')")
            raise Boom
        assert count(table) == 0
        assert_pool_clean(pg_server, test_db)

    def test_sql_error_rolls_back_earlier_statements(self, table: str) -> None:
        """A failing statement rolls back the whole transaction."""
        with pytest.raises(psycopg.errors.NotNullViolation), get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO cursor_items (name) VALUES ('first')")
            cur.execute("INSERT INTO cursor_items (name) VALUES (NULL)")
        assert count(table) == 0

    def test_transaction_is_atomic_and_isolated(self, table: str) -> None:
        """Other sessions do not see uncommitted rows of a commit=True block."""
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO cursor_items (name) VALUES ('pending')")
            assert count(table) == 0
        assert count(table) == 1


class TestConnection:
    def test_connection_is_autocommit_and_read_only_by_default(self, table: str) -> None:
        """get_connection yields an autocommit connection whose plain writes are refused."""
        with get_connection() as conn:
            assert conn.autocommit
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("INSERT INTO cursor_items (name) VALUES ('x')")

    def test_transaction_block_writes(self, table: str) -> None:
        """conn.transaction() is a read-write transaction."""
        with get_connection() as conn, conn.transaction():
            conn.execute("INSERT INTO cursor_items (name) VALUES ('x')")
        assert count(table) == 1

    def test_state_changes_are_undone_on_return(
        self, table: str, pg_server: Server, test_settings: DatabaseSettings, test_db: str
    ) -> None:
        """A connection returned with autocommit off and an open transaction is restored."""
        close_pool()
        initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
        with get_connection() as conn:
            conn.autocommit = False
            conn.execute("SELECT 1")
        with get_connection() as conn:
            assert conn.autocommit and conn.read_only is False
        assert_pool_clean(pg_server, test_db)


class TestHarness:
    def test_table_fixture_leaves_a_full_pool_that_never_grew(self, table: str) -> None:
        """After the table fixture every connection the pool counts is open and idle, so assert_pool_clean is exact."""
        stats = get_pool().get_stats()
        assert stats.get("requests_queued", 0) == 0, stats  # the first checkout did not wait, so no growth
        assert stats["pool_size"] == stats["pool_available"] == 1, stats


class TestForgottenCommit:
    def test_write_in_a_read_block_says_to_use_commit_true(self, table: str) -> None:
        """An INSERT in get_cursor() raises ReadOnlyWriteError, still a ReadOnlySqlTransaction, naming the fix."""
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info, get_cursor() as cur:
            cur.execute("INSERT INTO cursor_items (name) VALUES (%s)", ("x",))
        assert isinstance(info.value, ReadOnlyWriteError)
        message = str(info.value)
        assert "cannot execute INSERT in a read-only transaction" in message
        assert "get_cursor(commit=True)" in message
        assert info.value.sqlstate == "25006" and info.value.diag.sqlstate == "25006"
        assert count(table) == 0

    def test_nextval_in_a_read_block_says_to_use_commit_true(self, table: str) -> None:
        """nextval() in get_cursor() raises ReadOnlyWriteError naming get_cursor(commit=True)."""
        with pytest.raises(ReadOnlyWriteError, match=r"nextval\(\).*get_cursor\(commit=True\)"), get_cursor() as cur:
            cur.execute("SELECT nextval('cursor_items_id_seq')")

    def test_raw_connection_write_gets_the_same_hint(self, table: str) -> None:
        """A write through get_connection() outside a transaction gets the same error and hint."""
        with get_connection() as conn, pytest.raises(ReadOnlyWriteError, match=r"conn\.transaction\(\)"):
            conn.execute("INSERT INTO cursor_items (name) VALUES ('x')")

    def test_explicit_read_only_transaction_keeps_the_plain_error(self, table: str) -> None:
        """Inside a transaction the caller declared READ ONLY, the error is psycopg's own, without the hint."""
        with get_connection() as conn:
            conn.read_only = True
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info, conn.transaction():
                conn.execute("INSERT INTO cursor_items (name) VALUES ('x')")
        assert not isinstance(info.value, ReadOnlyWriteError)


class TestPublicSignature:
    def test_rows_are_typed_dicts_by_default(self, table: str) -> None:
        """get_cursor() is typed Cursor[dict[str, Any]] (checked by mypy over the tests) and yields dicts."""
        with get_cursor() as cur:
            cur.execute("SELECT 1 AS one")
            row = cur.fetchone()
        assert_type(row, dict[str, Any] | None)
        assert row == {"one": 1}

    def test_a_row_factory_sets_the_row_type(self, table: str) -> None:
        """get_cursor(row_factory=tuple_row) is typed by its factory and yields tuples."""
        with get_cursor(row_factory=tuple_row) as cur:
            cur.execute("SELECT 1, 'a'")
            row = cur.fetchone()
        assert_type(row, tuple[Any, ...] | None)
        assert row == (1, "a")

    def test_commit_is_keyword_only(self) -> None:
        """get_cursor(True) is a TypeError: a bare True does not say that it commits."""
        with pytest.raises(TypeError):
            get_cursor(True)  # type: ignore[call-overload]
