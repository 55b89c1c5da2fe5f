"""The I/O of `precog_db._pipelining`, written once: this asyncio source generates `precog_db._pipeline_sync`.

Both layers run the same code (docs/DESIGN.md, "Sync and async from one
source"): `AsyncFirstStatementCursor` / `FirstStatementCursor`,
`AsyncPipelinedBlock` / `PipelinedBlock`, `AsyncQueueingPipeline` /
`QueueingPipeline`, and `begin_pending`, which a connection's ``wait``
(`precog_db._connection_async`) calls to send a ``commit=True`` block's
deferred ``BEGIN`` before any other I/O. The decisions and the psycopg
generators they drive are in `precog_db._pipeline_base` (no I/O).

The deferred BEGIN has one design in both layers: a ``commit=True`` block
marks its connection with itself (``conn._precog.pending_begin``); the
block's cursor takes the mark on its first statement, and sends it with the
statement in one pipeline when it can; anything else (a statement that cannot
be pipelined, ``copy``, ``stream``, a server cursor, whatever runs through
``cur.connection``) reaches the connection's ``wait``, which sends the BEGIN
on its own first.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import AsyncConnection, AsyncPipeline, AsyncTransaction
from psycopg.abc import PQGen

from precog_db._conn_state import ConnState
from precog_db._pipeline_base import SUPPORTED, Block, Queueing, exit_mode, first_gen, idle, outcome, pipelinable
from precog_db._pipeline_base import unleavable as _unleavable
from precog_db._session_async import AsyncPrecogCursor
from precog_db.log import get_logger

log = get_logger()


class AsyncQueueingPipeline(Queueing, AsyncPipeline):
    """psycopg's pipeline with its I/O in one place (`precog_db._pipeline_base.Queueing`)."""


class AsyncFirstStatementCursor(AsyncPrecogCursor):
    """The cursor of a ``commit=True`` block: its first statement carries the block's ``BEGIN``."""

    __slots__ = ()
    #: False behind a transaction-mode pooler: ``prepare=True`` is ignored there, as `PoolerCursor` does.
    _PREPARE = True

    def _take_block(self) -> Block | None:
        if self._closed:
            # A cursor kept from an ended block: refused before its connection's wait (which would
            # send the pending BEGIN of whoever borrows the connection now).
            raise psycopg.InterfaceError("the cursor is closed")
        st: ConnState = self._conn._precog
        block: Block | None = st.pending_begin
        st.pending_begin = None
        return block

    async def _first(self, block: Block, statement: PQGen[None]) -> None:
        """Run `first_gen` (one write, one wait), leave pipeline mode, raise what went wrong."""
        conn: Any = self._conn
        conn._precog.busy = True  # cleared only when the pipeline is done or failed with a server error
        pipeline = AsyncQueueingPipeline(conn)
        refused: Exception | None = None
        synced: psycopg.Error | None = None
        try:
            async with conn.lock:
                refused = await conn.wait(first_gen(conn, block, pipeline, AsyncTransaction(conn), statement))
        except psycopg.Error as exc:
            synced = exc
        left = exit_mode(conn, pipeline)
        if not left:
            await conn.close()
        outcome(conn, refused, synced, left)

    async def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Any:
        block = self._take_block()
        if block is not None:
            if SUPPORTED and pipelinable(query, params):
                await self._first(
                    block, self._execute_gen(query, params, prepare=prepare if self._PREPARE else False, binary=binary)
                )
                return self
            self._conn._precog.pending_begin = block  # the wait sends it first
        return await super().execute(query, params, prepare=prepare, binary=binary)

    async def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        block = self._take_block()
        if block is not None:
            if SUPPORTED and pipelinable(query, ()):
                # psycopg runs executemany in a pipeline of its own; here it rides ours.
                await self._first(block, self._executemany_gen_pipeline(query, params_seq, returning))
                return
            self._conn._precog.pending_begin = block
        await super().executemany(query, params_seq, returning=returning)


async def begin_pending(conn: AsyncConnection[Any], block: Block) -> None:
    """Send ``block``'s ``BEGIN READ WRITE`` on its own (one round trip); the caller holds ``conn.lock``."""
    transaction = AsyncTransaction(conn)
    await conn.wait(transaction._enter_gen())  # what __enter__ does, without taking the lock again
    block._transaction = transaction


class AsyncPipelinedBlock:
    """The pipeline of a ``get_cursor(commit=True, pipeline=True)`` block: BEGIN, statements and COMMIT, one sync."""

    __slots__ = ("_conn", "_pipeline", "transaction")

    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn
        self._pipeline = AsyncQueueingPipeline(conn)
        self.transaction: AsyncTransaction | None = None

    async def start(self) -> None:
        """Enter pipeline mode and queue ``BEGIN READ WRITE`` (nothing is sent)."""
        conn: Any = self._conn
        conn._precog.busy = True  # until the block's end collected every result
        await self._pipeline.__aenter__()
        conn._pipeline = self._pipeline
        transaction = AsyncTransaction(conn)
        await transaction.__aenter__()  # buffered
        self.transaction = transaction

    async def finish(self, et: type[BaseException] | None, ev: BaseException | None, tb: Any) -> bool:
        """End the block: commit in the same sync when it ended cleanly, else roll everything back.

        Returns True when the exception ``ev`` is to be swallowed (``psycopg.Rollback``).
        A server error found at the sync is raised after the transaction was rolled back.
        """
        conn: Any = self._conn
        st: ConnState = conn._precog
        transaction, self.transaction = self.transaction, None
        st.busy = True  # cleared only once every result is collected (or a server error ended it)
        if et is None and transaction is not None:
            error: psycopg.Error | None = None
            try:
                await transaction.__aexit__(None, None, None)  # COMMIT, buffered behind the statements
                await self._pipeline.sync()  # one write, one wait for the whole block
            except psycopg.Error as exc:
                error = exc
            if not exit_mode(conn, self._pipeline):
                await conn.close()
                error = error or _unleavable()
            if error is not None:
                conn._prepared.dirty = True  # see outcome(): the return resets the session
            if error is not None and not (conn.broken or conn.closed):
                await _roll_back_failed(conn)
            st.busy = False
            if error is not None:
                raise error  # the caller tells a lost COMMIT apart
            return False
        # The block raised: sync what was queued, then roll back outside pipeline mode. The
        # block's own exception propagates; what the sync reports (typically "pipeline
        # aborted" behind the error that ended the block) is secondary.
        try:
            await self._pipeline.sync()
        except psycopg.Error as exc:
            log.debug("pipeline_sync_failed_after_error", reason=type(exc).__name__)
        if not exit_mode(conn, self._pipeline):
            await conn.close()
        swallow = False
        if transaction is not None:
            swallow = bool(await transaction.__aexit__(et, ev, tb))
        st.busy = False
        return swallow


async def _roll_back_failed(conn: Any) -> None:
    """After a failed sync: the transaction is aborted (or ended by a failed COMMIT); make it end."""
    if not idle(conn):
        try:
            await conn.rollback()
        except psycopg.Error as exc:
            log.info("pipeline_rollback_failed", reason=type(exc).__name__)
