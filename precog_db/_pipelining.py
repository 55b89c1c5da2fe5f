"""Fewer round trips for ``get_cursor(commit=True)``: libpq pipeline mode, used inside the block.

Two mechanisms (docs/DESIGN.md "Committed writes in fewer round trips"), in
both layers (`precog_db.cursors`, `precog_db.aio`):

* **BEGIN with the first statement** (every ``commit=True`` block): the block
  sends no ``BEGIN`` when it is entered. The cursor it hands out is a
  `FirstStatementCursor` (`AsyncFirstStatementCursor`); its first ``execute`` /
  ``executemany`` enters pipeline mode, queues ``BEGIN READ WRITE`` and the
  statement, and syncs once, so both cost one round trip. The call waits for
  both replies before it returns: an error is raised by the ``execute`` that
  caused it, and the results are there for ``fetch*`` exactly as before. Later
  statements and the ``COMMIT`` run as before. Anything that cannot be
  pipelined safely (a statement string holding several statements, ``COPY``,
  ``stream``, a server cursor, anything run through ``cur.connection``) first
  gets a plain ``BEGIN`` of its own, as before this change.
* **pipeline=True** (opt-in): `PipelinedBlock` (`AsyncPipelinedBlock`) queues
  ``BEGIN``, every statement and the ``COMMIT`` and syncs once at the end of the
  block; a ``fetch*`` waits for the results queued so far (a flush, no sync).
  Errors surface late: see the ``get_cursor`` docstring and docs/DESIGN.md.

The pipeline is psycopg's, with its I/O moved to one place (`QueueingPipeline`):
psycopg writes and polls once per queued message, this one buffers every
message in libpq and writes them all at the sync, then waits once. That is
what makes the saved round trip cheaper than the one it saves
(docs/PERFORMANCE.md).

Safety: while a pipeline is being synced the connection's ``_precog_busy`` flag
is set (`precog_db.session`), so an interrupt raised by a signal handler (or a
cancellation) in the middle leaves the connection marked and the pool closes it
instead of lending it again; a connection still in pipeline mode (``_pipeline``
set) is never lent either. The waits go through ``Connection.wait``, so the
reply bound of `precog_db.connection.PrecogConnection` covers them.

The psycopg internals used here (the pipelines' generators, the cursors' ``_execute_gen``, the
connection's ``_pipeline`` ...) are declared in `precog_db._compat` (checked by tests/test_compat.py).
A ``Transaction`` is entered directly (not through ``conn.transaction()``,
which would sync the pipeline at ``BEGIN``).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import psycopg
from psycopg import AsyncConnection, AsyncPipeline, AsyncTransaction, Connection, Pipeline, Transaction
from psycopg.abc import PQGen
from psycopg.pq import TransactionStatus

from precog_db._compat import send
from precog_db.log import get_logger
from precog_db.session import AsyncPrecogCursor, PrecogCursor

__all__ = [
    "SUPPORTED",
    "AsyncFirstStatementCursor",
    "AsyncPipelinedBlock",
    "AsyncQueueingPipeline",
    "FirstStatementCursor",
    "PipelinedBlock",
    "QueueingPipeline",
]

log = get_logger()

#: libpq's pipeline mode is available (libpq 14+); without it every block sends its BEGIN on its own.
SUPPORTED = Pipeline.is_supported()

#: A leading ``COPY`` (after comments, whitespace, parentheses): never pipelined.
_COPY = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/|\()*copy\b", re.I | re.S)

_IDLE = TransactionStatus.IDLE


class _Block(Protocol):
    """What the cursor needs from its get_cursor(commit=True) block: where to keep the transaction."""

    _transaction: Any  # Transaction | AsyncTransaction | None


def _pipelinable(query: Any, params: Any) -> bool:
    """True if ``query`` runs the same way in pipeline mode (extended protocol, one statement)."""
    if isinstance(query, bytes):
        try:
            query = query.decode()
        except UnicodeDecodeError:
            return False
    if not isinstance(query, str):
        return False  # sql.Composable, templates: judged conservatively, BEGIN on its own
    if _COPY.match(query):
        return False
    # Without parameters psycopg sends the simple protocol, which accepts several
    # statements in one string; the extended protocol (pipeline mode) does not.
    # A ';' inside a literal only costs the round trip this saves.
    return params is not None or ";" not in query.rstrip(" \t\r\n;")


class _Queueing:
    """psycopg's pipeline with its I/O in one place: messages are buffered as queued, written and awaited at the sync.

    psycopg's own pipeline writes each queued message as it is queued and polls
    the socket before each one (``_communicate_gen``); here queueing only
    buffers the message in libpq, and ``_sync_gen`` writes everything in one
    go, then waits once for the replies. Server errors are therefore raised at
    the sync (or by a ``fetch*``, which flushes and waits), never by the call
    that queued the statement.
    """

    command_queue: Any
    pgconn: Any

    def _buffer_all(self) -> None:
        commands = self.command_queue
        while commands:
            commands.popleft()()  # libpq appends the message to its output buffer (no wait)

    def _communicate_gen(self) -> PQGen[None]:
        self._buffer_all()
        return
        yield  # a generator, as psycopg expects

    def _sync_gen(self) -> PQGen[None]:
        self._enqueue_sync()  # type: ignore[attr-defined]
        self._buffer_all()
        yield from send(self.pgconn)  # write everything (reading meanwhile if the server pushes back)
        yield from self._fetch_gen(flush=False)  # type: ignore[attr-defined]


class QueueingPipeline(_Queueing, Pipeline):
    """`_Queueing` on a sync connection."""


class AsyncQueueingPipeline(_Queueing, AsyncPipeline):
    """`_Queueing` on an asyncio connection."""


def _exit_mode(conn: Any, pipeline: Pipeline | AsyncPipeline) -> bool:
    """Leave pipeline mode (no I/O). False when the connection must go instead of back to the pool.

    That is: libpq refused (results left uncollected), or the borrower entered a nested
    ``conn.pipeline()`` and never left it, so libpq is still in pipeline mode.
    """
    try:
        pipeline._exit(None)
    except psycopg.Error as exc:
        log.info("pipeline_exit_failed", reason=type(exc).__name__)
        return False
    finally:
        conn._pipeline = None
    # A nested conn.pipeline() the borrower entered and never left keeps libpq in pipeline mode.
    return pipeline.level == 0 and not conn.pgconn.pipeline_status


def _outcome(conn: Any, refused: Exception | None, synced: psycopg.Error | None, left: bool) -> None:
    """After a first statement's sync: clear the busy flag when the connection is consistent; raise the error."""
    if left and not synced and not refused:
        conn._precog_busy = False
        return
    if synced is not None:
        # psycopg records a statement it prepares in pipeline mode before the reply, and does not
        # forget it when the Parse failed: the return must reset the session (DISCARD ALL).
        conn._prepared.dirty = True
    if left:
        conn._precog_busy = False  # a server error (or a refusal) ended it cleanly
    error = synced or refused
    if error is not None:
        raise error
    raise _unleavable()


def _first_gen(conn: Any, block: _Block, pipeline: Any, transaction: Any, statement: PQGen[None]) -> PQGen[Any]:
    """A block's first statement as one psycopg generator, which either layer runs with its ``wait``.

    Enters pipeline mode, queues ``BEGIN READ WRITE`` and ``statement`` (the
    cursor's own execute generator: it only queues, see `_Queueing`), writes
    both with one ``Sync`` and collects every result: one write, one wait.
    Returns the psycopg error that refused the statement (a wrong parameter
    count: the BEGIN is synced alone), or another exception raised before
    anything of the statement was queued (parameters that are not a sequence);
    raises the first server error. Anything else (an interrupt raised by a
    signal handler while psycopg was queueing, even one that is an
    ``Exception``) propagates as itself, leaving the connection in pipeline
    mode and marked busy: the pool closes it.
    """
    yield from pipeline._enter_gen()  # libpq enters pipeline mode: nothing is sent
    conn._pipeline = pipeline
    yield from transaction._enter_gen()  # BEGIN READ WRITE, buffered
    block._transaction = transaction
    refused: Exception | None = None
    queued = (len(pipeline.command_queue), len(pipeline.result_queue))  # the BEGIN's
    try:
        yield from statement
    except psycopg.Error as exc:
        refused = exc
    except Exception as exc:
        if (len(pipeline.command_queue), len(pipeline.result_queue)) != queued:
            raise  # cut short half-way through psycopg's bookkeeping: never synced, never reused
        refused = exc
    yield from pipeline._sync_gen()
    return refused


class FirstStatementCursor(PrecogCursor):
    """The cursor of a ``commit=True`` block: its first statement carries the block's ``BEGIN``."""

    __slots__ = ("_precog_block",)
    _precog_block: _Block | None
    #: False behind a transaction-mode pooler: ``prepare=True`` is ignored there, as `PoolerCursor` does.
    _PREPARE = True

    def _take_block(self) -> _Block | None:
        try:
            block: _Block | None = self._precog_block
        except AttributeError:  # not set yet: the cursor is being constructed
            return None
        self._precog_block = None
        return block

    def _begin_alone(self) -> None:
        block = self._take_block()
        if block is not None:
            transaction = Transaction(self._conn)
            transaction.__enter__()  # BEGIN READ WRITE, one round trip, as before pipelining
            block._transaction = transaction

    def _first(self, block: _Block, statement: PQGen[None]) -> None:
        """Run `_first_gen` (one write, one wait), leave pipeline mode, raise what went wrong."""
        conn: Any = self._conn
        conn._precog_busy = True  # cleared only when the pipeline is done or failed with a server error
        pipeline = QueueingPipeline(conn)
        refused: Exception | None = None
        synced: psycopg.Error | None = None
        try:
            with conn.lock:
                refused = conn.wait(_first_gen(conn, block, pipeline, Transaction(conn), statement))
        except psycopg.Error as exc:
            synced = exc
        left = _exit_mode(conn, pipeline)
        if not left:
            conn.close()
        _outcome(conn, refused, synced, left)

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Any:
        block = self._take_block()
        if block is not None:
            if SUPPORTED and _pipelinable(query, params):
                self._first(
                    block, self._execute_gen(query, params, prepare=prepare if self._PREPARE else False, binary=binary)
                )
                return self
            self._precog_block = block
            self._begin_alone()
        return super().execute(query, params, prepare=prepare, binary=binary)

    def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        block = self._take_block()
        if block is not None:
            if SUPPORTED and _pipelinable(query, ()):
                # psycopg runs executemany in a pipeline of its own; here it rides ours.
                self._first(block, self._executemany_gen_pipeline(query, params_seq, returning))
                return
            self._precog_block = block
            self._begin_alone()
        super().executemany(query, params_seq, returning=returning)

    def copy(self, *args: Any, **kwargs: Any) -> Any:
        self._begin_alone()
        return super().copy(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        self._begin_alone()
        return super().stream(*args, **kwargs)

    @property
    def connection(self) -> Connection[Any]:
        """The cursor's connection; handing it out first sends the block's ``BEGIN`` (what runs on it is inside)."""
        if getattr(self, "_precog_block", None) is not None:  # psycopg reads this property on every new query
            self._begin_alone()
        conn: Connection[Any] = self._conn
        return conn

    def close(self) -> None:
        self._precog_block = None  # the block no longer needs to begin
        super().close()


class PipelinedBlock:
    """The pipeline of a ``get_cursor(commit=True, pipeline=True)`` block: BEGIN, statements and COMMIT, one sync."""

    __slots__ = ("_conn", "_pipeline", "transaction")

    def __init__(self, conn: Connection[Any]) -> None:
        self._conn = conn
        self.transaction: Transaction | None = None
        c: Any = conn
        c._precog_busy = True  # until the block's end collected every result
        pipeline = self._pipeline = QueueingPipeline(conn)
        pipeline.__enter__()  # libpq enters pipeline mode: nothing is sent
        c._pipeline = pipeline
        transaction = Transaction(conn)
        transaction.__enter__()  # BEGIN READ WRITE, buffered
        self.transaction = transaction

    def finish(self, et: type[BaseException] | None, ev: BaseException | None, tb: Any) -> bool:
        """End the block: commit in the same sync when it ended cleanly, else roll everything back.

        Returns True when the exception ``ev`` is to be swallowed (``psycopg.Rollback``).
        A server error found at the sync is raised after the transaction was rolled back.
        """
        conn: Any = self._conn
        transaction, self.transaction = self.transaction, None
        conn._precog_busy = True  # cleared only once every result is collected (or a server error ended it)
        if et is None and transaction is not None:
            error: psycopg.Error | None = None
            try:
                transaction.__exit__(None, None, None)  # COMMIT, buffered behind the statements
                self._pipeline.sync()  # one write, one wait for the whole block
            except psycopg.Error as exc:
                error = exc
            if not _exit_mode(conn, self._pipeline):
                conn.close()
                error = error or _unleavable()
            if error is not None:
                conn._prepared.dirty = True  # see _outcome: the return resets the session
            if error is not None and not (conn.broken or conn.closed):
                _roll_back_failed(conn)
            conn._precog_busy = False
            if error is not None:
                raise error  # the caller tells a lost COMMIT apart
            return False
        # The block raised: sync what was queued, then roll back outside pipeline mode. The
        # block's own exception propagates; what the sync reports (typically "pipeline
        # aborted" behind the error that ended the block) is secondary.
        try:
            self._pipeline.sync()
        except psycopg.Error as exc:
            log.debug("pipeline_sync_failed_after_error", reason=type(exc).__name__)
        if not _exit_mode(conn, self._pipeline):
            conn.close()
        swallow = False
        if transaction is not None:
            swallow = bool(transaction.__exit__(et, ev, tb))
        conn._precog_busy = False
        return swallow


def _unleavable() -> psycopg.OperationalError:
    return psycopg.OperationalError("the pipeline could not be left: the connection was closed; the pool replaces it")


def _roll_back_failed(conn: Any) -> None:
    """After a failed sync: the transaction is aborted (or ended by a failed COMMIT); make it end."""
    if conn.pgconn.transaction_status != _IDLE:
        try:
            conn.rollback()
        except psycopg.Error as exc:
            log.info("pipeline_rollback_failed", reason=type(exc).__name__)


# --- asyncio ------------------------------------------------------------------------------------
# The same two mechanisms, awaited. A ``commit=True`` block of `precog_db.aio` marks its connection
# with the block (``_precog_pending_begin``) instead of handing the cursor a reference: any I/O on
# the connection other than a pipelinable first statement (``copy``, ``stream``, a server cursor,
# ``cur.connection``'s own statements, ``transaction()``) goes through
# `precog_db._aconnection.PrecogAsyncConnection.wait`, which sends the block's BEGIN first.


class AsyncFirstStatementCursor(AsyncPrecogCursor):
    """The asyncio cursor of a ``commit=True`` block: its first statement carries the block's ``BEGIN``."""

    __slots__ = ()

    def _take_block(self) -> _Block | None:
        if self.closed:
            # A cursor kept from an ended block: refused before its connection's wait (which would
            # send the pending BEGIN of whoever borrows the connection now).
            raise psycopg.InterfaceError("the cursor is closed")
        conn: Any = self._conn
        block: _Block | None = conn._precog_pending_begin
        conn._precog_pending_begin = None
        return block

    async def _first(self, block: _Block, statement: PQGen[None]) -> None:
        """Run `_first_gen` (one write, one wait), leave pipeline mode, raise what went wrong."""
        conn: Any = self._conn
        conn._precog_busy = True  # cleared only when the pipeline is done or failed with a server error
        pipeline = AsyncQueueingPipeline(conn)
        refused: Exception | None = None
        synced: psycopg.Error | None = None
        try:
            async with conn.lock:
                refused = await conn.wait(_first_gen(conn, block, pipeline, AsyncTransaction(conn), statement))
        except psycopg.Error as exc:
            synced = exc
        left = _exit_mode(conn, pipeline)
        if not left:
            await conn.close()
        _outcome(conn, refused, synced, left)

    async def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Any:
        block = self._take_block()
        if block is not None:
            if SUPPORTED and _pipelinable(query, params):
                await self._first(block, self._execute_gen(query, params, prepare=prepare, binary=binary))
                return self
            self._conn._precog_pending_begin = block  # sent before the statement
        return await super().execute(query, params, prepare=prepare, binary=binary)

    async def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        block = self._take_block()
        if block is not None:
            if SUPPORTED and _pipelinable(query, ()):
                await self._first(block, self._executemany_gen_pipeline(query, params_seq, returning))
                return
            self._conn._precog_pending_begin = block
        await super().executemany(query, params_seq, returning=returning)


async def abegin_pending(conn: AsyncConnection[Any], block: _Block) -> None:
    """Send ``block``'s ``BEGIN READ WRITE`` on its own (one round trip); the caller holds ``conn.lock``."""
    transaction = AsyncTransaction(conn)
    await conn.wait(transaction._enter_gen())  # what __aenter__ does, without taking the lock again
    block._transaction = transaction


class AsyncPipelinedBlock:
    """`PipelinedBlock` for `precog_db.aio`: BEGIN, statements and COMMIT, one sync, awaited."""

    __slots__ = ("_conn", "_pipeline", "transaction")

    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn
        self._pipeline = AsyncQueueingPipeline(conn)
        self.transaction: AsyncTransaction | None = None

    async def start(self) -> None:
        """Enter pipeline mode and queue ``BEGIN READ WRITE`` (nothing is sent)."""
        conn: Any = self._conn
        conn._precog_busy = True  # until the block's end collected every result
        await self._pipeline.__aenter__()
        conn._pipeline = self._pipeline
        transaction = AsyncTransaction(conn)
        await transaction.__aenter__()  # buffered
        self.transaction = transaction

    async def finish(self, et: type[BaseException] | None, ev: BaseException | None, tb: Any) -> bool:
        """As `PipelinedBlock.finish`: commit in the same sync, or roll everything back."""
        conn: Any = self._conn
        transaction, self.transaction = self.transaction, None
        conn._precog_busy = True
        if et is None and transaction is not None:
            error: psycopg.Error | None = None
            try:
                await transaction.__aexit__(None, None, None)  # COMMIT, buffered behind the statements
                await self._pipeline.sync()
            except psycopg.Error as exc:
                error = exc
            if not _exit_mode(conn, self._pipeline):
                await conn.close()
                error = error or _unleavable()
            if error is not None:
                conn._prepared.dirty = True
            if error is not None and not (conn.broken or conn.closed):
                await _aroll_back_failed(conn)
            conn._precog_busy = False
            if error is not None:
                raise error
            return False
        try:
            await self._pipeline.sync()
        except psycopg.Error as exc:
            log.debug("pipeline_sync_failed_after_error", reason=type(exc).__name__)
        if not _exit_mode(conn, self._pipeline):
            await conn.close()
        swallow = False
        if transaction is not None:
            swallow = bool(await transaction.__aexit__(et, ev, tb))
        conn._precog_busy = False
        return swallow


async def _aroll_back_failed(conn: Any) -> None:
    if conn.pgconn.transaction_status != _IDLE:
        try:
            await conn.rollback()
        except psycopg.Error as exc:
            log.info("pipeline_rollback_failed", reason=type(exc).__name__)
