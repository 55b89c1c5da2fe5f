"""The no-I/O half of `precog_db.session`, shared by both layers: the classifier hooks, the reset's decisions.

`precog_db.session` explains the borrower isolation and re-exports these;
the cursors and `restore`, which do I/O, are written once in
`precog_db._session_async`, from which `precog_db._session_sync` is generated.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection, Connection
from psycopg.abc import PQGen
from psycopg.adapt import AdaptersMap
from psycopg.pq import TransactionStatus
from psycopg.pq.abc import PGconn

from precog_db._compat import PrepareManager
from precog_db._conn_state import ConnState, state
from precog_db._sqlclass import CLEAN, UNREADABLE, classify
from precog_db.errors import ReadOnlyWriteError, SessionStateError, TransactionControlError

#: A connection of either layer.
AnyConnection = Connection[Any] | AsyncConnection[Any]
#: The caller's own setup, run again by `restore` after ``DISCARD ALL`` (one per layer).
AsyncReconfigure = Callable[[AsyncConnection[Any]], Awaitable[None]]
Reconfigure = Callable[[Connection[Any]], None]

__all__ = [
    "AnyConnection",
    "AsyncReconfigure",
    "Reconfigure",
    "RestoreFailed",
    "baseline",
    "changes_session",
    "mark_raw",
    "needs_restore",
    "reported",
    "restore_gen",
    "settled",
    "user_setup",
]

_IDLE = TransactionStatus.IDLE


def changes_session(query: bytes) -> bool:
    """True unless PostgreSQL's parser shows ``query`` leaves nothing in the session (`precog_db._sqlclass`)."""
    verdict = classify(query)
    return verdict.session is not None or verdict.ends_transaction  # a BEGIN left open: reset, conservatively


def _in_read_only_default(conn: Any) -> bool:
    """No transaction the library or psycopg opened read-write: the read-only default is the only guard.

    A transaction the borrower opened with its own ``BEGIN`` statement, or a pipeline of its own,
    counts as none (``BEGIN`` then ``SET TRANSACTION READ WRITE`` would otherwise write).
    """
    st = state(conn)
    return bool(conn._autocommit) and not conn._num_transactions and st.pending_begin is None and not st.setup


@contextmanager
def user_setup(conn: AnyConnection) -> Iterator[None]:
    """Around the caller's ``configure=``: its statements are setup, checked afterwards as a whole.

    A ``configure=`` may run what a borrower may not (a ``DO`` block, ``SET
    default_transaction_read_only``): the pool checks the result instead
    (`precog_db._pool_base.check_still_read_only` refuses a connection left writable).
    """
    st = state(conn)
    st.setup = True
    try:
        yield
    finally:
        st.setup = False


def _mark(conn: Any, query: bytes) -> None:
    """Judge one statement before it is sent: mark the session dirty, or refuse it (both layers)."""
    verdict = classify(query)
    if verdict is CLEAN:
        return
    st = state(conn)  # a cursor of ours on a connection precog_db did not open: the defaults
    if verdict.session is not None:
        if st.shared and verdict.session.startswith(UNREADABLE):
            raise SessionStateError(
                f"{verdict.session}: behind a transaction-mode pooler (DB_POOLER=transaction) a statement the "
                "library cannot judge is not sent, since it might change the session other clients share. Fix "
                "the SQL; if it is valid for your server but newer than the parser (pglast) knows, upgrade pglast"
            )
        if st.shared:
            raise SessionStateError(
                f"this statement changes the server session ({verdict.session}), and behind a transaction-mode "
                "pooler (DB_POOLER=transaction) the session is shared with other clients; the statement was not "
                "sent. Use SET LOCAL, set_config(..., true) or pg_advisory_xact_lock inside "
                "get_cursor(commit=True), ON COMMIT DROP for temporary tables, or DB_POOLER=session"
            )
        st.dirty = True
    elif verdict.ends_transaction and not st.shared:
        st.dirty = True  # a BEGIN its borrower may leave open: checked and undone on return
    if verdict.escapes is not None and _in_read_only_default(conn):
        raise ReadOnlyWriteError(
            f"refused before it was sent: {verdict.escapes}, which would get past the read-only default of "
            "pooled connections. To write, use get_cursor(commit=True), or `with conn.transaction():` on a "
            "get_connection() connection"
        )
    if verdict.ends_transaction and conn._num_transactions:
        raise TransactionControlError(
            "refused before it was sent: a BEGIN, COMMIT or ROLLBACK statement inside get_cursor(commit=True) or "
            "conn.transaction() would end the block's transaction, and what follows would run outside it. The "
            "block commits when it ends (and rolls back if it raises); for a partial undo nest "
            "conn.transaction(), which uses a savepoint"
        )


def _owned(conn: Any, start: PQGen[None]) -> PQGen[None]:
    """Run a pool cursor's ``_start_query`` with the connection told the statement is judged.

    The flag is down again however the generator ends, so a pool cursor that fails before
    reaching the connection (a closed cursor) leaves no pass for a hand-built one.
    """
    st: ConnState = conn._precog
    st.own = True
    try:
        return (yield from start)
    finally:
        st.own = False


def _untracked_statement(conn: Any) -> None:
    """A statement from a cursor the pool did not make (a hand-built psycopg cursor, a changed cursor_factory)."""
    st: ConnState = conn._precog
    if st.shared:
        raise SessionStateError(
            "behind a transaction-mode pooler (DB_POOLER=transaction) statements run only through the pool's own "
            "cursors (get_cursor(), conn.execute(), conn.cursor()), which keep them read-only outside a "
            "transaction and refuse session state; a hand-built psycopg cursor or a replaced cursor_factory "
            "would bypass both. The statement was not sent"
        )
    st.dirty = True  # its statement was not judged: the session may have changed


def _watch_statements(conn: AnyConnection) -> None:
    """Make every cursor's statement on ``conn`` pass `_untracked_statement` unless a pool cursor sent it.

    psycopg's cursors, all of them, call ``conn._start_query()`` before sending a
    statement (``execute``, ``stream``, a server cursor's ``DECLARE``, ``copy``);
    the pool's cursors raise ``_precog.own`` just before. The hook is an
    instance attribute holding only a weak reference, so the connection is
    still freed by reference counting, never left for the garbage collector.
    """
    ref = weakref.ref(conn)
    start = type(conn)._start_query

    def _start_query() -> PQGen[None]:
        c: Any = ref()
        st: ConnState = c._precog
        if st.own:
            st.own = False
        else:
            _untracked_statement(c)
        return start(c)

    c: Any = conn
    state(conn).own = False
    c._start_query = _start_query


class _TrackingPrepareManager(PrepareManager):
    """psycopg's per-connection prepared-statement manager, which every cursor class consults.

    Every ``execute``/``executemany`` of any cursor on the connection, including a
    ``psycopg.ClientCursor(conn)`` or ``psycopg.Cursor(conn)`` built by hand
    (which bypasses the connection's ``cursor_factory``), asks it whether to
    prepare the statement: so it sees the statement text and judges it exactly
    like `PrecogCursor` does (`_mark`: dirty, or refused before it is sent).
    """

    dirty = False
    _conn: Callable[[], Any] = staticmethod(lambda: None)

    def get(self, query: Any, prepare: bool | None = None) -> Any:
        if (conn := self._conn()) is not None:
            _mark(conn, query.query)
            if conn._precog.shared:
                prepare = False  # behind a transaction pooler, whatever prepare_threshold a borrower set
        elif not self.dirty and changes_session(query.query):
            self.dirty = True
        return super().get(query, prepare)


def _forgot_commit(conn: Any, exc: psycopg.errors.ReadOnlySqlTransaction) -> BaseException:
    """The error for a write refused by the read-only default (not by an explicit READ ONLY transaction)."""
    if conn.pgconn.transaction_status != TransactionStatus.IDLE:
        return exc
    first = str(exc).splitlines()[0] if str(exc) else "cannot write in a read-only transaction"
    return ReadOnlyWriteError(
        f"{first}: pooled connections are read-only outside a transaction. To write, use "
        "get_cursor(commit=True), or `with conn.transaction():` on a get_connection() connection",
        info=getattr(exc, "_info", None),
    )


class _Marking:
    """The classifier hook shared by the sync and the asyncio client cursors (no I/O)."""

    __slots__ = ()
    _conn: Any

    def _convert_query(self, query: Any, params: Any = None) -> Any:
        pgq = super()._convert_query(query, params)  # type: ignore[misc]
        _mark(self._conn, pgq.query)
        return pgq

    def _start_query(self, query: Any = None) -> Any:
        return _owned(self._conn, super()._start_query(query))  # type: ignore[misc]


def _statement_failed(conn: Any, exc: psycopg.Error) -> BaseException:
    """After a server error: the statement ended cleanly; the error to raise (``exc`` or a `ReadOnlyWriteError`)."""
    state(conn).busy = False
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction) and not isinstance(exc, ReadOnlyWriteError):
        return _forgot_commit(conn, exc)
    return exc


class _DeclareMarking:
    """The named-cursor hook shared by both layers: a ``WITH HOLD`` cursor outlives its transaction (no I/O).

    The ``DECLARE`` itself, the query inside it included, is judged like any
    statement by `_Marking` when psycopg converts it.
    """

    __slots__ = ()
    _conn: Any
    _withhold: bool

    def _make_declare_statement(self, query: Any) -> Any:
        if self._withhold and state(self._conn).shared:
            raise SessionStateError(
                "a WITH HOLD cursor outlives its transaction in the server session, which a transaction-mode "
                "pooler (DB_POOLER=transaction) shares with other clients; the statement was not sent. "
                "Fetch the rows inside the transaction, or use DB_POOLER=session"
            )
        return super()._make_declare_statement(query)  # type: ignore[misc]


_DTRO = b"default_transaction_read_only"
_SUPERUSER = b"is_superuser"
_TIMEZONE = b"TimeZone"
_SEARCH_PATH = b"search_path"


def reported(pgconn: PGconn) -> tuple[bytes | None, ...]:
    """The session parameters the server reports whenever they change (no round trip).

    ``default_transaction_read_only`` (PostgreSQL 14+: the read-only promise),
    ``is_superuser`` (changes with ``SET ROLE`` / ``SET SESSION AUTHORIZATION``
    between a superuser and another role), ``TimeZone``, and ``search_path``
    (reported from PostgreSQL 18; None before).
    """
    status = pgconn.parameter_status
    return (status(_DTRO), status(_SUPERUSER), status(_TIMEZONE), status(_SEARCH_PATH))


def _reported_changed(pgconn: PGconn, base: tuple[bytes | None, ...]) -> bool:
    status = pgconn.parameter_status
    return (
        status(_DTRO) != base[0]
        or status(_SUPERUSER) != base[1]
        or status(_TIMEZONE) != base[2]
        or (base[3] is not None and status(_SEARCH_PATH) != base[3])
    )


def baseline(conn: AnyConnection) -> None:
    """Record the connection's state once its setup is complete: what every later borrower must find."""
    c: Any = conn
    st: ConnState = c._precog
    st.dirty = False
    st.reported = reported(conn.pgconn)
    st.row_factory = conn.row_factory
    st.prepare_threshold = conn.prepare_threshold
    st.handlers = (len(c._notice_handlers), len(c._notify_handlers))
    c._prepared.dirty = False
    # Client-side adapters: the borrower gets a child map of the configured one, so a loader or
    # dumper it registers (copy-on-write in psycopg) replaces a table, which is noticed and undone on return.
    st.adapters_template = conn.adapters
    c._adapters = AdaptersMap(conn.adapters)
    st.adapters_owned = _adapters_owned(c._adapters)


def mark_raw(conn: AnyConnection) -> None:
    """The connection itself is lent (`get_connection`, `checkout`, psycopg_pool's ``getconn``/``connection()``).

    Its borrower can run statements no tracker sees (a ``psycopg.ClientCursor(conn)``
    built by hand uses neither the cursor factory nor the prepared-statement
    manager), so its return always pays one ``DISCARD ALL``. `get_cursor` blocks,
    whose statements the trackers do see, keep their single round trip.
    """
    c: Any = conn
    c._precog.dirty = True


def _adapters_owned(adapters: Any) -> tuple[Any, ...]:
    """The identity of the tables of an `AdaptersMap`: psycopg copies a table before the first write to it.

    Identities rather than psycopg's ``_own_*`` flags: every cursor makes a child
    map of the connection's, which resets those flags on the connection's map
    (so a loader registered, then a query run, would look untouched), while a
    table, once copied, stays a different object. The baseline tables are
    shared with the template map, which keeps them alive: no identity is reused.
    """
    # ``_dumpers`` keeps its keys (the formats) in the order its constructor set them: a table
    # copied on write replaces its value in place, and a child map copies the dict, order included.
    # map(id, ...) runs in C: this sits on every connection's return.
    return (
        tuple(map(id, adapters._loaders)),
        tuple(map(id, adapters._dumpers_by_oid)),
        tuple(map(id, adapters._dumpers.values())),
        id(getattr(adapters.types, "_registry", None)),
    )


def needs_restore(conn: AnyConnection) -> bool:
    """True if the borrower changed anything: no round trip, a few attribute reads."""
    c: Any = conn
    st: ConnState = c._precog
    factories: Any = st.factories  # set by adopt, before any lending
    return bool(
        st.dirty
        or c._prepared.dirty
        or c._adapters is None
        or _adapters_owned(c._adapters) != st.adapters_owned
        or not c._autocommit
        or c._read_only is not False
        or c._isolation_level is not None
        or c._deferrable is not None
        or c.cursor_factory is not factories[0]
        or c.server_cursor_factory is not factories[1]
        or c.row_factory is not st.row_factory
        or c._prepared.prepare_threshold != st.prepare_threshold
        or (len(c._notice_handlers), len(c._notify_handlers)) != st.handlers
        or st.busy
        or c._num_transactions
        or c._pipeline is not None
        or _reported_changed(c.pgconn, st.reported)
    )


def _forget_prepared(conn: AnyConnection) -> None:
    """Empty psycopg's prepared-statement cache after ``DISCARD ALL`` dropped the statements on the server.

    psycopg clears it by itself only the first time it sees that command on a
    connection (it checks command statuses of statements new to its cache),
    so the next borrower would get "prepared statement _pg3_N does not exist".
    """
    prepared: Any = conn._prepared
    prepared._counts.clear()
    prepared._names.clear()
    prepared._to_flush.clear()


class RestoreFailed(Exception):
    """The session could not be brought back to its baseline: the connection must be closed."""


def restore_gen(conn: AnyConnection) -> PQGen[bool]:
    """Everything `restore` decides and sends, as a psycopg generator that either layer runs with its ``wait``.

    Raises `RestoreFailed` when the connection cannot be brought back.
    Returns True when it ran ``DISCARD ALL`` (the user's setup must then run again).
    """
    c: Any = conn
    st: ConnState = c._precog
    status = conn.pgconn.transaction_status
    if status == TransactionStatus.ACTIVE or status == TransactionStatus.UNKNOWN:
        raise RestoreFailed(f"connection returned {TransactionStatus(status).name}")
    if st.busy or c._num_transactions or c._pipeline is not None:
        # A statement, transaction() or pipeline() block was cut short (an
        # interrupt or a cancelled task in its bookkeeping): psycopg's own state
        # may be inconsistent, the connection must go.
        raise RestoreFailed("a statement, transaction() or pipeline() block was cut short by an interrupt")
    if status != TransactionStatus.IDLE:
        yield from c._rollback_gen()
    if not c._autocommit:
        yield from c._set_autocommit_gen(True)
    yield from c._set_read_only_gen(False)
    yield from c._set_isolation_level_gen(None)
    yield from c._set_deferrable_gen(None)
    factories: Any = st.factories  # set by adopt, before any lending
    cursor_factory, server_cursor_factory = factories
    if c.cursor_factory is not cursor_factory or c.server_cursor_factory is not server_cursor_factory:
        st.dirty = True  # statements may have run unseen
        c.cursor_factory, c.server_cursor_factory = cursor_factory, server_cursor_factory
    c.row_factory = st.row_factory
    c.prepare_threshold = st.prepare_threshold
    del c._notice_handlers[st.handlers[0] :]
    del c._notify_handlers[st.handlers[1] :]
    if c._adapters is None or _adapters_owned(c._adapters) != st.adapters_owned:
        c._adapters = AdaptersMap(st.adapters_template)
        st.adapters_owned = _adapters_owned(c._adapters)
    if st.shared:
        # Behind a transaction-mode pooler the server session is not ours to reset (see `adopt`);
        # session-changing statements were refused or rolled back (precog_db.topology).
        st.dirty = False
        c._prepared.dirty = False
        if reported(conn.pgconn) != st.reported:
            raise RestoreFailed("session parameters differ from the baseline behind a transaction-mode pooler")
        return False
    if not (st.dirty or c._prepared.dirty or reported(conn.pgconn) != st.reported):
        return False
    yield from c._exec_command(b"DISCARD ALL")
    _forget_prepared(conn)
    return True


def settled(conn: AnyConnection) -> None:
    """After ``DISCARD ALL`` and the user's setup: the session is back at its baseline, or raise."""
    c: Any = conn
    st: ConnState = c._precog
    if reported(conn.pgconn) != st.reported:
        raise RestoreFailed("session parameters differ from the baseline after DISCARD ALL")
    st.dirty = False
    c._prepared.dirty = False
