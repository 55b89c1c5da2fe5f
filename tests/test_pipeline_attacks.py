"""Issue 16, attacked: what an independent review of the pipelining change found, each pinned.

Every test here failed on the first version of the change (up to commit 8bcbdfe; docs/RELIABILITY.md
rows 16.8-16.13) and asserts the rule, not a behaviour.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from precog_db import _connection_async, aio, close_pool, get_connection, get_cursor, initialize_pool
from precog_db._pipeline_async import begin_pending
from precog_db._pipelining import _Queueing
from precog_db.errors import CommitOutcomeUnknownError, TransactionControlError
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server
from tests._helpers.topology import pgbouncer

INSERT = "INSERT INTO rv16 (id) VALUES (%s)"

# The nested pipelines left entered on purpose (test 4) fail psycopg's own assertion when collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def table(pg_server: Server, test_db: str) -> str:
    with pg_server.connect(test_db) as admin:
        admin.execute("DROP TABLE IF EXISTS rv16")
        admin.execute("CREATE TABLE rv16 (id int)")
    return "rv16"


def _rows(pg_server: Server, test_db: str) -> list[int]:
    with pg_server.connect(test_db) as admin:
        return [r[0] for r in admin.execute("SELECT id FROM rv16 ORDER BY id")]


class JobTimeout(Exception):
    """What a job runner raises from its SIGALRM handler (an Exception, like tests/test_interrupts._JobTimeout)."""


# --- 1. An interrupt that is an Exception, raised while the first statement is being queued ---------------


def test_job_timeout_while_first_statement_is_queued_surfaces_as_itself(
    test_settings: DatabaseSettings, table: str
) -> None:
    """first_gen's ``except Exception`` takes the interrupt for a "refusal", syncs anyway, and clears busy.

    The signal is simulated deterministically where a real SIGALRM can land (seen with
    tests/test_interrupts._Alarm): after ``popleft()`` took the INSERT's command off the queue in
    ``_Queueing._buffer_all``, before libpq was given it. The queue and the result queue are then out
    of step; the sync hands the Sync's result to the cursor.
    """
    initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1)).wait(timeout=10)
    seen = {"popleft": 0}

    def profiler(frame: Any, event: str, arg: Any) -> None:
        in_buffer = event == "c_return" and frame.f_code is _Queueing._buffer_all.__code__
        if in_buffer and getattr(arg, "__name__", "") == "popleft":
            seen["popleft"] += 1
            if seen["popleft"] == 2:  # 1: BEGIN READ WRITE, 2: the INSERT
                sys.setprofile(None)
                raise JobTimeout("job timed out")

    conn: Any = None
    with pytest.raises(JobTimeout), get_cursor(commit=True) as cur:
        conn = cur._conn
        sys.setprofile(profiler)
        try:
            cur.execute(INSERT, (1,))
        finally:
            sys.setprofile(None)
    close_pool()
    assert conn is not None


# --- 2. asyncio: cancellation while the deferred BEGIN runs for a nested transaction() ----------------------


@pytest.mark.asyncio
async def test_cancel_during_deferred_begin_of_nested_transaction_stays_a_cancellation(
    test_settings: DatabaseSettings, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``async with cur.connection.transaction()`` as the block's first I/O, cancelled at a random moment.

    AsyncPrecogConnection.wait sends the block's BEGIN inside the transaction's own wait. psycopg 3.3
    finishes the statement after a cancellation (status INTRANS, connection OK), so the wait does not
    close the connection; AsyncTransaction.__aenter__ then "undoes" its own enter, which never ran,
    pops the block's transaction off the stack and raises OutOfOrderTransactionNesting instead of
    CancelledError (asyncio.timeout()/TaskGroup then see a ProgrammingError, not their cancellation).
    """
    await aio.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
    wrong: list[str] = []
    # The window: the cancellation lands in the deferred BEGIN that the connection's wait sends for the
    # nested transaction(). The real function runs; this only counts the tries cut short inside it.
    in_window = {"tries": 0}

    async def counted(conn: Any, block: Any) -> None:
        try:
            await begin_pending(conn, block)
        except asyncio.CancelledError:
            in_window["tries"] += 1
            raise

    monkeypatch.setattr(_connection_async, "begin_pending", counted)

    async def body(i: int) -> None:
        async with aio.get_cursor(commit=True) as cur, cur.connection.transaction():
            await cur.execute(INSERT, (i,))

    try:
        # Delays from 0 to 4 ms; a slower machine reaches the BEGIN later, so sweeps of 0-8 and 0-12 ms
        # follow while fewer than 5 tries landed in the window (1,200 tries at most).
        for step in range(1200):
            if step >= 400 and in_window["tries"] >= 5:
                break
            task = asyncio.create_task(body(step))
            await asyncio.sleep((step % 400) * 0.00001 * (1 + step // 400))
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, CommitOutcomeUnknownError):
                pass  # CommitOutcomeUnknownError: cancelled while the block's COMMIT was in flight (documented)
            except BaseException as exc:
                wrong.append(type(exc).__name__)
    finally:
        await aio.close_pool()
    assert wrong == [], wrong
    assert in_window["tries"] >= 1, "no try was cancelled inside the deferred BEGIN: the test proved nothing"


# --- 3. A failed pipelined first statement leaves a phantom prepared statement, and
# --- 4. a nested conn.pipeline() left entered: both layers, tests/test_pipeline_common_async.py::TestAttacks


# --- 5. Behind DB_POOLER=transaction: a write after an explicit COMMIT runs read-write in autocommit -------


@pytest.fixture(scope="module")
def bouncer(pg_server: Server, test_db: str) -> Iterator[int]:
    with pgbouncer(pg_server, pool_mode="transaction", pool_size=1) as port:
        yield port


def test_pooler_write_after_commit_statement_is_refused(
    pg_server: Server, test_db: str, bouncer: int, table: str
) -> None:
    """A ``COMMIT`` statement inside ``conn.transaction()`` is refused before it is sent (21.7).

    Before: after ``COMMIT`` run as a statement the server was IDLE but psycopg still counted the
    block's transaction, and the next INSERT was sent bare (autocommit, read-write) and committed at
    once (3383e2e fixed that by refusing the INSERT). Now the COMMIT itself is refused with
    `TransactionControlError`, so the block's transaction stays whole and rolls back with the error.
    """
    settings = pg_server.settings(
        port=bouncer, pooler="transaction", direct_host=pg_server.host, direct_port=pg_server.port
    )
    initialize_pool(settings=settings.replace(pool_min=1, pool_max=1)).wait(timeout=10)
    try:
        with pytest.raises(TransactionControlError), get_connection() as conn, conn.transaction():
            conn.execute(INSERT, (1,))
            conn.execute("COMMIT")
            conn.execute(INSERT, (2,))  # never reached
    finally:
        close_pool()
    assert _rows(pg_server, test_db) == []


# --- 6. asyncio: a cursor kept from an ended block takes nothing from the connection's next borrower -------


@pytest.mark.asyncio
async def test_stale_cursor_does_not_send_another_blocks_begin(test_settings: DatabaseSettings, table: str) -> None:
    """A closed AsyncFirstStatementCursor from an earlier block must not take the next block's pending BEGIN."""
    await aio.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
    try:
        async with aio.get_cursor(commit=True) as stale:
            pass
        async with aio.get_cursor(commit=True) as cur:
            conn: Any = cur._conn
            assert conn._precog.pending_begin is not None
            assert id(conn) == id(stale._conn)  # the same connection (one in the pool)
            with pytest.raises(psycopg.InterfaceError):
                await stale.execute(INSERT, (1,))
            assert conn._precog.pending_begin is not None  # still this block's, not sent by the stale cursor
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
            await cur.execute(INSERT, (2,))
    finally:
        await aio.close_pool()
