"""What both layers' pipelining shares, with no I/O: the decisions and the psycopg generators.

`precog_db._pipeline_async` (and `precog_db._pipeline_sync`, generated from
it) drive these with their connection's ``wait``; `precog_db._pipelining`
explains the two mechanisms and re-exports the public names.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import psycopg
from psycopg import AsyncPipeline, Pipeline
from psycopg.abc import PQGen
from psycopg.pq import TransactionStatus

from precog_db._compat import send
from precog_db.log import get_logger

__all__ = ["SUPPORTED", "Block", "Queueing", "exit_mode", "first_gen", "idle", "outcome", "pipelinable", "unleavable"]

log = get_logger()

#: libpq's pipeline mode is available (libpq 14+); without it every block sends its BEGIN on its own.
SUPPORTED = Pipeline.is_supported()

#: A leading ``COPY`` (after comments, whitespace, parentheses): never pipelined.
_COPY = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/|\()*copy\b", re.I | re.S)

_IDLE = TransactionStatus.IDLE


class Block(Protocol):
    """What the cursor needs from its get_cursor(commit=True) block: where to keep the transaction."""

    _transaction: Any  # Transaction | AsyncTransaction | None


def idle(conn: Any) -> bool:
    """No transaction open on the server (after a failed sync: nothing left to roll back)."""
    return bool(conn.pgconn.transaction_status == _IDLE)


def pipelinable(query: Any, params: Any) -> bool:
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


class Queueing:
    """psycopg's pipeline with its I/O in one place: messages are buffered as queued, written and awaited at the sync.

    psycopg's own pipeline writes each queued message as it is queued and polls
    the socket before each one (``_communicate_gen``); here queueing only
    buffers the message in libpq, and ``_sync_gen`` writes everything in one
    go, then waits once for the replies. Server errors are therefore raised at
    the sync (or by a ``fetch*``, which flushes and waits), never by the call
    that queued the statement. Mixed into both layers' `QueueingPipeline`.
    """

    command_queue: Any
    pgconn: Any

    def _buffer_all(self) -> None:
        commands = self.command_queue
        while commands:
            commands.popleft()()  # libpq appends the message to its output buffer (no wait)

    def _communicate_gen(self) -> PQGen[None]:
        self._buffer_all()
        return
        yield  # a generator, as psycopg expects

    def _sync_gen(self) -> PQGen[None]:
        self._enqueue_sync()  # type: ignore[attr-defined]
        self._buffer_all()
        yield from send(self.pgconn)  # write everything (reading meanwhile if the server pushes back)
        yield from self._fetch_gen(flush=False)  # type: ignore[attr-defined]


def exit_mode(conn: Any, pipeline: Pipeline | AsyncPipeline) -> bool:
    """Leave pipeline mode (no I/O). False when the connection must go instead of back to the pool.

    That is: libpq refused (results left uncollected), or the borrower entered a nested
    ``conn.pipeline()`` and never left it, so libpq is still in pipeline mode.
    """
    try:
        pipeline._exit(None)
    except psycopg.Error as exc:
        log.info("pipeline_exit_failed", reason=type(exc).__name__)
        return False
    finally:
        conn._pipeline = None
    # A nested conn.pipeline() the borrower entered and never left keeps libpq in pipeline mode.
    return pipeline.level == 0 and not conn.pgconn.pipeline_status


def unleavable() -> psycopg.OperationalError:
    return psycopg.OperationalError("the pipeline could not be left: the connection was closed; the pool replaces it")


def outcome(conn: Any, refused: Exception | None, synced: psycopg.Error | None, left: bool) -> None:
    """After a first statement's sync: clear the busy flag when the connection is consistent; raise the error."""
    if left and not synced and not refused:
        conn._precog.busy = False
        return
    if synced is not None:
        # psycopg records a statement it prepares in pipeline mode before the reply, and does not
        # forget it when the Parse failed: the return must reset the session (DISCARD ALL).
        conn._prepared.dirty = True
    if left:
        conn._precog.busy = False  # a server error (or a refusal) ended it cleanly
    error = synced or refused
    if error is not None:
        raise error
    raise unleavable()


def first_gen(conn: Any, block: Block, pipeline: Any, transaction: Any, statement: PQGen[None]) -> PQGen[Any]:
    """A block's first statement as one psycopg generator, which either layer runs with its ``wait``.

    Enters pipeline mode, queues ``BEGIN READ WRITE`` and ``statement`` (the
    cursor's own execute generator: it only queues, see `Queueing`), writes
    both with one ``Sync`` and collects every result: one write, one wait.
    Returns the psycopg error that refused the statement (a wrong parameter
    count: the BEGIN is synced alone), or another exception raised before
    anything of the statement was queued (parameters that are not a sequence);
    raises the first server error. Anything else (an interrupt raised by a
    signal handler while psycopg was queueing, even one that is an
    ``Exception``) propagates as itself, leaving the connection in pipeline
    mode and marked busy: the pool closes it.
    """
    yield from pipeline._enter_gen()  # libpq enters pipeline mode: nothing is sent
    conn._pipeline = pipeline
    yield from transaction._enter_gen()  # BEGIN READ WRITE, buffered
    block._transaction = transaction
    refused: Exception | None = None
    queued = (len(pipeline.command_queue), len(pipeline.result_queue))  # the BEGIN's
    try:
        yield from statement
    except psycopg.Error as exc:
        refused = exc
    except Exception as exc:
        if (len(pipeline.command_queue), len(pipeline.result_queue)) != queued:
            raise  # cut short half-way through psycopg's bookkeeping: never synced, never reused
        refused = exc
    yield from pipeline._sync_gen()
    return refused
