"""Fewer round trips for ``get_cursor(commit=True)``: libpq pipeline mode, used inside the block.

Two mechanisms (docs/DESIGN.md "Committed writes in fewer round trips"):

* **BEGIN with the first statement** (every ``commit=True`` block): the block
  sends no ``BEGIN`` when it is entered. The cursor it hands out is a
  `FirstStatementCursor`; its first ``execute`` / ``executemany`` enters
  pipeline mode, queues ``BEGIN READ WRITE`` and the statement, and syncs once,
  so both cost one round trip. The call waits for both replies before it
  returns: an error is raised by the ``execute`` that caused it, and the results
  are there for ``fetch*`` exactly as before. Later statements and the
  ``COMMIT`` run as before. Anything that cannot be pipelined safely (a
  statement string holding several statements, ``COPY``, ``stream``, a server
  cursor, anything run through ``cur.connection``) first gets a plain
  ``BEGIN`` of its own, as before this change.
* **pipeline=True** (opt-in): `PipelinedBlock` queues ``BEGIN``, every statement
  and the ``COMMIT`` and syncs once at the end of the block; a ``fetch*`` waits
  for the results queued so far (a flush, no sync). Errors surface late: see
  the ``get_cursor`` docstring and docs/DESIGN.md.

Safety: while a pipeline is being synced the connection's ``_precog_busy`` flag
is set (`precog_db.session`), so an interrupt raised by a signal handler in the
middle leaves the connection marked and the pool closes it instead of lending
it again; a connection still in pipeline mode (``_pipeline`` set) is never
lent either. The waits go through ``Connection.wait``, so the reply bound of
`precog_db.connection.PrecogConnection` covers them.

psycopg internals used here (checked by tests/test_pipeline.py::TestPsycopgInternals):
``Pipeline._exit``, ``Pipeline._fetch_gen``, ``Pipeline.result_queue``,
``BaseConnection._pipeline``; a ``Transaction`` is entered directly (not
through ``conn.transaction()``, which would sync the pipeline at ``BEGIN``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Protocol

import psycopg
from psycopg import Connection, Pipeline, Transaction
from psycopg.pq import TransactionStatus

from precog_db.log import get_logger
from precog_db.session import PrecogCursor

__all__ = ["SUPPORTED", "FirstStatementCursor", "PipelinedBlock"]

log = get_logger()

#: libpq's pipeline mode is available (libpq 14+); without it every block sends its BEGIN on its own.
SUPPORTED = Pipeline.is_supported()

#: A leading ``COPY`` (after comments, whitespace, parentheses): never pipelined.
_COPY = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/|\()*copy\b", re.I | re.S)


class _Block(Protocol):
    """What the cursor needs from its get_cursor(commit=True) block: where to keep the transaction."""

    _transaction: Transaction | None


def _pipelinable(query: Any, params: Any) -> bool:
    """True if ``query`` runs the same way in pipeline mode (extended protocol, one statement)."""
    if isinstance(query, bytes):
        try:
            query = query.decode()
        except UnicodeDecodeError:
            return False
    if not isinstance(query, str):
        return False  # sql.Composable, templates: judged conservatively, BEGIN on its own
    if _COPY.match(query):
        return False
    # Without parameters psycopg sends the simple protocol, which accepts several
    # statements in one string; the extended protocol (pipeline mode) does not.
    # A ';' inside a literal only costs the round trip this saves.
    return params is not None or ";" not in query.rstrip(" \t\r\n;")


def _enter(conn: Connection[Any]) -> Pipeline:
    """Put ``conn`` in pipeline mode (no I/O). The caller has set ``_precog_busy``."""
    pipeline = Pipeline(conn)
    pipeline.__enter__()  # libpq enters pipeline mode: nothing is sent
    conn._pipeline = pipeline
    return pipeline


def _leave(conn: Connection[Any], pipeline: Pipeline) -> None:
    """Sync (one round trip), collect every result, leave pipeline mode; raise the first error.

    Not psycopg's ``Pipeline.__exit__``: its wait generator yields in a
    ``finally`` clause, so an interrupt raised by a signal handler during the
    wait comes out as ``RuntimeError: generator ignored GeneratorExit`` instead
    of itself. Here an interrupt propagates unchanged and leaves the
    connection in pipeline mode, marked busy: the pool closes it.
    """
    try:
        pipeline.sync()
    except psycopg.Error:
        if not (conn.broken or conn.closed):
            _drain(conn, pipeline)
        with contextlib.suppress(psycopg.Error):  # the first error is the one to raise
            _exit_mode(conn, pipeline)
        raise
    _exit_mode(conn, pipeline)


def _drain(conn: Connection[Any], pipeline: Pipeline) -> None:
    """After a sync raised the first error: collect the results still queued behind it (secondary errors)."""
    for _ in range(len(pipeline.result_queue) + 1):
        if not pipeline.result_queue or conn.broken or conn.closed:
            return
        try:
            conn.wait(pipeline._fetch_gen(flush=True))
        except psycopg.Error as exc:
            log.debug("pipeline_result_after_error", reason=type(exc).__name__)


def _exit_mode(conn: Connection[Any], pipeline: Pipeline) -> None:
    """Leave pipeline mode (no I/O); a connection that cannot (results left uncollected) is closed."""
    try:
        pipeline._exit(None)
    except psycopg.Error:
        conn.close()
        raise
    finally:
        conn._pipeline = None


def _begin(conn: Connection[Any], block: _Block) -> None:
    """Send ``BEGIN READ WRITE`` on its own (one round trip), as get_cursor(commit=True) always did."""
    transaction = Transaction(conn)
    transaction.__enter__()
    block._transaction = transaction


class FirstStatementCursor(PrecogCursor):
    """The cursor of a ``commit=True`` block: its first statement carries the block's ``BEGIN``."""

    __slots__ = ("_precog_block",)
    _precog_block: _Block | None

    def _take_block(self) -> _Block | None:
        try:
            block: _Block | None = self._precog_block
        except AttributeError:  # not set yet: the cursor is being constructed
            return None
        self._precog_block = None
        return block

    def _begin_alone(self) -> None:
        block = self._take_block()
        if block is not None:
            _begin(self._conn, block)

    def _first(self, block: _Block, send: Any) -> None:
        """Queue BEGIN and the statement ``send`` sends, then wait for both (one sync)."""
        conn: Any = self._conn
        conn._precog_busy = True  # cleared only when the pipeline is done or failed with a server error
        try:
            pipeline = _enter(conn)
            try:
                transaction = Transaction(conn)
                transaction.__enter__()  # BEGIN READ WRITE, queued: no I/O
                block._transaction = transaction
                send()
            except psycopg.Error:  # refused before it was queued (a wrong parameter): BEGIN still runs
                _leave(conn, pipeline)
                raise
            _leave(conn, pipeline)
        except psycopg.Error:
            conn._precog_busy = False
            raise
        conn._precog_busy = False

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Any:
        block = self._take_block()
        if block is not None:
            if SUPPORTED and _pipelinable(query, params):
                self._first(block, lambda: PrecogCursor.execute(self, query, params, prepare=prepare, binary=binary))
                return self
            _begin(self._conn, block)
        return super().execute(query, params, prepare=prepare, binary=binary)

    def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        block = self._take_block()
        if block is not None:
            if SUPPORTED and _pipelinable(query, ()):
                # psycopg runs executemany in a pipeline of its own; here it rides ours.
                self._first(block, lambda: PrecogCursor.executemany(self, query, params_seq, returning=returning))
                return
            _begin(self._conn, block)
        super().executemany(query, params_seq, returning=returning)

    def copy(self, *args: Any, **kwargs: Any) -> Any:
        self._begin_alone()
        return super().copy(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        self._begin_alone()
        return super().stream(*args, **kwargs)

    @property
    def connection(self) -> Connection[Any]:
        """The cursor's connection; handing it out first sends the block's ``BEGIN`` (what runs on it is inside)."""
        self._begin_alone()
        conn: Connection[Any] = self._conn
        return conn

    def close(self) -> None:
        self._precog_block = None  # the block no longer needs to begin
        super().close()


class PipelinedBlock:
    """The pipeline of a ``get_cursor(commit=True, pipeline=True)`` block: BEGIN, statements and COMMIT, one sync."""

    __slots__ = ("_conn", "_pipeline", "transaction")

    def __init__(self, conn: Connection[Any]) -> None:
        self._conn = conn
        self.transaction: Transaction | None = None
        c: Any = conn
        c._precog_busy = True  # until the block's end collected every result
        self._pipeline = _enter(conn)
        transaction = Transaction(conn)
        transaction.__enter__()  # BEGIN READ WRITE, queued: no I/O
        self.transaction = transaction

    def finish(self, et: type[BaseException] | None, ev: BaseException | None, tb: Any) -> bool:
        """End the block: commit in the same sync when it ended cleanly, else roll everything back.

        Returns True when the exception ``ev`` is to be swallowed (``psycopg.Rollback``).
        A server error found at the sync is raised after the transaction was rolled back.
        """
        conn: Any = self._conn
        transaction, self.transaction = self.transaction, None
        conn._precog_busy = True  # cleared only once every result is collected (or a server error ended it)
        if et is None and transaction is not None:
            try:
                try:
                    transaction.__exit__(None, None, None)  # COMMIT, queued behind the statements
                finally:
                    _leave(conn, self._pipeline)  # sync: one round trip for the whole block
            except psycopg.Error:
                if conn.broken or conn.closed:
                    conn._precog_busy = False
                    raise  # the caller tells a lost COMMIT apart
                self._roll_back_failed(conn)
                conn._precog_busy = False
                raise
            conn._precog_busy = False
            return False
        # The block raised: sync what was queued, then roll back outside pipeline mode. The
        # block's own exception propagates; what the sync reports (typically "pipeline
        # aborted" behind the error that ended the block) is secondary.
        try:
            _leave(conn, self._pipeline)
        except psycopg.Error as exc:
            log.debug("pipeline_sync_failed_after_error", reason=type(exc).__name__)
        swallow = False
        if transaction is not None:
            swallow = bool(transaction.__exit__(et, ev, tb))
        conn._precog_busy = False
        return swallow

    @staticmethod
    def _roll_back_failed(conn: Any) -> None:
        """After a failed sync: the transaction is aborted (or ended by a failed COMMIT); make it end."""
        if conn.pgconn.transaction_status != TransactionStatus.IDLE:
            try:
                conn.rollback()
            except psycopg.Error as exc:
                log.info("pipeline_rollback_failed", reason=type(exc).__name__)
