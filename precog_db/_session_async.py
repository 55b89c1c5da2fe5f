"""The I/O of `precog_db.session`, written once: this asyncio source generates `precog_db._session_sync`.

The pool's cursors (`AsyncPrecogCursor`, `AsyncPrecogServerCursor`; sync:
`PrecogCursor`, `PrecogServerCursor`) and `restore`, which brings a returned
connection back to its baseline. What they decide is in
`precog_db._session_base` (no I/O); `precog_db.session` explains the borrower
isolation and re-exports the sync names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection

from precog_db._conn_state import ConnState
from precog_db._session_base import (
    AsyncReconfigure,
    RestoreFailed,
    _DeclareMarking,
    _Marking,
    _statement_failed,
    restore_gen,
    settled,
)


class AsyncPrecogCursor(_Marking, psycopg.AsyncCursor[Any]):
    """The pool's client-side cursor: marks the connection dirty before a session-changing statement is sent.

    ``_precog.busy`` stays set if something other than a server error (an
    interrupt raised by a signal handler, a cancelled task) ends a statement
    half-way: psycopg's own bookkeeping (its prepared-statement cache) may then
    disagree with the server, so checkin closes that connection instead of lending it again.
    """

    __slots__ = ()

    async def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Any:
        conn: Any = self._conn
        st: ConnState = conn._precog  # the connection was adopted (`precog_db.session.adopt`)
        st.busy = True
        try:
            rv = await super().execute(query, params, prepare=prepare, binary=binary)
        except psycopg.Error as exc:
            if (error := _statement_failed(conn, exc)) is exc:
                raise
        else:
            st.busy = False
            return rv
        raise error.with_traceback(None)

    async def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        conn: Any = self._conn
        st: ConnState = conn._precog  # the connection was adopted (`precog_db.session.adopt`)
        st.busy = True
        try:
            await super().executemany(query, params_seq, returning=returning)
        except psycopg.Error as exc:
            if (error := _statement_failed(conn, exc)) is exc:
                raise
        else:
            st.busy = False
            return
        raise error.with_traceback(None)

    @asynccontextmanager
    async def copy(self, statement: Any, params: Any = None, *, writer: Any = None) -> AsyncIterator[Any]:
        """``COPY … FROM`` refused by the read-only default says what to do, like `execute` (21.7)."""
        try:
            async with super().copy(statement, params, writer=writer) as copy:
                yield copy
        except psycopg.errors.ReadOnlySqlTransaction as exc:
            if (error := _statement_failed(self._conn, exc)) is exc:
                raise
            raise error.with_traceback(None) from None


class AsyncPrecogServerCursor(_DeclareMarking, _Marking, psycopg.AsyncServerCursor[Any]):
    """The pool's named cursor: its ``DECLARE`` is judged like any statement (``WITH HOLD`` marks the session)."""

    __slots__ = ()


async def restore(conn: AsyncConnection[Any], reconfigure: AsyncReconfigure | None = None) -> None:
    """Bring a returned connection back to its baseline, or raise (the caller then closes it).

    Costs a round trip only when needed: a ROLLBACK for an open transaction, one
    ``DISCARD ALL`` (then ``reconfigure``, the user's own setup) if the session
    may have changed. Everything it decides is `restore_gen`, run through the
    connection's own ``wait``.
    """
    if conn.lock.locked():
        # Still in use: a stream() its borrower kept half-read (psycopg holds the lock between rows), or
        # another thread. Waiting for the lock would never end; the caller closes the connection.
        raise RestoreFailed("the connection is still in use (a stream kept half-read, or another thread)")
    async with conn.lock:
        discarded = await conn.wait(restore_gen(conn))
    if discarded:
        if reconfigure is not None:
            await reconfigure(conn)
        settled(conn)
