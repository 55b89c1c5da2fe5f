"""The connection pool: one psycopg_pool per process, opened safely.

`create_pool` takes explicit settings and reads no environment variables.
`initialize_pool` / `get_pool` / `close_pool` manage the process-wide pool
and are the only functions here that consult the settings layer.

Connections are opened in autocommit mode with
``default_transaction_read_only=on``: a plain statement costs one round trip
and cannot write, while `psycopg.Connection.transaction` starts an explicit
``BEGIN READ WRITE``. A checkout runs a zero-round-trip liveness check (is the
idle socket readable, i.e. did the server close it or send a FATAL?), so dead
connections are dropped without a ``SELECT 1`` on every checkout. A checkin
costs no round trip unless the borrower changed the session
(`precog_db.session`), and no interrupt raised by a signal handler can lose a
connection on the way out or back (docs/DESIGN.md).

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
import dataclasses
import os
import queue
import select
import threading
import weakref
from collections.abc import Callable
from time import monotonic, sleep
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import psycopg
from psycopg import AsyncConnection, Connection
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests
from psycopg_pool.base import AttemptWithBackoff
from psycopg_pool.pool import AddConnection, MaintenanceTask

from precog_db import audit
from precog_db.connection import (
    PrecogConnection,
    check_gate,
    check_target,
    connect,
    connection_kwargs,
    failure_reason,
    prepare,
)
from precog_db.connection import reply_timeout as reply_timeout
from precog_db.environment import Environment
from precog_db.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    ForeignConnectionError,
    PoolExhaustedError,
    PoolStateError,
    PrecogDBError,
)
from precog_db.guard import production_confirmed
from precog_db.log import get_logger, route_pool_logging
from precog_db.metrics import FOLD_AT, PoolRecorder, PoolState
from precog_db.session import RestoreFailed, adopt, baseline, mark_raw, needs_restore, restore
from precog_db.settings import DatabaseSettings, settings_for
from precog_db.topology import PoolerCursor, cannot_write, session_setup

__all__ = ["PrecogPool", "close_pool", "create_pool", "get_pool", "initialize_pool"]

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

_READ_ONLY_OPTION = "-c default_transaction_read_only=on"
#: Pool arguments that would replace the connection settings (and with them the read-only option).
_REFUSED_POOL_KWARGS = ("conninfo", "kwargs")
#: `_retire` marker: return the connection through psycopg_pool (a ``reset`` callback is configured).
_RETURN = "return"
#: Longest pause, in seconds, between two attempts to reconnect while the server is down.
#: psycopg_pool doubles the pause without limit (1, 2, 4 … 128 s), so after a long outage
#: the pool could stay empty for minutes after the server came back.
MAX_RECONNECT_DELAY = 5.0
#: The same with several DB_HOST entries: the standby being promoted is found within this time.
FAILOVER_RECONNECT_DELAY = 1.0
_HAS_POLL = hasattr(select, "poll")
_POLL_MASK = (select.POLLIN | select.POLLERR | select.POLLHUP) if _HAS_POLL else 0


_MAIN_THREAD = threading.main_thread()
_OK = ConnStatus.OK
_HOT_STANDBY = b"in_hot_standby"
_ON = b"on"
_IDLE = TransactionStatus.IDLE


def connection_is_usable(conn: Connection[Any] | AsyncConnection[Any]) -> bool:
    """Cheap check, no round trip: open, idle, on a server that can write, nothing unsolicited on the socket.

    A server that reports ``in_hot_standby=on`` (a standby, or a node demoted
    in a failover) cannot take the writes of this pool: its connection is
    replaced, and libpq's ``target_session_attrs`` picks a primary for the new one.

    An idle PostgreSQL connection receives nothing unsolicited unless the
    server is closing it (terminate, restart, idle timeout) or a NOTIFY
    arrived; either way the connection is not safe to hand out as it is.
    The poll object is kept on the connection (its socket never changes),
    which saves building and registering one on every checkout.
    """
    pgconn = conn.pgconn
    if pgconn.status != _OK or pgconn.transaction_status != _IDLE:
        return False
    if pgconn.parameter_status(_HOT_STANDBY) == _ON and getattr(conn, "_precog_writer", True):
        return False  # `precog_db.topology.cannot_write`, inlined: this runs on every checkout
    try:
        fd = pgconn.socket
        if not _HAS_POLL:
            return not select.select([fd], [], [], 0)[0]
        poller = getattr(conn, "_precog_poller", None)
        if poller is None or poller[0] != fd:
            poller = (fd, select.poll())
            poller[1].register(fd, _POLL_MASK)
            with contextlib.suppress(AttributeError):
                conn._precog_poller = poller  # type: ignore[union-attr]
        return not poller[1].poll(0)
    except (psycopg.OperationalError, OSError, ValueError, RuntimeError):
        return False


def check_pool_kwargs(pool_kwargs: dict[str, Any]) -> None:
    """Refuse pool arguments that would replace the connection settings (either layer)."""
    for key in _REFUSED_POOL_KWARGS:
        if key in pool_kwargs:
            raise ConfigurationError(
                f"{key}= cannot be passed to the pool: connection settings come from DatabaseSettings "
                "(DB_HOST, DB_PORT, DB_NAME, DB_USER, DB_PASSWORD, DB_SSLMODE, DB_STATEMENT_TIMEOUT, ...), "
                "so that every pooled connection keeps the library's read-only default and timeouts. "
                "Put the value in the settings (load_settings(...) or settings.replace(...)) instead"
            )


def pooled_connect_kwargs(settings: DatabaseSettings) -> dict[str, Any]:
    """The connection arguments of a pooled connection (either layer): autocommit, read-only by default.

    The credentials are resolved now (`precog_db.connection.connection_kwargs`):
    the pools call this for every new physical connection.
    """
    kwargs = connection_kwargs(settings)
    kwargs["autocommit"] = True
    if settings.pooler == "none":
        options = kwargs.get("options")
        kwargs["options"] = f"{options} {_READ_ONLY_OPTION}" if options else _READ_ONLY_OPTION
    elif settings.pooler == "transaction":
        kwargs["prepare_threshold"] = None  # no server-side prepared statement behind the pooler
    return kwargs


def refuse_foreign(conn: Connection[Any] | AsyncConnection[Any], pool: object) -> None:
    """A connection given back to ``pool`` (either layer) must be one it lent and has not had back yet; no I/O."""
    owner = getattr(conn, "_pool", None)
    if owner is pool:
        return
    name = getattr(pool, "name", "?")
    if owner is None:
        why = "it was not lent by any pool, or was already given back"
    else:
        why = f"it was lent by pool {getattr(owner, 'name', '?')!r}"
    raise ForeignConnectionError(
        f"this connection cannot be given back to pool {name!r}: {why}. Give each connection back once, "
        "to the pool that lent it"
    )


def lent_ms(lent: float, now: float) -> int:
    """Milliseconds a connection was lent, from the `_precog_lent` mark (negative: lent after a wait); no I/O."""
    return int(1000.0 * (now - abs(lent)))


def check_still_read_only(conn: Connection[Any] | AsyncConnection[Any]) -> None:
    """After the caller's ``configure=``: refuse a connection whose read-only default was turned off."""
    if conn.pgconn.parameter_status(b"default_transaction_read_only") not in (b"on", None):
        raise ConfigurationError(
            "the pool's configure= callback turned default_transaction_read_only off; pooled "
            "connections must stay read-only outside transactions (use get_cursor(commit=True) to write)"
        )


def already_open(current: DatabaseSettings, wanted: DatabaseSettings) -> PoolStateError:
    """`initialize_pool` (either layer) for another target while a pool is open."""
    return PoolStateError(
        f"the pool is already open for the {current.describe()}; "
        f"call close_pool() before initializing it for the {wanted.describe()}"
    )


#: `DatabaseSettings` fields that do not change what a pooled connection is: the pool's sizing and
#: where the values came from. Every other field must match for `initialize_pool` to reuse a pool.
_NOT_CONNECTION_SETTINGS = frozenset({"pool_min", "pool_max", "pool_timeout", "files", "origins"})
#: Fields whose values are never shown in an error.
_SECRET_SETTINGS = frozenset({"password", "password_provider"})


def connection_difference(current: DatabaseSettings, wanted: DatabaseSettings) -> str | None:
    """The first connection setting in which ``wanted`` differs from the open pool's ``current``, or None (no I/O).

    Named with both values, except a secret (the password, the password provider), which is only named.
    """
    for f in dataclasses.fields(current):
        if f.name in _NOT_CONNECTION_SETTINGS:
            continue
        have, want = getattr(current, f.name), getattr(wanted, f.name)
        if have == want:
            continue
        if f.name in _SECRET_SETTINGS:
            return f"a different {f.name}"
        return f"{f.name}={want!r} (the open pool has {f.name}={have!r})"
    return None


def settings_differ(current: DatabaseSettings, wanted: DatabaseSettings, difference: str) -> PoolStateError:
    """`initialize_pool` (either layer) for the open pool's target but with another connection setting."""
    return PoolStateError(
        f"the pool is already open for the {current.describe()} with other connection settings: "
        f"initialize_pool() asked for {difference}. The open pool's connections do not have what was asked "
        "for; call close_pool() first to reopen it with the new settings, or pass the same settings"
    )


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
        assert isinstance(pool, PrecogPool)
        pool._bury()


class PoolFaults:
    """What both pool classes (sync `PrecogPool`, asyncio `precog_db.apool.AsyncPrecogPool`) share, no I/O:
    remembering why connection attempts fail, the capped back-off, and the timeout errors."""

    settings: DatabaseSettings
    #: The arguments the pool was created with beyond the settings (a forked child reopens with them).
    pool_kwargs: dict[str, Any]
    prod_confirmed: bool | None
    pid: int
    _reply_timeout: float | None
    _user_configure: Any
    _configure_connection: Any
    name: str
    max_size: int
    _last_connect_failure: tuple[float, str] | None
    _last_refusal: PrecogDBError | None
    _last_connect_ok: float
    _retries_pending: int
    _max_reconnect_delay: float
    _writer: bool

    @property
    def env(self) -> Environment:
        """The environment this pool serves."""
        return self.settings.env

    if TYPE_CHECKING:

        def get_stats(self) -> dict[str, int]: ...  # psycopg_pool's

    def _setup(
        self,
        settings: DatabaseSettings,
        prod_confirmed: bool | None,
        pool_kwargs: dict[str, Any],
        classes: tuple[type[Any], type[Any]],
    ) -> dict[str, Any]:
        """What both pool classes do before psycopg_pool's constructor; return its keyword arguments.

        ``classes``: the connection class with the reply bound, and the plain one.
        """
        self.settings = settings
        #: Production confirmation as given to `create_pool`; None: read PRECOG_PROD_CONFIRMED at each connect.
        self.prod_confirmed = prod_confirmed
        self.pid = os.getpid()
        self._reply_timeout = reply_timeout(settings)
        self._init_faults()
        check_pool_kwargs(pool_kwargs)
        wanted_class = pool_kwargs.get("connection_class")
        # The asyncio pool always needs its class (``classes`` names one): its ``wait`` also sends a
        # commit=True block's deferred BEGIN (precog_db._pipelining).
        always = classes[0] is classes[1]
        if (
            wanted_class is not None
            and (always or self._reply_timeout is not None)
            and not (isinstance(wanted_class, type) and issubclass(wanted_class, classes[0]))
        ):
            why = (
                "it sends a commit=True block's BEGIN before any other statement and bounds the wait for replies"
                if always
                else "while DB_STATEMENT_TIMEOUT is set, a plain psycopg connection class would drop the bound on a "
                "server that stops answering"
            )
            # Named where a caller imports it: the asyncio class lives in a private module, exported by aio.
            home = "precog_db.aio" if always else classes[0].__module__
            raise ConfigurationError(
                f"connection_class= must be a subclass of {home}.{classes[0].__name__}: {why}. "
                f"Subclass {classes[0].__name__} instead"
            )
        #: A writer pool discards connections to a hot standby (`connection_is_usable`).
        self._writer = settings.target_session_attrs in ("read-write", "primary")
        #: Longest pause between reconnection attempts: short with several hosts, where a failover is expected.
        self._max_reconnect_delay = MAX_RECONNECT_DELAY if len(settings.endpoints()) == 1 else FAILOVER_RECONNECT_DELAY
        #: The caller's own ``configure=`` callback, run after the library's setup (and again after a reset).
        self._user_configure = pool_kwargs.pop("configure", None)
        self.pool_kwargs = (
            dict(pool_kwargs, configure=self._user_configure) if self._user_configure else dict(pool_kwargs)
        )
        params: dict[str, Any] = {
            "min_size": settings.pool_min,
            "max_size": settings.pool_max,
            "timeout": settings.pool_timeout,
            "name": settings.pool_name,
            "configure": self._configure_connection,
            # Only a bounded reply wait needs the overriding `wait`; without a
            # statement timeout every statement goes straight to psycopg's.
            "connection_class": classes[0] if self._reply_timeout is not None else classes[1],
            "open": False,
        }
        params.update(pool_kwargs)
        if "min_size" in pool_kwargs and "max_size" not in pool_kwargs:
            # psycopg_pool's rule: min_size= alone is a fixed-size pool (not min_size..DB_POOL_MAX_CONN).
            params["max_size"] = pool_kwargs["min_size"]
        return params

    def _init_faults(self) -> None:
        #: (when, reason) of the last failed attempt to open a connection, and when one last succeeded.
        self._last_connect_failure = None
        #: The last failed attempt, when the library refused the connection (stamp, configure=, guard)
        #: rather than the server being unreachable: a caller is told about the refusal itself.
        self._last_refusal = None
        self._last_connect_ok = 0.0
        #: Failed attempts to open a connection that psycopg_pool will retry after a back-off: until
        #: they succeed the pool has fewer open connections than it counts (its pool_size).
        self._retries_pending = 0

    def _check_target(self, prod_confirmed: bool | None) -> None:
        # Every physical connection passes the chokepoint's checks first
        # (naming rule, gate, production guard), however this pool was built.
        check_target(self.settings, operation="open a pooled connection", prod_confirmed=prod_confirmed, quiet=True)

    def _connect_failed(self, exc: BaseException) -> None:
        # Remember why the server could not be reached, so that a caller who
        # times out meanwhile is told the real reason (psycopg_pool itself
        # only logs it from its background worker).
        self._last_connect_failure = (monotonic(), failure_reason(exc, self.settings))
        refused = isinstance(exc, PrecogDBError) and not isinstance(exc, psycopg.Error)
        self._last_refusal = exc if isinstance(exc, PrecogDBError) and refused else None
        if refused:
            # Nobody waiting can be served by a connection the library refuses: tell them now,
            # instead of letting them wait out the pool timeout.
            self._fail_waiters(self._refused)

    def _fail_waiters(self, error: Callable[[], Exception]) -> None:
        """Wake every queued caller with ``error()`` (a fresh exception each); no I/O."""
        raise NotImplementedError

    def _refused(self, waited: float | None = None) -> PrecogDBError:
        """The error for a caller left without a connection because the library refused the new ones.

        Of the refusal's own class (``except EnvironmentMismatchError`` and the like keep working), a new
        instance per caller, saying which pool and why; no I/O.
        """
        refusal = self._last_refusal
        assert refusal is not None
        reason = failure_reason(refusal, self.settings)
        within = "" if waited is None else f" within {waited:.1f}s"
        message = (
            f"pool {self.name!r} ({self.env.value}) got no connection{within}: precog_db refused its new "
            f"connections to the {self.settings.describe()}: {reason}"
        )
        try:
            error = type(refusal)(message)
        except Exception:  # a class whose constructor takes other arguments
            error = PoolStateError(message)
        return error

    def _cap(self, attempt: AttemptWithBackoff) -> None:
        # psycopg_pool doubles the delay after each failure before scheduling the next
        # attempt: cap it so that it never exceeds MAX_RECONNECT_DELAY (FAILOVER_RECONNECT_DELAY
        # with several hosts).
        attempt.delay = min(attempt.delay, self._max_reconnect_delay / attempt.DELAY_BACKOFF)

    def _connection_kwargs(self) -> dict[str, Any]:
        """libpq's arguments for one new pooled connection, with the credentials resolved now.

        A callable given to psycopg_pool as ``kwargs=``: it is called for every
        new connection, so the password is resolved each time (``DB_PASSWORD_FILE``
        re-read, the provider called; see `PrecogPool.drain`).
        """
        return pooled_connect_kwargs(self.settings)

    def _refuse_standby(self, conn: Connection[Any] | AsyncConnection[Any]) -> None:
        """A writer pool never keeps a connection to a hot standby (no I/O): mark the connection, or raise."""
        # libpq already refuses one on PostgreSQL 14+ for read-write/primary; this also covers a node
        # that reports it later (`connection_is_usable` reads the mark on every checkout).
        conn._precog_writer = self._writer  # type: ignore[union-attr]
        if self._writer and cannot_write(conn.pgconn):
            raise DatabaseUnavailableError(
                f"the {self.settings.describe()} is a hot standby (in_hot_standby=on) and cannot take writes; "
                "list the primary in DB_HOST (or several hosts for failover), or set DB_TARGET_SESSION_ATTRS=any "
                "for a pool that only reads"
            )

    def _timed_out(self, waited: float) -> PrecogDBError:
        # "Exhausted" only if every connection the pool counts is open: after an outage the pool
        # comes back one connection at a time while the others wait out their reconnect back-off,
        # and a caller timing out then must not be told that all max_size connections are busy.
        failure = self._last_connect_failure
        if failure is None:
            return self._exhausted(waited)
        when, reason = failure
        latest_failed = when >= self._last_connect_ok
        if latest_failed and self._last_refusal is not None:
            return self._refused(waited)
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


def _janitor_loop(
    pool_ref: weakref.ReferenceType[PrecogPool],
    deferred: queue.SimpleQueue[tuple[MaintenanceTask, float | None] | None],
) -> None:
    """The janitor thread of a `PrecogPool`: pass the main thread's maintenance requests on to psycopg_pool.

    Holds the pool only while passing one request on, so that a pool dropped without close() can be collected.
    """
    while (item := deferred.get()) is not None:
        pool = pool_ref()
        if pool is None:
            return
        task, delay = item
        try:
            if delay is None:
                pool.run_task(task)
            else:
                pool.schedule_task(task, delay)
        except Exception as exc:  # never let one request stop the janitor
            log.warning("pool_maintenance_request_failed", pool=pool.name, error=type(exc).__name__)
        del pool


class _FoldMetrics(MaintenanceTask):
    """Fold the returned-connection samples into the metrics histograms (in a pool worker, off the read path)."""

    def _run(self, pool: ConnectionPool[Any]) -> None:
        assert isinstance(pool, PrecogPool)
        pool.metrics.fold()


class PrecogPool(PoolFaults, ConnectionPool[Connection[Any]]):
    """A `psycopg_pool.ConnectionPool` that knows its environment and settings.

    `lend` / `give_back` are what `get_cursor` and `get_connection` use
    (`checkout` / `checkin` wrap them for callers that handle the connection
    themselves): they add the liveness check, turn a checkout timeout into a
    `PoolExhaustedError` that says what to change, undo whatever session state
    a borrower left (`precog_db.session`), and lose no connection to an
    asynchronous exception (docs/DESIGN.md). Its `repr` shows only the pool name.
    """

    settings: DatabaseSettings

    def __init__(self, settings: DatabaseSettings, *, prod_confirmed: bool | None = None, **pool_kwargs: Any) -> None:
        # psycopg_pool's ``open``: None (not given) opens now, as psycopg_pool does, with its deprecation
        # warning on first use; either way through `open`, which starts the janitor thread first.
        open_now: bool | None = pool_kwargs.pop("open", None)
        self._retries_lock = threading.Lock()
        #: Connections handed to a worker for replacement (see `_retire`).
        self._graves: queue.SimpleQueue[tuple[Connection[Any], str | None]] = queue.SimpleQueue()
        #: Maintenance work asked for from the main thread, passed on by the janitor thread (see `run_task`).
        self._deferred: queue.SimpleQueue[tuple[MaintenanceTask, float | None] | None] = queue.SimpleQueue()
        self._janitor: threading.Thread | None = None
        #: Behind a session-mode pooler, the SETs that replace the startup options (precog_db.topology).
        self._session_setup = session_setup(settings)
        params = self._setup(settings, prod_confirmed, pool_kwargs, (PrecogConnection, Connection))
        #: What `precog_db.pool_metrics()` reports for this pool, under its name (``name=`` can set it).
        self.metrics = PoolRecorder(
            str(params["name"]), settings.env.value, self._metrics_state, fold_soon=self._fold_metrics_soon
        )
        #: (lent_at, returned_at) of every block given back since the recorder last folded them (`give_back`).
        self._returns = self.metrics.returns
        # A callable: psycopg_pool calls it for every new connection, so the password is
        # resolved each time (DB_PASSWORD_FILE re-read, the provider called; see `drain`).
        super().__init__("", kwargs=self._connection_kwargs, **params)
        if open_now is None or open_now:
            self.open()
            # psycopg_pool's flag: its first getconn()/wait() warns that the implicit open is deprecated
            # (entering the pool as a context manager clears it).
            self._open_implicit = open_now is None

    def __repr__(self) -> str:
        return f"<PrecogPool {self.name!r} env={self.env.value}>"

    def drain(self) -> None:
        """Replace every connection, gracefully: after a credential rotation, or a failover.

        Idle connections are closed and reopened now (with the password as
        resolved now); connections in use finish their block undisturbed and
        are closed and replaced when given back. Callers keep being served
        meanwhile. See docs/OPERATIONS.md.
        """
        super().drain()
        log.info("pool_drained", pool=self.name, env=self.env.value)

    def _fold_metrics_soon(self) -> None:
        self.run_task(_FoldMetrics(self))

    def _metrics_state(self) -> PoolState | None:
        """The pool's current state for `precog_db.metrics` (None when closed); read at snapshot time only."""
        if getattr(self, "_closed", True):  # closed, or still being constructed
            return None
        with self._lock:
            idle = len(self._pool)
            pending = sum(1 for w in self._waiting if not getattr(w, "_served", False))
            # Connections the pool counts that are not idle: lent out (or, briefly, being opened).
            # No per-connection registry: a WeakSet's removal callback is Python code that runs when
            # a connection is freed, where an interrupt raised by a signal handler would be lost.
            used = max(self._nconns - idle, 0)
        return PoolState(idle=idle, used=used, pending_requests=pending, min=self.min_size, max=self.max_size)

    def _configure_connection(self, conn: Connection[Any]) -> None:
        # Explicit transactions are read-write; everything else inherits the
        # read-only default set through the startup options.
        conn.read_only = False
        # A writer pool (DB_TARGET_SESSION_ATTRS read-write or primary) never keeps a connection to a hot standby.
        self._refuse_standby(conn)
        if self._session_setup is not None:
            self._session_setup(conn)
        # The chokepoint's post-connect checks: reply bound and identity stamp
        # (on every physical connection; its warnings were logged at open).
        prepare(conn, self.settings, quiet=True)
        if self.settings.pooler == "transaction":
            adopt(conn, PoolerCursor, shared=True)
        else:
            adopt(conn)
        if self._user_configure is not None:
            # The caller's setup runs after the library's, never instead of it.
            self._user_configure(conn)
            if conn.pgconn.transaction_status != _IDLE:
                conn.rollback()
            check_still_read_only(conn)
            conn.autocommit = True
            conn.read_only = False
        baseline(conn)

    def _reconfigure(self, conn: Connection[Any]) -> None:
        """After DISCARD ALL: the session setup behind a session pooler, then the caller's own."""
        if self._session_setup is not None:
            self._session_setup(conn)
        if self._user_configure is not None:
            self._user_configure(conn)

    def _connect(self, timeout: float | None = None) -> Connection[Any]:
        started = monotonic()
        try:
            self._check_target(self.prod_confirmed)
            conn = super()._connect(timeout)
        except (psycopg.Error, PrecogDBError) as exc:
            self._connect_failed(exc)
            self.metrics.connection_failed()
            raise
        self._last_connect_ok = now = monotonic()
        self.metrics.created(now - started)
        conn._precog_lent = None  # type: ignore[attr-defined]  # set by lend, cleared by give_back
        return conn

    # --- maintenance requests from the main thread ---------------------------------------------
    #
    # psycopg_pool queues maintenance work with queue.Queue.put and sched.scheduler.enter, which
    # take Python-level locks. A signal handler that raises in the main thread (KeyboardInterrupt,
    # a job runner's SIGALRM timeout) can fire just after such a lock was acquired inside
    # Condition.__enter__, before any `with` owns it: the lock then stays held forever and every
    # pool worker deadlocks on its next get (seen in tests/test_interrupts.py). So the main thread
    # never touches those queues: it puts the request on a SimpleQueue (one C call, no Python
    # lock) and the pool's janitor thread, where no signal handler runs, passes it on.

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open the pool (psycopg_pool's `open`), after starting the janitor thread."""
        if self._janitor is None or not self._janitor.is_alive():
            # The thread holds only a weak reference to the pool: a pool dropped without close() is
            # collected (its __del__ stops the janitor and psycopg_pool's workers), as psycopg_pool's is.
            self._janitor = threading.Thread(
                target=_janitor_loop, args=(weakref.ref(self), self._deferred), name=f"{self.name}-janitor", daemon=True
            )
            self._janitor.start()
        super().open(wait=wait, timeout=timeout)

    def __del__(self) -> None:
        # Collected without close(): stop the janitor, and let psycopg_pool's finalizer stop its workers
        # directly (the janitor that would pass its requests on is gone).
        deferred = getattr(self, "_deferred", None)
        if deferred is not None:
            self._janitor = None
            deferred.put(None)
        super().__del__()

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool and the pools of its read replicas, then stop the janitor thread.

        `precog_db.replicas` opens a replica's pool on first use and keeps the replicas on the pool they
        read for (``_precog_replicas``): their pools live and close with it.
        """
        try:
            for replica in getattr(self, "_precog_replicas", None) or ():
                if replica.pool is not None:
                    with contextlib.suppress(Exception):
                        replica.pool.close(timeout=1.0)
            super().close(timeout=timeout)
        finally:
            self._deferred.put(None)

    def _deferred_from_main_thread(self, task: MaintenanceTask, delay: float | None) -> bool:
        """Queue ``task`` for the janitor when called in the main thread; False: run it here."""
        if self._janitor is None or threading.current_thread() is not _MAIN_THREAD:
            return False
        self._deferred.put((task, delay))
        return True

    def run_task(self, task: MaintenanceTask) -> None:
        """psycopg_pool's `run_task`, handed over through the janitor when called in the main thread."""
        if not self._deferred_from_main_thread(task, None):
            super().run_task(task)

    def schedule_task(self, task: MaintenanceTask, delay: float) -> None:
        if self._deferred_from_main_thread(task, delay):
            return
        # psycopg_pool schedules an AddConnection only to retry a failed attempt (after the back-off).
        if isinstance(task, AddConnection):
            with self._retries_lock:
                self._retries_pending += 1
        super().schedule_task(task, delay)

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        if attempt is not None:  # a retry scheduled by schedule_task is running
            with self._retries_lock:
                self._retries_pending -= 1
            self._cap(attempt)
        super()._add_connection(attempt, growing=growing)

    def checkout(self, timeout: float | None = None) -> Connection[Any]:
        """Take a live, idle, autocommit connection out of the pool (give it back with `checkin`).

        `get_cursor` and `get_connection` use `lend` / `give_back`, which also
        survive an asynchronous exception (a signal handler raising) at any point.
        """
        slot = _Slot()
        self.lend(slot, timeout)
        conn = slot._conn
        assert conn is not None
        mark_raw(conn)
        return conn

    def checkin(self, conn: Connection[Any]) -> None:
        """Give a connection back, restoring the state `checkout` promises."""
        slot = _Slot()
        slot._conn = conn
        self.give_back(slot)

    def putconn(self, conn: Connection[Any]) -> None:
        """psycopg_pool's return path (``pool.connection()``, ``getconn``/``putconn``), through `give_back`.

        So a connection borrowed through psycopg_pool's own API gets the same
        session restore as one from `get_cursor`: nothing a borrower changed
        reaches the next one, whichever API lent it. Its ``usage_ms`` is
        psycopg_pool's to record (``connection()`` does).
        """
        slot = _Slot()
        slot._conn = conn
        self.give_back(slot, usage=False)

    def getconn(self, timeout: float | None = None) -> Connection[Any]:
        """psycopg_pool's own checkout (``pool.connection()`` uses it), behind the same gate check as `lend`."""
        check_gate(self.settings.env)
        conn = super().getconn(timeout)
        mark_raw(conn)
        return conn

    def lend(self, holder: _Holder, timeout: float | None = None) -> None:
        """Store a live, idle, autocommit connection into ``holder._conn``.

        Interrupt-safe: whatever exception ends it (a timeout, or a signal
        handler raising at any point), ``holder._conn`` is None afterwards and
        no connection is lost; when it returns normally the connection is in
        ``holder._conn`` and the holder owns it. The connection is always
        referenced by the idle stack, a waiter's holder or ``holder``: it is
        stored into the holder before it leaves the stack.
        """
        if self.pid != os.getpid():
            raise PoolStateError(
                f"pool {self.name!r} was opened in process {self.pid} and inherited through fork(); "
                "its connections belong to the parent. Use get_cursor()/get_pool() in the child, "
                "which open the child's own pool with the same settings"
            )
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
                    if waited:
                        self._lent_after_wait(holder, started)
                    else:
                        holder._conn._precog_lent = started  # type: ignore[union-attr]  # for the metrics (give_back)
                    return
                # The check failed: back off before the next one, as psycopg_pool's getconn does (at
                # once, then about 1, 2, 4 ... s), so that a check that keeps failing does not open a
                # new server connection per loop until the deadline.
                now = monotonic()
                if attempt is None:
                    attempt = AttemptWithBackoff(timeout=max(deadline - now, 0.0))
                else:
                    attempt.update_delay(now)
                if now >= deadline or attempt.time_to_give_up(now):
                    raise PoolTimeout()
                if attempt.delay > 0:
                    sleep(min(attempt.delay, deadline - now))
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
        covered by `lend`'s handler like any other point. A failure is appended to ``rejected``.
        """
        conn = holder._conn
        assert conn is not None and self._check is not None
        try:
            self._check(conn)
        except Exception as exc:
            log.info("connection_failed_check", pool=self.name, env=self.env.value, error=type(exc).__name__)
            rejected.append(exc)
            self._retire(holder, self._CONNECTIONS_LOST)
            return False
        return True

    def _check_rejected(self, waited: float, rejected: list[BaseException]) -> PoolExhaustedError:
        """The timeout of a caller whose connections all failed the ``check=`` callback (no I/O)."""
        last = rejected[-1]
        return PoolExhaustedError(
            f"pool {self.name!r} ({self.env.value}) got no connection within {waited:.1f}s: the check= callback "
            f"rejected {len(rejected)} connection(s), the last with {type(last).__name__}: "
            f"{failure_reason(last, self.settings)}. Each rejected connection is replaced, with a growing pause "
            "between checks; fix the check or what it tests"
        )

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

    def _lent_after_wait(self, holder: _Holder, started: float) -> None:
        """Metrics for a connection obtained after queueing (the slow path): record the wait now."""
        conn = holder._conn
        assert conn is not None
        now = monotonic()
        conn._precog_lent = -now  # type: ignore[attr-defined]  # negative: the wait is recorded here
        self.metrics.waited(now - started)

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
            lent = conn._precog_lent  # type: ignore[attr-defined]  # set in _connect, by lend
            conn._precog_lent = None  # type: ignore[attr-defined]
            pgconn = conn.pgconn
            if pgconn.transaction_status != _IDLE or needs_restore(conn):
                try:
                    restore(conn, self._reconfigure)
                except Exception as exc:
                    log.info("closing_unrestorable_connection", pool=self.name, reason=type(exc).__name__)
                    conn.close()
                    if not isinstance(exc, (psycopg.Error, RestoreFailed)):
                        raise  # e.g. a job timeout raised by a signal handler: the caller must see it
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
        pool = PrecogPool(settings, prod_confirmed=prod_confirmed, **{"open": False, **pool_kwargs})
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


_P = TypeVar("_P", bound=PoolFaults)


class Registry(Generic[_P]):
    """The process-wide pool of one layer (sync here, asyncio in `precog_db.apool`), no I/O.

    Holds the open pool; in a forked child, the settings and arguments of the
    pool the parent had open (the child reopens it with them on first use), and
    the inherited pool objects, kept referenced so that their finalizers never
    run in the child (they would talk to the parent's workers).
    """

    def __init__(self) -> None:
        self.pool: _P | None = None
        self.inherited: tuple[DatabaseSettings, dict[str, Any]] | None = None
        self.orphans: list[_P] = []

    def forget_in_child(self) -> None:
        # After fork the child shares the parent's sockets. Closing them would
        # send Terminate on the parent's connections, so the child just drops the
        # inherited pool (psycopg does not PQfinish in a forked child) and opens
        # its own on first use, with the same settings as the parent's pool.
        pool = self.pool
        if pool is not None:
            self.inherited = (pool.settings, pool.pool_kwargs)
            self.orphans.append(pool)
        self.pool = None

    def reuse(self, settings: DatabaseSettings) -> _P | None:
        """The open pool if it serves ``settings``' target with the same connection settings (gate checked),
        None if none is open; else raise `PoolStateError` naming what differs."""
        current = self.pool
        if current is None:
            return None
        if not _same_target(current.settings, settings):
            raise already_open(current.settings, settings)
        difference = connection_difference(current.settings, settings)
        if difference is not None:
            raise settings_differ(current.settings, settings, difference)
        check_gate(current.env)
        return current

    def inherited_settings(self) -> DatabaseSettings | None:
        return None if self.inherited is None else self.inherited[0]


class _State:
    registry: Registry[PrecogPool] = Registry()
    lock = threading.Lock()


def _forget_pool_in_child() -> None:
    _State.registry.forget_in_child()
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
        if (current := _State.registry.reuse(settings)) is not None:
            return current
        pool = create_pool(settings, prod_confirmed=production_confirmed(), **pool_kwargs)
        _State.registry.pool = pool
        return pool


def _same_target(a: DatabaseSettings, b: DatabaseSettings) -> bool:
    return (a.env, a.host, a.port, a.dbname, a.user, a.pooler, a.replica_hosts) == (
        b.env,
        b.host,
        b.port,
        b.dbname,
        b.user,
        b.pooler,
        b.replica_hosts,
    )


def get_pool() -> PrecogPool:
    """The process-wide pool, opened from the environment on first use.

    In a child forked while the parent had a pool open, the child's own pool
    is opened with the parent pool's settings.
    """
    pool = _State.registry.pool
    if pool is not None:
        check_gate(pool.env)
        return pool
    inherited = _State.registry.inherited
    if inherited is not None:
        settings, pool_kwargs = inherited
        return initialize_pool(settings=settings, **pool_kwargs)
    return initialize_pool()


def inherited_settings() -> DatabaseSettings | None:
    """In a forked child, the settings of the pool the parent had open (the child reopens it on first use)."""
    return _State.registry.inherited_settings()


def active_pool() -> PrecogPool | None:
    """The process-wide pool if one is open, without opening one."""
    return _State.registry.pool


def close_pool(timeout: float = 5.0) -> None:
    """Close the process-wide pool, if any. Idempotent."""
    with _State.lock:
        pool, _State.registry.pool = _State.registry.pool, None
    if pool is not None:
        pool.close(timeout=timeout)
        log.info("pool_closed", pool=pool.name, env=pool.env.value)
