"""get_cursor and get_connection: read-only by default, transactional with commit=True."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.rows import tuple_row

from precog_db import close_pool, get_connection, get_cursor, get_pool, initialize_pool
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server


@pytest.fixture
def table(test_settings: DatabaseSettings) -> str:
    initialize_pool(settings=test_settings)
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
    stats = get_pool().get_stats()
    assert stats["pool_available"] == stats["pool_size"]
    with pg_server.connect(dbname) as admin:
        stuck = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'precog-test' "
            "AND state LIKE 'idle in transaction%'"
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

    def test_write_without_commit_fails_loudly_and_persists_nothing(self, table: str, pg_server: Server) -> None:
        """A write in get_cursor() raises ReadOnlySqlTransaction; nothing is stored."""
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), get_cursor() as cur:
            cur.execute("INSERT INTO cursor_items (name) VALUES ('lost')")
        assert count(table) == 0
        assert_pool_clean(pg_server, "precog_test")

    def test_sql_error_leaves_connection_usable(self, table: str, pg_server: Server) -> None:
        """After a SQL error the connection returns to the pool idle and works."""
        with pytest.raises(psycopg.errors.UndefinedTable), get_cursor() as cur:
            cur.execute("SELECT * FROM no_such_table")
        assert count(table) == 0
        assert_pool_clean(pg_server, "precog_test")


class TestCommitCursor:
    def test_clean_exit_commits(self, table: str) -> None:
        """commit=True commits when the block exits cleanly."""
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO cursor_items (name) VALUES ('a'), ('b')")
        assert count(table) == 2

    def test_exception_rolls_back_and_propagates(self, table: str, pg_server: Server) -> None:
        """commit=True rolls back when the block raises, and the exception propagates."""

        class Boom(Exception):
            pass

        with pytest.raises(Boom), get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO cursor_items (name) VALUES ('gone')")
            raise Boom
        assert count(table) == 0
        assert_pool_clean(pg_server, "precog_test")

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
        self, table: str, pg_server: Server, test_settings: DatabaseSettings
    ) -> None:
        """A connection returned with autocommit off and an open transaction is restored."""
        close_pool()
        initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
        with get_connection() as conn:
            conn.autocommit = False
            conn.execute("SELECT 1")
        with get_connection() as conn:
            assert conn.autocommit and conn.read_only is False
        assert_pool_clean(pg_server, "precog_test")
