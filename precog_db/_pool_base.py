"""What both pools share, with no I/O: the decisions and state of a pool, written once.

`PoolBase` is a mixin that the sync `precog_db.pool.PrecogPool` and the asyncio
`precog_db.apool.AsyncPrecogPool` both inherit before their psycopg_pool class.
It holds everything a pool decides or remembers without talking to a server:
the argument setup and validation (`PoolBase._setup`), the bookkeeping of
connection attempts (which failed, why, whether the library refused them, how
many retries are pending; issue 21's refusal remembering), the capped
reconnect back-off, every error a caller without a connection gets, the
metrics of a connection opened or lent after a wait, and the fork check's
message. The plain functions below are the same rules for one connection or
one call: the zero-round-trip liveness check, the checkin decision
(`checkin_verdict`), the foreign-return check, the ``check=`` back-off, the
connection arguments of a pooled connection, and the audit and log lines of
opening and closing a pool.

Each pool keeps only its I/O driving: taking and handing over connections
under its own lock or on its event loop, running the session reset
(`precog_db.session`), opening and configuring physical connections. The
process-wide registry both layers use is `precog_db._pool_registry`.

The only system calls here are `connection_is_usable`'s zero-timeout poll of
an idle socket (no byte read or written) and the audit record of a pool open.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from time import monotonic
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import AsyncConnection, Connection
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg_pool import PoolTimeout

from precog_db import audit
from precog_db._compat import AttemptWithBackoff
from precog_db._conn_state import ConnState
from precog_db._readable import poller_for
from precog_db.connection import check_target, connection_kwargs, failure_reason, reply_timeout
from precog_db.environment import Environment
from precog_db.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    ForeignConnectionError,
    PoolExhaustedError,
    PoolStateError,
    PrecogDBError,
)
from precog_db.log import get_logger
from precog_db.metrics import FOLD_AT, PoolRecorder, PoolState
from precog_db.settings import DatabaseSettings
from precog_db.topology import cannot_write

if TYPE_CHECKING:
    from collections import Counter

log = get_logger()

_C = TypeVar("_C", Connection[Any], AsyncConnection[Any])

_READ_ONLY_OPTION = "-c default_transaction_read_only=on"
#: Pool arguments that would replace the connection settings (and with them the read-only option).
_REFUSED_POOL_KWARGS = ("conninfo", "kwargs")
#: Longest pause, in seconds, between two attempts to reconnect while the server is down.
#: psycopg_pool doubles the pause without limit (1, 2, 4 … 128 s), so after a long outage
#: the pool could stay empty for minutes after the server came back.
MAX_RECONNECT_DELAY = 5.0
#: The same with several DB_HOST entries: the standby being promoted is found within this time.
FAILOVER_RECONNECT_DELAY = 1.0

_OK = ConnStatus.OK
_HOT_STANDBY = b"in_hot_standby"
_ON = b"on"
_IDLE = TransactionStatus.IDLE

# --- the checkin decision: what `checkin_verdict` says to do with a connection given back ---------
#: Put it back (on the idle stack, or to the first waiter).
KEEP = "keep"
#: The pool is closed: close the connection.
CLOSE = "close"
#: Broken, or still in a transaction after the reset: close and replace it, counted as a bad return.
BAD = "bad"
#: Older than its max_lifetime, or opened before a `drain`: close and replace it.
EXPIRED = "expired"
#: A psycopg_pool ``reset=`` callback is configured: return the connection through psycopg_pool (it runs the hook).
RESET = "reset"


def connection_is_usable(conn: Connection[Any] | AsyncConnection[Any]) -> bool:
    """Cheap check, no round trip: open, idle, on a server that can write, nothing unsolicited on the socket.

    A server that reports ``in_hot_standby=on`` (a standby, or a node demoted
    in a failover) cannot take the writes of this pool: its connection is
    replaced, and libpq's ``target_session_attrs`` picks a primary for the new one.

    An idle PostgreSQL connection receives nothing unsolicited unless the
    server is closing it (terminate, restart, idle timeout) or a NOTIFY
    arrived; either way the connection is not safe to hand out as it is.
    The check (`precog_db._readable`: a zero-timeout ``poll`` that keeps the
    GIL, so a checkout never hands the GIL to another thread) is built once
    per socket and kept on the connection.
    """
    pgconn = conn.pgconn
    if pgconn.status != _OK or pgconn.transaction_status != _IDLE:
        return False
    st: ConnState | None = getattr(conn, "_precog", None)  # None: a connection precog_db did not open
    if pgconn.parameter_status(_HOT_STANDBY) == _ON and (st is None or st.writer):
        return False  # `precog_db.topology.cannot_write`, inlined: this runs on every checkout
    try:
        fd = pgconn.socket
        poller = None if st is None else st.poller
        if poller is None or poller[0] != fd:
            poller = (fd, poller_for(fd))
            if st is not None:
                st.poller = poller
        return not poller[1]()
    except (psycopg.OperationalError, OSError, ValueError, RuntimeError):
        return False


def checkin_verdict(pool: PoolBase, conn: Connection[Any] | AsyncConnection[Any]) -> str:
    """What to do with a connection given back, once any session reset has run: `KEEP`, `CLOSE`, `BAD`,
    `EXPIRED` or `RESET` (no I/O).

    The asyncio pool calls this; the sync pool's `give_back` (the tuned fast path,
    docs/PERFORMANCE.md) inlines the same chain, in the same order, to save a call per checkin.
    """
    if pool._closed:
        return CLOSE
    pgconn = conn.pgconn
    if pgconn.status != _OK or pgconn.transaction_status != _IDLE:
        return BAD
    if conn._created_at <= pool._drained_at or conn._expire_at <= monotonic():
        return EXPIRED
    if pool._reset is not None:
        return RESET
    return KEEP


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
    """Milliseconds a connection was lent, from the `_precog.lent` mark (negative: lent after a wait); no I/O."""
    return int(1000.0 * (now - abs(lent)))


def check_still_read_only(conn: Connection[Any] | AsyncConnection[Any]) -> None:
    """After the caller's ``configure=``: refuse a connection whose read-only default was turned off."""
    if conn.pgconn.parameter_status(b"default_transaction_read_only") not in (b"on", None):
        raise ConfigurationError(
            "the pool's configure= callback turned default_transaction_read_only off; pooled "
            "connections must stay read-only outside transactions (use get_cursor(commit=True) to write)"
        )


def left_by_check(conn: Connection[Any] | AsyncConnection[Any]) -> psycopg.ProgrammingError | None:
    """After a ``check=`` callback returned: why the connection cannot be lent as it is, else None (no I/O).

    A check that closed the connection, left a transaction open or turned
    autocommit off fails like a check that raised: the connection is replaced.
    """
    pgconn = conn.pgconn
    if pgconn.status != _OK:
        what = "closed"
    elif pgconn.transaction_status != _IDLE:
        what = f"in a transaction ({TransactionStatus(pgconn.transaction_status).name})"
    elif not conn.autocommit:
        what = "with autocommit off"
    else:
        return None
    return psycopg.ProgrammingError(
        f"the check= callback left the connection {what}: discarded; a check must leave it idle, in autocommit"
    )


def check_backoff(attempt: AttemptWithBackoff | None, deadline: float, now: float) -> tuple[AttemptWithBackoff, float]:
    """After a lent connection failed the ``check=`` callback: the back-off state and the pause before the next
    check (no I/O); `PoolTimeout` once the deadline passed or the back-off gives up.

    The pauses are psycopg_pool's ``getconn``'s (at once, then about 1, 2, 4 … s), so that a check that keeps
    failing does not open a new server connection per loop until the deadline.
    """
    if attempt is None:
        attempt = AttemptWithBackoff(timeout=max(deadline - now, 0.0))
    else:
        attempt.update_delay(now)
    if now >= deadline or attempt.time_to_give_up(now):
        raise PoolTimeout()
    return attempt, min(max(attempt.delay, 0.0), deadline - now)


# --- opening and closing a pool --------------------------------------------------------------


def audit_open(settings: DatabaseSettings, started: float, error: Exception | None) -> None:
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


@contextlib.contextmanager
def audited_open(settings: DatabaseSettings) -> Iterator[None]:
    """Around a layer's `create_pool` (probe, construct, open): audit the outcome, whatever it is."""
    started = monotonic()
    try:
        yield
    except Exception as exc:
        audit_open(settings, started, exc)
        raise
    audit_open(settings, started, None)


def log_opened(pool: PoolBase) -> None:
    log.info("pool_opened", pool=pool.name, env=pool.env.value, min_size=pool.min_size, max_size=pool.max_size)


def log_closed(pool: PoolBase) -> None:
    log.info("pool_closed", pool=pool.name, env=pool.env.value)


# --- the mixin -----------------------------------------------------------------------------------


class PoolBase:
    """What both pool classes (sync `PrecogPool`, asyncio `precog_db.apool.AsyncPrecogPool`) share, no I/O:
    the setup, remembering why connection attempts fail, the capped back-off, and the timeout errors.

    Listed before the psycopg_pool class in the bases, so its methods come first; it calls
    none of psycopg_pool's I/O.
    """

    #: The class name `repr` shows.
    _KIND = "pool"
    #: Where a forked child gets its own pool (the fork check's message).
    _API_HINT = "get_cursor()/get_pool()"

    settings: DatabaseSettings
    #: The arguments the pool was created with beyond the settings (a forked child reopens with them).
    pool_kwargs: dict[str, Any]
    prod_confirmed: bool | None
    pid: int
    metrics: PoolRecorder
    _reply_timeout: float | None
    _user_configure: Any
    _configure_connection: Any
    _last_connect_failure: tuple[float, str] | None
    _last_refusal: PrecogDBError | None
    _last_connect_ok: float
    _retries_pending: int
    _retries_lock: contextlib.AbstractContextManager[Any]
    _max_reconnect_delay: float
    _writer: bool

    if TYPE_CHECKING:  # psycopg_pool's, on both pool classes
        name: str
        min_size: int
        max_size: int
        _closed: bool
        _drained_at: float
        _reset: Any
        _nconns: int
        _stats: Counter[str]
        _USAGE_MS: str

        def get_stats(self) -> dict[str, int]: ...

    @property
    def env(self) -> Environment:
        """The environment this pool serves."""
        return self.settings.env

    def __repr__(self) -> str:
        return f"<{self._KIND} {self.name!r} env={self.env.value}>"

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
        # Both pools always need their class (``classes`` names one): its ``wait`` also sends a
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
            # Named where a caller imports it: both classes live in private modules, exported publicly.
            home = "precog_db.connection" if issubclass(classes[0], Connection) else "precog_db.aio"
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

    # --- opening physical connections: before, after, on failure ------------------------------------

    def _check_target(self, prod_confirmed: bool | None) -> None:
        # Every physical connection passes the chokepoint's checks first
        # (naming rule, gate, production guard), however this pool was built.
        check_target(self.settings, operation="open a pooled connection", prod_confirmed=prod_confirmed, quiet=True)

    def _connected(self, conn: Connection[Any] | AsyncConnection[Any], started: float) -> None:
        """A physical connection opened (``started``: when the attempt began): remember it, count it."""
        self._last_connect_ok = now = monotonic()
        self.metrics.created(now - started)
        conn._precog.lent = None  # type: ignore[union-attr]  # set by lend, cleared by give_back

    def _connect_failed(self, exc: BaseException) -> None:
        # Remember why the server could not be reached, so that a caller who
        # times out meanwhile is told the real reason (psycopg_pool itself
        # only logs it from its background worker).
        self._last_connect_failure = (monotonic(), failure_reason(exc, self.settings))
        refused = isinstance(exc, PrecogDBError) and not isinstance(exc, psycopg.Error)
        self._last_refusal = exc if isinstance(exc, PrecogDBError) and refused else None
        self.metrics.connection_failed()
        if refused:
            # Nobody waiting can be served by a connection the library refuses: tell them now,
            # instead of letting them wait out the pool timeout.
            self._fail_waiters(self._refused)

    def _fail_waiters(self, error: Callable[[], Exception]) -> None:
        """Wake every queued caller with ``error()`` (a fresh exception each); no I/O."""
        raise NotImplementedError

    def _retry_scheduled(self) -> None:
        """psycopg_pool scheduled the retry of a failed connection attempt (after its back-off)."""
        with self._retries_lock:
            self._retries_pending += 1

    def _retry_started(self, attempt: AttemptWithBackoff) -> None:
        """A scheduled retry is running: count it, and cap the back-off before psycopg_pool doubles it."""
        with self._retries_lock:
            self._retries_pending -= 1
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
        conn._precog.writer = self._writer  # type: ignore[union-attr]
        if self._writer and cannot_write(conn.pgconn):
            raise DatabaseUnavailableError(
                f"the {self.settings.describe()} is a hot standby (in_hot_standby=on) and cannot take writes; "
                "list the primary in DB_HOST (or several hosts for failover), or set DB_TARGET_SESSION_ATTRS=any "
                "for a pool that only reads"
            )

    # --- lending and giving back: the bookkeeping off the fast path -----------------------------------

    def _inherited_through_fork(self) -> PoolStateError:
        """`lend` in a forked child, on the parent's pool."""
        return PoolStateError(
            f"pool {self.name!r} was opened in process {self.pid} and inherited through fork(); "
            f"its connections belong to the parent. Use {self._API_HINT} in the child, "
            "which open the child's own pool with the same settings"
        )

    def _lent_after_wait(self, conn: _C, started: float) -> _C:
        """Metrics for a connection obtained after queueing (the slow path): record the wait now; ``conn``."""
        now = monotonic()
        conn._precog.lent = -now  # type: ignore[attr-defined]  # negative: the wait is recorded here
        self.metrics.waited(now - started)
        return conn

    def _returned(self, lent: float, usage: bool) -> None:
        """Metrics for a connection given back (``lent``: its `_precog.lent` mark). The sync `give_back`
        inlines this (the fast path); an interrupt in it loses a sample, never a connection."""
        returns = self.metrics.returns
        now = monotonic()
        returns.append((lent, now))  # folded into the histograms off the read path
        if usage:
            self._stats[self._USAGE_MS] += lent_ms(lent, now)
        if len(returns) >= FOLD_AT:
            self.metrics.fold_soon()

    def _state(self, idle: int, pending: int) -> PoolState:
        """The pool's state for `precog_db.metrics`, from its idle and pending counts (read under its lock)."""
        # Connections the pool counts that are not idle: lent out (or, briefly, being opened).
        # No per-connection registry: a WeakSet's removal callback is Python code that runs when
        # a connection is freed, where an interrupt raised by a signal handler would be lost.
        used = max(self._nconns - idle, 0)
        return PoolState(idle=idle, used=used, pending_requests=pending, min=self.min_size, max=self.max_size)

    # --- the errors of a caller left without a connection ---------------------------------------------

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

    def _check_rejected(self, waited: float, rejected: list[BaseException]) -> PoolExhaustedError:
        """The timeout of a caller whose connections all failed the ``check=`` callback (no I/O)."""
        last = rejected[-1]
        return PoolExhaustedError(
            f"pool {self.name!r} ({self.env.value}) got no connection within {waited:.1f}s: the check= callback "
            f"rejected {len(rejected)} connection(s), the last with {type(last).__name__}: "
            f"{failure_reason(last, self.settings)}. Each rejected connection is replaced, with a growing pause "
            "between checks; fix the check or what it tests"
        )
