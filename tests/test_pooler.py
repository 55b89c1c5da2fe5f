"""Behind Debian's real PgBouncer: DB_POOLER=transaction and DB_POOLER=session (docs/TOPOLOGY.md)."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.pq import Trace

from bench.wire import RoundTripCounter
from precog_db import (
    ConfigurationError,
    ReadOnlyWriteError,
    SessionStateError,
    close_pool,
    get_connection,
    get_cursor,
    initialize_pool,
)
from precog_db.connection import connect, direct_settings, tool_connection_args
from precog_db.environment import Environment
from precog_db.settings import DatabaseSettings
from precog_db.stamp import read_stamp, stamp_database
from tests._helpers.cli import workspace
from tests._helpers.server import TEST_DB, Server
from tests._helpers.topology import pgbouncer


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


def _raw(port: int) -> psycopg.Connection[Any]:
    """A plain client of the PgBouncer, sharing its one server connection with the pool."""
    return psycopg.connect(
        f"host=127.0.0.1 port={port} user=postgres dbname={TEST_DB}",
        autocommit=True,
        prepare_threshold=None,
        connect_timeout=10,
    )


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


class TestTransactionMode:
    def test_no_prepared_statement_collides(self, tx_settings: DatabaseSettings, bouncer: int) -> None:
        """Four threads repeating a mix of queries far past psycopg's prepare threshold never collide on the server."""
        initialize_pool(settings=tx_settings.replace(pool_min=4, pool_max=4))
        with get_cursor(commit=True) as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS pooler_mix (x int)")
        errors: list[str] = []

        def work(seed: int) -> None:
            for i in range(40):
                try:
                    with get_cursor() as cur:
                        cur.execute(f"SELECT %s::int + {(seed + i) % 5} AS v", (i,))
                        assert cur.fetchone() == {"v": i + (seed + i) % 5}
                    with get_cursor(commit=True) as cur:
                        cur.execute("INSERT INTO pooler_mix VALUES (%s)", (i,))
                except Exception as exc:  # collected: every one of them is a failure
                    errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        with _raw(bouncer) as conn:
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)

    def test_reads_stay_read_only_per_transaction(self, tx_settings: DatabaseSettings) -> None:
        """get_cursor() and get_connection() statements refuse writes, commit=True writes; no startup option."""
        initialize_pool(settings=tx_settings)
        with get_cursor(commit=True) as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS pooler_ro (x int)")
        with pytest.raises(ReadOnlyWriteError), get_cursor() as cur:
            cur.execute("INSERT INTO pooler_ro VALUES (1)")
        with pytest.raises(ReadOnlyWriteError), get_connection() as conn:
            conn.execute("INSERT INTO pooler_ro VALUES (2)")
        with (
            pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
            get_cursor() as cur,
            cur.copy("COPY pooler_ro FROM STDIN") as copy,
        ):
            copy.write_row((3,))
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO pooler_ro VALUES (4)")
        with get_cursor() as cur:
            cur.execute("SELECT array_agg(x) AS xs FROM pooler_ro")
            assert cur.fetchone() == {"xs": [4]}
        assert "options" not in tx_settings.connect_kwargs()

    def test_one_round_trip_per_read(self, tx_settings: DatabaseSettings, tmp_path: Path) -> None:
        """The wire: BEGIN READ ONLY, the SELECT and ROLLBACK in one round trip; a write BEGIN+INSERT, then COMMIT."""
        initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        with get_cursor(commit=True) as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS pooler_rt (x int)")
        trace = tmp_path / "trace.txt"
        with trace.open("w") as fh:
            with get_connection() as conn:
                conn.pgconn.trace(fh.fileno())
                conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
            with get_cursor() as cur:
                cur.execute("SELECT %s::int AS one", (1,))
                assert cur.fetchone() == {"one": 1}
            with get_cursor(commit=True) as cur:
                cur.execute("INSERT INTO pooler_rt VALUES (1)")
            with get_connection() as conn:
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

    def test_committed_writes_round_trips_through_the_pooler(
        self, tx_settings: DatabaseSettings, bouncer: int, pg_server: Server, test_db: str
    ) -> None:
        """Issue 16 behind PgBouncer, counted between the client and PgBouncer: both modes keep their counts."""
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS pooler_rt16")
            admin.execute("CREATE TABLE pooler_rt16 (x int PRIMARY KEY)")
        with RoundTripCounter("127.0.0.1", bouncer) as proxy:
            initialize_pool(settings=tx_settings.replace(port=proxy.port, pool_min=1, pool_max=1)).wait(timeout=10)
            try:
                trips: dict[str, int] = {}

                def count(name: str, block: Callable[[], None]) -> None:
                    proxy.reset()
                    block()
                    trips[name] = proxy.round_trips

                def one() -> None:
                    with get_cursor(commit=True) as cur:
                        cur.execute("INSERT INTO pooler_rt16 VALUES (%s)", (1,))

                def txn3() -> None:
                    with get_cursor(commit=True) as cur:
                        cur.execute("SELECT count(*) AS n FROM pooler_rt16")
                        assert cur.fetchone() == {"n": 1}
                        cur.execute("UPDATE pooler_rt16 SET x = x + 1")
                        cur.execute("INSERT INTO pooler_rt16 VALUES (%s)", (10,))

                def batch() -> None:
                    with get_cursor(commit=True, pipeline=True) as cur:
                        for i in range(10):
                            cur.execute("INSERT INTO pooler_rt16 VALUES (%s)", (100 + i,))

                def empty() -> None:
                    with get_cursor(commit=True):
                        pass

                for name, block in (("one", one), ("txn3", txn3), ("batch", batch), ("empty", empty)):
                    count(name, block)
            finally:
                close_pool()
        assert trips == {"one": 2, "txn3": 4, "batch": 1, "empty": 0}
        with pg_server.connect(test_db) as admin:
            rows = [r[0] for r in admin.execute("SELECT x FROM pooler_rt16 ORDER BY x")]
        assert rows == [2, 10, *range(100, 110)]

    def test_session_state_refused_in_both_write_modes(self, tx_settings: DatabaseSettings, bouncer: int) -> None:
        """A session SET as a committed block's first statement, or inside pipeline=True, is refused unsent."""
        initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        for pipeline in (False, True):
            with (
                pytest.raises(SessionStateError, match="DB_POOLER=session"),
                get_cursor(commit=True, pipeline=pipeline) as cur,
            ):
                cur.execute("SET search_path TO pg_catalog")
            with get_cursor(commit=True, pipeline=pipeline) as cur:  # the connection goes on working
                cur.execute("SELECT current_setting('search_path') AS p")
                assert cur.fetchone() == {"p": '"$user", public'}
        with _raw(bouncer) as other:
            assert other.execute("SHOW search_path").fetchone() == ('"$user", public',)

    def test_session_state_does_not_leak(self, tx_settings: DatabaseSettings, bouncer: int) -> None:
        """A session SET is refused unsent and a set_config() in a read is rolled back: no other client sees them."""
        initialize_pool(settings=tx_settings)
        with pytest.raises(SessionStateError, match="DB_POOLER=session"), get_cursor() as cur:
            cur.execute("SET statement_timeout = 1234")
        with pytest.raises(SessionStateError), get_cursor(commit=True) as cur:
            cur.execute("SELECT pg_advisory_lock(42)")
        with pytest.raises(SessionStateError, match="not a literal true"), get_cursor() as cur:
            # A bound third argument is not provably local (21.2): refused unsent, even in a read.
            cur.execute("SELECT set_config(%s, %s, %s) AS v", ("statement_timeout", "4321", False))
        with get_cursor() as cur:  # a literal true is transaction-local: allowed
            cur.execute("SELECT set_config('statement_timeout', '4321', true) AS v")
            assert cur.fetchone() == {"v": "4321ms"}
        with _raw(bouncer) as other:  # the same (single) server connection behind PgBouncer
            assert other.execute("SHOW statement_timeout").fetchone() == ("0",)
            assert other.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchone() == (0,)
        with (
            pytest.raises(SessionStateError, match="WITH HOLD"),
            get_connection() as conn,
            conn.transaction(),
            conn.cursor("held", withhold=True) as held,
        ):
            held.execute("SELECT 1")
        with get_cursor(commit=True) as cur:  # what is allowed: state that ends with the transaction
            cur.execute("SET LOCAL statement_timeout = 5000")
            cur.execute("SELECT pg_advisory_xact_lock(42)")

    def test_no_discard_all_behind_the_pooler(self, tx_settings: DatabaseSettings, tmp_path: Path) -> None:
        """A dirty block is not followed by DISCARD ALL, which would reset a server connection not ours."""
        initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        trace = tmp_path / "trace.txt"
        with trace.open("w") as fh:
            with get_connection() as conn:
                conn.pgconn.trace(fh.fileno())
                conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
            with get_cursor() as cur:
                cur.execute("EXPLAIN SELECT 1")
            with get_connection() as conn:
                conn.pgconn.untrace()
        assert "DISCARD" not in trace.read_text()

    def test_failed_read_leaves_the_connection_usable(self, tx_settings: DatabaseSettings) -> None:
        """An error inside the pipelined read-only transaction is raised and rolled back; the next block works."""
        initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        with pytest.raises(psycopg.errors.DivisionByZero), get_cursor() as cur:
            cur.execute("SELECT 1/0")
        with get_cursor() as cur:
            cur.execute("SELECT 2 AS two")
            assert cur.fetchone() == {"two": 2}
            assert list(cur.stream("SELECT generate_series(1, 2) AS g")) == [{"g": 1}, {"g": 2}]


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
    def test_session_state_is_refused_unsent(
        self, tx_settings: DatabaseSettings, bouncer: int, pg_server: Server, test_db: str, how: str
    ) -> None:
        """Every spelling the regular expressions let through is refused before it is sent (21.2)."""
        sql, params = SESSION_ATTACKS[how]
        initialize_pool(settings=tx_settings)
        with pytest.raises(SessionStateError, match="was not sent"), get_cursor(commit=True) as cur:
            cur.execute(sql, params)
        with _raw(bouncer) as other:  # the one server connection every client shares
            assert other.execute("SHOW search_path").fetchone() == ('"$user", public',)
            assert other.execute("SELECT current_setting('app.tenant', true)").fetchone() in ((None,), ("",))
        with pg_server.connect(test_db) as admin:
            temp = admin.execute("SELECT count(*) FROM pg_class WHERE relpersistence = 't'").fetchone()
            locks = admin.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND d.datname = current_database()"
            ).fetchone()
        assert temp == (0,)
        assert locks == (0,)

    def test_a_temp_table_cannot_swallow_other_clients_commits(
        self, tx_settings: DatabaseSettings, pg_server: Server, test_db: str
    ) -> None:
        """CREATE TABLE pg_temp.orders is refused, so five committed INSERTs all reach public.orders (21.2)."""
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS public.orders")
            admin.execute("CREATE TABLE public.orders (ref int)")
        initialize_pool(settings=tx_settings)
        try:
            with pytest.raises(SessionStateError), get_cursor(commit=True) as cur:
                cur.execute("CREATE TABLE pg_temp.orders (ref int)")
            for ref in range(5):
                with get_cursor(commit=True) as cur:
                    cur.execute("INSERT INTO orders VALUES (%s)", (ref,))
            with pg_server.connect(test_db) as admin:
                assert admin.execute("SELECT count(*) FROM public.orders").fetchone() == (5,)
        finally:
            with pg_server.connect(test_db) as admin:
                admin.execute("DROP TABLE IF EXISTS public.orders")

    def test_hand_built_cursors_cannot_write_past_the_read_only_default(
        self, tx_settings: DatabaseSettings, pg_server: Server, test_db: str
    ) -> None:
        """A hand-built cursor or a replaced cursor_factory is refused unsent behind the pooler (21.3)."""
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS pooler_raw")
            admin.execute("CREATE TABLE pooler_raw (x int)")
        initialize_pool(settings=tx_settings)
        with pytest.raises(SessionStateError, match="hand-built"), get_connection() as conn:
            psycopg.Cursor(conn).execute("INSERT INTO pooler_raw VALUES (1)")
        with pytest.raises(SessionStateError, match="hand-built"), get_cursor() as cur:
            cur.connection.cursor_factory = psycopg.ClientCursor
            cur.connection.execute("INSERT INTO pooler_raw VALUES (2)")
        with pytest.raises(SessionStateError, match="hand-built"), get_cursor() as cur:
            list(psycopg.Cursor(cur.connection).stream("INSERT INTO pooler_raw VALUES (3) RETURNING x"))
        with get_cursor() as cur:  # the pool's own cursors still read, and still refuse writes
            cur.execute("SELECT count(*) AS n FROM pooler_raw")
            assert cur.fetchone() == {"n": 0}
        with pytest.raises(ReadOnlyWriteError), get_connection() as conn:
            conn.execute("INSERT INTO pooler_raw VALUES (4)")
        with (
            pytest.raises(ReadOnlyWriteError, match="commit=True"),
            get_cursor() as cur,
            cur.copy("COPY pooler_raw FROM STDIN") as copy,
        ):
            copy.write_row((5,))
        with pg_server.connect(test_db) as admin:
            assert admin.execute("SELECT count(*) FROM pooler_raw").fetchone() == (0,)


class TestPreparedStatementsBehindThePooler:
    def test_a_borrowers_prepare_threshold_prepares_nothing_and_is_put_back(
        self, tx_settings: DatabaseSettings, bouncer: int
    ) -> None:
        """prepare_threshold=0 set by a borrower creates no server statement and does not reach the next one."""
        initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        with get_cursor(commit=True) as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS pooler_prep (x int)")
        with get_cursor(commit=True) as cur:
            cur.connection.prepare_threshold = 0
            cur.executemany("INSERT INTO pooler_prep VALUES (%s)", [(1,), (2,)])
            cur.execute("SELECT count(*) AS n FROM pg_prepared_statements")
            assert cur.fetchone() == {"n": 0}
        with get_connection() as conn:
            assert conn.prepare_threshold is None
        with _raw(bouncer) as other:
            assert other.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)


class TestQuietRefusals:
    def test_refused_write_logs_no_pipeline_noise(
        self, tx_settings: DatabaseSettings, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A write refused by the read-only wrapper raises ReadOnlyWriteError and psycopg logs nothing (21.13)."""
        initialize_pool(settings=tx_settings)
        with get_cursor(commit=True) as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS pooler_quiet (x int)")
        with caplog.at_level("DEBUG", logger="psycopg"):
            for _ in range(3):
                with pytest.raises(ReadOnlyWriteError), get_cursor() as cur:
                    cur.execute("INSERT INTO pooler_quiet VALUES (1)")
        assert [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()] == []


class TestDirectConnections:
    def test_refused_without_direct_host(self, pg_server: Server, bouncer: int) -> None:
        """Stamp, pg_dump/pg_restore and CLI connections are refused behind a transaction pooler with no direct host."""
        settings = pg_server.settings(port=bouncer, pooler="transaction")
        with pytest.raises(ConfigurationError, match="DB_DIRECT_HOST and DB_DIRECT_PORT"):
            read_stamp(settings=settings)
        with pytest.raises(ConfigurationError, match="DB_DIRECT_HOST"):
            stamp_database("test", settings=settings)
        with pytest.raises(ConfigurationError, match="DB_DIRECT_HOST"):
            tool_connection_args(settings, operation="back up")
        with pytest.raises(ConfigurationError, match="migrate"):
            connect(settings, operation="migrate", direct=True)

    def test_direct_goes_to_the_server(self, tx_settings: DatabaseSettings, pg_server: Server) -> None:
        """connect(direct=True) and the tools' target reach DB_DIRECT_HOST:PORT itself, not PgBouncer."""
        direct = direct_settings(tx_settings, operation="migrate")
        assert (direct.host, direct.port, direct.pooler) == (pg_server.host, pg_server.port, "none")
        args, _ = tool_connection_args(tx_settings, operation="back up")
        assert f"port={pg_server.port}" in args[0].replace("'", "")
        conn = connect(tx_settings, operation="migrate", direct=True, verify=False)
        try:
            with socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as sock:  # a dup
                local_port = sock.getsockname()[1]
            row = conn.execute("SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()
            assert row == (local_port,)  # our own socket is the server's client: no PgBouncer in between
        finally:
            conn.close()

    def test_stamp_through_direct_then_pool_through_bouncer(self, tx_settings: DatabaseSettings) -> None:
        """The stamp is written over the direct connection and verified on the pool's connections through PgBouncer."""
        stamp_database("test", settings=tx_settings, force=True)
        stamp = read_stamp(settings=tx_settings)
        assert stamp is not None and stamp.env == "test"
        initialize_pool(settings=tx_settings)
        with get_cursor() as cur:
            cur.execute("SELECT env FROM precog_meta.stamp")
            assert cur.fetchone() == {"env": "test"}


class TestSessionMode:
    def test_read_only_and_timeout_without_startup_options(self, pg_server: Server, test_db: str) -> None:
        """Behind a session-mode PgBouncer (no startup options) reads stay read-only and the statement timeout holds."""
        with pgbouncer(pg_server, pool_mode="session", pool_size=2) as port:
            settings = pg_server.settings(port=port, pooler="session", statement_timeout_ms=4000)
            assert "options" not in settings.connect_kwargs()
            initialize_pool(settings=settings)
            with get_cursor(commit=True) as cur:
                cur.execute("CREATE TABLE IF NOT EXISTS pooler_session (x int)")
            with pytest.raises(ReadOnlyWriteError), get_cursor() as cur:
                cur.execute("INSERT INTO pooler_session VALUES (1)")
            with get_cursor() as cur:  # a session SET is allowed here, and undone at checkin
                cur.execute("SET statement_timeout = 1234")
            with get_cursor() as cur:
                cur.execute("SELECT current_setting('statement_timeout') AS t")
                assert cur.fetchone() == {"t": "4s"}
            with pytest.raises(ReadOnlyWriteError), get_cursor() as cur:
                cur.execute("INSERT INTO pooler_session VALUES (2)")


class TestSettings:
    def test_statement_timeout_refused_in_transaction_mode(self) -> None:
        """DB_STATEMENT_TIMEOUT with DB_POOLER=transaction is refused with the fix (set it on the role)."""
        with pytest.raises(ConfigurationError, match="ALTER ROLE"):
            DatabaseSettings(env=Environment.TEST, pooler="transaction", statement_timeout_ms=1000)

    def test_bad_pooler(self) -> None:
        """An unknown DB_POOLER value names the valid ones."""
        with pytest.raises(ConfigurationError, match="none, session, transaction"):
            DatabaseSettings(env=Environment.TEST, pooler="statement")


class TestMigrateThroughThePooler:
    def test_migrate_up_needs_the_direct_host_and_then_uses_it(
        self, pg_server: Server, bouncer: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`precog-db migrate up` behind a transaction pooler is refused without DB_DIRECT_HOST and applies with it."""
        with workspace(pg_server, tmp_path, monkeypatch) as ws:
            ws.add("dev")
            env_file = ws.config / ".env.dev"
            base = env_file.read_text().replace(f"DB_PORT={pg_server.port}", f"DB_PORT={bouncer}")
            env_file.write_text(base + "DB_POOLER=transaction\n")
            ws.write_migration("0001_create_widgets.sql", "CREATE TABLE widgets (id int);\n")
            refused = ws.run("--env", "dev", "migrate", "up")
            assert refused.code != 0 and "DB_DIRECT_HOST" in refused.err, refused
            assert ws.ledger("dev") == []
            env_file.write_text(
                base + f"DB_POOLER=transaction\nDB_DIRECT_HOST=127.0.0.1\nDB_DIRECT_PORT={pg_server.port}\n"
            )
            applied = ws.run("--env", "dev", "migrate", "up")
            assert applied.code == 0, applied
            assert [version for version, _ in ws.ledger("dev")] == [1]
