"""Borrower isolation, what does not depend on the layer: the statement classifier and psycopg's internals.

The scenarios (no block leaves session state or a writable session to the next
borrower) run over both layers from one source in
tests/test_isolation_common_async.py, which generates tests/test_isolation_common.py.
"""

from __future__ import annotations

import pytest

from precog_db.session import changes_session


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
