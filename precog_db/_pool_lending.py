"""The sync pool's lending: checkout and checkin on the fast path, safe against asynchronous interrupts.

`Lending` is the half of `precog_db.pool.PrecogPool` that hands connections
out and takes them back: `lend` / `give_back` (what `get_cursor` and
`get_connection` use), the queue of waiting callers (`_Waiter`), and handing
broken or expired connections to a pool worker for replacement (`_retire`,
`_bury`). It is the tuned fast path (docs/PERFORMANCE.md): no lookups or calls
beyond the ones measured there. The decisions it shares with the asyncio pool
live in `precog_db._pool_base`; where the fast path inlines one (the checkin
chain, the return metrics), that module names it.

Interrupt safety (docs/DESIGN.md, "Asynchronous interrupts"): a lent
connection is always referenced by the idle stack, a waiter's holder or the
caller's holder, and every hand-over is one step for an asynchronous exception.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from time import monotonic, sleep
from typing import Any, Protocol

import psycopg
from psycopg import Connection
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests

from precog_db._compat import AddConnection, AttemptWithBackoff, MaintenanceTask
from precog_db._pool_base import PoolBase, check_backoff, connection_is_usable, left_by_check, lent_ms, refuse_foreign
from precog_db.connection import check_gate
from precog_db.log import get_logger
from precog_db.metrics import FOLD_AT
from precog_db.session import RestoreFailed, needs_restore, restore

log = get_logger()

#: `_retire` marker: return the connection through psycopg_pool (a ``reset`` callback is configured).
_RETURN = "return"
_OK = ConnStatus.OK
_IDLE = TransactionStatus.IDLE


class _Holder(Protocol):
    """Whoever a lent connection is stored into: a get_cursor()/get_connection() block, or a `_Slot`."""

    _conn: Connection[Any] | None


class _Slot:
    """A holder for `PrecogPool.checkout` callers."""

    __slots__ = ("_conn",)

    def __init__(self) -> None:
        self._conn: Connection[Any] | None = None


class _Waiter:
    """A caller queued for a connection; the interface of psycopg_pool's ``WaitingClient``.

    Whoever hands a connection over writes it straight into the caller's
    holder (`set`), with the pool lock held, so the connection is never only
    in a local variable of a thread that an asynchronous exception could
    unwind. The caller gives up (`abandon`) with the pool lock held too, so
    exactly one of a hand-over, `fail` (the pool closing) and giving up wins.
    The wake-up is one lock release (psycopg_pool's ``WaitingClient`` goes
    through a ``Condition``; docs/PERFORMANCE.md).
    """

    __slots__ = ("_gate", "_served", "error", "holder")

    def __init__(self, holder: _Holder) -> None:
        self.holder = holder
        self.error: BaseException | None = None
        self._served = False
        self._gate = threading.Lock()
        self._gate.acquire()

    def set(self, conn: Connection[Any]) -> bool:
        """Hand ``conn`` over (pool lock held); False if the caller already gave up or was served."""
        if self._served:
            return False
        # One step for an asynchronous exception: no eval-breaker check
        # between these stores and the end of release().
        self.holder._conn = conn
        self._served = True
        self._gate.release()
        return True

    def fail(self, error: BaseException) -> bool:
        """Wake the caller with ``error`` (the pool is closing); False if it already gave up or was served."""
        if self._served:
            return False
        self.error = error
        self._served = True
        self._gate.release()
        return True

    def wait(self, timeout: float) -> bool:
        """Block until served (True) or ``timeout`` seconds pass (False)."""
        return self._gate.acquire(True, min(max(timeout, 0.0), threading.TIMEOUT_MAX))

    def abandon(self) -> bool:
        """Give up (call with the pool lock held); False if the caller was served first."""
        if self._served:
            return False
        self._served = True
        return True


class _Bury(MaintenanceTask):
    """Replace the connections `PrecogPool._retire` queued (runs in a pool worker, where no signal handler runs)."""

    def _run(self, pool: ConnectionPool[Any]) -> None:
        assert isinstance(pool, Lending)
        pool._bury()


class Lending(PoolBase, ConnectionPool[Connection[Any]]):
    """The lending half of `precog_db.pool.PrecogPool` (see the module docstring)."""

    #: Connections handed to a worker for replacement (see `_retire`); set by `PrecogPool.__init__`.
    _graves: queue.SimpleQueue[tuple[Connection[Any], str | None]]
    #: The metrics' list of (lent_at, returned_at) samples (``metrics.returns``, one lookup less per checkin).
    _returns: Any

    def _reconfigure(self, conn: Connection[Any]) -> None:
        """After DISCARD ALL: the pool's own setup (`PrecogPool._reconfigure`)."""
        raise NotImplementedError

    def lend(self, holder: _Holder, timeout: float | None = None) -> Connection[Any]:
        """A live, idle, autocommit connection, stored into ``holder._conn`` and returned.

        The asyncio pool's `lend` returns the connection too; the holder is what
        the sync layer adds. Interrupt-safe: whatever exception ends it (a timeout,
        or a signal handler raising at any point), ``holder._conn`` is None
        afterwards and no connection is lost; when it returns normally the
        connection is in ``holder._conn`` and the holder owns it. The connection
        is always referenced by the idle stack, a waiter's holder or ``holder``:
        it is stored into the holder before it leaves the stack.
        """
        if self.pid != os.getpid():
            raise self._inherited_through_fork()
        check_gate(self.settings.env)  # inside a dangerous_operation, only an allowed environment is lent
        if self._open_implicit:
            self._check_open_getconn()  # psycopg_pool's deprecation warning for a pool opened implicitly
        wait = self.timeout if timeout is None else timeout
        started = monotonic()
        rejected: list[BaseException] = []  # what the check= callback raised, this call
        try:
            self._stats[self._REQUESTS_NUM] += 1  # once per request, whatever happens next
            deadline = started + wait
            attempt: AttemptWithBackoff | None = None
            while True:
                waited = self._lend_once(holder, deadline)
                if self._check is None or self._passes_check(holder, rejected):
                    conn = holder._conn  # not None: _lend_once stored one (no assert on the fast path)
                    if waited:
                        return self._lent_after_wait(conn, started)  # type: ignore[arg-type]
                    conn._precog.lent = started  # type: ignore[union-attr]  # for the metrics (give_back)
                    return conn  # type: ignore[return-value]
                # The check failed: back off before the next one, as psycopg_pool's getconn does.
                attempt, pause = check_backoff(attempt, deadline, monotonic())
                if pause > 0:
                    sleep(pause)
        except PoolTimeout:
            self._abandon(holder)
            self.metrics.timed_out()
            raise (self._check_rejected(wait, rejected) if rejected else self._timed_out(wait)) from None
        except BaseException:
            self._abandon(holder)
            raise

    def _passes_check(self, holder: _Holder, rejected: list[BaseException]) -> bool:
        """Run psycopg_pool's ``check=`` callback on the lent connection; retire it if the check fails.

        The check runs here, with the connection already in the holder, rather
        than through psycopg_pool's `getconn`: an interrupt during it is then
        covered by `lend`'s handler like any other point. A failure is appended to ``rejected``; so is
        a check that left the connection closed, in a transaction or out of autocommit (`left_by_check`).
        """
        conn = holder._conn
        assert conn is not None and self._check is not None
        try:
            self._check(conn)
            if (left := left_by_check(conn)) is not None:
                raise left
        except Exception as exc:
            log.info("connection_failed_check", pool=self.name, env=self.env.value, error=type(exc).__name__)
            rejected.append(exc)
            self._retire(holder, self._CONNECTIONS_LOST)
            return False
        return True

    def _fail_waiters(self, error: Callable[[], Exception]) -> None:
        with self._lock:
            waiting = self._waiting
            while waiting:
                waiting.popleft().fail(error())  # psycopg_pool's own waiter (a check= callback) too

    def _lend_once(self, holder: _Holder, deadline: float) -> bool:
        """Put a live idle connection into ``holder._conn``: the top of the stack (False), or the first one
        handed over after queueing (True)."""
        if not self._closed:
            with self._lock:
                idle = self._pool
                if idle:
                    # Store, then pop: no eval-breaker check between the two.
                    holder._conn = idle[-1]
                    idle.pop()  # the most recently returned one (see _get_ready_connection)
                    if len(idle) < self._nconns_min:  # psycopg_pool's low-water mark for max_idle shrinking
                        self._nconns_min = len(idle)
        conn = holder._conn
        if conn is not None:
            if connection_is_usable(conn):
                conn._pool = self
                return False
            self._retire(holder, self._CONNECTIONS_LOST)
        self._lend_waiting(holder, deadline)
        return True

    def _lend_waiting(self, holder: _Holder, deadline: float) -> None:
        """The slow path of `lend`: the first idle connection, or a place in the queue (first come, first served)."""
        while True:
            waiter: _Waiter | None = None
            with self._lock:
                self._check_open_getconn()
                idle = self._pool
                if idle:
                    holder._conn = idle[-1]
                    idle.pop()
                    if len(idle) < self._nconns_min:
                        self._nconns_min = len(idle)
                elif self.max_waiting and len(self._waiting) >= self.max_waiting:
                    self._stats[self._REQUESTS_ERRORS] += 1
                    raise TooManyRequests(f"the pool {self.name!r} has already {len(self._waiting)} requests waiting")
                else:
                    waiter = _Waiter(holder)
                    self._waiting.append(waiter)  # type: ignore[arg-type]
                    self._stats[self._REQUESTS_QUEUED] += 1
                    self._maybe_grow_pool()
                    if not self._graves.empty():  # a replacement whose kick was lost to an interrupt
                        self.run_task(_Bury(self))
            if waiter is not None:
                started = monotonic()
                try:
                    served = waiter.wait(deadline - started)
                finally:
                    self._stats[self._REQUESTS_WAIT_MS] += int(1000.0 * (monotonic() - started))
                if not served:
                    with self._lock:
                        if waiter.abandon():
                            with contextlib.suppress(ValueError):
                                self._waiting.remove(waiter)  # type: ignore[arg-type]
                            self._stats[self._REQUESTS_ERRORS] += 1
                            raise PoolTimeout()
                    # Served just as the wait expired: take it.
                if waiter.error is not None:
                    raise waiter.error
            conn = holder._conn
            assert conn is not None
            if connection_is_usable(conn):
                conn._pool = self
                return
            self._retire(holder, self._CONNECTIONS_LOST)

    def _abandon(self, holder: _Holder) -> None:
        """After `lend` failed: leave the queue, and give back a connection handed over meanwhile."""
        with self._lock:
            for waiter in self._waiting:
                if isinstance(waiter, _Waiter) and waiter.holder is holder:
                    if waiter.abandon():
                        self._stats[self._REQUESTS_ERRORS] += 1
                    self._waiting.remove(waiter)
                    break
        if holder._conn is not None:  # fresh from the stack or a hand-over: clean, return it as it is
            if holder._conn.closed:
                self._retire(holder, None)
            else:
                self._hand_over(holder, holder._conn)

    def give_back(self, holder: _Holder, *, usage: bool = True) -> None:
        """Return the connection in ``holder._conn`` to the pool, in the state `lend` promises.

        A borrower that changed nothing costs no round trip. One that left a
        transaction open, changed a client attribute or (possibly) the server
        session pays here: see `precog_db.session`. A connection that cannot be
        brought back (broken, interrupted mid-statement, the reset failed) is
        closed and replaced. Interrupt-safe like `lend`: ``holder._conn`` is
        None afterwards, whatever happens. ``usage``: add the time it was lent
        to psycopg_pool's ``usage_ms`` statistic, as its ``connection()`` does.
        """
        conn = holder._conn
        if conn is None:
            return
        refuse_foreign(conn, self)
        lent: float | None = None
        try:
            # Detached from the pool first, as psycopg_pool's own return path does: closing it below is
            # then a plain close, never (with close_returns=True) another return to this pool.
            conn._pool = None
            st = conn._precog  # type: ignore[attr-defined]  # lent by lend, from _connect None
            lent = st.lent
            st.lent = None
            pgconn = conn.pgconn
            if pgconn.transaction_status != _IDLE or needs_restore(conn):
                try:
                    restore(conn, self._reconfigure)
                except Exception as exc:
                    log.debug("closing_unrestorable_connection", pool=self.name, reason=type(exc).__name__)
                    conn.close()
                    if not isinstance(exc, (psycopg.Error, RestoreFailed)):
                        raise  # e.g. a job timeout raised by a signal handler: the caller must see it
            # `precog_db._pool_base.checkin_verdict`, inlined (one call less per checkin): same chain, same order.
            if self._closed:
                conn.close()
                holder._conn = None
            elif pgconn.status != _OK or pgconn.transaction_status != _IDLE:
                self._retire(holder, self._RETURNS_BAD)
            elif conn._created_at <= self._drained_at or conn._expire_at <= monotonic():
                conn.close()
                self._retire(holder, None)
            elif self._reset is not None:
                self._retire(holder, _RETURN)  # psycopg_pool's reset hook runs in a worker
            else:
                self._hand_over(holder, conn)
        except BaseException:
            if holder._conn is conn:
                # Interrupted half-way: never hand out a connection whose state is unknown.
                conn.close()
                self._retire(holder, None)
            raise
        if lent is not None:  # after the hand-over: an interrupt here loses a sample, never a connection
            # `PoolBase._returned`, inlined (one call less per checkin).
            returns = self._returns
            now = monotonic()
            returns.append((lent, now))  # folded into the histograms off the read path
            if usage:
                self._stats[self._USAGE_MS] += lent_ms(lent, now)
            if len(returns) >= FOLD_AT:
                self.metrics.fold_soon()

    def _hand_over(self, holder: _Holder, conn: Connection[Any]) -> None:
        """Give an idle connection to the first waiter, or put it on the idle stack (exactly as `putconn` would)."""
        conn._pool = None
        with self._lock:
            if self._closed:
                conn.close()
                holder._conn = None
                return
            waiting = self._waiting
            while waiting:
                waiter = waiting[0]
                if isinstance(waiter, _Waiter):
                    if waiter._served:
                        waiting.popleft()
                        continue
                    # One step: clearing our slot, filling the waiter's and waking it
                    # have no eval-breaker check in between (CPython checks after a call returns).
                    holder._conn = None
                    waiter.holder._conn = conn
                    waiter._served = True
                    waiter._gate.release()
                    waiting.popleft()
                    return
                waiting.popleft()  # psycopg_pool's own WaitingClient (a check callback is configured)
                if waiter.set(conn):
                    holder._conn = None
                    return
            holder._conn = None
            self._pool.append(conn)
            if self._pool_full_event and len(self._pool) >= self._min_size:
                self._pool_full_event.set()

    def _retire(self, holder: _Holder, stat: str | None) -> None:
        """Hand the connection in ``holder._conn`` to a pool worker, which replaces it (``stat``: what to count).

        The hand-over is one `SimpleQueue.put`, done together with clearing the
        holder, so it happens exactly once even if a signal handler raises here;
        the worker (where no signal handler ever runs) does the rest.
        """
        conn = holder._conn
        assert conn is not None
        conn._pool = None  # a plain close, even with close_returns=True (_bury re-attaches a _RETURN)
        if stat is not _RETURN:
            conn.close()
        item = (conn, stat)
        holder._conn = None
        self._graves.put(item)
        self.run_task(_Bury(self))  # a lost kick is redone by the next caller that has to queue

    def _bury(self) -> None:
        """In a worker: replace (or, for a reset hook, return) every connection `_retire` queued."""
        while True:
            try:
                conn, stat = self._graves.get_nowait()
            except queue.Empty:
                return
            if stat is _RETURN:
                conn._pool = self
                self._putconn(conn, from_getconn=False)
                continue
            conn.close()
            if stat is not None:
                self._stats[stat] += 1
            if self._closed:
                continue
            log.info("replacing_connection", pool=self.name, env=self.env.value, reason=stat or "expired")
            self.run_task(AddConnection(self))

    def _get_ready_connection(self, timeout: float | None) -> Connection[Any] | None:
        # Hand out the most recently returned connection (LIFO) instead of
        # psycopg_pool's oldest-first rotation: at low concurrency the same few
        # server processes stay hot instead of waking a cold one every call,
        # and the connections left idle are the ones max_idle shrinking closes.
        # Only psycopg_pool's `getconn` (used with a ``check`` callback) comes here.
        idle = self._pool
        if len(idle) > 1:
            idle.rotate(1)
        return super()._get_ready_connection(timeout)
