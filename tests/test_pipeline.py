"""Committed writes in fewer round trips (issue 16): BEGIN with the first statement, and pipeline=True.

Round trips are counted on the wire by `bench.wire.RoundTripCounter`, a proxy
that counts the server's ``ReadyForQuery`` messages (one per request cycle):
exact counts, never timings.
"""

from __future__ import annotations

import contextlib
import gc
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any, assert_type

import psycopg
import pytest
from psycopg import Cursor
from psycopg.generators import send

from bench.wire import RoundTripCounter
from precog_db import (
    CommitOutcomeUnknownError,
    ConnectionLostError,
    close_pool,
    get_cursor,
    get_pool,
    initialize_pool,
)
from precog_db._pipelining import QueueingPipeline
from precog_db.settings import DatabaseSettings
from tests._helpers.fault_proxy import fault_proxy
from tests._helpers.server import Server
from tests.test_interrupts import _Alarm, _assert_every_connection_works, _JobTimeout

INSERT = "INSERT INTO pipe_items (id, qty) VALUES (%s, %s)"


@pytest.fixture
def table(pg_server: Server, test_db: str) -> str:
    with pg_server.connect(test_db) as admin:
        admin.execute("DROP TABLE IF EXISTS pipe_items")
        admin.execute("CREATE TABLE pipe_items (id int PRIMARY KEY, qty int NOT NULL CHECK (qty >= 0))")
        admin.execute("INSERT INTO pipe_items VALUES (0, 0)")
    return "pipe_items"


@pytest.fixture
def counter(test_settings: DatabaseSettings, table: str) -> Iterator[RoundTripCounter]:
    """A pool of one connection that talks to the server through the round-trip counting proxy."""
    with RoundTripCounter(test_settings.host, int(test_settings.port)) as proxy:
        initialize_pool(settings=test_settings.replace(port=proxy.port, pool_min=1, pool_max=1)).wait(timeout=10)
        with get_cursor() as cur:  # warm: the connection is open, its setup done
            cur.execute("SELECT 1")
        try:
            yield proxy
        finally:
            close_pool()  # before the proxy goes


def _trips(proxy: RoundTripCounter, block: Callable[[], None]) -> int:
    proxy.reset()
    block()
    return proxy.round_trips


def _rows(pg_server: Server, test_db: str) -> list[tuple[int, int]]:
    with pg_server.connect(test_db) as admin:
        return [(int(a), int(b)) for a, b in admin.execute("SELECT id, qty FROM pipe_items WHERE id > 0 ORDER BY id")]


def _pool_idle(pg_server: Server, test_db: str) -> None:
    stats = get_pool().get_stats()
    assert stats["pool_available"] == stats["pool_size"], stats
    with pg_server.connect(test_db) as admin:
        stuck = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'precog-test' "
            "AND state LIKE 'idle in transaction%'"
        ).fetchone()
    assert stuck == (0,)


class TestRoundTripsOnTheWire:
    """The counts issue 16 promises, pinned exactly."""

    def test_one_statement_committed_block_costs_two(self, counter: RoundTripCounter) -> None:
        """get_cursor(commit=True) with one INSERT: BEGIN+INSERT, then COMMIT (it cost 3 before)."""

        def block() -> None:
            with get_cursor(commit=True) as cur:
                cur.execute(INSERT, (1, 1))

        assert _trips(counter, block) == 2

    def test_one_literal_statement_costs_two(self, counter: RoundTripCounter) -> None:
        """A statement without parameters (sent with the simple protocol before) also carries the BEGIN."""

        def block() -> None:
            with get_cursor(commit=True) as cur:
                cur.execute("INSERT INTO pipe_items VALUES (2, 2)")

        assert _trips(counter, block) == 2

    def test_txn3_costs_four(self, counter: RoundTripCounter) -> None:
        """SELECT (fetched), UPDATE, INSERT in one committed block: 4 round trips instead of 5."""

        def block() -> None:
            with get_cursor(commit=True) as cur:
                cur.execute("SELECT qty FROM pipe_items WHERE id = %s", (0,))
                assert cur.fetchone() == {"qty": 0}
                cur.execute("UPDATE pipe_items SET qty = qty + %s WHERE id = %s", (1, 0))
                cur.execute(INSERT, (3, 3))

        assert _trips(counter, block) == 4

    def test_empty_committed_block_costs_nothing(self, counter: RoundTripCounter) -> None:
        """A commit=True block that runs no statement sends no BEGIN and no COMMIT."""

        def block() -> None:
            with get_cursor(commit=True):
                pass

        assert _trips(counter, block) == 0

    def test_pipelined_batch_of_ten_costs_one(self, counter: RoundTripCounter) -> None:
        """pipeline=True: BEGIN, ten INSERTs and COMMIT in one round trip."""

        def block() -> None:
            with get_cursor(commit=True, pipeline=True) as cur:
                for i in range(10):
                    cur.execute(INSERT, (10 + i, i))

        assert _trips(counter, block) == 1

    def test_pipelined_txn3_costs_one_sync(self, counter: RoundTripCounter) -> None:
        """pipeline=True txn3: one request cycle; the fetch waits for a flush, not for a sync."""

        def block() -> None:
            with get_cursor(commit=True, pipeline=True) as cur:
                cur.execute("SELECT qty FROM pipe_items WHERE id = %s", (0,))
                assert cur.fetchone() == {"qty": 0}
                cur.execute("UPDATE pipe_items SET qty = qty + %s WHERE id = %s", (1, 0))
                cur.execute(INSERT, (30, 3))

        assert _trips(counter, block) == 1

    def test_reads_keep_one_round_trip(self, counter: RoundTripCounter) -> None:
        """A get_cursor() read is untouched: one round trip."""

        def block() -> None:
            with get_cursor() as cur:
                cur.execute("SELECT qty FROM pipe_items WHERE id = %s", (0,))
                cur.fetchone()

        assert _trips(counter, block) == 1


class TestTransparent:
    """commit=True looks exactly as before to the caller."""

    @pytest.fixture(autouse=True)
    def _pool(self, test_settings: DatabaseSettings, table: str) -> None:
        initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1)).wait(timeout=10)

    def test_error_is_raised_by_the_failing_execute(self, pg_server: Server, test_db: str) -> None:
        """A duplicate key in the first statement is raised by that execute, and the block rolls back."""
        raised_by: list[str] = []
        with pytest.raises(psycopg.errors.UniqueViolation), get_cursor(commit=True) as cur:
            try:
                cur.execute(INSERT, (0, 1))
            except psycopg.errors.UniqueViolation:
                raised_by.append("execute")
                raise
        assert raised_by == ["execute"]
        assert _rows(pg_server, test_db) == []
        _pool_idle(pg_server, test_db)

    def test_fetch_after_the_first_statement(self, pg_server: Server, test_db: str) -> None:
        """INSERT … RETURNING as the first statement: the row is there to fetch, and it is committed."""
        with get_cursor(commit=True) as cur:
            cur.execute(INSERT + " RETURNING id, qty", (5, 7))
            assert cur.fetchone() == {"id": 5, "qty": 7}
            assert cur.rowcount == 1
        assert _rows(pg_server, test_db) == [(5, 7)]

    def test_exception_after_the_first_statement_rolls_back(self, pg_server: Server, test_db: str) -> None:
        """An exception raised in the block after a pipelined first statement rolls everything back."""
        with pytest.raises(RuntimeError, match="boom"), get_cursor(commit=True) as cur:
            cur.execute(INSERT, (6, 6))
            cur.execute(INSERT, (7, 7))
            raise RuntimeError("boom")
        assert _rows(pg_server, test_db) == []
        _pool_idle(pg_server, test_db)

    def test_the_transaction_is_read_write(self) -> None:
        """The first statement already runs inside BEGIN READ WRITE, not in the read-only session."""
        with get_cursor(commit=True) as cur:
            cur.execute("SELECT current_setting('transaction_read_only') AS ro, now() = statement_timestamp() AS first")
            row = cur.fetchone()
            cur.execute("SELECT now() = statement_timestamp() AS same")
            later = cur.fetchone()
        assert row is not None and row["ro"] == "off"
        assert later == {"same": False}  # a later statement sees the transaction's start time: one transaction

    def test_several_statements_in_one_string(self, pg_server: Server, test_db: str) -> None:
        """A parameterless string with two statements still works (its BEGIN goes alone) and commits."""
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO pipe_items VALUES (8, 8); INSERT INTO pipe_items VALUES (9, 9)")
        assert _rows(pg_server, test_db) == [(8, 8), (9, 9)]

    def test_connection_used_before_any_execute_is_inside_the_transaction(
        self, pg_server: Server, test_db: str
    ) -> None:
        """Statements run through cur.connection before the first execute are part of the block's transaction."""
        undo = RuntimeError("undo")
        with pytest.raises(RuntimeError, match=r"^undo$") as raised, get_cursor(commit=True) as cur:
            cur.connection.execute(INSERT, (11, 1))
            with cur.connection.cursor("named") as named:
                named.execute("SELECT id FROM pipe_items ORDER BY id")
                assert [r[0] for r in named.fetchall()] == [0, 11]
            raise undo
        assert raised.value is undo  # the test's own exception, not one the library raised on the way
        assert _rows(pg_server, test_db) == []

    def test_executemany_and_copy(self, pg_server: Server, test_db: str) -> None:
        """executemany as the first statement carries the BEGIN; COPY gets a BEGIN of its own; both commit."""
        with get_cursor(commit=True) as cur:
            cur.executemany(INSERT, [(20, 1), (21, 2)])
        with get_cursor(commit=True) as cur, cur.copy("COPY pipe_items (id, qty) FROM STDIN") as copy:
            copy.write_row((22, 3))
        assert _rows(pg_server, test_db) == [(20, 1), (21, 2), (22, 3)]

    def test_refused_first_statement_keeps_the_connection(self, pg_server: Server, test_db: str) -> None:
        """Parameters psycopg refuses before sending (TypeError, wrong count): raised as ever, connection kept."""
        conn_ids = set()
        for params in (5, (1,)):
            with pytest.raises((TypeError, psycopg.ProgrammingError)), get_cursor(commit=True) as cur:
                conn_ids.add(cur._conn.info.backend_pid)
                cur.execute(INSERT, params)  # type: ignore[arg-type]
        with get_cursor(commit=True) as cur:
            conn_ids.add(cur._conn.info.backend_pid)
            cur.execute(INSERT, (24, 4))
        assert len(conn_ids) == 1  # the pool's one connection was never closed and replaced
        assert _rows(pg_server, test_db) == [(24, 4)]
        _pool_idle(pg_server, test_db)

    def test_executemany_returning_first(self, pg_server: Server, test_db: str) -> None:
        """executemany(returning=True) as the first statement: every result is there, and committed."""
        with get_cursor(commit=True) as cur:
            cur.executemany(INSERT + " RETURNING id", [(25, 1), (26, 2)], returning=True)
            ids = []
            while True:
                row = cur.fetchone()
                assert row is not None
                ids.append(row["id"])
                if not cur.nextset():
                    break
        assert ids == [25, 26]
        assert _rows(pg_server, test_db) == [(25, 1), (26, 2)]

    def test_rollback_exception_is_swallowed(self, pg_server: Server, test_db: str) -> None:
        """psycopg.Rollback raised after the first statement, or before any, ends the block quietly."""
        with get_cursor(commit=True) as cur:
            cur.execute(INSERT, (23, 1))
            raise psycopg.Rollback()
        with get_cursor(commit=True):
            raise psycopg.Rollback()
        assert _rows(pg_server, test_db) == []


class TestPipelined:
    """commit=True, pipeline=True: one round trip, errors surface late, a failure rolls everything back."""

    @pytest.fixture(autouse=True)
    def _pool(self, test_settings: DatabaseSettings, table: str) -> None:
        initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1)).wait(timeout=10)

    def test_batch_is_committed(self, pg_server: Server, test_db: str) -> None:
        """Ten queued INSERTs are committed when the block ends."""
        with get_cursor(commit=True, pipeline=True) as cur:
            for i in range(10):
                cur.execute(INSERT, (100 + i, i))
        assert _rows(pg_server, test_db) == [(100 + i, i) for i in range(10)]
        _pool_idle(pg_server, test_db)

    def test_failure_anywhere_rolls_back_the_whole_block(self, pg_server: Server, test_db: str) -> None:
        """A duplicate key in statement 3 of 10 surfaces by the block's end at the latest; nothing is committed."""
        with pytest.raises(psycopg.errors.UniqueViolation), get_cursor(commit=True, pipeline=True) as cur:
            for i in range(10):
                cur.execute(INSERT, (0 if i == 2 else 200 + i, i))
        assert _rows(pg_server, test_db) == []
        _pool_idle(pg_server, test_db)
        with get_cursor(commit=True, pipeline=True) as cur:  # the connection is reusable
            cur.execute(INSERT, (299, 1))
        assert _rows(pg_server, test_db) == [(299, 1)]

    def test_failure_caught_by_the_caller_still_rolls_back(self, pg_server: Server, test_db: str) -> None:
        """A caller that catches a surfaced error and goes on cannot commit the rest: the block end raises."""
        with pytest.raises(psycopg.Error), get_cursor(commit=True, pipeline=True) as cur:
            cur.execute("UPDATE pipe_items SET qty = -1 WHERE id = 0")  # violates the CHECK
            try:
                cur.execute("SELECT 1 AS one")
                cur.fetchone()  # waits: the CHECK violation surfaces here
            except psycopg.errors.CheckViolation:
                pass
            cur.execute(INSERT, (300, 1))
        assert _rows(pg_server, test_db) == []
        _pool_idle(pg_server, test_db)

    def test_fetch_mid_block(self, pg_server: Server, test_db: str) -> None:
        """A fetch waits for the queued results and returns the row; the block still commits at the end."""
        with get_cursor(commit=True, pipeline=True) as cur:
            cur.execute(INSERT + " RETURNING id", (400, 4))
            assert cur.fetchone() == {"id": 400}
            cur.execute(INSERT, (401, 4))
        assert _rows(pg_server, test_db) == [(400, 4), (401, 4)]

    def test_exception_in_block_rolls_back(self, pg_server: Server, test_db: str) -> None:
        """The caller's own exception rolls back every queued statement, and propagates unchanged."""
        with pytest.raises(KeyError), get_cursor(commit=True, pipeline=True) as cur:
            cur.execute(INSERT, (500, 5))
            raise KeyError("stop")
        with get_cursor(commit=True, pipeline=True) as cur:
            cur.execute(INSERT, (501, 5))
            raise psycopg.Rollback()
        assert _rows(pg_server, test_db) == []
        _pool_idle(pg_server, test_db)

    def test_long_batch_whose_replies_overflow_the_socket_buffers(self, pg_server: Server, test_db: str) -> None:
        """Attack: 20,000 queued statements, replies (~5 MB) far past the socket buffers: no deadlock, all committed."""
        with get_cursor(commit=True, pipeline=True) as cur:
            for i in range(20_000):
                cur.execute(INSERT + " RETURNING id, repeat('x', 200) AS pad", (1_000 + i, 1))
        with pg_server.connect(test_db) as admin:
            assert admin.execute("SELECT count(*) FROM pipe_items WHERE id >= 1000").fetchone() == (20_000,)
        _pool_idle(pg_server, test_db)

    def test_pipeline_needs_commit(self) -> None:
        """pipeline=True on a read-only block is refused with what to do."""
        with pytest.raises(ValueError, match="commit=True"):
            get_cursor(pipeline=True)

    def test_typing(self) -> None:
        """The overloads type pipeline=True blocks like any other (dict rows by default)."""
        with get_cursor(commit=True, pipeline=True) as cur:
            assert_type(cur, Cursor[dict[str, Any]])
            cur.execute("SELECT 1 AS one")
            assert cur.fetchone() == {"one": 1}


def _in_thread(func: Callable[[], None], timeout: float) -> tuple[bool, BaseException | None]:
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            func()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    return not worker.is_alive(), outcome.get("error")


@pytest.mark.fault
class TestSilentPath:
    """The reply bound and CommitOutcomeUnknownError hold when statements are pipelined."""

    def _pool(self, test_settings: DatabaseSettings, port: int) -> None:
        initialize_pool(
            settings=test_settings.replace(
                port=port, pool_min=1, pool_max=1, statement_timeout_ms=300, tcp_user_timeout_ms=700
            )
        ).wait(timeout=10)

    def test_first_statement_on_a_silent_path_is_bounded(
        self, test_settings: DatabaseSettings, table: str, pg_server: Server, test_db: str
    ) -> None:
        """BEGIN+first statement sent into a silent path: ConnectionLostError (not committed) after the bound."""
        with fault_proxy(test_settings.host, int(test_settings.port)) as proxy:
            self._pool(test_settings, proxy.port)

            def write() -> None:
                with get_cursor(commit=True) as cur:
                    proxy.go_deaf()
                    cur.execute(INSERT, (600, 1))

            started = time.monotonic()
            finished, error = _in_thread(write, timeout=15)
            assert finished, "the pipelined statement hung on a silent path"
            assert time.monotonic() - started < 10
            assert isinstance(error, ConnectionLostError) and not isinstance(error, CommitOutcomeUnknownError), repr(
                error
            )
            assert "no reply" in str(error)
            proxy.forward()
            close_pool()  # before the proxy goes
        assert _rows(pg_server, test_db) == []

    def test_pipelined_block_lost_in_flight_is_ambiguous(self, test_settings: DatabaseSettings, table: str) -> None:
        """pipeline=True: the whole block travels with its COMMIT, so a silent path raises CommitOutcomeUnknownError."""
        with fault_proxy(test_settings.host, int(test_settings.port)) as proxy:
            self._pool(test_settings, proxy.port)

            def write() -> None:
                with get_cursor(commit=True, pipeline=True) as cur:
                    proxy.go_deaf()
                    cur.execute(INSERT, (700, 1))

            finished, error = _in_thread(write, timeout=15)
            assert finished, "the pipelined block hung on a silent path"
            assert isinstance(error, CommitOutcomeUnknownError), repr(error)
            proxy.forward()
            close_pool()  # before the proxy goes


class TestInterrupts:
    # An alarm that lands in a finalizer (psycopg's Connection.__del__ for a retired connection, a gc
    # callback) cannot be raised there: CPython reports it as "unraisable" instead. That is a lost
    # interrupt, not a lost connection, and no code can prevent it; what these tests assert is that no
    # connection is lost or left tainted, so that report alone does not fail them.
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    def test_random_interrupts_in_pipelined_blocks_lose_nothing(
        self, test_settings: DatabaseSettings, table: str
    ) -> None:
        """Random SIGALRM interrupts in pipelined blocks surface as themselves (or an unknown COMMIT), lose nothing."""
        initialize_pool(settings=test_settings.replace(pool_min=2, pool_max=2, pool_timeout=2.0)).wait(timeout=10)
        rng = random.Random(16)
        outcomes: Counter[str] = Counter()
        deadline = time.monotonic() + 20
        # No garbage collection in the loop: a gc callback (hypothesis installs one) hit by the
        # alarm would report the interrupt as an unraisable exception instead of raising it here.
        with _Alarm(rng) as alarm, contextlib.ExitStack() as stack:
            gc.disable()
            stack.callback(gc.enable)
            for i in range(400):
                if time.monotonic() > deadline:
                    break
                try:
                    alarm.arm(0.002)
                    if i % 2:
                        with get_cursor(commit=True, pipeline=True) as cur:
                            for j in range(3):
                                cur.execute(INSERT, (10_000 + 3 * i + j, 1))
                    else:
                        with get_cursor(commit=True) as cur:
                            cur.execute(INSERT + " RETURNING id", (10_000 + 3 * i, 1))
                            cur.fetchone()
                    outcome = "ok"
                except (_JobTimeout, KeyboardInterrupt) as exc:
                    outcome = type(exc).__name__
                except CommitOutcomeUnknownError as exc:
                    # Landed while the COMMIT was in flight (issue 21.4): chained from the interrupt itself.
                    outcome = f"CommitOutcomeUnknownError from {type(exc.__cause__).__name__}"
                except psycopg.Error as exc:
                    outcome = type(exc).__name__
                finally:
                    alarm.armed = False
                    alarm.disarm()
                outcomes[outcome] += 1
        assert sum(alarm.fired.values()) >= 50, (alarm.fired, outcomes)
        assert outcomes["ok"] > 0, outcomes
        # Only the interrupts themselves (and a connection they broke) failed: no RuntimeError, no pool error.
        interrupts = {"_JobTimeout", "KeyboardInterrupt"}
        expected = {"ok", "OperationalError", *interrupts, *(f"CommitOutcomeUnknownError from {i}" for i in interrupts)}
        assert set(outcomes) <= expected, outcomes
        _assert_every_connection_works(2)


class TestPsycopgInternals:
    def test_the_pipeline_internals_used_exist(self, test_settings: DatabaseSettings) -> None:
        """precog_db._pipelining relies on these psycopg internals: a psycopg upgrade that drops one fails here."""
        assert psycopg.Pipeline.is_supported()
        for cls in (psycopg.Pipeline, psycopg.AsyncPipeline):
            # overridden by QueueingPipeline (the names psycopg's own methods call) or called directly
            for name in ("_communicate_gen", "_sync_gen", "_enter_gen", "_enqueue_sync", "_fetch_gen", "_exit", "sync"):
                assert callable(getattr(cls, name)), (cls, name)
        for cursor in (psycopg.Cursor, psycopg.AsyncCursor):
            assert callable(cursor._execute_gen) and callable(cursor._executemany_gen_pipeline), cursor
        for transaction in (psycopg.Transaction, psycopg.AsyncTransaction):
            assert callable(transaction._enter_gen), transaction  # begin_pending: entered under the caller's lock
        assert callable(send)
        initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1)).wait(timeout=10)
        with get_cursor(commit=True) as cur:
            conn: Any = cur._conn
            assert conn._pipeline is None and conn._num_transactions == 0
            assert cur._closed is False  # read by the first-statement cursor
            pipeline = QueueingPipeline(conn)
            assert isinstance(pipeline.command_queue, deque) and isinstance(pipeline.result_queue, deque)
            assert pipeline.level == 0
