"""The pool's cursors behind a transaction-mode pooler (``DB_POOLER=transaction``), for both layers.

The asyncio source; `precog_db._pooler_sync` is generated from it
(tools/async_to_sync.py). The rules are `precog_db.topology`'s (docs/TOPOLOGY.md):

* `AsyncPoolerCursor` (sync: `PoolerCursor`) keeps the read-only default per
  transaction: a statement outside a transaction is sent as ``BEGIN READ
  ONLY`` / the statement / ``ROLLBACK`` in one pipeline (one round trip, ended
  by a Sync alone), so whatever session state it set is undone before PgBouncer
  hands the server connection to another client; it is never prepared; ``COPY``
  and ``stream`` outside a transaction get their own read-only transaction;
* `AsyncPoolerFirstStatementCursor` (sync: `PoolerFirstStatementCursor`) is a
  ``commit=True`` block's cursor: the block's ``BEGIN`` travels with the first
  statement (`precog_db._pipelining`), which is judged like any other.

Session-state statements are refused before they are sent by the connection's
classifier (`precog_db.session._mark`), since the pool adopts its connections
with ``shared=True``; that also keeps the pool's return path from sending
``DISCARD ALL`` (`precog_db.session._restore_gen`), in both layers.

What differs between the layers is one thing, written below as an ``if True:  #
ASYNC`` branch: a ``commit=True`` block of `precog_db.aio` defers its ``BEGIN``
on the connection (``_precog.pending_begin``) until the first I/O, so a pending
``BEGIN`` means the statement runs inside the block's transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from precog_db._conn_state import ConnState
from precog_db._pipelining import AsyncFirstStatementCursor, AsyncQueueingPipeline, _exit_mode
from precog_db.session import AsyncPrecogCursor, _forgot_commit

_IDLE = TransactionStatus.IDLE
_BEGIN = b"BEGIN READ ONLY"
_END = b"ROLLBACK"


class AsyncPoolerCursor(AsyncPrecogCursor):
    """The pool's cursor behind a transaction-mode pooler: read-only per transaction, no session state."""

    __slots__ = ()

    def _outside_transaction(self) -> bool:
        conn: Any = self._conn
        # A commit=True block whose BEGIN is deferred: the connection's wait sends that BEGIN READ WRITE
        # before this statement (precog_db._connection_async), so it runs inside.
        if conn._precog.pending_begin is not None:
            return False
        # A transaction() entered in pipeline mode has its BEGIN queued, not yet sent: inside all the same.
        # (Only in pipeline mode: after an explicit COMMIT statement psycopg still counts the transaction.)
        return (
            bool(conn._autocommit)
            and conn.pgconn.transaction_status == _IDLE
            and not (conn._num_transactions and conn._pipeline is not None)
        )

    async def _plain(self, command: bytes) -> None:
        """One of the wrapper's own commands: no cursor (nothing to judge), queued in pipeline mode."""
        conn: Any = self._conn
        async with conn.lock:
            await conn.wait(conn._exec_command(command))

    async def _end(self) -> None:
        """End the read-only transaction this cursor opened, whatever state it is in (a ROLLBACK)."""
        conn: Any = self._conn
        if conn.closed or conn.pgconn.transaction_status == _IDLE or conn._pipeline is not None:
            return  # nothing open, or the user's own pipeline, which ends it when it exits
        try:
            await self._plain(_END)
        except psycopg.Error:
            await conn.close()

    @asynccontextmanager
    async def _pipeline(self) -> AsyncIterator[Any]:
        """A pipeline that reads nothing before its one sync (`precog_db._pipelining`'s), or the borrower's own, nested.

        With psycopg's own pipeline a server error could be read while statements were still
        queued and raised inside the block; its exit then logged "error ignored terminating
        <psycopg.Pipeline>" (21.13). That exit also sends a Flush after the Sync which, reaching
        PgBouncer once it has handed the server connection back, can pin that connection to this
        client (other clients then wait out query_wait_timeout): here the block ends with the Sync
        alone, as `precog_db._pipelining`'s blocks do.
        """
        conn: Any = self._conn
        if conn._pipeline is not None:
            async with conn.pipeline() as nested:
                yield nested
            return
        pipeline = AsyncQueueingPipeline(conn)
        await pipeline.__aenter__()  # libpq enters pipeline mode: nothing is sent
        conn._pipeline = pipeline
        try:
            try:
                yield pipeline
            except BaseException:
                with suppress(psycopg.Error):  # what was queued before the block failed (its BEGIN)
                    await pipeline.sync()
                raise
            await pipeline.sync()  # one write, one wait: the server's error, if any, is raised here
        finally:
            if not _exit_mode(conn, pipeline):
                await conn.close()

    async def _read_only(self, run: partial[Any]) -> None:
        """Run one statement as BEGIN READ ONLY / statement / ROLLBACK, pipelined: one round trip."""
        conn: Any = self._conn
        st: ConnState = conn._precog
        st.busy = True
        try:
            async with self._pipeline():
                await self._plain(_BEGIN)
                await run()
                await self._plain(_END)
        except psycopg.errors.ReadOnlySqlTransaction as exc:
            await self._end()
            st.busy = False
            error = _forgot_commit(conn, exc)
            if error is exc:
                raise
        except psycopg.Error:  # the server's error, or SessionStateError before anything was sent
            await self._end()
            st.busy = False
            raise
        except BaseException:
            await self._end()  # an interrupt or a cancellation: _precog.busy stays set, the pool closes it
            raise
        else:
            st.busy = False
            return
        raise error.with_traceback(None)

    async def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Any:
        if not self._outside_transaction():
            return await super().execute(query, params, prepare=False, binary=binary)
        await self._read_only(partial(AsyncPrecogCursor.execute, self, query, params, prepare=False, binary=binary))
        return self

    async def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        if not self._outside_transaction():
            return await super().executemany(query, params_seq, returning=returning)
        await self._read_only(partial(AsyncPrecogCursor.executemany, self, query, params_seq, returning=returning))
        return None

    @asynccontextmanager
    async def copy(self, statement: Any, params: Any = None, *, writer: Any = None) -> AsyncIterator[Any]:
        """COPY outside a transaction runs in its own read-only transaction (two more round trips)."""
        if not self._outside_transaction():
            async with super().copy(statement, params, writer=writer) as copy:
                yield copy
            return
        await self._plain(_BEGIN)
        try:
            async with super().copy(statement, params, writer=writer) as copy:
                yield copy
        except psycopg.errors.ReadOnlySqlTransaction as exc:
            await self._end()  # the read-only transaction is this cursor's: once it is over, say what to do
            if (error := _forgot_commit(self._conn, exc)) is exc:
                raise
        except BaseException:
            await self._end()
            raise
        else:
            await self._end()
            return
        raise error.with_traceback(None)

    async def stream(
        self, query: Any, params: Any = None, *, binary: bool | None = None, size: int = 1
    ) -> AsyncIterator[Any]:
        """A streamed query outside a transaction runs in its own read-only transaction.

        psycopg's generator is closed before the transaction ends: a consumer that stops early
        leaves it mid-result, and closing it consumes the rest.
        """
        outside = self._outside_transaction()
        if outside:
            await self._plain(_BEGIN)
        records: Any = super().stream(query, params, binary=binary, size=size)
        try:
            # An async generator has no `yield from`; ruff asks for one in the generated sync twin.
            async for record in records:  # noqa: RUF100, UP028
                yield record
        finally:
            try:
                await records.aclose()
            finally:
                if outside:
                    await self._end()


class AsyncPoolerFirstStatementCursor(AsyncFirstStatementCursor, AsyncPoolerCursor):
    """A ``commit=True`` block's cursor behind a transaction-mode pooler: BEGIN with the first statement.

    The first statement is converted like the pooler cursor's (a session-state statement is refused
    before anything is sent) and never prepared (the connection's prepared-statement manager
    ignores ``prepare=True`` on a shared session), then queued behind the block's BEGIN.
    """

    __slots__ = ()
    _PREPARE = False
