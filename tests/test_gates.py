"""Environment gates and the gated helpers, on a real server."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from precog_db import (
    ConfigurationError,
    Environment,
    EnvironmentNotAllowedError,
    dangerous_operation,
    delete_all,
    get_cursor,
    initialize_pool,
    stamp_database,
    truncate_tables,
)
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server


@pytest.fixture
def tables(test_settings: DatabaseSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRECOG_ENV", "test")
    initialize_pool(settings=test_settings)
    with get_cursor(commit=True) as cur:
        cur.execute("DROP TABLE IF EXISTS gate_child, gate_parent, victims")
        cur.execute("CREATE TABLE gate_parent (id int PRIMARY KEY)")
        cur.execute("CREATE TABLE gate_child (id int PRIMARY KEY, parent int REFERENCES gate_parent)")
        cur.execute("CREATE TABLE victims (id int)")
        cur.execute("INSERT INTO gate_parent VALUES (1), (2), (3)")
        cur.execute("INSERT INTO gate_child VALUES (1, 1)")
        cur.execute("INSERT INTO victims VALUES (1)")


def rows(table: str) -> int:
    with get_cursor() as cur:
        cur.execute(f"SELECT count(*) AS n FROM {table}")
        row = cur.fetchone()
        assert row is not None
        return int(row["n"])


class TestDecorator:
    @pytest.mark.parametrize("env", ["staging", "prod", "production"])
    def test_refuses_before_running(self, env: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Outside dev/test the wrapped function never runs."""
        ran = []

        @dangerous_operation()
        def wipe() -> None:
            ran.append(True)

        monkeypatch.setenv("PRECOG_ENV", env)
        with (
            capture_logs() as logs,
            pytest.raises(EnvironmentNotAllowedError, match="wipe is allowed only in dev, test"),
        ):
            wipe()
        assert ran == []
        assert logs[0]["event"] == "dangerous_operation_refused"

    @pytest.mark.parametrize("env", ["dev", "test"])
    def test_runs_in_allowed_environments(self, env: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """In dev and test the wrapped function runs and returns its value."""

        @dangerous_operation()
        def wipe(x: int) -> int:
            return x * 2

        monkeypatch.setenv("PRECOG_ENV", env)
        assert wipe(21) == 42

    def test_checked_on_every_call(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The environment is checked at call time, not at decoration time."""

        @dangerous_operation(allowed=("staging",))
        def job() -> str:
            return "ran"

        monkeypatch.setenv("PRECOG_ENV", "staging")
        assert job() == "ran"
        monkeypatch.setenv("PRECOG_ENV", "prod")
        with pytest.raises(EnvironmentNotAllowedError):
            job()

    def test_open_pool_environment_counts_too(self, pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
        """A pool opened for prod blocks the gate even when PRECOG_ENV says test."""
        pg_server.fresh_database("trading_live")
        monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        stamp_database("prod", settings=pg_server.settings("trading_live", env=Environment.PROD))
        initialize_pool(settings=pg_server.settings("trading_live", env=Environment.PROD))
        monkeypatch.setenv("PRECOG_ENV", "test")
        with pytest.raises(EnvironmentNotAllowedError, match="prod"):
            truncate_tables("anything")

    def test_empty_allowed_is_an_error(self) -> None:
        """A gate that allows nothing is a configuration mistake."""
        with pytest.raises(ConfigurationError):
            dangerous_operation(allowed=())


class TestHelpers:
    def test_truncate_in_dependency_order_logs_counts(self, tables: None) -> None:
        """truncate_tables empties the tables and logs each table with its row count."""
        with capture_logs() as logs:
            counts = truncate_tables("gate_child", "gate_parent")
        assert counts == {"gate_child": 1, "gate_parent": 3}
        assert rows("gate_parent") == 0 and rows("gate_child") == 0
        events = {(e["table"], e["rows"]) for e in logs if e["event"] == "table_truncated"}
        assert events == {("gate_child", 1), ("gate_parent", 3)}

    def test_delete_all_returns_count(self, tables: None) -> None:
        """delete_all deletes every row and logs the count."""
        with capture_logs() as logs:
            assert delete_all("gate_child") == 1
        assert rows("gate_child") == 0
        assert logs[-1]["event"] == "table_rows_deleted" and logs[-1]["rows"] == 1

    def test_schema_qualified_name(self, tables: None) -> None:
        """schema.table is quoted as two identifiers."""
        assert delete_all("public.gate_child") == 1

    @pytest.mark.parametrize(
        "name",
        [
            "victims; DROP TABLE victims; --",
            'gate_child"; DROP TABLE victims; --',
            "gate_child' OR 1=1 --",
        ],
    )
    def test_injection_does_nothing(self, tables: None, name: str) -> None:
        """An identifier that tries SQL injection is quoted: the statement fails and victims survives."""
        import psycopg

        with pytest.raises(psycopg.errors.UndefinedTable):
            truncate_tables(name)
        with pytest.raises(psycopg.errors.UndefinedTable):
            delete_all(name)
        assert rows("victims") == 1

    def test_helpers_refuse_staging(self, tables: None, monkeypatch: pytest.MonkeyPatch) -> None:
        """The gated helpers refuse staging and leave the data alone."""
        monkeypatch.setenv("PRECOG_ENV", "staging")
        with pytest.raises(EnvironmentNotAllowedError):
            truncate_tables("victims")
        with pytest.raises(EnvironmentNotAllowedError):
            delete_all("victims")
        monkeypatch.setenv("PRECOG_ENV", "test")
        assert rows("victims") == 1

    def test_empty_name_refused(self, tables: None) -> None:
        """An empty table name is a clear error."""
        with pytest.raises(ConfigurationError):
            delete_all(" ")
