"""The connection pool: one psycopg_pool per process, opened safely.

`create_pool` takes explicit settings and reads no environment variables.
`initialize_pool` / `get_pool` / `close_pool` manage the process-wide pool
and are the only functions here that consult the settings layer.

Connections are opened in autocommit mode with
``default_transaction_read_only=on``: a plain statement costs one round trip
and cannot write, while `psycopg.Connection.transaction` starts an explicit
``BEGIN READ WRITE``. A checkout runs a zero-round-trip liveness check (is the
idle socket readable, i.e. did the server close it or send a FATAL?), so dead
connections are dropped without a ``SELECT 1`` on every checkout.

Faults (see docs/RELIABILITY.md): while the server is down the pool retries
at least every `MAX_RECONNECT_DELAY` seconds and a caller that cannot get a
connection gets `DatabaseUnavailableError` with the reason, not a misleading
"pool exhausted"; with ``DB_STATEMENT_TIMEOUT`` set, a statement whose reply
never comes (a stalled proxy keeps TCP alive, so keepalives and
``tcp_user_timeout`` cannot notice) fails after the statement timeout plus
``DB_TCP_USER_TIMEOUT`` instead of blocking its thread for good; a pool
inherited through ``fork()`` is never used by the child.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from time import monotonic
from typing import Any, ClassVar

import psycopg
from psycopg import Connection
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout
from psycopg_pool.base import AttemptWithBackoff
from psycopg_pool.pool import AddConnection, MaintenanceTask

from precog_db import audit
from precog_db.connection import PrecogConnection, check_gate, check_target, connect, failure_reason, prepare
from precog_db.connection import reply_timeout as reply_timeout
from precog_db.environment import Environment
from precog_db.errors import (
    DatabaseUnavailableError,
    PoolExhaustedError,
    PoolStateError,
    PrecogDBError,
)
from precog_db.guard import production_confirmed
from precog_db.log import get_logger, route_pool_logging
from precog_db.settings import DatabaseSettings, settings_for

__all__ = ["PrecogPool", "close_pool", "create_pool", "get_pool", "initialize_pool"]

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

_READ_ONLY_OPTION = "-c default_transaction_read_only=on"
#: Longest pause, in seconds, between two attempts to reconnect while the server is down.
#: psycopg_pool doubles the pause without limit (1, 2, 4 … 128 s), so after a long outage
#: the pool could stay empty for minutes after the server came back.
MAX_RECONNECT_DELAY = 5.0
_HAS_POLL = hasattr(select, "poll")
_POLL_MASK = (select.POLLIN | select.POLLERR | select.POLLHUP) if _HAS_POLL else 0


_OK = ConnStatus.OK
_IDLE = TransactionStatus.IDLE


def connection_is_usable(conn: Connection[Any]) -> bool:
    """Cheap check, no round trip: open, idle, and nothing unsolicited on the socket.

    An idle PostgreSQL connection receives nothing unsolicited unless the
    server is closing it (terminate, restart, idle timeout) or a NOTIFY
    arrived; either way the connection is not safe to hand out as it is.
    The poll object is kept on the connection (its socket never changes),
    which saves building and registering one on every checkout.
    """
    pgconn = conn.pgconn
    if pgconn.status != _OK or pgconn.transaction_status != _IDLE:
        return False
    try:
        fd = pgconn.socket
        if not _HAS_POLL:
            return not select.select([fd], [], [], 0)[0]
        poller = getattr(conn, "_precog_poller", None)
        if poller is None or poller[0] != fd:
            poller = (fd, select.poll())
            poller[1].register(fd, _POLL_MASK)
            with contextlib.suppress(AttributeError):
                conn._precog_poller = poller  # type: ignore[attr-defined]
        return not poller[1].poll(0)
    except (psycopg.OperationalError, OSError, ValueError, RuntimeError):
        return False


class _Waiter:
    """A caller queued for a connection; the interface of psycopg_pool's ``WaitingClient``.

    The hand-off is one lock release, where ``WaitingClient`` goes through a
    ``Condition`` (a reentrant lock, a new lock per wait, a notify loop). With
    more threads than connections every checkout is a hand-off, and all of it
    runs holding the GIL, so the leaner path is worth having (docs/PERFORMANCE.md).
    Exactly one of `set`, `fail` and the waiter giving up wins, under `_mutex`.
    """

    __slots__ = ("_done", "_gate", "_mutex", "conn", "error")

    def __init__(self) -> None:
        self.conn: Connection[Any] | None = None
        self.error: BaseException | None = None
        self._done = False
        self._mutex = threading.Lock()
        self._gate = threading.Lock()
        self._gate.acquire()

    def set(self, conn: Connection[Any]) -> bool:
        """Hand ``conn`` over; False if the caller already gave up (the pool offers it to the next one)."""
        with self._mutex:
            if self._done:
                return False
            self._done = True
            self.conn = conn
        self._gate.release()
        return True

    def fail(self, error: BaseException) -> bool:
        """Wake the caller with ``error`` (the pool is closing); False if it already gave up."""
        with self._mutex:
            if self._done:
                return False
            self._done = True
            self.error = error
        self._gate.release()
        return True

    def wait(self, timeout: float) -> Connection[Any]:
        """Block until handed a connection or an error, or raise `PoolTimeout` after ``timeout`` seconds."""
        if (
            not self._gate.acquire(True, min(max(timeout, 0.0), threading.TIMEOUT_MAX))
            and self.abandon() is None
            and self.error is None
        ):
            raise PoolTimeout(f"couldn't get a connection after {timeout:.2f} sec")
        # Woken, or handed a connection just as the wait expired.
        if self.error is not None:
            raise self.error
        assert self.conn is not None
        return self.conn

    def abandon(self) -> Connection[Any] | None:
        """Give up waiting; return the connection if one was handed over first (the caller must pass it on)."""
        with self._mutex:
            if self._done:
                return self.conn
            self._done = True
            return None


class PrecogPool(ConnectionPool[Connection[Any]]):
    """A `psycopg_pool.ConnectionPool` that knows its environment and settings.

    `checkout` / `checkin` are what `get_cursor` uses: they add the liveness
    check and turn a checkout timeout into a `PoolExhaustedError` that says
    what to change. Its `repr` shows only the pool name.
    """

    settings: DatabaseSettings

    def __init__(self, settings: DatabaseSettings, *, prod_confirmed: bool | None = None, **pool_kwargs: Any) -> None:
        self.settings = settings
        #: Production confirmation as given to `create_pool`; None: read PRECOG_PROD_CONFIRMED at each connect.
        self.prod_confirmed = prod_confirmed
        self.pid = os.getpid()
        self.pool_kwargs = dict(pool_kwargs)
        self._reply_timeout = reply_timeout(settings)
        #: (when, reason) of the last failed attempt to open a connection, and when one last succeeded.
        self._last_connect_failure: tuple[float, str] | None = None
        self._last_connect_ok = 0.0
        #: Failed attempts to open a connection that psycopg_pool will retry after a back-off: until
        #: they succeed the pool has fewer open connections than it counts (its pool_size).
        self._retries_pending = 0
        self._retries_lock = threading.Lock()
        kwargs = settings.connect_kwargs()
        kwargs["autocommit"] = True
        options = kwargs.get("options")
        kwargs["options"] = f"{options} {_READ_ONLY_OPTION}" if options else _READ_ONLY_OPTION
        params: dict[str, Any] = {
            "min_size": settings.pool_min,
            "max_size": settings.pool_max,
            "timeout": settings.pool_timeout,
            "name": settings.pool_name,
            "configure": self._configure_connection,
            # Only a bounded reply wait needs the overriding `wait`; without a
            # statement timeout every statement goes straight to psycopg's.
            "connection_class": PrecogConnection if self._reply_timeout is not None else Connection,
            "open": False,
        }
        params.update(pool_kwargs)
        super().__init__("", kwargs=kwargs, **params)

    @property
    def env(self) -> Environment:
        """The environment this pool serves."""
        return self.settings.env

    def __repr__(self) -> str:
        return f"<PrecogPool {self.name!r} env={self.env.value}>"

    def _configure_connection(self, conn: Connection[Any]) -> None:
        # Explicit transactions are read-write; everything else inherits the
        # read-only default set through the startup options.
        conn.read_only = False
        # The chokepoint's post-connect checks: reply bound and identity stamp
        # (on every physical connection; its warnings were logged at open).
        prepare(conn, self.settings, quiet=True)

    def _connect(self, timeout: float | None = None) -> Connection[Any]:
        # Every physical connection passes the chokepoint's checks first
        # (naming rule, gate, production guard), however this pool was built.
        # Remember why the server could not be reached, so that a caller who
        # times out meanwhile is told the real reason (psycopg_pool itself
        # only logs it from its background worker).
        try:
            check_target(
                self.settings, operation="open a pooled connection", prod_confirmed=self.prod_confirmed, quiet=True
            )
            conn = super()._connect(timeout)
        except (psycopg.Error, PrecogDBError) as exc:
            self._last_connect_failure = (monotonic(), failure_reason(exc, self.settings))
            raise
        self._last_connect_ok = monotonic()
        return conn

    def schedule_task(self, task: MaintenanceTask, delay: float) -> None:
        # psycopg_pool schedules an AddConnection only to retry a failed attempt (after the back-off).
        if isinstance(task, AddConnection):
            with self._retries_lock:
                self._retries_pending += 1
        super().schedule_task(task, delay)

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        # psycopg_pool doubles the delay after each failure before scheduling
        # the next attempt: cap it so that it never exceeds MAX_RECONNECT_DELAY.
        if attempt is not None:  # a retry scheduled by schedule_task is running
            with self._retries_lock:
                self._retries_pending -= 1
            attempt.delay = min(attempt.delay, MAX_RECONNECT_DELAY / attempt.DELAY_BACKOFF)
        super()._add_connection(attempt, growing=growing)

    def checkout(self, timeout: float | None = None) -> Connection[Any]:
        """Take a live, idle, autocommit connection out of the pool."""
        if self.pid != os.getpid():
            raise PoolStateError(
                f"pool {self.name!r} was opened in process {self.pid} and inherited through fork(); "
                "its connections belong to the parent. Use get_cursor()/get_pool() in the child, "
                "which open the child's own pool with the same settings"
            )
        conn = self._take_idle()
        if conn is not None:
            if connection_is_usable(conn):
                return conn
            self._discard(conn)
        wait = self.timeout if timeout is None else timeout
        deadline = monotonic() + wait
        while True:
            try:
                conn = self._wait_in_line(max(deadline - monotonic(), 0.001))
            except PoolTimeout:
                raise self._timed_out(wait) from None
            if connection_is_usable(conn):
                return conn
            self._discard(conn)

    def checkin(self, conn: Connection[Any]) -> None:
        """Give a connection back, restoring the state `checkout` promises."""
        if not conn.autocommit or conn.read_only is not False:
            try:
                if conn.pgconn.transaction_status != TransactionStatus.IDLE:
                    conn.rollback()
                conn.autocommit = True
                conn.read_only = False
            except Exception:
                conn.close()
        # Fast path: an idle, unexpired connection of this open pool goes
        # straight to the first waiter or back on the stack, exactly as
        # `putconn` would do, minus its per-call logging. Anything else
        # (in a transaction, broken, expired, pool closed, a reset hook) takes
        # `putconn`, which rolls back, replaces or closes it.
        if (
            getattr(conn, "_pool", None) is self
            and not self._closed
            and self._reset is None
            and conn.pgconn.transaction_status == _IDLE
            and conn._created_at > self._drained_at
            and conn._expire_at > monotonic()
        ):
            self._add_to_pool(conn)
        else:
            self.putconn(conn)

    def _take_idle(self) -> Connection[Any] | None:
        """An idle connection if one is ready right now, else None (the caller then queues in `getconn`).

        The same bookkeeping as `getconn`, without its per-call logging; with
        a ``check`` callback configured every checkout goes through `getconn`.
        """
        if self._closed or self._check is not None:
            return None
        with self._lock:
            idle = self._pool
            if not idle:
                return None
            conn = idle.pop()  # the most recently returned one (see _get_ready_connection)
            if len(idle) < self._nconns_min:  # psycopg_pool's low-water mark for max_idle shrinking
                self._nconns_min = len(idle)
        self._stats[self._REQUESTS_NUM] += 1
        conn._pool = self
        return conn

    def _wait_in_line(self, timeout: float) -> Connection[Any]:
        """`getconn`, except that a caller who must wait queues a `_Waiter` (first come, first served).

        Same bookkeeping as psycopg_pool (statistics, growing the pool, the
        ``max_waiting`` limit, PoolClosed, PoolTimeout). With a ``check``
        callback configured it simply calls `getconn`, which runs it.
        """
        if self._check is not None:
            return self.getconn(timeout=timeout)
        self._check_open_getconn()
        waiter: _Waiter | None = None
        with self._lock:
            conn = self._get_ready_connection(timeout)
            if conn is None:
                waiter = _Waiter()
                self._waiting.append(waiter)  # type: ignore[arg-type]
                self._stats[self._REQUESTS_QUEUED] += 1
                self._maybe_grow_pool()
        if conn is None:
            assert waiter is not None
            started = monotonic()
            try:
                conn = waiter.wait(timeout)
            except BaseException:
                self._stats[self._REQUESTS_ERRORS] += 1
                handed = waiter.abandon()
                if handed is not None:  # given to us just as we gave up: pass it on
                    self._return_connection(handed, from_getconn=True)
                else:  # leave the queue now, so requests_waiting and max_waiting count live callers only
                    with self._lock, contextlib.suppress(ValueError):
                        self._waiting.remove(waiter)  # type: ignore[arg-type]
                raise
            finally:
                self._stats[self._REQUESTS_WAIT_MS] += int(1000.0 * (monotonic() - started))
        self._stats[self._REQUESTS_NUM] += 1
        conn._pool = self
        return conn

    def _get_ready_connection(self, timeout: float | None) -> Connection[Any] | None:
        # Hand out the most recently returned connection (LIFO) instead of
        # psycopg_pool's oldest-first rotation: at low concurrency the same few
        # server processes stay hot instead of waking a cold one every call,
        # and the connections left idle are the ones max_idle shrinking closes.
        # Called with the pool lock held; waiting callers are still served FIFO.
        idle = self._pool
        if len(idle) > 1:
            idle.rotate(1)
        return super()._get_ready_connection(timeout)

    def _discard(self, conn: Connection[Any]) -> None:
        log.info("discarding_dead_connection", pool=self.name, env=self.env.value)
        conn.close()
        self.putconn(conn)

    def _timed_out(self, waited: float) -> PoolExhaustedError | DatabaseUnavailableError:
        # "Exhausted" only if every connection the pool counts is open: after an outage the pool
        # comes back one connection at a time while the others wait out their reconnect back-off,
        # and a caller timing out then must not be told that all max_size connections are busy.
        failure = self._last_connect_failure
        if failure is None:
            return self._exhausted(waited)
        when, reason = failure
        latest_failed = when >= self._last_connect_ok
        retrying = self._retries_pending
        if not latest_failed and retrying <= 0:
            return self._exhausted(waited)
        ago = max(monotonic() - when, 0.0)
        if latest_failed:
            state = f"cannot be reached: {reason} (last attempt {ago:.1f}s ago)"
        else:
            state = (
                f"could not be reached ({reason}, {ago:.1f}s ago) and the pool is still re-opening "
                f"{retrying} of its connections"
            )
        return DatabaseUnavailableError(
            f"pool {self.name!r} ({self.env.value}) got no connection within {waited:.1f}s because the "
            f"{self.settings.describe()} {state}. The pool keeps reconnecting by itself, at least every "
            f"{MAX_RECONNECT_DELAY:g}s, and calls succeed again once the server is back; check the server "
            "and DB_HOST / DB_PORT"
        )

    def _exhausted(self, waited: float) -> PoolExhaustedError:
        stats = self.get_stats()
        return PoolExhaustedError(
            f"pool {self.name!r} ({self.env.value}) had no free connection after {waited:.1f}s: "
            f"{stats.get('pool_size', self.max_size)} of at most {self.max_size} connections are busy "
            f"and {stats.get('requests_waiting', 0)} callers are waiting. Raise DB_POOL_MAX_CONN, "
            "raise DB_POOL_TIMEOUT to wait longer, or hold connections for less time "
            "(a get_cursor block that waits on something else keeps its connection)"
        )


def create_pool(settings: DatabaseSettings, *, prod_confirmed: bool, **pool_kwargs: Any) -> PrecogPool:
    """Check, then open a pool for ``settings``.

    Order: production guard (no connection attempted before it), one probe
    connection bounded by the connect timeout (a clear error if it fails),
    then the pool. ``pool_kwargs`` go to `psycopg_pool.ConnectionPool`.
    """
    started = monotonic()
    try:
        probe = connect(settings, operation="open a pool", prod_confirmed=prod_confirmed)
        probe.close()
        route_pool_logging()  # psycopg_pool's stdlib records become library events unless the app handles them
        pool = PrecogPool(settings, prod_confirmed=prod_confirmed, **pool_kwargs)
        pool.open(wait=False)
    except Exception as exc:
        _audit_open(settings, started, exc)
        raise
    _audit_open(settings, started, None)
    log.info("pool_opened", pool=pool.name, env=settings.env.value, min_size=pool.min_size, max_size=pool.max_size)
    return pool


def _audit_open(settings: DatabaseSettings, started: float, error: Exception | None) -> None:
    """Audit every staging/prod pool open (whatever its outcome) and every refusal to open any pool."""
    outcome = audit.OK if error is None else audit.outcome_of(error)
    if settings.env not in (Environment.STAGING, Environment.PROD) and outcome != audit.REFUSED:
        return
    audit.record_safely(
        "pool open",
        outcome=outcome,
        settings=settings,
        confirmation="PRECOG_PROD_CONFIRMED=yes" if settings.env is Environment.PROD and outcome == audit.OK else None,
        duration_s=monotonic() - started,
        error=error,
    )
    if error is not None:
        audit.mark_recorded(error)


# --- the process-wide pool ---------------------------------------------------------


class _State:
    pool: PrecogPool | None = None
    lock = threading.Lock()
    #: In a forked child: the settings and arguments of the pool the parent had open.
    inherited: tuple[DatabaseSettings, dict[str, Any]] | None = None
    #: Pools inherited through fork, kept referenced so that their finalizer
    #: never runs in the child (it would talk to the parent's worker threads).
    orphans: ClassVar[list[PrecogPool]] = []


def _forget_pool_in_child() -> None:
    # After fork the child shares the parent's sockets. Closing them would
    # send Terminate on the parent's connections, so the child just drops the
    # inherited pool (psycopg does not PQfinish in a forked child) and opens
    # its own on first use, with the same settings as the parent's pool.
    pool = _State.pool
    if pool is not None:
        _State.inherited = (pool.settings, pool.pool_kwargs)
        _State.orphans.append(pool)
    _State.pool = None
    _State.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def initialize_pool(
    env: str | Environment | None = None,
    *,
    settings: DatabaseSettings | None = None,
    **pool_kwargs: Any,
) -> PrecogPool:
    """Open the process-wide pool, or return it if it is already open for the same target.

    Thread-safe and idempotent. Initializing for another environment or
    database without `close_pool` first raises `PoolStateError`.
    """
    with _State.lock:
        settings = settings_for(env, settings, caller="initialize_pool")
        current = _State.pool
        if current is not None:
            if _same_target(current.settings, settings):
                check_gate(current.env)
                return current
            raise PoolStateError(
                f"the pool is already open for the {current.settings.describe()}; "
                f"call close_pool() before initializing it for the {settings.describe()}"
            )
        pool = create_pool(settings, prod_confirmed=production_confirmed(), **pool_kwargs)
        _State.pool = pool
        return pool


def _same_target(a: DatabaseSettings, b: DatabaseSettings) -> bool:
    return (a.env, a.host, a.port, a.dbname, a.user) == (b.env, b.host, b.port, b.dbname, b.user)


def get_pool() -> PrecogPool:
    """The process-wide pool, opened from the environment on first use.

    In a child forked while the parent had a pool open, the child's own pool
    is opened with the parent pool's settings.
    """
    pool = _State.pool
    if pool is not None:
        check_gate(pool.env)
        return pool
    inherited = _State.inherited
    if inherited is not None:
        settings, pool_kwargs = inherited
        return initialize_pool(settings=settings, **pool_kwargs)
    return initialize_pool()


def inherited_settings() -> DatabaseSettings | None:
    """In a forked child, the settings of the pool the parent had open (the child reopens it on first use)."""
    inherited = _State.inherited
    return None if inherited is None else inherited[0]


def active_pool() -> PrecogPool | None:
    """The process-wide pool if one is open, without opening one."""
    return _State.pool


def close_pool(timeout: float = 5.0) -> None:
    """Close the process-wide pool, if any. Idempotent."""
    with _State.lock:
        pool, _State.pool = _State.pool, None
    if pool is not None:
        pool.close(timeout=timeout)
        log.info("pool_closed", pool=pool.name, env=pool.env.value)
