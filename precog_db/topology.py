"""Beyond one server: what the pool does behind PgBouncer and across a failover (docs/TOPOLOGY.md).

**Transaction-mode pooler** (``DB_POOLER=transaction``). PgBouncer hands each
transaction to whichever server connection is free, so nothing may live in a
server session:

* no server-side prepared statement (``prepare_threshold=None`` on every
  connection: psycopg's automatic ``_pg3_N`` statements would land on a server
  connection another client uses next);
* no startup ``options``: the read-only default of `get_cursor()` is kept per
  transaction by `PoolerCursor`. A statement run outside a transaction is sent
  as ``BEGIN READ ONLY`` / the statement / ``ROLLBACK`` in one pipeline: one
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

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from typing import Any

import psycopg
from psycopg import Connection
from psycopg.pq import TransactionStatus
from psycopg.pq.abc import PGconn

from precog_db._pipelining import FirstStatementCursor, QueueingPipeline, _exit_mode
from precog_db._sqlclass import classify
from precog_db.session import PrecogCursor, _forgot_commit
from precog_db.settings import DatabaseSettings

__all__ = [
    "PoolerCursor",
    "PoolerFirstStatementCursor",
    "cannot_write",
    "session_level",
    "session_setup",
    "session_setup_sql",
]

_IDLE = TransactionStatus.IDLE
_BEGIN = b"BEGIN READ ONLY"
_END = b"ROLLBACK"
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


class PoolerCursor(PrecogCursor):
    """The pool's cursor behind a transaction-mode pooler: read-only per transaction, no session state."""

    __slots__ = ()

    def _outside_transaction(self) -> bool:
        conn: Any = self._conn
        # A transaction() entered in pipeline mode has its BEGIN queued, not yet sent: inside all the same.
        # (Only in pipeline mode: after an explicit COMMIT statement psycopg still counts the transaction.)
        return (
            bool(conn._autocommit)
            and conn.pgconn.transaction_status == _IDLE
            and not (conn._num_transactions and conn._pipeline is not None)
        )

    def _plain(self, command: bytes) -> None:
        """One of the wrapper's own commands: no cursor (nothing to judge), queued in pipeline mode."""
        conn: Any = self._conn
        with conn.lock:
            conn.wait(conn._exec_command(command))

    def _end(self) -> None:
        """End the read-only transaction this cursor opened, whatever state it is in (a ROLLBACK)."""
        conn: Any = self._conn
        if conn.closed or conn.pgconn.transaction_status == _IDLE or conn._pipeline is not None:
            return  # nothing open, or the user's own pipeline, which ends it when it exits
        try:
            self._plain(_END)
        except psycopg.Error:
            conn.close()

    @contextmanager
    def _pipeline(self) -> Iterator[Any]:
        """A pipeline that reads nothing before its one sync (`QueueingPipeline`), or the borrower's own, nested.

        With psycopg's own pipeline a server error could be read while statements were still
        queued and raised inside the block; its exit then logged "error ignored terminating
        <psycopg.Pipeline>" (21.13). That exit also sends a Flush after the Sync which, reaching
        PgBouncer once it has handed the server connection back, can pin that connection to this
        client (other clients then wait out query_wait_timeout): here the block ends with the Sync
        alone, as `precog_db._pipelining`'s blocks do.
        """
        conn: Any = self._conn
        if conn._pipeline is not None:
            with conn.pipeline() as nested:
                yield nested
            return
        pipeline = QueueingPipeline(conn)
        pipeline.__enter__()  # libpq enters pipeline mode: nothing is sent
        conn._pipeline = pipeline
        try:
            try:
                yield pipeline
            except BaseException:
                with suppress(psycopg.Error):  # what was queued before the block failed (its BEGIN)
                    pipeline.sync()
                raise
            pipeline.sync()  # one write, one wait: the server's error, if any, is raised here
        finally:
            if not _exit_mode(conn, pipeline):
                conn.close()

    def _read_only(self, run: Callable[[], Any]) -> None:
        """Run one statement as BEGIN READ ONLY / statement / ROLLBACK, pipelined: one round trip."""
        conn: Any = self._conn
        conn._precog_busy = True
        try:
            with self._pipeline():
                self._plain(_BEGIN)
                run()
                self._plain(_END)
        except psycopg.errors.ReadOnlySqlTransaction as exc:
            self._end()
            conn._precog_busy = False
            error = _forgot_commit(conn, exc)
            if error is exc:
                raise
        except psycopg.Error:  # the server's error, or SessionStateError before anything was sent
            self._end()
            conn._precog_busy = False
            raise
        except BaseException:
            self._end()  # an interrupt: _precog_busy stays set, so the pool closes the connection
            raise
        else:
            conn._precog_busy = False
            return
        raise error.with_traceback(None)

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Any:
        if not self._outside_transaction():
            return super().execute(query, params, prepare=False, binary=binary)
        self._read_only(partial(PrecogCursor.execute, self, query, params, prepare=False, binary=binary))
        return self

    def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        if not self._outside_transaction():
            return super().executemany(query, params_seq, returning=returning)
        self._read_only(partial(PrecogCursor.executemany, self, query, params_seq, returning=returning))
        return None

    @contextmanager
    def copy(self, statement: Any, params: Any = None, *, writer: Any = None) -> Iterator[Any]:
        """COPY outside a transaction runs in its own read-only transaction (two more round trips)."""
        if not self._outside_transaction():
            with super().copy(statement, params, writer=writer) as copy:
                yield copy
            return
        self._plain(_BEGIN)
        try:
            with super().copy(statement, params, writer=writer) as copy:
                yield copy
        except psycopg.errors.ReadOnlySqlTransaction as exc:
            self._end()  # the read-only transaction is this cursor's: once it is over, say what to do
            if (error := _forgot_commit(self._conn, exc)) is exc:
                raise
        except BaseException:
            self._end()
            raise
        else:
            self._end()
            return
        raise error.with_traceback(None)

    def stream(self, query: Any, params: Any = None, *, binary: bool | None = None, size: int = 1) -> Iterator[Any]:
        """A streamed query outside a transaction runs in its own read-only transaction."""
        if not self._outside_transaction():
            yield from super().stream(query, params, binary=binary, size=size)
            return
        self._plain(_BEGIN)
        try:
            yield from super().stream(query, params, binary=binary, size=size)
        finally:
            self._end()


class PoolerFirstStatementCursor(FirstStatementCursor, PoolerCursor):
    """A ``commit=True`` block's cursor behind a transaction-mode pooler: BEGIN with the first statement.

    The first statement is converted by `PoolerCursor` (a session-state statement is refused
    before anything is sent) and never prepared, then queued behind the block's BEGIN.
    """

    __slots__ = ()
    _PREPARE = False
