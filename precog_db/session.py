"""Session state a borrower may leave on a pooled connection, noticed for free and undone at checkin.

A pooled connection is shared by borrowers one after the other. Anything one
of them leaves in the server session (``SET``, ``SET ROLE``, a temporary table,
a prepared statement, ``LISTEN``, a session advisory lock, a ``WITH HOLD``
cursor, read-only turned off) or on the psycopg connection (isolation level,
autocommit, cursor or row factory) would reach the next one. The pool's
connections therefore:

* run every statement through `PrecogCursor` / `PrecogServerCursor`, which mark
  the connection *dirty* when a statement may change session state. The verdict
  is a cheap, cached look at the statement text (`changes_session`): plain
  reads and writes are clean, everything else is dirty;
* remember at connect time the parameters the server reports on its own
  (``default_transaction_read_only``, ``is_superuser``, ``TimeZone``,
  ``search_path`` where reported), so
  a change made where the text does not show it (a function calling
  ``set_config``) is still seen, with no round trip.

At checkin `needs_restore` compares all of this without a round trip; only a
connection that changed something pays `restore`: the client attributes are
put back and, if the session may have changed, one ``DISCARD ALL`` (which also
brings every setting back to its startup value, ``default_transaction_read_only=on``
included), and psycopg's prepared-statement cache is emptied to match.

Known limit: a server-side function that changes a setting the server does not
report (``search_path`` before PostgreSQL 18, ``statement_timeout``), creates a
temporary table or takes a session advisory lock, called from a plain
``SELECT``, is not noticed; nor is SQL sent through ``conn.pgconn`` directly.

The psycopg internals used here (the connection's client attributes, handlers, ``_prepared`` and
``_adapters``, the cursors' ``_convert_query`` ...) are declared in `precog_db._compat` (checked by
tests/test_compat.py), among them the connection's generators ``_rollback_gen``,
``_set_autocommit_gen``, ``_set_read_only_gen``, ``_set_isolation_level_gen``, ``_set_deferrable_gen``,
``_exec_command``, which `restore` runs through the connection's own ``wait``.

Where the code is (docs/DESIGN.md, "Sync and async from one source"): the decisions (the classifier
hooks, `needs_restore`, the reset generator) in `precog_db._session_base`, with no I/O; the cursors
and `restore` written once in the asyncio source `precog_db._session_async` (`AsyncPrecogCursor`,
`AsyncPrecogServerCursor`, `restore`), from which `precog_db._session_sync` (`PrecogCursor`,
`PrecogServerCursor`, `restore`) is generated. This module re-exports them, and `adopt` installs
either layer's cursors.
"""

from __future__ import annotations

import weakref
from typing import Any

import psycopg

from precog_db._conn_state import state
from precog_db._session_async import AsyncPrecogCursor, AsyncPrecogServerCursor
from precog_db._session_base import (
    AnyConnection,
    RestoreFailed,
    _forgot_commit,
    _TrackingPrepareManager,
    _watch_statements,
    baseline,
    changes_session,
    mark_raw,
    needs_restore,
    reported,
    user_setup,
)
from precog_db._session_sync import PrecogCursor, PrecogServerCursor, restore

__all__ = [
    "AnyConnection",
    "AsyncPrecogCursor",
    "AsyncPrecogServerCursor",
    "PrecogCursor",
    "PrecogServerCursor",
    "RestoreFailed",
    "_forgot_commit",
    "adopt",
    "baseline",
    "changes_session",
    "mark_raw",
    "needs_restore",
    "reported",
    "restore",
    "user_setup",
]


def adopt(conn: AnyConnection, cursor_factory: type[Any] | None = None, *, shared: bool = False) -> None:
    """Install the tracking cursors on a new pooled connection of either layer (before any user setup runs).

    ``cursor_factory``: a `PrecogCursor` subclass (sync) or `AsyncPrecogCursor`
    subclass (asyncio) instead of the plain one. ``shared``: the server session
    is not this connection's own (a transaction-mode pooler hands each
    transaction to any server connection), so `restore` never sends
    ``DISCARD ALL``: it would reset a server connection another client uses
    next, and nothing of this client's lives there. The prepared-statement
    manager is replaced by `_TrackingPrepareManager`, which sees the statements
    of every cursor, hand-built ones included.
    """
    c: Any = conn
    st = state(conn)  # a connection precog_db opened has it already; any other gets it here
    if isinstance(conn, psycopg.AsyncConnection):
        st.factories = (cursor_factory or AsyncPrecogCursor, AsyncPrecogServerCursor)
    else:
        st.factories = (cursor_factory or PrecogCursor, PrecogServerCursor)
    tracker = _TrackingPrepareManager()
    tracker.prepare_threshold = c._prepared.prepare_threshold
    tracker.prepared_max = c._prepared.prepared_max
    tracker._conn = weakref.ref(c)
    c._prepared = tracker
    c.cursor_factory, c.server_cursor_factory = st.factories
    st.shared = shared
    _watch_statements(conn)
    st.dirty = False
    st.busy = False
