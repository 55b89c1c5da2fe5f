"""SQLAlchemy engines whose every connection comes from precog_db's pool.

Install the extra, ``pip install 'precog-db[sqlalchemy]'``, then::

    from precog_db.sqlalchemy import create_engine

    engine = create_engine()                     # the resolved environment (PRECOG_ENV, DB_NAME, config/.env)
    reports = create_engine(read_only=True)      # every transaction BEGIN READ ONLY
    with Session(engine) as session, session.begin():
        session.add(Order(...))

and, for asyncio, ``create_async_engine()`` over `precog_db.aio`'s pool.

What it does (docs/SQLALCHEMY.md):

* **One pool.** The engine's SQLAlchemy pool (`PrecogPoolBridge`, a `sqlalchemy.pool.NullPool`) keeps no
  connection of its own: each checkout borrows a connection from precog_db's process-wide pool
  (`precog_db.pool.get_pool` / `precog_db.apool`), and each return gives it back to that pool, which
  restores the session (``DISCARD ALL`` after a raw borrow, the same check-in rules as ``get_connection``).
  The pool's sizes, timeouts and metrics are the environment's ``DB_POOL_*``; a borrower that waits
  longer than ``DB_POOL_TIMEOUT`` gets `precog_db.errors.PoolExhaustedError`, not SQLAlchemy's.
* **The chokepoint.** Those connections are opened by precog_db (naming rule, gate, production guard,
  identity stamp, reply bound, per-connection credentials).
* **The production refusal** happens in ``create_engine`` itself, before any connection is opened: it
  opens (or reuses) the process-wide pool, whose guard runs first.
* **Transactions.** A borrowed connection is handed to SQLAlchemy with ``autocommit`` off, so
  SQLAlchemy's implicit ``BEGIN`` starts a transaction: ``BEGIN READ WRITE`` for a normal engine,
  ``BEGIN READ ONLY`` for a ``read_only=True`` one (the server refuses writes, as in
  ``get_cursor()``); ``postgresql_readonly=False`` is refused on a read-only engine.

A hand-built ``sqlalchemy.create_engine("postgresql+psycopg://...")`` is none of this: its connections
bypass precog_db entirely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.pool import NullPool
from sqlalchemy.util.concurrency import await_only

from precog_db import apool as _apool
from precog_db import pool as _pool
from precog_db import replicas
from precog_db.environment import Environment
from precog_db.errors import ConfigurationError, PrecogDBError
from precog_db.session import mark_raw
from precog_db.settings import DatabaseSettings, settings_for

if TYPE_CHECKING:
    from psycopg import AsyncConnection, Connection
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["PrecogPoolBridge", "create_async_engine", "create_engine"]

#: SQLAlchemy arguments that would build a second pool or bypass precog_db's: refused, with the reason.
_REFUSED = {
    "poolclass": "the engine's connections come from precog_db's pool",
    "pool": "the engine's connections come from precog_db's pool",
    "creator": "the engine's connections are opened by precog_db's chokepoint",
    "async_creator": "the engine's connections are opened by precog_db's chokepoint",
    "pool_size": "set DB_POOL_MIN_CONN / DB_POOL_MAX_CONN for the environment instead",
    "max_overflow": "set DB_POOL_MAX_CONN for the environment instead",
    "pool_timeout": "set DB_POOL_TIMEOUT for the environment instead",
    "pool_recycle": "set DB_POOL_MAX_LIFETIME for the environment instead",
    "pool_pre_ping": "precog_db's pool checks each connection's liveness at checkout",
    "pool_use_lifo": "precog_db's pool decides the order",
    "pool_reset_on_return": "precog_db's pool restores each connection on return",
    "connect_args": "connection options come from the environment's settings (DB_*)",
    "isolation_level": "use execution_options(isolation_level=...) on a connection, which resets on return",
}


def _refuse(kwargs: dict[str, Any], api: str) -> None:
    for name, why in _REFUSED.items():
        if name in kwargs:
            raise ConfigurationError(f"precog_db.sqlalchemy.{api}({name}=...) is not accepted: {why}")


class PrecogPoolBridge(NullPool):
    """SQLAlchemy's pool over precog_db's: a `NullPool` whose "close" gives the connection back.

    SQLAlchemy's `NullPool` opens a DBAPI connection per checkout (its creator) and closes it on return;
    here the creator borrows from precog_db's pool and `_close_connection` returns it there instead,
    so SQLAlchemy keeps nothing and precog_db's pool is the only one.
    """

    def _close_connection(self, connection: Any, *, terminate: bool = False) -> None:
        conn: Any = getattr(connection, "driver_connection", connection)  # the async dialect's adapter wraps it
        lender = getattr(conn, "_pool", None)
        if terminate or lender is None:
            # Invalidated by SQLAlchemy (a disconnect) or not lent: closed; a lender replaces it on return.
            conn.close() if not _is_async(conn) else await_only(conn.close())
            if lender is None:
                return
        if isinstance(lender, _apool.AsyncPrecogPool):
            await_only(lender.give_back(conn))
        else:
            lender.checkin(conn)


def _is_async(conn: Any) -> bool:
    from psycopg import AsyncConnection

    return isinstance(conn, AsyncConnection)


class _Borrower:
    """The creator: borrows from the process-wide pool for ``settings`` (reopened after close_pool or a fork)."""

    def __init__(self, settings: DatabaseSettings, read_only: bool, replica: bool) -> None:
        self.settings = settings
        self.read_only = read_only
        self.replica = replica
        self._pool: Any = None

    def _sync_pool(self) -> _pool.PrecogPool:
        pool = _pool.active_pool()
        if pool is None or pool is not self._pool or pool.closed:
            # Reused when open for the same target; PoolStateError when open for another one.
            pool = self._pool = _pool.initialize_pool(settings=self.settings)
        return pool

    def connect(self) -> Connection[Any]:
        pool = self._sync_pool()
        if self.replica:
            pool = replicas.choose(pool)
        conn = pool.checkout()
        self._prepare(conn)
        return conn

    async def aconnect(self) -> AsyncConnection[Any]:
        pool = _apool.active_pool()
        if pool is None or pool is not self._pool or pool.closed:
            pool = self._pool = await _apool.initialize_pool(settings=self.settings)
        if self.replica:
            from precog_db import _replicas_async

            pool = await _replicas_async.choose(pool)
        conn = await pool.lend()
        mark_raw(conn)
        try:
            await conn.set_autocommit(False)  # see _prepare
            await conn.set_read_only(self.read_only)
        except BaseException:
            await pool.give_back(conn)
            raise
        return conn

    def _prepare(self, conn: Connection[Any]) -> None:
        try:
            # SQLAlchemy's transactions are DBAPI ones: autocommit off, so its implicit BEGIN happens;
            # READ WRITE, or READ ONLY on a read-only engine. The pool's give_back restores autocommit.
            conn.autocommit = False
            conn.read_only = self.read_only
        except BaseException:
            lender: Any = conn._pool
            lender.checkin(conn)
            raise


def _engine_kwargs(settings: DatabaseSettings, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"poolclass": PrecogPoolBridge, "pool_reset_on_return": "rollback", **kwargs}


def _url(settings: DatabaseSettings, driver: str) -> sqlalchemy.URL:
    # Only the dialect is read from it (and shown by repr(engine)); connections come from the creator.
    return sqlalchemy.URL.create(f"postgresql+{driver}", database=settings.dbname)


def _listen(engine: Engine, read_only: bool) -> None:
    @event.listens_for(engine, "handle_error")
    def _precog_errors(context: ExceptionContext) -> BaseException | None:
        # No connection yet (checkout): precog_db's own error (PoolExhaustedError, a refusal) is raised
        # as itself, not wrapped in sqlalchemy.exc.OperationalError.
        if context.connection is None and isinstance(context.original_exception, PrecogDBError):
            return context.original_exception
        return None

    if read_only:

        @event.listens_for(engine, "set_connection_execution_options")
        def _stay_read_only(conn: Any, opts: dict[str, Any]) -> None:
            if opts.get("postgresql_readonly") is False or opts.get("isolation_level") == "AUTOCOMMIT":
                raise ConfigurationError(
                    "this engine is read-only (create_engine(read_only=True)); use an engine made with "
                    "create_engine() for writes"
                )


def _resolve(env: str | Environment | None, settings: DatabaseSettings | None, api: str) -> DatabaseSettings:
    return settings_for(env, settings, caller=api)


def create_engine(
    env: str | Environment | None = None,
    *,
    settings: DatabaseSettings | None = None,
    read_only: bool = False,
    replica: bool = False,
    **kwargs: Any,
) -> Engine:
    """An `Engine` for the resolved environment whose connections all come from precog_db's pool.

    Opens (or reuses) the process-wide pool first, so the production guard, the naming rule and the
    identity stamp are checked here, before the engine exists. ``read_only=True``: every transaction
    is ``BEGIN READ ONLY``. ``replica=True`` (implies ``read_only``): each checkout reads from a fresh
    ``DB_REPLICA_HOSTS`` replica when there is one, as ``get_cursor(replica=True)``. ``kwargs`` go to
    `sqlalchemy.create_engine` (``echo``, ``execution_options`` ...), except those that would build
    a second pool or other connections (refused with `ConfigurationError`).
    """
    _refuse(kwargs, "create_engine")
    settings = _resolve(env, settings, "create_engine")
    read_only = read_only or replica
    borrower = _Borrower(settings, read_only, replica)
    borrower._sync_pool()  # the guard, the stamp, the probe: before any engine exists
    engine = sqlalchemy.create_engine(
        _url(settings, "psycopg"), creator=borrower.connect, **_engine_kwargs(settings, kwargs)
    )
    _listen(engine, read_only)
    return engine


async def create_async_engine(
    env: str | Environment | None = None,
    *,
    settings: DatabaseSettings | None = None,
    read_only: bool = False,
    replica: bool = False,
    **kwargs: Any,
) -> AsyncEngine:
    """`create_engine` for asyncio: an `AsyncEngine` over `precog_db.aio`'s pool (awaited: it opens the pool)."""
    from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

    _refuse(kwargs, "create_async_engine")
    settings = _resolve(env, settings, "create_async_engine")
    read_only = read_only or replica
    borrower = _Borrower(settings, read_only, replica)
    borrower._pool = await _apool.initialize_pool(settings=settings)
    engine = sa_create_async_engine(
        _url(settings, "psycopg_async"), async_creator=borrower.aconnect, **_engine_kwargs(settings, kwargs)
    )
    _listen(engine.sync_engine, read_only)
    return engine
