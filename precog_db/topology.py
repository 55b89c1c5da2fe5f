"""Beyond one server: what the pool does behind PgBouncer and across a failover (docs/TOPOLOGY.md).

**Transaction-mode pooler** (``DB_POOLER=transaction``). PgBouncer hands each
transaction to whichever server connection is free, so nothing may live in a
server session:

* no server-side prepared statement (``prepare_threshold=None`` on every
  connection: psycopg's automatic ``_pg3_N`` statements would land on a server
  connection another client uses next);
* no startup ``options``: the read-only default of `get_cursor()` and
  ``aio.get_cursor()`` is kept per transaction by `PoolerCursor` and
  `AsyncPoolerCursor` (one source: `precog_db._pooler_async`). A statement run
  outside a transaction is sent as ``BEGIN READ ONLY`` / the statement /
  ``ROLLBACK`` in one pipeline: one
  round trip, like the read-only session of a direct pool, and the ``ROLLBACK``
  undoes whatever session state the statement set (``set_config``, a
  temporary table, ``SET ROLE``) before the server connection goes back to
  PgBouncer;
* commands whose effect outlives the transaction and that a ``ROLLBACK``
  does not undo, or that would be committed by a ``commit=True`` block
  (``SET`` without ``LOCAL``, ``RESET``, ``DISCARD``, ``PREPARE``, ``LISTEN``,
  session advisory locks, ``WITH HOLD`` cursors, temporary tables without
  ``ON COMMIT DROP``), are refused with `SessionStateError` before they are sent;
* the pool's return path never sends ``DISCARD ALL`` (it would reset a server
  connection that is no longer this client's), and migrations, backups,
  restores and the stamp connect to ``DB_DIRECT_HOST`` (`precog_db.connection.direct_settings`).

**Session-mode pooler** (``DB_POOLER=session``): the client keeps its server
connection, so session state works, but PgBouncer refuses or drops startup
options; `session_setup` sets the read-only default (and the statement
timeout) with ``SET`` once per connection instead, and again after a reset.

**Failover** (``DB_HOST=a,b``): libpq tries the hosts in order and accepts
only a server that can write (``DB_TARGET_SESSION_ATTRS``); a pooled
connection whose server reports ``in_hot_standby=on`` (`cannot_write`, read from
the parameters the server pushes, no round trip) is discarded, not lent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg import Connection
from psycopg.pq.abc import PGconn

# The cursors are written once for both layers (precog_db._pooler_async, which generates _pooler_sync).
from precog_db._pooler_async import AsyncPoolerCursor as AsyncPoolerCursor
from precog_db._pooler_async import AsyncPoolerFirstStatementCursor as AsyncPoolerFirstStatementCursor
from precog_db._pooler_sync import PoolerCursor as PoolerCursor
from precog_db._pooler_sync import PoolerFirstStatementCursor as PoolerFirstStatementCursor
from precog_db._sqlclass import classify
from precog_db.settings import DatabaseSettings

__all__ = [
    "AsyncPoolerCursor",
    "AsyncPoolerFirstStatementCursor",
    "PoolerCursor",
    "PoolerFirstStatementCursor",
    "cannot_write",
    "session_level",
    "session_setup",
    "session_setup_sql",
]

_HOT_STANDBY = b"in_hot_standby"
_ON = b"on"


def session_level(query: bytes) -> bool:
    """True if ``query`` would leave state in the server session (PostgreSQL's parser decides: `_sqlclass`)."""
    return classify(query).session is not None


def cannot_write(pgconn: PGconn) -> bool:
    """The server reports it is a hot standby (PostgreSQL 14+ pushes ``in_hot_standby``; no round trip)."""
    return pgconn.parameter_status(_HOT_STANDBY) == _ON


def session_setup_sql(settings: DatabaseSettings) -> bytes | None:
    """Behind a session-mode pooler: the ``SET`` statements that replace the startup options (both layers)."""
    if settings.pooler != "session":
        return None
    statements = ["SET default_transaction_read_only = on"]
    if settings.statement_timeout_ms:
        statements.append(f"SET statement_timeout = {int(settings.statement_timeout_ms)}")
    return "; ".join(statements).encode()


def session_setup(settings: DatabaseSettings) -> Callable[[Connection[Any]], None] | None:
    """Behind a session-mode pooler: what the startup options would have set, as one ``SET`` round trip."""
    text = session_setup_sql(settings)
    if text is None:
        return None

    def setup(conn: Connection[Any]) -> None:
        conn.execute(text, prepare=False)  # simple query protocol (no parameters): one round trip

    return setup
