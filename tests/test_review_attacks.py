"""Adversarial review of issue 10's fixes: each test reproduces a hole found against a real server.

Every test here fails on the code it was written against; the fix belongs in
the library, not in the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from precog_db import get_connection, get_cursor, get_pool, initialize_pool, stamp_database
from precog_db.environment import Environment
from precog_db.errors import EnvironmentNotAllowedError
from precog_db.gates import dangerous_operation
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server

# --- borrower isolation ------------------------------------------------------------------------


@pytest.fixture
def one_conn(test_settings: DatabaseSettings, pg_server: Server, test_db: str) -> Iterator[None]:
    """A process pool of exactly one connection over the test database, with public.rv_items and evil.rv_items."""
    with pg_server.connect(test_db) as admin:
        admin.execute("DROP TABLE IF EXISTS public.rv_items")
        admin.execute("CREATE TABLE public.rv_items (id int)")
        admin.execute("CREATE SCHEMA IF NOT EXISTS rv_evil")
        admin.execute("DROP TABLE IF EXISTS rv_evil.rv_items")
        admin.execute("CREATE TABLE rv_evil.rv_items (id int)")
    initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
    yield


def _session() -> dict[str, str]:
    with get_cursor() as cur:
        cur.execute(
            "SELECT current_setting('search_path') AS search_path, "
            "current_setting('statement_timeout') AS statement_timeout"
        )
        row = cur.fetchone()
        assert row is not None
        return dict(row)


_BASELINE = {"search_path": '"$user", public', "statement_timeout": "0"}


class TestBorrowerIsolation:
    def test_pool_connection_cannot_turn_read_only_off_for_next_borrower(self, one_conn: None) -> None:
        """A block lent through psycopg_pool's own pool.connection() must not leave the session writable."""
        pool = get_pool()
        with pool.connection() as conn, conn.transaction():  # outside one it is refused unsent (21.7)
            conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), get_cursor() as cur:
            cur.execute("INSERT INTO rv_items VALUES (1)")

    def test_pool_connection_temp_table_does_not_swallow_later_commits(
        self, one_conn: None, pg_server: Server, test_db: str
    ) -> None:
        """A temp table created through pool.connection() must not capture a later commit=True insert."""
        pool = get_pool()
        with pool.connection() as conn, conn.transaction():
            conn.execute("CREATE TEMP TABLE rv_items (id int)")
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO rv_items VALUES (7)")
        with pg_server.connect(test_db) as admin:
            row = admin.execute("SELECT count(*) FROM public.rv_items WHERE id = 7").fetchone()
        assert row is not None and row[0] == 1

    def test_getconn_putconn_resets_session(self, one_conn: None) -> None:
        """A connection taken with pool.getconn() and returned with putconn() comes back to its baseline."""
        pool = get_pool()
        conn = pool.getconn()
        conn.execute("SET search_path = rv_evil")
        pool.putconn(conn)
        assert _session() == _BASELINE

    def test_client_cursor_on_get_connection_is_seen(self, one_conn: None) -> None:
        """SET sent through psycopg.ClientCursor(conn) on a get_connection() connection is undone at checkin."""
        with get_connection() as conn:
            cur = psycopg.ClientCursor(conn)
            cur.execute("SET search_path = rv_evil, public")
            cur.execute("SET statement_timeout = 1234")
        assert _session() == _BASELINE

    def test_update_pg_settings_in_commit_block_is_seen(self, one_conn: None) -> None:
        """UPDATE pg_settings (set_config under the hood) in a commit=True block is undone at checkin."""
        with get_cursor(commit=True) as cur:
            cur.execute("UPDATE pg_settings SET setting = 'rv_evil, public' WHERE name = 'search_path'")
            cur.execute("UPDATE pg_settings SET setting = '4321' WHERE name = 'statement_timeout'")
        assert _session() == _BASELINE

    def test_unicode_escaped_set_config_in_read_block_is_seen(self, one_conn: None) -> None:
        """set_config spelled as a U&"..." identifier in a plain read block is still undone at checkin."""
        with get_cursor() as cur:
            cur.execute(
                "SELECT U&\"set\\005fconfig\"('search_path', 'rv_evil, public', false), "
                "U&\"set\\005fconfig\"('statement_timeout', '999', false)"
            )
        assert _session() == _BASELINE

    def test_search_path_hijack_redirects_next_writer(self, one_conn: None, pg_server: Server, test_db: str) -> None:
        """After a read block that hid set_config, the next commit=True insert still lands in public."""
        with get_cursor() as cur:
            cur.execute("SELECT U&\"set\\005fconfig\"('search_path', 'rv_evil', false)")
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO rv_items VALUES (9)")
        with pg_server.connect(test_db) as admin:
            row = admin.execute("SELECT count(*) FROM public.rv_items WHERE id = 9").fetchone()
        assert row is not None and row[0] == 1

    def test_carriage_return_ended_comment_does_not_hide_set(
        self, one_conn: None, pg_server: Server, test_db: str
    ) -> None:
        """A '--' comment ended by a bare CR (as PostgreSQL's lexer ends it) cannot hide a SET from the classifier."""
        with pg_server.connect(test_db) as admin:
            admin.execute('CREATE SCHEMA IF NOT EXISTS "insert"')
            admin.execute('DROP TABLE IF EXISTS "insert".rv_items')
            admin.execute('CREATE TABLE "insert".rv_items (id int)')
        with get_cursor() as cur:
            cur.execute("--\rSET search_path TO\ninsert")
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO rv_items VALUES (55)")
        with pg_server.connect(test_db) as admin:
            row = admin.execute("SELECT count(*) FROM public.rv_items WHERE id = 55").fetchone()
        assert row is not None and row[0] == 1

    def test_adapter_registered_on_get_connection_does_not_reach_next_borrower(self, one_conn: None) -> None:
        """A numeric loader registered on a get_connection() connection never reaches the next borrower."""
        from decimal import Decimal

        from psycopg.types.numeric import FloatLoader

        with get_connection() as conn:
            conn.adapters.register_loader("numeric", FloatLoader)
        with get_cursor() as cur:
            cur.execute("SELECT 12345678901234567.89::numeric AS balance")
            row = cur.fetchone()
        assert row is not None and row["balance"] == Decimal("12345678901234567.89")

    def test_adapter_used_before_the_block_ends_does_not_reach_next_borrower(self, one_conn: None) -> None:
        """A loader registered and then used (each cursor resets psycopg's copy-on-write flags) is still undone."""
        from decimal import Decimal

        from psycopg.types.numeric import FloatLoader

        with get_connection() as conn:
            conn.adapters.register_loader("numeric", FloatLoader)
            used = conn.execute("SELECT 1.5::numeric").fetchone()
            assert used == (1.5,)
        with get_cursor() as cur:
            cur.execute("SELECT 12345678901234567.89::numeric AS balance")
            row = cur.fetchone()
        assert row is not None and row["balance"] == Decimal("12345678901234567.89")

    def test_unicode_escaped_pg_temp_table_does_not_swallow_commits(
        self, one_conn: None, pg_server: Server, test_db: str
    ) -> None:
        """A temp table created as U&"pg\\005ftemp".name must not capture three later committed inserts."""
        with get_cursor(commit=True) as cur:
            cur.execute('CREATE TABLE U&"pg\\005ftemp".rv_items (id int)')
        for _ in range(3):
            with get_cursor(commit=True) as cur:
                cur.execute("INSERT INTO rv_items VALUES (777)")
        with pg_server.connect(test_db) as admin:
            row = admin.execute("SELECT count(*) FROM public.rv_items WHERE id = 777").fetchone()
        assert row is not None and row[0] == 3

    def test_dynamic_sql_through_query_to_xml_is_seen(self, one_conn: None) -> None:
        """set_config run as hex-encoded dynamic SQL through the built-in query_to_xml is still undone at checkin."""
        hidden = b"SELECT set_config('search_path', 'rv_evil, public', false)".hex()
        with get_cursor() as cur:
            cur.execute(f"SELECT query_to_xml(convert_from(decode('{hidden}', 'hex'), 'UTF8'), true, false, '')")
        assert _session() == _BASELINE


# --- gates -------------------------------------------------------------------------------------


@pytest.fixture
def staging_in_shared_env(pg_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A stamped staging database rv_staging (5 rows in accounts) named by DB_NAME in config/.env only."""
    name = pg_server.fresh_database("rv_staging")
    with pg_server.connect(name) as admin:
        admin.execute("CREATE TABLE accounts (id int)")
        admin.execute("INSERT INTO accounts SELECT generate_series(1, 5)")
    stamp_database("staging", settings=pg_server.settings(name, env=Environment.STAGING))
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    lines = [f"{k}={v}" for k, v in pg_server.env_vars(name).items()] + ["DB_SSLMODE=disable"]
    (config / ".env").write_text("\n".join(lines) + "\n")
    (config / ".env").chmod(0o600)
    monkeypatch.setenv("PRECOG_CONFIG_DIR", str(config))
    return name


def _wipe() -> int:
    with get_cursor(commit=True) as cur:
        cur.execute("DELETE FROM accounts")
        return cur.rowcount


def _rows(pg_server: Server, name: str) -> int:
    with pg_server.connect(name) as admin:
        row = admin.execute("SELECT count(*) FROM accounts").fetchone()
    assert row is not None
    return int(row[0])


class TestGateEscapes:
    def test_gate_holds_in_the_calling_thread(self, staging_in_shared_env: str, pg_server: Server) -> None:
        """Control: the chokepoint refuses the staging connection in the gated function's own thread."""

        @dangerous_operation()
        def wipe() -> int:
            return _wipe()

        with pytest.raises(EnvironmentNotAllowedError):
            wipe()
        assert _rows(pg_server, staging_in_shared_env) == 5

    def test_gate_holds_in_a_worker_thread(self, staging_in_shared_env: str, pg_server: Server) -> None:
        """A dev/test-only gated function cannot empty a staging table from a ThreadPoolExecutor worker."""

        @dangerous_operation()
        def wipe() -> int:
            with ThreadPoolExecutor(1) as ex:
                return ex.submit(_wipe).result()

        with pytest.raises(EnvironmentNotAllowedError):
            wipe()
        assert _rows(pg_server, staging_in_shared_env) == 5

    def test_gate_holds_for_a_coroutine(self, staging_in_shared_env: str, pg_server: Server) -> None:
        """A dev/test-only gate on an async def still covers its body (or refuses to decorate it)."""

        async def body() -> int:
            return _wipe()

        with pytest.raises((EnvironmentNotAllowedError, TypeError)):
            wipe = dangerous_operation()(body)
            asyncio.run(wipe())
        assert _rows(pg_server, staging_in_shared_env) == 5

    def test_gate_holds_for_a_generator(self, staging_in_shared_env: str, pg_server: Server) -> None:
        """A dev/test-only gate on a generator function still covers its body (or refuses to decorate it)."""

        def body() -> Iterator[int]:
            yield _wipe()

        with pytest.raises((EnvironmentNotAllowedError, TypeError)):
            wipe = dangerous_operation()(body)
            list(wipe())
        assert _rows(pg_server, staging_in_shared_env) == 5


class TestOneResolution:
    def test_require_environment_counts_precog_env_in_shared_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """require_environment('dev', 'test') refuses when config/.env says PRECOG_ENV=staging."""
        from precog_db.environment import require_environment

        config = tmp_path / "config"
        config.mkdir(exist_ok=True)
        (config / ".env").write_text("PRECOG_ENV=staging\n")
        with pytest.raises(EnvironmentNotAllowedError):
            require_environment("dev", "test")

    def test_gated_body_does_not_run_when_shared_file_says_staging(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A dev/test-only gated function does not start at all in a process whose config/.env resolves staging."""
        config = tmp_path / "config"
        config.mkdir(exist_ok=True)
        (config / ".env").write_text("PRECOG_ENV=staging\n")
        ran: list[int] = []

        @dangerous_operation()
        def wipe_exports() -> None:
            ran.append(1)

        with pytest.raises(EnvironmentNotAllowedError):
            wipe_exports()
        assert ran == []


# --- the migration ledger ----------------------------------------------------------------------


class TestMigrationLexer:
    def test_bare_cr_comment_cannot_hide_commit(self, pg_server: Server, tmp_path: Path) -> None:
        """A COMMIT after a '--' comment ended by a bare CR is refused before anything of the file runs."""
        from precog_db import migrations
        from precog_db.errors import MigrationError

        name = pg_server.fresh_database("rv_mig")
        directory = tmp_path / "migrations"
        directory.mkdir()
        (directory / "0001_init.sql").write_bytes(b"CREATE TABLE r0 (id int);\n")
        (directory / "0002_cr.sql").write_bytes(b"-- note\rCOMMIT;\nCREATE TABLE r1 (id int);\n")
        with pytest.raises(MigrationError):
            migrations.upgrade(
                pg_server.settings(name), directory=directory, take_backup=False, reason="adversarial review"
            )
        with pg_server.connect(name) as admin:
            row = admin.execute("SELECT to_regclass('r1') IS NULL").fetchone()
        assert row is not None and row[0], "0002 was refused only after its COMMIT ran: r1 was committed"


# --- secrets -----------------------------------------------------------------------------------


class TestSecretsInAudit:
    def test_schemeless_user_password_at_host_database_is_not_audited(
        self, pg_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A --database pasted as user:PASSWORD@host/db (a URL without its scheme) keeps PASSWORD out of the audit."""
        from tests._helpers.cli import workspace

        with workspace(pg_server, tmp_path, monkeypatch) as ws:
            ws.add("staging")
            result = ws.run("--env", "staging", "--database", "app:Hunter2Secret@db.internal/ledger", "stamp")
            assert result.code != 0 and "URL without its scheme" in result.err
            assert "Hunter2Secret" not in result.err + result.out
            assert not ws.audit_log.exists() or "Hunter2Secret" not in ws.audit_log.read_text()
        # Where such an argument is audited (any command line the library records), it is masked.
        from precog_db._secrets import scrub_argv

        assert scrub_argv(["--database", "app:Hunter2Secret@db.internal/ledger"])[1] == "app:***@db.internal/ledger"


# --- interrupts --------------------------------------------------------------------------------


class TestInterruptsWithCheck:
    # An alarm that lands in a finalizer (psycopg's Connection.__del__ for a retired connection, a gc
    # callback) cannot be raised there: CPython reports it as "unraisable" instead. That is a lost
    # interrupt, not a lost connection, and no code can prevent it; what these tests assert is that no
    # connection is lost or left tainted, so that report alone does not fail them.
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    def test_interrupts_with_a_check_callback_lose_no_connection(
        self, test_settings: DatabaseSettings, pg_server: Server, test_db: str
    ) -> None:
        """With check= in the pool kwargs, random SIGALRM interrupts around get_cursor lose no connection."""
        import time
        from collections import Counter

        from psycopg_pool import ConnectionPool

        from precog_db import PoolExhaustedError
        from tests.test_interrupts import _Alarm, _assert_every_connection_works, _block, _JobTimeout

        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS irq_log")
            admin.execute("CREATE TABLE irq_log (i int)")
        initialize_pool(
            settings=test_settings.replace(pool_min=2, pool_max=2, pool_timeout=2.0),
            check=ConnectionPool.check_connection,
        )
        import random

        outcomes: Counter[str] = Counter()
        deadline = time.monotonic() + 60.0
        with _Alarm(random.Random(20261128)) as alarm:
            for i in range(800):
                if time.monotonic() > deadline:
                    break
                try:
                    alarm.arm(0.0015)
                    _block(i % 5, i)
                    outcome = "ok"
                except (_JobTimeout, KeyboardInterrupt) as exc:
                    outcome = type(exc).__name__
                except (psycopg.Error, PoolExhaustedError) as exc:
                    outcome = type(exc).__name__
                finally:
                    alarm.armed = False
                    alarm.disarm()
                outcomes[outcome] += 1
        assert outcomes.get("PoolExhaustedError", 0) == 0, outcomes
        _assert_every_connection_works(2)


# --- the reply bound ---------------------------------------------------------------------------


class TestReplyBoundKeptWithPoolKwargs:
    def test_connection_class_in_pool_kwargs_keeps_the_reply_bound(self) -> None:
        """connection_class= cannot drop the stalled-server bound: a plain class is refused, a subclass keeps it."""
        from precog_db import ConfigurationError, ConnectionLostError
        from precog_db.connection import PrecogConnection
        from tests._helpers.fault_proxy import fault_proxy
        from tests._helpers.faults import own_server
        from tests.test_faults_network import _in_thread, _select_one

        class MyConnection(PrecogConnection):
            pass

        with own_server() as server, fault_proxy(server.host, server.port) as proxy:
            settings = server.settings(
                port=proxy.port, pool_min=1, pool_max=1, statement_timeout_ms=300, tcp_user_timeout_ms=700
            )
            with pytest.raises(ConfigurationError, match=r"subclass of precog_db\.connection\.PrecogConnection"):
                initialize_pool(settings=settings, connection_class=psycopg.Connection)
            initialize_pool(settings=settings, connection_class=MyConnection)
            assert _select_one() == 1
            proxy.go_deaf()
            finished, _took, error = _in_thread(_select_one, timeout=20)
            assert finished, "a statement on a silent path hung: the reply bound was lost"
            assert isinstance(error, ConnectionLostError), repr(error)
