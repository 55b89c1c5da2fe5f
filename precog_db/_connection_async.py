"""The chokepoint's I/O, written once: this asyncio source generates `precog_db._connection_sync`.

`connect`, `prepare` and the connection class of each layer
(`AsyncPrecogConnection` here, `PrecogConnection` in the generated module):
the same `check_target` (naming rule, gate, production guard: no I/O, in
`precog_db._chokepoint`) before connecting, the same reply bound (`arm`,
`_bounded`) and the same identity stamp verification (`verify_stamp`) after.
`precog_db.connection` re-exports the sync names and explains the chokepoint;
`precog_db.aio` exports `AsyncPrecogConnection` (docs/DESIGN.md, "Sync and
async from one source").
"""

from __future__ import annotations

import asyncio  # ASYNC-ONLY
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from precog_db._chokepoint import (
    BoundedConnection,
    Pin,
    _bounded,
    _Silent,
    arm,
    check_target,
    connection_kwargs,
    direct_settings,
    failure_reason,
    silent_error,
    unavailable_error,
)
from precog_db._conn_state import ConnState
from precog_db._pipeline_async import begin_pending
from precog_db._stamp_async import verify_stamp
from precog_db.settings import DatabaseSettings

if True:  # ASYNC

    def _cancelled_meanwhile() -> bool:
        """The running task was asked to cancel while it waited on the server.

        psycopg 3.3.0 takes a ``CancelledError`` in, tries to cancel the statement on the server
        and, when that fails (a server that went silent), ends with a psycopg error or the reply
        bound's, swallowing the cancellation (later 3.3 releases re-raise it). The cancellation
        must reach the caller: it is raised again here.
        """
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0


class AsyncPrecogConnection(BoundedConnection, AsyncConnection[Any]):
    """A psycopg connection that does not wait forever for a server that went silent.

    `reply_timeout` (set by `prepare` from the settings, see
    `precog_db.connection.reply_timeout`) bounds how long a statement in
    progress may go without a byte from the server. When it expires the
    connection is closed and `ConnectionLostError` raised; the pool replaces
    the connection. Set ``conn.reply_timeout = None`` on a connection from
    ``get_connection`` before lifting ``statement_timeout`` for a deliberately
    long statement.

    Its ``wait`` is also where a ``commit=True`` block's deferred ``BEGIN`` is
    sent when the first thing run on the connection is not the block cursor's
    pipelined first statement (``copy``, ``stream``, a statement through
    ``cur.connection``; `precog_db._pipelining`). In the asyncio layer a task
    cancelled while a statement runs (in the sync layer: a signal handler raising
    while it waits) sends a cancel request to the server and waits (briefly)
    for the statement to end, and the connection is closed rather than left
    busy.
    """

    #: precog_db's state of this connection (`precog_db._conn_state`), here from construction; its
    #: ``pending_begin`` is a ``commit=True`` block whose ``BEGIN`` is not sent yet: it waits for the
    #: block's first statement (`precog_db._pipelining`); any other I/O sends it here first.
    _precog: ConnState

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._precog = ConnState()

    async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        st = self._precog
        block = st.pending_begin
        if block is not None:
            st.pending_begin = None
            try:
                await begin_pending(self, block)  # BEGIN READ WRITE on its own, then what was asked
            except BaseException:
                # Cut short (a cancellation, an interrupt, a lost server): a transaction psycopg counts
                # may be half entered. Close, so that the caller's own transaction() sees a dead
                # connection and re-raises the cancellation itself, and the pool replaces it.
                st.busy = True
                await self.close()
                raise
        limit = self.reply_timeout
        try:
            # The base class named, not super(): this runs for every statement (docs/PERFORMANCE.md).
            if limit is None:
                return await AsyncConnection.wait(self, gen, *args, **kwargs)
            return await AsyncConnection.wait(self, _bounded(gen, self.pgconn, limit), *args, **kwargs)
        except _Silent as silent:
            waited = silent.waited
        except psycopg.Error:
            if True:  # ASYNC
                if _cancelled_meanwhile():
                    await self.close()  # psycopg took the cancellation in and answered with an error
                    raise asyncio.CancelledError() from None
            raise  # the server's answer (or psycopg's): the statement is over
        except BaseException:
            # An interrupt: a task's cancellation, or whatever a signal handler raised (a job timeout,
            # KeyboardInterrupt). The statement must not run on after its caller gave up.
            await self._cancel_on_server()
            raise
        # Outside the except block: the half-finished statement leaves the
        # protocol out of step, so the connection cannot be reused.
        await self.close()
        if True:  # ASYNC
            if _cancelled_meanwhile():
                raise asyncio.CancelledError()
        raise silent_error(self.description, waited)

    async def _cancel_on_server(self) -> None:
        """After an interrupted wait: cancel a statement still running on the server, then close.

        psycopg does it itself for ``KeyboardInterrupt`` (sync) and, from 3.3, for a cancelled task;
        not for what a signal handler raises, nor for a cancelled task before 3.3. The connection is
        closed either way: its protocol state is unknown, and the pool replaces it.
        """
        if self.pgconn.transaction_status == TransactionStatus.ACTIVE:
            try:
                await self.cancel_safe(timeout=5.0)
            finally:
                await self.close()


async def prepare(
    conn: AsyncConnection[Any], settings: DatabaseSettings, *, verify: bool = True, quiet: bool = False
) -> None:
    """The checks that need the fresh connection: arm the reply bound, then verify the identity stamp.

    ``verify`` False skips the stamp (only for `stamp_database`, which writes
    it, and for maintenance connections to a server's admin database).
    ``quiet`` suppresses the warnings an unstamped dev/test database or a
    same-environment copy log (the pool logs them once, at open). Closes the
    connection and re-raises if a check fails.
    """
    arm(conn, settings)
    if not verify:
        return
    try:
        await verify_stamp(settings, conn, quiet=quiet)
    except BaseException:
        await conn.close()
        raise


async def connect(
    settings: DatabaseSettings,
    *,
    operation: str,
    prod_confirmed: bool | None = None,
    verify: bool = True,
    autocommit: bool = True,
    direct: bool = False,
    pin: Pin | None = None,
) -> AsyncPrecogConnection:
    """Open one connection after every check (see `precog_db.connection`), or raise.

    ``direct`` True: to the database server itself even behind a pooler
    (`direct_settings`; migrations, backups, restores, the stamp). A server
    that cannot be reached raises `DatabaseUnavailableError` with libpq's
    reason (password scrubbed). The connection is autocommit unless told
    otherwise; the caller closes it. Behind a transaction-mode pooler it
    prepares no statement on the server (``prepare_threshold=None``).
    ``pin`` (`precog_db.connection.pin_target`) sends it to exactly that
    server, whatever ``settings``' host list or DNS say now.
    """
    if direct:
        settings = direct_settings(settings, operation=operation)
    check_target(settings, operation=operation, prod_confirmed=prod_confirmed)
    prepare_threshold = None if settings.pooler == "transaction" else 5
    # Resolved before the try: a provider's DatabaseUnavailableError is an OperationalError, and is not
    # a server that cannot be reached (it must not be wrapped as one).
    kwargs = connection_kwargs(settings)
    if pin is not None:
        kwargs.update(pin.params())
    try:
        conn = await AsyncPrecogConnection.connect(**kwargs, autocommit=autocommit, prepare_threshold=prepare_threshold)
    except psycopg.OperationalError as exc:
        detail = failure_reason(exc, settings)
    else:
        await prepare(conn, settings, verify=verify)
        return conn
    # Raised outside the except block on purpose: the psycopg error (and the
    # frames of psycopg's connect, whose locals hold the full conninfo with the
    # password) must not stay reachable as __context__ of what we raise.
    raise unavailable_error(settings, detail)
