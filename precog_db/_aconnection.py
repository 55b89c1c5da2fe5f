"""The chokepoint's asyncio door: every asyncio connection precog_db opens is opened here.

The twin of `precog_db.connection.connect` / `prepare` / `PrecogConnection`,
and nothing more: it runs the same `check_target` (naming rule, gate,
production guard: no I/O) before connecting, arms the same reply bound
(`arm`, `_bounded`) and verifies the identity stamp with the same steps and the
same decision (`precog_db.stamp.averify_stamp`). Only the awaits differ
(docs/DESIGN.md, "Sync and async from one source").
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from precog_db._pipeline_async import begin_pending
from precog_db._stamp_check import averify_stamp
from precog_db.connection import (
    BoundedConnection,
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
from precog_db.settings import DatabaseSettings

__all__ = ["PrecogAsyncConnection", "aconnect", "aprepare"]

_ACTIVE = TransactionStatus.ACTIVE


class PrecogAsyncConnection(BoundedConnection, AsyncConnection[Any]):
    """An asyncio psycopg connection with the reply bound, whose cancelled statement is cancelled on the server.

    `reply_timeout` works as on `precog_db.connection.PrecogConnection` (the
    same `_bounded` relay and message). A task cancelled while a statement
    runs sends a cancel request to the server and waits (briefly) for the
    statement to end, as psycopg does from 3.3; if the statement is still
    running afterwards, the connection is closed rather than left busy.

    It is also where a ``commit=True`` block's deferred ``BEGIN`` is sent when
    the first thing run on the connection is not the cursor's pipelined first
    statement (``copy``, ``stream``, a statement through ``cur.connection``).
    """

    #: A ``commit=True`` block of `precog_db.aio` whose ``BEGIN`` is not sent yet: it waits for the
    #: block's first statement (`precog_db._pipelining`); any other I/O first sends it here.
    _precog_pending_begin: Any = None

    async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        block = self._precog_pending_begin
        if block is not None:
            self._precog_pending_begin = None
            try:
                await begin_pending(self, block)  # BEGIN READ WRITE on its own, then what was asked
            except BaseException:
                # Cut short (a cancellation, a lost server): a transaction psycopg counts may be half
                # entered. Close, so that the caller's own transaction() sees a dead connection and
                # re-raises the cancellation itself, and the pool replaces the connection.
                self._precog_busy = True
                await self.close()
                raise
        limit = self.reply_timeout
        try:
            if limit is None:
                return await super().wait(gen, *args, **kwargs)
            return await super().wait(_bounded(gen, self.pgconn, limit), *args, **kwargs)
        except _Silent as silent:
            waited = silent.waited
        except asyncio.CancelledError:
            if self.pgconn.transaction_status == _ACTIVE:
                # psycopg before 3.3 does not cancel on the server by itself.
                try:
                    await self.cancel_safe(timeout=5.0)
                finally:
                    await self.close()
            raise
        await self.close()
        raise silent_error(self.description, waited)


async def aprepare(
    conn: AsyncConnection[Any], settings: DatabaseSettings, *, verify: bool = True, quiet: bool = False
) -> None:
    """`precog_db.connection.prepare` for an asyncio connection: arm the reply bound, verify the stamp."""
    arm(conn, settings)
    if not verify:
        return
    try:
        await averify_stamp(settings, conn, quiet=quiet)
    except BaseException:
        await conn.close()
        raise


async def aconnect(
    settings: DatabaseSettings,
    *,
    operation: str,
    prod_confirmed: bool | None = None,
    verify: bool = True,
    autocommit: bool = True,
    direct: bool = False,
) -> PrecogAsyncConnection:
    """`precog_db.connection.connect` for asyncio: every check, then one connection, or raise.

    The same arguments, credentials (`connection_kwargs`, resolved now) and
    pooler rules (``direct``, no prepared statements behind a transaction-mode pooler).
    """
    if direct:
        settings = direct_settings(settings, operation=operation)
    check_target(settings, operation=operation, prod_confirmed=prod_confirmed)
    prepare_threshold = None if settings.pooler == "transaction" else 5
    # Resolved before the try: a provider's DatabaseUnavailableError is an OperationalError, and is not
    # a server that cannot be reached (it must not be wrapped as one).
    kwargs = connection_kwargs(settings)
    try:
        conn = await PrecogAsyncConnection.connect(**kwargs, autocommit=autocommit, prepare_threshold=prepare_threshold)
    except psycopg.OperationalError as exc:
        detail = failure_reason(exc, settings)
    else:
        await aprepare(conn, settings, verify=verify)
        return conn
    raise unavailable_error(settings, detail)  # outside the except block: see connection.connect
