"""Cursors and connections handed out from the process-wide pool.

``get_cursor()`` runs in autocommit on a read-only session: one round trip per
statement, and a write fails loudly (``cannot execute INSERT in a read-only
transaction``) instead of vanishing. ``get_cursor(commit=True)`` runs one
``BEGIN READ WRITE`` … ``COMMIT`` transaction, rolled back if the block raises.
Either way the connection goes back to the pool idle, never in a transaction.

A connection lost inside the block raises `ConnectionLostError` (the work of
a ``commit=True`` block was not committed). A connection lost while the
COMMIT itself was in flight raises `CommitOutcomeUnknownError`: the server may
have committed before the reply was lost, so the caller must check before
retrying.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import Connection, Cursor
from psycopg.rows import RowFactory, dict_row

from precog_db.errors import CommitOutcomeUnknownError, ConnectionLostError
from precog_db.pool import PrecogPool, get_pool

__all__ = ["CommitOutcomeUnknownError", "ConnectionLostError", "get_connection", "get_cursor"]


def _detail(exc: BaseException) -> str:
    # The first line carries the reason ("server closed the connection
    # unexpectedly", "terminating connection due to administrator command");
    # libpq's following lines are generic hints.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else "no detail"


def _lost(pool: PrecogPool, exc: psycopg.OperationalError) -> ConnectionLostError:
    return ConnectionLostError(
        f"lost the connection to the {pool.settings.describe()} during the operation "
        f"({_detail(exc)}). "
        "The pool replaces dead connections by itself: retry the operation. "
        "If you used commit=True the transaction was not committed."
    )


def _commit_unknown(pool: PrecogPool, exc: psycopg.OperationalError) -> CommitOutcomeUnknownError:
    return CommitOutcomeUnknownError(
        f"lost the connection to the {pool.settings.describe()} while COMMIT was in flight ({_detail(exc)}). "
        "The server may have committed the transaction before the reply was lost, or not: check whether "
        "its effects are there (or make the write idempotent) before retrying"
    )


@contextmanager
def get_connection() -> Iterator[Connection[Any]]:
    """Borrow a pooled connection (autocommit, read-only by default).

    Use ``with conn.transaction():`` for writes. The connection goes back to
    the pool when the block ends, whatever happened in it.
    """
    pool = get_pool()
    conn = pool.checkout()
    try:
        yield conn
    finally:
        pool.checkin(conn)


@contextmanager
def get_cursor(commit: bool = False, *, row_factory: RowFactory[Any] = dict_row) -> Iterator[Cursor[Any]]:
    """Borrow a cursor; rows are dicts by default.

    ``commit=False``: statements run read-only in autocommit; writes raise
    `psycopg.errors.ReadOnlySqlTransaction`. ``commit=True``: one read-write
    transaction, committed when the block exits cleanly and rolled back when
    it raises (the exception propagates).
    """
    pool = get_pool()
    conn = pool.checkout()
    committing = False
    try:
        if commit:
            with conn.transaction(), conn.cursor(row_factory=row_factory) as cur:
                yield cur
                # Reached only when the block exited cleanly: what fails from
                # here on is the COMMIT (leaving the `with` sends it).
                committing = True
        else:
            with conn.cursor(row_factory=row_factory) as cur:
                yield cur
    except psycopg.OperationalError as exc:
        gone = conn.broken or conn.closed
        if committing and gone and not isinstance(exc, CommitOutcomeUnknownError):
            raise _commit_unknown(pool, exc) from exc
        if gone and not isinstance(exc, ConnectionLostError):
            raise _lost(pool, exc) from exc
        raise
    finally:
        pool.checkin(conn)
