"""PostgreSQL's parser decides what a statement leaves in the session and what gets past read-only (21.2, 6, 7).

A pure table over `precog_db._sqlclass.classify`: every attack string of issue 21
and the look-alikes that must stay clean. The real-server consequences (a dirty
connection reset on a direct pool, a refusal behind PgBouncer) are in
tests/test_classifier_server.py.
"""

from __future__ import annotations

import pytest

from precog_db._sqlclass import CLEAN, classify

#: Statements that leave state in the server session (refused behind a transaction pooler, reset on a direct pool).
SESSION = [
    "SET search_path = evil",
    "SET/**/search_path = evil",
    "set\tsearch_path\n= evil",
    "SELECT 1; SET search_path = evil",
    "SELECT 1;SET search_path = evil;",
    "/* a /* nested */ comment */ SET search_path = evil",
    "-- comment\nSET search_path = evil",
    "RESET search_path",
    "RESET ALL",
    "SET ROLE someone",
    "SET SESSION AUTHORIZATION someone",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SELECT set_config('app.tenant', 'a', false)",
    "SELECT set_config('app.tenant', 'a', $1)",
    "SELECT set_config('app.tenant', 'a', 1=0)",
    "SELECT set_config('app.tenant', 'a', 'off')",
    "SELECT set_config('app.tenant', 'a', false::boolean)",
    "SELECT pg_catalog.set_config('app.tenant', 'a', false)",
    "SELECT U&\"set\\005fconfig\"('app.tenant', 'a', false)",
    "SELECT (SELECT set_config('a.b', 'c', false))",
    "WITH x AS (SELECT set_config('a.b', 'c', false)) SELECT * FROM x",
    "UPDATE pg_settings SET setting = 'evil' WHERE name = 'search_path'",
    "CREATE TABLE pg_temp.orders (id int)",
    "CREATE TABLE PG_TEMP.orders (id int)",
    "CREATE TEMP TABLE t (id int)",
    "CREATE TEMPORARY TABLE t (id int) ON COMMIT DELETE ROWS",
    "SELECT 1 AS a INTO TEMP t",
    "SELECT 1 AS a INTO pg_temp.t",
    "CREATE TEMP TABLE t AS SELECT 1",
    "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
    "CREATE VIEW pg_temp.v AS SELECT 1",
    "CREATE TEMP SEQUENCE s",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "DECLARE c CURSOR WITH/**/HOLD FOR SELECT 1",
    "SELECT pg_advisory_lock(1)",
    'SELECT U&"pg\\005fadvisory\\005flock"(1)',
    "SELECT pg_try_advisory_lock_shared(1)",
    "SELECT pg_advisory_unlock_all()",
    "PREPARE p AS SELECT 1",
    "DEALLOCATE ALL",
    "DISCARD ALL",
    "LISTEN channel",
    "UNLISTEN *",
    "LOAD 'auto_explain'",
    "CALL my_procedure()",
    "DO $$ BEGIN PERFORM 1; END $$",
    "SELECT query_to_xml('set search_path = evil', true, false, '')",
    "SELECT cursor_to_xml('c', 1, true, false, '')",
    "SELECT * FROM ts_stat($1)",
    "SELECT * FROM ts_stat('select 1')",
    "SELECT ts_rewrite('a & b'::tsquery, $1)",
    "SELECT dblink_connect('c', 'dbname=x')",
    "PREPARE TRANSACTION 'x'",
    "EXPLAIN ANALYZE SELECT set_config('a.b', 'c', false)",
    "this is not sql",
    # The second adversarial pass (issue 21's closing attack):
    "SELECT precog_test.pg_catalog.set_config('search_path', 'evil, public', false)",
    "SELECT precog_test.pg_catalog.pg_advisory_lock(4242)",
    "SELECT public.dblink_connect('leak', 'dbname=x')",
    "SET LOCAL search_path = pg_temp",
    "SELECT set_config('search_path', 'pg_temp, public', true)",
    "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "SET LOCAL standard_conforming_strings = off",
    "SET LOCAL client_encoding = 'SJIS'",
    "SELECT setseed(0.5)",
]

#: Statements that could write although the session is read-only by default (refused outside a transaction).
ESCAPES = [
    "begin read write; insert into orders values (1); commit",
    "BEGIN; INSERT INTO orders VALUES (1); COMMIT",
    "START TRANSACTION READ WRITE",
    "BEGIN READ WRITE",
    "SET TRANSACTION READ WRITE",
    "SET transaction_read_only = off",
    "SET default_transaction_read_only = off",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "CALL commits_and_writes()",
    "DO $$ BEGIN COMMIT; END $$",
    "SELECT lo_create(0)",
    "SELECT lo_from_bytea(0, 'x')",
    "SELECT lo_put(1, 0, 'x')",
    "SELECT pg_catalog.lo_unlink(1)",
    "SELECT dblink_exec('c', 'insert into t values (1)')",
    "insert into orders values (1); commit",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT set_config('transaction_read_only', 'off', true)",
    "SELECT set_config($1, 'off', false)",
    "UPDATE pg_settings SET setting = 'off' WHERE name = 'default_transaction_read_only'",
    "RESET ALL",
    "RESET default_transaction_read_only",
    "SET default_transaction_read_only TO DEFAULT",
    "SELECT 1; SET default_transaction_read_only = off",
    "SELECT precog_test.pg_catalog.lo_from_bytea(0, 'x')",
    "SELECT public.dblink_exec('dbname=x', 'insert into t values (1)')",
    "SET LOCAL standard_conforming_strings = off",
    "SELECT set_config('standard_conforming_strings', 'off', true)",
    "ALTER SYSTEM SET work_mem = '64MB'",
]

#: Statements that leave nothing behind and cannot write past read-only by themselves.
CLEAN_STATEMENTS = [
    "SELECT id, symbol FROM markets WHERE id = $1",
    "select * from orders where note = 'SET search_path = evil; commit'",
    "INSERT INTO orders (ref) VALUES ($1) RETURNING id",
    "UPDATE orders SET qty = qty + 1 WHERE id = $1",
    "DELETE FROM orders WHERE id = $1",
    "SET LOCAL search_path = app",
    "SET LOCAL statement_timeout = 1000",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET TRANSACTION READ ONLY",
    "SET CONSTRAINTS ALL DEFERRED",
    "SELECT set_config('app.tenant', 'a', true)",
    "SELECT set_config('app.tenant', $1, 'true')",
    "SELECT pg_advisory_xact_lock(1)",
    "CREATE TEMP TABLE t (id int) ON COMMIT DROP",
    "CREATE TABLE orders_copy AS SELECT * FROM orders",
    "CREATE TABLE settings_log (id int)",
    "DECLARE c CURSOR FOR SELECT 1",
    "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
    "SAVEPOINT s",
    "RELEASE SAVEPOINT s",
    "ROLLBACK TO SAVEPOINT s",
    "SELECT my_schema.set_config('a', 'b', false)",
    "SELECT lo_get(1)",
    "COPY orders FROM STDIN",
    "NOTIFY channel",
    "SELECT 1; SELECT 2",
    "SET default_transaction_read_only = on",
    "SET LOCAL transaction_read_only = on",
    "SELECT set_config('search_path', 'tenant_7, public', true)",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public AS 'SELECT 1'",
    "ALTER FUNCTION f() SET search_path = pg_catalog",
    "ALTER ROLE app SET statement_timeout = '5s'",
    "ALTER DATABASE app SET statement_timeout = '5s'",
    "SELECT other_db.other_schema.set_config('a', 'b', false)",
]


@pytest.mark.parametrize("sql", SESSION)
def test_session_changing_statements_are_seen(sql: str) -> None:
    """Each of these may leave state in the server session: the verdict says so, with a reason."""
    verdict = classify(sql)
    assert verdict.session is not None, sql
    assert verdict.session.strip()


@pytest.mark.parametrize("sql", ESCAPES)
def test_read_only_escapes_are_seen(sql: str) -> None:
    """Each of these could write past the read-only default: the verdict says so, with a reason."""
    verdict = classify(sql)
    assert verdict.escapes is not None, sql


@pytest.mark.parametrize("sql", CLEAN_STATEMENTS)
def test_clean_statements_stay_clean(sql: str) -> None:
    """Ordinary reads, writes and transaction-scoped settings leave nothing and escape nothing."""
    verdict = classify(sql)
    if sql != "SET default_transaction_read_only = on":  # a session SET, but it only restores the default
        assert verdict.session is None, (sql, verdict.session)
    assert verdict.escapes is None, (sql, verdict.escapes)


def test_plain_statements_are_the_shared_clean_verdict() -> None:
    """A statement with nothing to report is the one `CLEAN` object (the hot path compares identity)."""
    assert classify(b"SELECT 1") is CLEAN
    assert classify("SELECT 1") is CLEAN


def test_verdicts_are_cached_per_text() -> None:
    """The same text is parsed once: the second look-up returns the same object."""
    first = classify(b"SET search_path = cached_test")
    assert classify(b"SET search_path = cached_test") is first


def test_transaction_control_is_reported() -> None:
    """COMMIT, ROLLBACK and BEGIN are reported as ending a transaction; savepoints are not."""
    for sql in ("COMMIT", "ROLLBACK", "BEGIN", "END", "ABORT", "insert into t values (1); commit"):
        assert classify(sql).ends_transaction, sql
    for sql in ("SAVEPOINT s", "RELEASE s", "ROLLBACK TO s", "SELECT 1"):
        assert not classify(sql).ends_transaction, sql


def test_the_cache_is_bounded_in_entries_and_bytes() -> None:
    """Many distinct or long texts never hold more than the cache's bounds."""
    from precog_db import _sqlclass

    for i in range(_sqlclass._VERDICTS_MAX + 10):
        classify(f"SELECT {i}".encode())
    assert len(_sqlclass._VERDICTS) <= _sqlclass._VERDICTS_MAX
    long = b"SELECT '" + b"x" * (1 << 20) + b"'"
    for i in range(12):
        classify(long + str(i).encode())
    assert sum(map(len, _sqlclass._VERDICTS)) <= _sqlclass._VERDICT_BYTES_MAX
