"""precog_db for asyncio: the same API and the same rules, awaited.

::

    from precog_db import aio

    async with aio.get_cursor() as cur:            # read-only autocommit: one round trip
        await cur.execute("SELECT * FROM trades WHERE id = %s", (trade_id,))
        row = await cur.fetchone()                 # a dict
    async with aio.get_cursor(commit=True) as cur:  # BEGIN READ WRITE ... COMMIT (rolled back if the block raises)
        await cur.execute("INSERT INTO trades (symbol) VALUES (%s)", ("AAPL",))

Built on `psycopg_pool.AsyncConnectionPool` (`precog_db.apool`). Everything
that is not I/O is the sync layer's: settings, environment, the production
guard, the gate, the stamp's SQL and decisions (`precog_db._steps`), the
session classifier and reset (`precog_db.session`), the error classes and
messages, the audit log (docs/DESIGN.md, "Sync and async from one source").

Cancellation (``asyncio.wait_for``, ``asyncio.timeout``, ``Task.cancel``) is
a fault like any other, wherever it lands: waiting for a connection, in a
statement (the server is told to cancel it), or in the reset. No connection
is lost and none goes back to the pool inside a transaction. A task
cancelled while its ``COMMIT`` is in flight gets `CommitOutcomeUnknownError`
(chained from the ``CancelledError``) instead of ``CancelledError``: the
server may or may not have committed, and that is what the caller must
know; the connection is closed.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, overload

import psycopg
from psycopg import AsyncConnection, AsyncCursor, AsyncTransaction
from psycopg.rows import AsyncRowFactory, Row, dict_row

from precog_db._compat import OutOfOrderTransactionNesting
from precog_db._connection_async import AsyncPrecogConnection
from precog_db._pipelining import SUPPORTED as PIPELINE_SUPPORTED
from precog_db._pipelining import AsyncFirstStatementCursor, AsyncPipelinedBlock
from precog_db._replica_state import note_commit
from precog_db._replicas_async import choose
from precog_db.apool import AsyncPrecogPool, close_pool, get_pool, initialize_pool
from precog_db.cursors import _commit_interrupted, _kept_stream, _translate, refuse_options
from precog_db.errors import PoolStateError
from precog_db.gates import (
    dangerous_operation,
    delete_statement,
    log_deleted,
    log_truncated,
    truncate_statements,
)
from precog_db.session import mark_raw
from precog_db.topology import AsyncPoolerFirstStatementCursor

#: Deprecated alias of `AsyncPrecogConnection` (its name before it was named like `AsyncPrecogPool`); use that.
PrecogAsyncConnection = AsyncPrecogConnection

__all__ = [
    "AsyncPrecogConnection",
    "PrecogAsyncConnection",
    "close_pool",
    "delete_all",
    "get_connection",
    "get_cursor",
    "get_pool",
    "initialize_pool",
    "truncate_tables",
]


def get_connection() -> AbstractAsyncContextManager[AsyncConnection[Any]]:
    """Borrow a pooled asyncio connection (autocommit, read-only by default).

    Use ``async with conn.transaction():`` to write. The connection goes back
    to the pool when the block ends, whatever happened in it. With read
    replicas configured, the block counts as a write for this task's
    read-your-writes (`precog_db.replicas`).
    """
    return _ConnectionBlock()


@overload
def get_cursor(
    *, commit: bool = False, pipeline: bool = False, replica: bool = False
) -> AbstractAsyncContextManager[AsyncCursor[dict[str, Any]]]: ...


@overload
def get_cursor(
    *, commit: bool = False, pipeline: bool = False, row_factory: AsyncRowFactory[Row], replica: bool = False
) -> AbstractAsyncContextManager[AsyncCursor[Row]]: ...


def get_cursor(
    *,
    commit: bool = False,
    pipeline: bool = False,
    row_factory: AsyncRowFactory[Any] = dict_row,
    replica: bool = False,
) -> AbstractAsyncContextManager[AsyncCursor[Any]]:
    """Borrow an asyncio cursor; rows are dicts by default (typed ``AsyncCursor[dict[str, Any]]``).

    Keyword-only, like `precog_db.get_cursor`: ``get_cursor(commit=True)`` reads as what it does.

    ``commit=False``: statements run read-only in autocommit, a write raises
    `ReadOnlyWriteError`. ``commit=True``: one read-write transaction,
    committed when the block exits cleanly and rolled back when it raises; its
    ``BEGIN`` travels with the first statement (two round trips for a
    one-statement block). ``commit=True, pipeline=True``: the whole block in
    one round trip, errors surfacing late, exactly as `precog_db.get_cursor`
    documents it. ``replica=True`` (reads only): from a ``DB_REPLICA_HOSTS``
    replica that is fresh enough and has this task's own writes, else from the
    primary (`precog_db.replicas`).
    """
    if pipeline or replica:
        refuse_options(commit, pipeline, replica, "aio.")
    block = _CursorBlock(commit, row_factory, pipeline)
    block._replica = replica
    return block


class _ConnectionBlock:
    __slots__ = ("_conn", "_pool")

    def __init__(self) -> None:
        self._pool: AsyncPrecogPool | None = None
        self._conn: AsyncConnection[Any] | None = None

    async def __aenter__(self) -> AsyncConnection[Any]:
        if self._conn is not None:
            raise PoolStateError("a get_connection() block cannot be entered twice; call get_connection() again")
        pool = self._pool = await get_pool()
        conn = self._conn = await pool.lend()
        mark_raw(conn)  # the raw connection is lent: its return always restores the session
        return conn

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pool is not None:
            if self._pool.settings.replica_hosts:
                note_commit()  # it may have committed (conn.transaction()): read-your-writes counts it as a write
            await self._pool.give_back(conn)


class _CursorBlock:
    __slots__ = ("_commit", "_conn", "_cursor", "_pipeline", "_pool", "_replica", "_row_factory", "_transaction")

    def __init__(self, commit: bool, row_factory: AsyncRowFactory[Any], pipeline: bool = False) -> None:
        self._commit = commit
        self._row_factory = row_factory
        #: pipeline=True: the block's pipeline once entered; False before; None for other blocks.
        self._pipeline: AsyncPipelinedBlock | bool | None = True if pipeline else None
        self._pool: AsyncPrecogPool | None = None
        self._conn: AsyncConnection[Any] | None = None
        self._cursor: AsyncCursor[Any] | None = None
        self._transaction: AsyncTransaction | None = None
        self._replica = False

    async def __aenter__(self) -> AsyncCursor[Any]:
        if self._conn is not None:
            raise PoolStateError("a get_cursor() block cannot be entered twice; call get_cursor() again")
        pool = self._pool = await get_pool() if not self._replica else await choose(await get_pool())
        conn = self._conn = await pool.lend()  # no suspension between lend's return and this store
        try:
            if not self._commit:
                cursor = self._cursor = conn.cursor(row_factory=self._row_factory)
            elif self._pipeline is not None:
                cursor = self._cursor = conn.cursor(row_factory=self._row_factory)
                block = self._pipeline = AsyncPipelinedBlock(conn)
                await block.start()  # BEGIN READ WRITE queued, nothing sent yet
            elif PIPELINE_SUPPORTED:
                # No BEGIN now: the cursor's first statement carries it; any other I/O on the
                # connection sends it first (AsyncPrecogConnection.wait).
                # Behind a transaction-mode pooler the cursor is also the pooler's (session state refused unsent).
                cls = (
                    AsyncPoolerFirstStatementCursor
                    if pool.settings.pooler == "transaction"
                    else AsyncFirstStatementCursor
                )
                cursor = self._cursor = cls(conn, row_factory=self._row_factory)
                conn._precog.pending_begin = self  # type: ignore[attr-defined]
            else:
                cursor = self._cursor = conn.cursor(row_factory=self._row_factory)
                transaction = AsyncTransaction(conn)  # what conn.transaction() wraps, without the generator
                await transaction.__aenter__()  # BEGIN READ WRITE
                self._transaction = transaction
            return cursor
        except BaseException as exc:
            try:
                if isinstance(exc, psycopg.OperationalError) and (wrapped := _translate(pool, conn, exc, False)):
                    raise wrapped from exc
                raise
            finally:
                await self._release()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> bool:
        pool, conn = self._pool, self._conn
        assert pool is not None and conn is not None, "get_cursor() block exited without being entered"
        conn._precog.pending_begin = None  # type: ignore[attr-defined]  # before any await: never outlives the block
        pipelined = self._pipeline
        transaction = self._transaction
        committing = et is None and (transaction is not None or isinstance(pipelined, AsyncPipelinedBlock))
        try:
            try:
                if transaction is not None and conn.lock.locked():
                    # A stream() of the block kept half-read holds the connection (see precog_db.cursors).
                    await conn.close()
                    if et is None:
                        raise _kept_stream(pool)
                    return False
                if isinstance(pipelined, AsyncPipelinedBlock):
                    self._pipeline = True
                    if await pipelined.finish(et, ev, tb):
                        return True
                # psycopg.Rollback raised in the block: rolled back, and the
                # transaction swallows it; so does this block.
                elif transaction is not None:
                    try:
                        if await transaction.__aexit__(et, ev, tb):
                            return True
                    except OutOfOrderTransactionNesting:
                        if et is None:
                            raise  # the caller's own misuse, as psycopg reports it
                        # An interrupted inner transaction() left psycopg's nesting count behind (psycopg
                        # before 3.3 does not undo an enter cut short): the session's state is unknown.
                        # Close it; what ended the block propagates, not this.
                        await conn.close()
                        return False
                elif self._commit and isinstance(ev, psycopg.Rollback) and ev.transaction is None:
                    return True  # raised before the first statement: nothing to roll back, swallowed as ever
                if committing:
                    committing = False  # committed: what follows is not the COMMIT any more
                    if pool.settings.replica_hosts:
                        note_commit()  # this task's next replica read must see the write
            except psycopg.OperationalError as exc:
                if committing and pool.settings.replica_hosts:
                    note_commit()  # the COMMIT may have been applied: the next replica read must not miss it
                if et is not None and not issubclass(et, Exception):
                    return False  # a cancellation (or an interrupt) ended the block: it propagates, not this
                # With a clean block, what failed here is the COMMIT (with pipeline=True, the whole block).
                if wrapped := _translate(pool, conn, exc, committing):
                    raise wrapped from exc
                raise
            except BaseException as exc:
                # A cancellation (or an interrupt) while the COMMIT was in flight: the sync layer's decision.
                if (outcome := _commit_interrupted(pool, exc, committing)) is not None:
                    if pool.settings.replica_hosts:
                        note_commit()  # the COMMIT may have been applied: the next replica read must not miss it
                    await conn.close()  # no suspension: psycopg's close only finishes the socket
                    if outcome is not exc:
                        raise outcome from exc
                raise
            if isinstance(ev, psycopg.OperationalError) and (wrapped := _translate(pool, conn, ev, False)):
                raise wrapped from ev
            return False
        finally:
            await self._release()

    async def _release(self) -> None:
        """Close the cursor (no I/O for a client cursor) and give the connection back."""
        cursor, conn, pool = self._cursor, self._conn, self._pool
        self._cursor = self._transaction = None
        if conn is not None:
            conn._precog.pending_begin = None  # type: ignore[attr-defined]
        self._conn = None
        if cursor is not None:
            await cursor.close()
        if conn is not None and pool is not None:
            await pool.give_back(conn)


@dangerous_operation()
async def truncate_tables(*tables: str, cascade: bool = False) -> dict[str, int]:
    """Empty ``tables`` in one transaction; return the row count each held (the twin of `precog_db.truncate_tables`)."""
    count_queries, truncate = truncate_statements(tables, cascade)
    counts: dict[str, int] = {}
    async with get_cursor(commit=True) as cur:
        for name, query in zip(tables, count_queries, strict=True):
            await cur.execute(query)
            row = await cur.fetchone()
            counts[name] = int(row["n"]) if row else 0
        await cur.execute(truncate)
    log_truncated(counts)
    return counts


@dangerous_operation()
async def delete_all(table: str) -> int:
    """Delete every row of ``table``; return how many were deleted (the twin of `precog_db.delete_all`)."""
    statement = delete_statement(table)
    async with get_cursor(commit=True) as cur:
        await cur.execute(statement)
        rows = cur.rowcount
    log_deleted(table, rows)
    return rows
