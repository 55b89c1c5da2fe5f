"""The asyncio connection pool: `AsyncPrecogPool`, one per process, for `precog_db.aio`.

The twin of `precog_db.pool` built on `psycopg_pool.AsyncConnectionPool`, with
the same rules and the same shared, non-I/O pieces (`precog_db._pool_base`:
the `PoolBase` mixin, `connection_is_usable`, `checkin_verdict`,
`refuse_foreign`, `audited_open`; the `Registry` of `precog_db._pool_registry`;
`precog_db.session`): connections are autocommit and
read-only by default, every physical connection passes the chokepoint
(`check_target` before, `prepare` after), a checkout checks liveness without a
round trip, and a checkin costs no round trip unless the borrower changed the
session.

Cancellation (docs/DESIGN.md, "asyncio and cancellation"): asyncio delivers
it only where a coroutine suspends, so the pool's bookkeeping has no await in
it: taking an idle connection, handing one to a waiter (one
``Future.set_result``), putting one back are plain statements. A caller
queued for a connection waits on its own future; cancelled or timed out, it
leaves the queue, and a connection handed to it at that very moment goes
straight back: the cancellation is never swallowed (psycopg#1401, #1345) and
no connection is lost. The only awaits on the way back are the reset's
(ROLLBACK, DISCARD ALL); a cancellation there closes the connection, which a
worker replaces.

The psycopg_pool private names used here are declared, with the sync pool's, in
`precog_db._compat` (checked both ways by tests/test_compat.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from precog_db._compat import AsyncAddConnection as AddConnection
from precog_db._compat import AsyncMaintenanceTask as MaintenanceTask
from precog_db._compat import AsyncReturnConnection as ReturnConnection
from precog_db._compat import AsyncStopWorker as StopWorker
from precog_db._compat import AttemptWithBackoff
from precog_db._connection_async import AsyncPrecogConnection, connect, prepare
from precog_db._pool_base import (
    BAD,
    CLOSE,
    KEEP,
    RESET,
    PoolBase,
    audited_open,
    check_backoff,
    check_still_read_only,
    checkin_verdict,
    connection_is_usable,
    left_by_check,
    log_closed,
    log_opened,
    refuse_foreign,
)
from precog_db._pool_registry import Registry
from precog_db._session_async import restore
from precog_db.connection import check_gate
from precog_db.environment import Environment
from precog_db.errors import PoolStateError, PrecogDBError
from precog_db.guard import production_confirmed
from precog_db.log import get_logger, route_pool_logging
from precog_db.metrics import PoolRecorder, PoolState
from precog_db.session import RestoreFailed, adopt, baseline, mark_raw, needs_restore, user_setup
from precog_db.settings import DatabaseSettings, settings_for
from precog_db.topology import AsyncPoolerCursor, session_setup_sql

__all__ = ["AsyncPrecogPool", "active_pool", "close_pool", "create_pool", "get_pool", "initialize_pool"]

log = get_logger()

_OK = ConnStatus.OK
_IDLE = TransactionStatus.IDLE

AsyncConfigure = Callable[[AsyncConnection[Any]], Awaitable[None]]


class _Waiter:
    """A caller queued for a connection: psycopg_pool's ``WaitingClient`` interface over one future.

    Handing over is ``set_result`` on the future, with no await, so it either
    happens entirely or not at all; a caller that gave up (its future
    cancelled or done) is skipped.
    """

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[AsyncConnection[Any]] = asyncio.get_running_loop().create_future()

    async def set(self, conn: AsyncConnection[Any]) -> bool:
        return self.offer(conn)

    def offer(self, conn: AsyncConnection[Any]) -> bool:
        """Hand ``conn`` over; False if the caller already gave up or was served."""
        if self.future.done():
            return False
        self.future.set_result(conn)
        return True

    async def fail(self, error: BaseException) -> bool:
        if self.future.done():
            return False
        self.future.set_exception(error)
        return True


class AsyncPrecogPool(PoolBase, AsyncConnectionPool[AsyncConnection[Any]]):
    """A `psycopg_pool.AsyncConnectionPool` that knows its environment and settings.

    `lend` / `give_back` are what `precog_db.aio` uses (``getconn`` /
    ``putconn`` and ``connection()`` go through them too). Its `repr` shows only
    the pool name. ``check=``, ``reset=`` and ``configure=`` take an ``async def``,
    with the sync pool's meaning: ``check=`` is awaited on each connection `lend`
    hands out, after the zero-round-trip liveness check (a connection that fails it
    is replaced, with psycopg_pool's back-off between checks); ``reset=`` runs on
    each connection given back, after the library's own session reset, in a pool
    worker as psycopg_pool runs it; ``configure=`` runs after the library's setup.

    Topology: multi-host failover (several ``DB_HOST`` entries, the writer
    check on ``in_hot_standby``), a session-mode pooler (``DB_POOLER=session``),
    a transaction-mode pooler (``DB_POOLER=transaction``: `AsyncPoolerCursor`,
    the same source as the sync pool's `PoolerCursor`, and no ``DISCARD ALL``
    on return) and read replicas (``DB_REPLICA_HOSTS``,
    ``aio.get_cursor(replica=True)``: `precog_db._replicas_async` keeps their
    pools on this one, ``_precog_replicas``, and `close` closes them) work as
    in the sync pool (docs/TOPOLOGY.md).
    """

    _KIND = "AsyncPrecogPool"
    _API_HINT = "precog_db.aio.get_cursor()/get_pool()"
    #: One event loop: the retry counters need no lock.
    _retries_lock = contextlib.nullcontext()

    def __init__(self, settings: DatabaseSettings, *, prod_confirmed: bool | None = None, **pool_kwargs: Any) -> None:
        #: Behind a session-mode pooler, the SETs that replace the startup options (precog_db.topology).
        self._session_sql = session_setup_sql(settings)
        params = self._setup(settings, prod_confirmed, pool_kwargs, (AsyncPrecogConnection, AsyncPrecogConnection))
        #: What `precog_db.pool_metrics()` reports for this pool, under its name (``name=`` can set it).
        self.metrics = PoolRecorder(str(params["name"]), settings.env.value, self._metrics_state)
        # A callable: psycopg_pool calls it for every new connection, so the password is
        # resolved each time (DB_PASSWORD_FILE re-read, the provider called).
        super().__init__("", kwargs=self._connection_kwargs, **params)

    def _metrics_state(self) -> PoolState | None:
        """The pool's current state for `precog_db.metrics` (None when closed); read at snapshot time only."""
        if getattr(self, "_closed", True):  # closed, or still being constructed
            return None
        pending = sum(1 for w in self._waiting if not (isinstance(w, _Waiter) and w.future.done()))
        return self._state(len(self._pool), pending)

    async def _configure_connection(self, conn: AsyncConnection[Any]) -> None:
        await conn.set_read_only(False)  # explicit transactions are read-write
        self._refuse_standby(conn)  # a writer pool keeps no connection to a hot standby
        if self._session_sql is not None:
            await conn.execute(self._session_sql, prepare=False)
        await prepare(conn, self.settings, quiet=True)  # the chokepoint: reply bound, identity stamp
        if self.settings.pooler == "transaction":
            adopt(conn, AsyncPoolerCursor, shared=True)  # read-only per transaction, session state refused
        else:
            adopt(conn)
        if self._user_configure is not None:
            with user_setup(conn):
                await self._user_configure(conn)
            if conn.pgconn.transaction_status != _IDLE:
                await conn.rollback()
            check_still_read_only(conn)
            await conn.set_autocommit(True)
            await conn.set_read_only(False)
        baseline(conn)

    async def _reconfigure(self, conn: AsyncConnection[Any]) -> None:
        """After DISCARD ALL: the session setup behind a session pooler, then the caller's own."""
        if self._session_sql is not None:
            await conn.execute(self._session_sql, prepare=False)
        if self._user_configure is not None:
            with user_setup(conn):
                await self._user_configure(conn)

    async def _connect(self, timeout: float | None = None) -> AsyncConnection[Any]:
        started = monotonic()
        try:
            self._check_target(self.prod_confirmed)
            conn = await super()._connect(timeout)
        except (psycopg.Error, PrecogDBError) as exc:
            self._connect_failed(exc)
            raise
        self._connected(conn, started)
        return conn

    async def close(self, timeout: float = 5.0) -> None:
        """Close the pool and the pools of its read replicas (as `precog_db.pool.PrecogPool.close` does)."""
        await super().close(timeout=timeout)  # first: a replica pool opening meanwhile sees it closed
        for replica in getattr(self, "_precog_replicas", None) or ():
            if replica.pool is not None:
                with contextlib.suppress(Exception):
                    await replica.pool.close(timeout=1.0)

    @classmethod
    async def worker(cls, q: asyncio.Queue[MaintenanceTask]) -> None:
        """psycopg_pool's maintenance worker, which ends when its task is cancelled.

        psycopg_pool's own catches ``CancelledError`` around each maintenance
        task (and ``_add_connection`` retries a connection attempt it cut short),
        so a worker cancelled while it connects goes back to waiting for the
        next task: ``asyncio.run`` (and pytest-asyncio's loop teardown), which
        cancel every task left and wait for them to end, then never return when
        the pool was not closed (issue 21.14). Here a cancellation ends the
        worker, whether it propagates or the task swallowed it.
        """
        while True:
            task = await q.get()  # a cancellation here propagates
            if isinstance(task, StopWorker):
                return
            try:
                await task.run()
            except Exception as exc:
                log.warning("pool_task_failed", task=type(task).__name__, reason=type(exc).__name__)
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                return  # cancelled while running the task, which swallowed it

    async def schedule_task(self, task: MaintenanceTask, delay: float) -> None:
        if isinstance(task, AddConnection):  # only a retry of a failed attempt is scheduled
            self._retry_scheduled()
        await super().schedule_task(task, delay)

    async def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        if attempt is not None:
            self._retry_started(attempt)
        await super()._add_connection(attempt, growing=growing)

    # --- lending ---------------------------------------------------------------------------------

    async def getconn(self, timeout: float | None = None) -> AsyncConnection[Any]:
        """psycopg_pool's checkout, served by `lend`: the raw connection is lent (`mark_raw`)."""
        conn = await self.lend(timeout)
        mark_raw(conn)  # statements may run unseen: its return always restores the session
        return conn

    async def putconn(self, conn: AsyncConnection[Any]) -> None:
        """psycopg_pool's checkin, served by `give_back` (its ``usage_ms`` is psycopg_pool's ``connection()``'s)."""
        await self.give_back(conn, usage=False)

    def _take_idle(self) -> AsyncConnection[Any] | None:
        """A live idle connection (the most recently returned), or None; dead ones go to be replaced. No await."""
        idle = self._pool
        while idle and not self._closed:
            conn = idle.pop()
            if len(idle) < self._nconns_min:  # psycopg_pool's low-water mark for max_idle shrinking
                self._nconns_min = len(idle)
            if connection_is_usable(conn):
                conn._pool = self
                return conn
            self._replace(conn, self._CONNECTIONS_LOST)
        return None

    async def lend(self, timeout: float | None = None) -> AsyncConnection[Any]:
        """A live, idle, autocommit connection; give it back with `give_back`.

        Bounded by ``timeout`` (default ``DB_POOL_TIMEOUT``) and by any
        cancellation: a cancelled or timed-out caller leaves the queue at once,
        and a connection handed to it at that moment goes back to the pool.
        With a ``check=`` callback, each connection is checked before it is
        lent (`_passes_check`), with the sync pool's back-off between failed checks.
        """
        if self.pid != os.getpid():
            raise self._inherited_through_fork()
        check_gate(self.settings.env)
        self._stats[self._REQUESTS_NUM] += 1
        conn = self._take_idle()
        if conn is not None and self._check is None:
            conn._precog.lent = monotonic()  # type: ignore[attr-defined]  # for the metrics (give_back)
            return conn
        wait = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        requested = monotonic()
        rejected: list[BaseException] = []  # what the check= callback raised, this call
        attempt: AttemptWithBackoff | None = None
        while True:
            waited = conn is None
            if conn is None:
                conn = await self._lend_waiting(deadline, wait, rejected)
            if self._check is None or await self._passes_check(conn, rejected):
                if waited:
                    return self._lent_after_wait(conn, requested)
                conn._precog.lent = requested  # type: ignore[attr-defined]
                return conn
            # The check failed (the connection is being replaced): back off as psycopg_pool's getconn does.
            try:
                attempt, pause = check_backoff(attempt, requested + wait, monotonic())
            except PoolTimeout:
                self.metrics.timed_out()
                raise self._check_rejected(wait, rejected) from None
            if pause > 0:
                await asyncio.sleep(pause)  # holding no connection: a cancellation here loses nothing
            conn = self._take_idle()

    async def _lend_waiting(self, deadline: float, wait: float, rejected: list[BaseException]) -> AsyncConnection[Any]:
        """The slow path of `lend`: the first idle connection, or a place in the queue (first come, first served)."""
        loop = asyncio.get_running_loop()
        while True:
            self._check_open_getconn()
            conn = self._take_idle()
            if conn is not None:
                return conn
            if self.max_waiting and len(self._waiting) >= self.max_waiting:
                self._stats[self._REQUESTS_ERRORS] += 1
                raise TooManyRequests(f"the pool {self.name!r} has already {len(self._waiting)} requests waiting")
            waiter = _Waiter()
            self._waiting.append(waiter)  # type: ignore[arg-type]
            self._stats[self._REQUESTS_QUEUED] += 1
            self._maybe_grow_pool()
            started = loop.time()
            try:
                async with asyncio.timeout_at(deadline):
                    conn = await waiter.future
            except BaseException as exc:
                self._give_up(waiter)
                if isinstance(exc, TimeoutError) and loop.time() >= deadline:
                    self.metrics.timed_out()
                    raise (self._check_rejected(wait, rejected) if rejected else self._timed_out(wait)) from None
                raise
            finally:
                self._stats[self._REQUESTS_WAIT_MS] += int(1000.0 * (loop.time() - started))
            if connection_is_usable(conn):
                conn._pool = self
                return conn
            self._replace(conn, self._CONNECTIONS_LOST)

    async def _passes_check(self, conn: AsyncConnection[Any], rejected: list[BaseException]) -> bool:
        """Await psycopg_pool's ``check=`` callback on a connection about to be lent; replace it if the check fails.

        A failure is appended to ``rejected``; so is a check that left the connection closed, in a
        transaction or out of autocommit (`left_by_check`). A cancellation during the check closes the
        connection (the check may have been cut mid-statement) and has it replaced, then propagates.
        """
        assert self._check is not None
        try:
            await self._check(conn)
            if (left := left_by_check(conn)) is not None:
                raise left
        except Exception as exc:
            log.info("connection_failed_check", pool=self.name, env=self.env.value, error=type(exc).__name__)
            rejected.append(exc)
            self._replace(conn, self._CONNECTIONS_LOST)
            return False
        except BaseException:
            self._replace(conn, None, "check_cancelled")
            raise
        return True

    def _fail_waiters(self, error: Callable[[], Exception]) -> None:
        """Wake every queued caller with a fresh ``error()`` (the library refused the new connections). No await."""
        waiting = self._waiting
        while waiting:
            waiter = waiting.popleft()
            if isinstance(waiter, _Waiter) and not waiter.future.done():
                waiter.future.set_exception(error())

    def _give_up(self, waiter: _Waiter) -> None:
        """A queued caller stops waiting (cancelled, timed out): leave the queue, return what it got. No await."""
        future = waiter.future
        self._stats[self._REQUESTS_ERRORS] += 1
        if not future.done():
            future.cancel()
        elif not future.cancelled() and future.exception() is None:
            self._hand_over(future.result())
        with contextlib.suppress(ValueError):
            self._waiting.remove(waiter)  # type: ignore[arg-type]

    # --- giving back -----------------------------------------------------------------------------

    async def give_back(self, conn: AsyncConnection[Any], *, usage: bool = True) -> None:
        """Return a lent connection in the state `lend` promises, or close it and have it replaced.

        A borrower that changed nothing costs no round trip. A cancellation
        while the reset runs closes the connection (its state is unknown) and
        propagates; the connection is never lost and never returned inside a
        transaction. ``usage``: add the time it was lent to psycopg_pool's
        ``usage_ms`` statistic, as its ``connection()`` does.
        """
        refuse_foreign(conn, self)
        st = conn._precog  # type: ignore[attr-defined]  # every connection of the pool has one (its class)
        lent: float | None = st.lent
        st.lent = None
        if lent is not None:  # an interrupt after this loses a sample, never a connection
            self._returned(lent, usage)
        pgconn = conn.pgconn
        if pgconn.status == _OK and (pgconn.transaction_status != _IDLE or needs_restore(conn)):
            try:
                await restore(conn, self._reconfigure)
            except BaseException as exc:
                log.debug("closing_unrestorable_connection", pool=self.name, reason=type(exc).__name__)
                self._replace(conn, None, "unrestorable")
                if not isinstance(exc, (psycopg.Error, RestoreFailed)):
                    raise  # a cancellation: the caller must see it
                return
        verdict = checkin_verdict(self, conn)
        if verdict == KEEP:
            self._hand_over(conn)
        elif verdict == CLOSE:
            _close_now(conn)
        elif verdict == BAD:
            self._replace(conn, self._RETURNS_BAD)
        elif verdict == RESET:
            # As psycopg_pool's own return path with reset=: a worker runs the hook and puts the connection
            # back (or closes and replaces it). Queuing it has no await, so no cancellation window.
            self.run_task(ReturnConnection(self, conn, from_getconn=False))
        else:  # EXPIRED
            self._replace(conn, None)

    def _hand_over(self, conn: AsyncConnection[Any]) -> None:
        """Give an idle connection to the first waiter, or put it on the idle stack. No await."""
        conn._pool = None
        if self._closed:
            _close_now(conn)
            return
        waiting = self._waiting
        while waiting:
            waiter = waiting.popleft()
            if isinstance(waiter, _Waiter) and waiter.offer(conn):
                return
        self._pool.append(conn)
        if self._pool_full_event and len(self._pool) >= self._min_size:
            self._pool_full_event.set()

    def _replace(self, conn: AsyncConnection[Any], stat: str | None, reason: str = "expired") -> None:
        """Close ``conn`` now and have a worker open its replacement (``stat``: what to count). No await."""
        _close_now(conn)
        if stat is not None:
            self._stats[stat] += 1
        if self._closed:
            return
        log.info("replacing_connection", pool=self.name, env=self.env.value, reason=stat or reason)
        self.run_task(AddConnection(self))


def _close_now(conn: AsyncConnection[Any]) -> None:
    """Close without awaiting (``AsyncConnection.close`` does nothing more for a pool's connection)."""
    conn._pool = None
    conn._closed = True
    conn.pgconn.finish()


async def create_pool(settings: DatabaseSettings, *, prod_confirmed: bool, **pool_kwargs: Any) -> AsyncPrecogPool:
    """Check, then open an asyncio pool for ``settings`` (the order of `precog_db.pool.create_pool`)."""
    with audited_open(settings):
        probe = await connect(settings, operation="open a pool", prod_confirmed=prod_confirmed)
        await probe.close()
        route_pool_logging()
        pool = AsyncPrecogPool(settings, prod_confirmed=prod_confirmed, **pool_kwargs)
        await pool.open(wait=False)
    log_opened(pool)
    return pool


# --- the process-wide asyncio pool ---------------------------------------------------------


class _State:
    registry: Registry[AsyncPrecogPool] = Registry()
    #: The event loop the pool serves, and the lock that serializes opening it on that loop.
    loop: asyncio.AbstractEventLoop | None = None
    lock: asyncio.Lock | None = None


def _forget_pool_in_child() -> None:
    _State.registry.forget_in_child()  # the fork rule of precog_db.pool
    _State.loop = None
    _State.lock = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _forget_pool_of_closed_loop() -> None:
    """Drop the process-wide pool if the event loop it served is closed (it was never closed itself). No await.

    ``asyncio.run(main())`` without ``close_pool()`` leaves it behind: its tasks ended with that loop
    (`AsyncPrecogPool.worker`), and nothing can be awaited on a closed loop. Its idle connections are
    closed (psycopg's close sends no query), and the next use on a new loop opens a new pool.
    """
    loop, pool = _State.loop, _State.registry.pool
    if loop is None or not loop.is_closed() or pool is None:
        return
    log.warning(
        "pool_loop_closed",
        pool=pool.name,
        env=pool.env.value,
        fix="await precog_db.aio.close_pool() before the event loop ends (it closes the connections cleanly)",
    )
    _State.registry.pool = None
    _State.lock = None
    _State.loop = None
    for replica in getattr(pool, "_precog_replicas", None) or ():  # their tasks ended with the same loop
        if replica.pool is not None:
            _abandon(replica.pool)
    _abandon(pool)


def _abandon(pool: AsyncPrecogPool) -> None:
    """Mark ``pool`` closed and close its idle connections, without awaiting (its loop is gone)."""
    pool._closed = True
    idle = pool._pool
    while idle:
        _close_now(idle.pop())


def _lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    _forget_pool_of_closed_loop()
    if _State.lock is None or _State.loop is not loop:
        pool = _State.registry.pool
        if pool is not None and _State.loop is not loop:
            raise PoolStateError(
                f"the asyncio pool {pool.name!r} was opened on another event loop; an asyncio pool "
                "serves one loop. Call `await precog_db.aio.close_pool()` on that loop first (a test fixture "
                "per event loop, or one loop for the whole application)"
            )
        _State.lock = asyncio.Lock()
        _State.loop = loop
    return _State.lock


async def initialize_pool(
    env: str | Environment | None = None, *, settings: DatabaseSettings | None = None, **pool_kwargs: Any
) -> AsyncPrecogPool:
    """Open the process-wide asyncio pool, or return it if it is already open for the same target."""
    async with _lock():
        settings = settings_for(env, settings, caller="initialize_pool")
        if (current := _State.registry.reuse(settings)) is not None:
            return current
        pool = await create_pool(settings, prod_confirmed=production_confirmed(), **pool_kwargs)
        _State.registry.pool = pool
        return pool


async def get_pool() -> AsyncPrecogPool:
    """The process-wide asyncio pool, opened on first use (in a forked child, with the parent pool's settings)."""
    if _State.loop is asyncio.get_running_loop() and (pool := _State.registry.lend_open()) is not None:
        return pool
    return await initialize_pool(**_State.registry.reopen_kwargs())


def active_pool() -> AsyncPrecogPool | None:
    """The process-wide asyncio pool if one is open, without opening one."""
    return _State.registry.pool


def inherited_settings() -> DatabaseSettings | None:
    """In a forked child, the settings of the asyncio pool the parent had open."""
    return _State.registry.inherited_settings()


async def close_pool(timeout: float = 5.0) -> None:
    """Close the process-wide asyncio pool, if any. Idempotent."""
    _forget_pool_of_closed_loop()  # its loop is gone: nothing of it can be awaited
    pool = _State.registry.take()
    _State.lock = None
    _State.loop = None
    if pool is not None:
        await pool.close(timeout=timeout)
        log_closed(pool)
