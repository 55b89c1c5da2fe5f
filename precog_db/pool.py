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
import os
import queue
import threading
from time import monotonic
from typing import Any

import psycopg
from psycopg import Connection
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

# Shared with the asyncio pool (precog_db._pool_base, precog_db._pool_registry), importable from here as before.
from precog_db._pool_base import FAILOVER_RECONNECT_DELAY as FAILOVER_RECONNECT_DELAY
from precog_db._pool_base import MAX_RECONNECT_DELAY as MAX_RECONNECT_DELAY
from precog_db._pool_base import PoolBase, audited_open, check_still_read_only, log_closed, log_opened
from precog_db._pool_base import check_pool_kwargs as check_pool_kwargs
from precog_db._pool_base import connection_is_usable as connection_is_usable
from precog_db._pool_base import lent_ms as lent_ms
from precog_db._pool_base import pooled_connect_kwargs as pooled_connect_kwargs
from precog_db._pool_base import refuse_foreign as refuse_foreign
from precog_db._pool_janitor import Janitor
from precog_db._pool_lending import Lending, _Slot
from precog_db._pool_registry import Registry
from precog_db._pool_registry import already_open as already_open
from precog_db._pool_registry import connection_difference as connection_difference
from precog_db._pool_registry import settings_differ as settings_differ
from precog_db.connection import PrecogConnection, check_gate, connect, prepare
from precog_db.connection import reply_timeout as reply_timeout
from precog_db.environment import Environment
from precog_db.errors import PrecogDBError
from precog_db.guard import production_confirmed
from precog_db.log import get_logger, route_pool_logging
from precog_db.metrics import PoolRecorder, PoolState
from precog_db.session import adopt, baseline, mark_raw, user_setup
from precog_db.settings import DatabaseSettings, settings_for
from precog_db.topology import PoolerCursor, session_setup

__all__ = ["PrecogPool", "close_pool", "create_pool", "get_pool", "initialize_pool"]

#: The pool base's former name (`precog_db.cursors` and older code import it from here).
PoolFaults = PoolBase

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

_IDLE = TransactionStatus.IDLE


class PrecogPool(Lending, Janitor, ConnectionPool[Connection[Any]]):
    """A `psycopg_pool.ConnectionPool` that knows its environment and settings.

    `lend` / `give_back` are what `get_cursor` and `get_connection` use
    (`checkout` / `checkin` wrap them for callers that handle the connection
    themselves): they add the liveness check, turn a checkout timeout into a
    `PoolExhaustedError` that says what to change, undo whatever session state
    a borrower left (`precog_db.session`), and lose no connection to an
    asynchronous exception (docs/DESIGN.md). Its `repr` shows only the pool name.

    Built from three parts: `precog_db._pool_base.PoolBase` (the decisions and
    state shared with the asyncio pool, no I/O), `precog_db._pool_lending.Lending`
    (checkout and checkin) and `precog_db._pool_janitor.Janitor` (maintenance
    requests from the main thread); this class opens and configures the
    physical connections.
    """

    _KIND = "PrecogPool"
    settings: DatabaseSettings

    def __init__(self, settings: DatabaseSettings, *, prod_confirmed: bool | None = None, **pool_kwargs: Any) -> None:
        # psycopg_pool's ``open``: None (not given) opens now, as psycopg_pool does, with its deprecation
        # warning on first use; either way through `open`, which starts the janitor thread first.
        open_now: bool | None = pool_kwargs.pop("open", None)
        self._init_janitor()
        #: Connections handed to a worker for replacement (see `_retire`).
        self._graves = queue.SimpleQueue()
        #: Behind a session-mode pooler, the SETs that replace the startup options (precog_db.topology).
        self._session_setup = session_setup(settings)
        params = self._setup(settings, prod_confirmed, pool_kwargs, (PrecogConnection, PrecogConnection))
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

    def drain(self) -> None:
        """Replace every connection, gracefully: after a credential rotation, or a failover.

        Idle connections are closed and reopened now (with the password as
        resolved now); connections in use finish their block undisturbed and
        are closed and replaced when given back. Callers keep being served
        meanwhile. See docs/OPERATIONS.md.
        """
        super().drain()
        log.info("pool_drained", pool=self.name, env=self.env.value)

    def _metrics_state(self) -> PoolState | None:
        """The pool's current state for `precog_db.metrics` (None when closed); read at snapshot time only."""
        if getattr(self, "_closed", True):  # closed, or still being constructed
            return None
        with self._lock:
            idle = len(self._pool)
            pending = sum(1 for w in self._waiting if not getattr(w, "_served", False))
            return self._state(idle, pending)

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
            with user_setup(conn):
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
            with user_setup(conn):
                self._user_configure(conn)

    def _connect(self, timeout: float | None = None) -> Connection[Any]:
        started = monotonic()
        try:
            self._check_target(self.prod_confirmed)
            conn = super()._connect(timeout)
        except (psycopg.Error, PrecogDBError) as exc:
            self._connect_failed(exc)
            raise
        self._connected(conn, started)
        return conn

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool and the pools of its read replicas, then stop the janitor thread.

        `precog_db.replicas` opens a replica's pool on first use and keeps the replicas on the pool they
        read for (``_precog_replicas``): their pools live and close with it.
        """
        super().close(timeout=timeout)  # first: a replica pool opening meanwhile sees it closed
        for replica in getattr(self, "_precog_replicas", None) or ():
            if replica.pool is not None:
                with contextlib.suppress(Exception):
                    replica.pool.close(timeout=1.0)

    def checkout(self, timeout: float | None = None) -> Connection[Any]:
        """Take a live, idle, autocommit connection out of the pool (give it back with `checkin`).

        `get_cursor` and `get_connection` use `lend` / `give_back`, which also
        survive an asynchronous exception (a signal handler raising) at any point.
        """
        conn = self.lend(_Slot(), timeout)
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


def create_pool(settings: DatabaseSettings, *, prod_confirmed: bool, **pool_kwargs: Any) -> PrecogPool:
    """Check, then open a pool for ``settings``.

    Order: production guard (no connection attempted before it), one probe
    connection bounded by the connect timeout (a clear error if it fails),
    then the pool. ``pool_kwargs`` go to `psycopg_pool.ConnectionPool`.
    Audited (`precog_db._pool_base.audited_open`) whatever the outcome.
    """
    with audited_open(settings):
        probe = connect(settings, operation="open a pool", prod_confirmed=prod_confirmed)
        probe.close()
        route_pool_logging()  # psycopg_pool's stdlib records become library events unless the app handles them
        pool = PrecogPool(settings, prod_confirmed=prod_confirmed, **{"open": False, **pool_kwargs})
        pool.open(wait=False)
    log_opened(pool)
    return pool


# --- the process-wide pool (the rules: precog_db._pool_registry) ----------------------------------


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


def get_pool() -> PrecogPool:
    """The process-wide pool, opened from the environment on first use.

    In a child forked while the parent had a pool open, the child's own pool
    is opened with the parent pool's settings.
    """
    pool = _State.registry.lend_open()
    return pool if pool is not None else initialize_pool(**_State.registry.reopen_kwargs())


def inherited_settings() -> DatabaseSettings | None:
    """In a forked child, the settings of the pool the parent had open (the child reopens it on first use)."""
    return _State.registry.inherited_settings()


def active_pool() -> PrecogPool | None:
    """The process-wide pool if one is open, without opening one."""
    return _State.registry.pool


def close_pool(timeout: float = 5.0) -> None:
    """Close the process-wide pool, if any. Idempotent."""
    with _State.lock:
        pool = _State.registry.take()
    if pool is not None:
        pool.close(timeout=timeout)
        log_closed(pool)
