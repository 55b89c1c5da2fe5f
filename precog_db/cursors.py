"""Cursors and connections handed out from the process-wide pool.

``get_cursor()`` runs in autocommit on a read-only session: one round trip per
statement, and a write fails loudly (``cannot execute INSERT in a read-only
transaction``) instead of vanishing. ``get_cursor(commit=True)`` runs one
``BEGIN READ WRITE`` … ``COMMIT`` transaction, rolled back if the block raises;
its ``BEGIN`` travels with the block's first statement (one round trip for
both, `precog_db._pipelining`), and ``pipeline=True`` sends the whole block in
one. Either way the connection goes back to the pool idle, never in a transaction.

A connection lost inside the block raises `ConnectionLostError` (the work of
a ``commit=True`` block was not committed). A connection lost while the
COMMIT itself was in flight raises `CommitOutcomeUnknownError`: the server may
have committed before the reply was lost, so the caller must check before
retrying. So does an interrupt raised while the COMMIT is in flight (a job
timeout raised by a SIGALRM handler, ``KeyboardInterrupt``), chained from it
(``__cause__``); the connection is closed (`_commit_interrupted`).
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, TypeVar, overload

import psycopg
from psycopg import AsyncConnection, Connection, Cursor
from psycopg.rows import Row, RowFactory, dict_row
from psycopg.transaction import Transaction

from precog_db import replicas
from precog_db._compat import OutOfOrderTransactionNesting
from precog_db._pipelining import SUPPORTED as _PIPELINE_SUPPORTED
from precog_db._pipelining import FirstStatementCursor, PipelinedBlock
from precog_db.errors import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConnectionLostError,
    PoolStateError,
    TransactionControlError,
)
from precog_db.pool import PoolFaults, PrecogPool, get_pool
from precog_db.session import mark_raw
from precog_db.topology import PoolerFirstStatementCursor

__all__ = ["CommitOutcomeUnknownError", "ConnectionLostError", "get_connection", "get_cursor"]


def _detail(exc: BaseException) -> str:
    # The first line carries the reason ("server closed the connection
    # unexpectedly", "terminating connection due to administrator command");
    # libpq's following lines are generic hints.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else "no detail"


def _lost(pool: PoolFaults, exc: psycopg.OperationalError) -> ConnectionLostError:
    return ConnectionLostError(
        f"lost the connection to the {pool.settings.describe()} during the operation "
        f"({_detail(exc)}). "
        "The pool replaces dead connections by itself: retry the operation. "
        "If you used commit=True the transaction was not committed."
    )


def _commit_unknown(pool: PoolFaults, exc: psycopg.OperationalError) -> CommitOutcomeUnknownError:
    return CommitOutcomeUnknownError(
        f"lost the connection to the {pool.settings.describe()} while COMMIT was in flight ({_detail(exc)}). "
        "The server may have committed the transaction before the reply was lost, or not: check whether "
        "its effects are there (or make the write idempotent) before retrying"
    )


def _commit_interrupted(pool: PoolFaults, exc: BaseException, committing: bool) -> BaseException | None:
    """What to raise for ``exc``, raised in a block's exit: None if it did not cut a COMMIT short.

    The one decision for both layers (`_CursorBlock.__exit__` here, its twin in
    `precog_db.aio`). Not None: ``exc`` was raised while the block's ``COMMIT``
    (with ``pipeline=True``, the whole block) was sent or awaited, and it is
    not the server's answer (a psycopg error, which `_translate` words): the
    caller closes the connection, whose state is unknown, and raises the
    result, chained from ``exc`` when it is not ``exc`` itself.

    A task's cancellation, ``KeyboardInterrupt`` and any ``Exception`` a signal
    handler raises (a job timeout) become `CommitOutcomeUnknownError`: the
    server may have committed (it usually has: cancelling a COMMIT whose
    reply is on its way changes nothing), and that is what the caller must
    know before retrying. An exit (``SystemExit``, ``GeneratorExit``) stays
    itself: it stops the program or the generator, and turning it into an
    ``Exception`` would let an ``except Exception`` (a retry loop) swallow it.
    """
    if not committing or isinstance(exc, psycopg.Error):
        return None
    if isinstance(exc, asyncio.CancelledError):
        what = "the task was cancelled"
    elif isinstance(exc, (Exception, KeyboardInterrupt)):
        what = f"interrupted by {type(exc).__name__}"
    else:
        return exc
    return CommitOutcomeUnknownError(
        f"{what} while COMMIT was in flight on the {pool.settings.describe()}. The server "
        "may have committed the transaction or not: check whether its effects are there (or make the write "
        "idempotent) before retrying. The connection was closed; the pool replaces it"
    )


def get_connection() -> AbstractContextManager[Connection[Any]]:
    """Borrow a pooled connection (autocommit, read-only by default).

    Use ``with conn.transaction():`` for writes. The connection goes back to
    the pool when the block ends, whatever happened in it. With read replicas
    configured, the block counts as a write for this thread's read-your-writes
    (`precog_db.replicas`).
    """
    return _ConnectionBlock()


@overload
def get_cursor(
    *, commit: bool = False, pipeline: bool = False, replica: bool = False
) -> AbstractContextManager[Cursor[dict[str, Any]]]: ...


@overload
def get_cursor(
    *, commit: bool = False, pipeline: bool = False, row_factory: RowFactory[Row], replica: bool = False
) -> AbstractContextManager[Cursor[Row]]: ...


def get_cursor(
    *, commit: bool = False, pipeline: bool = False, row_factory: RowFactory[Any] = dict_row, replica: bool = False
) -> AbstractContextManager[Cursor[Any]]:
    """Borrow a cursor; rows are dicts by default (typed ``Cursor[dict[str, Any]]``).

    ``commit=False``: statements run read-only in autocommit; writes raise
    `ReadOnlyWriteError` (a `psycopg.errors.ReadOnlySqlTransaction`).
    ``commit=True``: one read-write transaction, committed when the block
    exits cleanly and rolled back when it raises (the exception propagates).
    Its ``BEGIN`` is sent together with the first statement: a one-statement
    block costs two round trips, and nothing else changes for the caller.
    ``commit=True, pipeline=True``: the whole block (``BEGIN``, every statement,
    ``COMMIT``) is sent in one round trip. Statements are queued, not waited
    for: a ``fetch*`` waits for the results queued so far, and an error is
    raised by a later ``fetch*``, or when the block ends, not by the
    ``execute`` that caused it (``execute`` only queues). Any error rolls the whole block back. Do not
    use it when the code decides what to do next from a statement's outcome
    (catching a `psycopg.errors.UniqueViolation` to update instead, reading
    ``rowcount`` before the block ends): see docs/DESIGN.md.
    ``replica=True`` (reads only): from a ``DB_REPLICA_HOSTS`` replica that
    is fresh enough and has this thread's or task's own writes, else from the
    primary (`precog_db.replicas`). All are keyword-only: ``get_cursor(commit=True)``
    reads as what it does.
    """
    if pipeline or replica:
        refuse_options(commit, pipeline, replica)
    block = _CursorBlock(commit, row_factory, pipeline)
    block._replica = replica
    return block


def refuse_options(commit: bool, pipeline: bool, replica: bool, api: str = "") -> None:
    """The keyword combinations ``get_cursor`` refuses, in both layers (``api``: ``"aio."`` for `precog_db.aio`)."""
    if pipeline and not commit:
        raise ValueError(
            f"{api}get_cursor(pipeline=True) needs commit=True: pipelining sends a write transaction's "
            "BEGIN, statements and COMMIT together; a read-only block already costs one round trip per statement"
        )
    if replica and commit:
        raise ConfigurationError(
            f"{api}get_cursor(commit=True, replica=True): a replica cannot take writes; drop replica=True"
        )


# The blocks are classes rather than @contextmanager generators: they sit on
# every query path, and a generator-based context manager costs several times
# more per block (docs/PERFORMANCE.md).


# Interrupts: a signal handler may raise (KeyboardInterrupt, a job timeout) at
# any point. The lent connection lives in the block's ``_conn`` slot from the
# moment it leaves the pool's idle stack until `PrecogPool.give_back` has handed
# it back, and every step in between is covered by an except clause that gives
# it back, so no interrupt can lose it (docs/RELIABILITY.md).


class _ConnectionBlock:
    __slots__ = ("_conn", "_pool")

    def __init__(self) -> None:
        self._pool: PrecogPool | None = None
        self._conn: Connection[Any] | None = None

    def __enter__(self) -> Connection[Any]:
        if self._conn is not None:
            raise PoolStateError("a get_connection() block cannot be entered twice; call get_connection() again")
        pool = self._pool = get_pool()
        pool.lend(self)  # on any exception the slot is empty again
        self.__class__ = _LentConnectionBlock  # no call in between: see _reclaim
        conn = self._conn
        assert conn is not None
        mark_raw(conn)  # the raw connection is lent: its return always restores the session
        return conn

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._pool is not None:
            if self._pool.settings.replica_hosts:
                replicas.note_commit()  # it may have committed (conn.transaction()): counted as a write
            _give_back(self._pool, self, _ConnectionBlock)


class _LentConnectionBlock(_ConnectionBlock):
    """A `_ConnectionBlock` holding a connection: the only kind with a finalizer (see `_reclaim`)."""

    __slots__ = ()

    def __del__(self) -> None:
        _reclaim(self)


class _CursorBlock:
    __slots__ = ("_commit", "_conn", "_cursor", "_pipeline", "_pool", "_replica", "_row_factory", "_transaction")

    def __init__(self, commit: bool, row_factory: RowFactory[Any], pipeline: bool = False) -> None:
        self._commit = commit
        self._row_factory = row_factory
        #: pipeline=True: the block's pipeline once entered; False before; None for other blocks.
        self._pipeline: PipelinedBlock | bool | None = True if pipeline else None
        self._pool: PrecogPool | None = None
        self._conn: Connection[Any] | None = None
        self._cursor: Cursor[Any] | None = None
        self._transaction: Transaction | None = None
        self._replica = False

    def __enter__(self) -> Cursor[Any]:
        if self._conn is not None:
            raise PoolStateError("a get_cursor() block cannot be entered twice; call get_cursor() again")
        pool = self._pool = get_pool() if not self._replica else replicas.choose(get_pool())
        pool.lend(self)  # on any exception the slot is empty again
        self.__class__ = _LentCursorBlock  # no call in between: see _reclaim
        try:
            conn = self._conn
            assert conn is not None
            self._transaction = self._cursor = None
            if not self._commit:
                cursor = self._cursor = conn.cursor(row_factory=self._row_factory)
            elif self._pipeline is not None:
                cursor = self._cursor = conn.cursor(row_factory=self._row_factory)
                block = self._pipeline = PipelinedBlock(conn)
                block.start()  # BEGIN READ WRITE queued, nothing sent yet
            elif _PIPELINE_SUPPORTED:
                # No BEGIN now: the cursor's first statement carries it (precog_db._pipelining).
                # Behind a transaction-mode pooler the cursor is also the pooler's (session state refused unsent).
                cls = PoolerFirstStatementCursor if pool.settings.pooler == "transaction" else FirstStatementCursor
                self._cursor = cursor = cls(conn, row_factory=self._row_factory)
                conn._precog.pending_begin = self  # any other I/O sends it first
            else:
                cursor = self._cursor = conn.cursor(row_factory=self._row_factory)
                transaction = conn.transaction()
                transaction.__enter__()  # BEGIN READ WRITE
                self._transaction = transaction
            return cursor
        except BaseException as exc:
            conn = self._conn
            if conn is not None:
                conn._precog.pending_begin = None
            try:
                if self._cursor is not None:
                    self._cursor.close()
                if (
                    conn is not None
                    and isinstance(exc, psycopg.OperationalError)
                    and (wrapped := _translate(pool, conn, exc, False))
                ):
                    raise wrapped from exc
                raise
            finally:
                self._cursor = None
                _give_back(pool, self, _CursorBlock)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> bool:
        pool, conn = self._pool, self._conn
        assert pool is not None and conn is not None, "get_cursor() block exited without being entered"
        conn._precog.pending_begin = None  # type: ignore[attr-defined]  # never outlives the block
        committing = False
        try:
            try:
                if self._cursor is not None:
                    self._cursor.close()
                if self._transaction is not None and conn.lock.locked():
                    # A stream() of the block kept half-read holds the connection: nothing can end the
                    # transaction on it. Closing it rolls the transaction back on the server.
                    conn.close()
                    if et is None:
                        raise _kept_stream(pool)
                    return False
                pipelined = self._pipeline
                if isinstance(pipelined, PipelinedBlock):
                    self._pipeline = True
                    committing = et is None
                    if pipelined.finish(et, ev, tb):
                        return True
                # psycopg.Rollback raised in the block: rolled back, and the
                # transaction swallows it; so does this block.
                elif self._transaction is not None:
                    committing = et is None
                    try:
                        if self._transaction.__exit__(et, ev, tb):
                            return True
                    except OutOfOrderTransactionNesting:
                        if et is None:
                            raise  # the caller's own misuse, as psycopg reports it
                        # An interrupted inner transaction() left psycopg's nesting count behind: the
                        # session's state is unknown. Close it; what ended the block propagates.
                        conn.close()
                        return False
                elif self._commit and isinstance(ev, psycopg.Rollback) and ev.transaction is None:
                    return True  # raised before the first statement: nothing to roll back, swallowed as ever
                if committing:
                    committing = False  # committed: what follows is not the COMMIT any more
                    if pool.settings.replica_hosts:
                        replicas.note_commit()  # this thread's/task's next replica read must see the write
            except psycopg.OperationalError as exc:
                # With a clean block, what failed here is the COMMIT (with pipeline=True, the
                # whole block was in flight with it).
                if committing and pool.settings.replica_hosts:
                    replicas.note_commit()  # the COMMIT may have been applied: the next replica read must see it
                if wrapped := _translate(pool, conn, exc, committing):
                    raise wrapped from exc
                raise
            except BaseException as exc:
                # An interrupt (a job timeout raised by a signal handler, KeyboardInterrupt) while the
                # COMMIT was in flight: the row may be committed. The decision is the asyncio layer's too.
                if (outcome := _commit_interrupted(pool, exc, committing)) is not None:
                    if pool.settings.replica_hosts:
                        replicas.note_commit()  # the COMMIT may have been applied: the next replica read must see it
                    conn.close()  # its state is unknown (psycopg may have left it mid-statement)
                    if outcome is not exc:
                        raise outcome from exc
                raise
            if isinstance(ev, psycopg.OperationalError) and (wrapped := _translate(pool, conn, ev, False)):
                raise wrapped from ev
            return False
        finally:
            _give_back(pool, self, _CursorBlock)


class _LentCursorBlock(_CursorBlock):
    """A `_CursorBlock` holding a connection: the only kind with a finalizer (see `_reclaim`)."""

    __slots__ = ()

    def __del__(self) -> None:
        _reclaim(self)


_Block = TypeVar("_Block", _ConnectionBlock, _CursorBlock)


def _give_back(pool: PrecogPool, block: _Block, unlent: type[_Block]) -> None:
    try:
        pool.give_back(block)
    finally:
        if block._conn is not None:  # interrupted on give_back's first instruction, before its own guard
            pool.give_back(block)
    block.__class__ = unlent  # nothing left to reclaim


def _reclaim(block: _ConnectionBlock | _CursorBlock) -> None:
    """Last resort when a block is collected still holding a connection, and give it back.

    That happens only when an interrupt is raised as the ``with`` statement
    calls ``__exit__``, before its first line runs (CPython checks for pending
    signals on entering a function), so the block never saw its exit: the
    connection is returned once the exception, whose traceback keeps the block
    alive, is released. Only blocks holding a connection have this finalizer,
    so an ordinary block's deallocation runs no Python code (a signal landing
    in a finalizer would be swallowed).
    """
    pool = getattr(block, "_pool", None)
    conn = getattr(block, "_conn", None)
    if conn is not None and pool is not None:
        conn._precog.pending_begin = None  # a commit=True block's BEGIN, never sent: not the next borrower's
        with contextlib.suppress(Exception):
            pool.give_back(block)


def _kept_stream(pool: PoolFaults) -> TransactionControlError:
    """A ``commit=True`` block ended while one of its ``stream()`` results was still being read (both layers)."""
    return TransactionControlError(
        f"the commit=True block on the {pool.settings.describe()} ended while one of its stream() results was "
        "still being read: the transaction was not committed (the connection was closed, which rolls it back). "
        "Read the stream to its end, or close it (contextlib.closing / aclosing), before the block ends"
    )


def _translate(
    pool: PoolFaults, conn: Connection[Any] | AsyncConnection[Any], exc: psycopg.OperationalError, committing: bool
) -> ConnectionLostError | None:
    """The error to raise instead of ``exc`` when the connection is gone, else None (raise ``exc``)."""
    if not (conn.broken or conn.closed):
        return None
    if committing and not isinstance(exc, CommitOutcomeUnknownError):
        return _commit_unknown(pool, exc)
    if not isinstance(exc, ConnectionLostError):
        return _lost(pool, exc)
    return None
