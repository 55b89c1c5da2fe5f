"""Cursors and connections handed out from the process-wide pool.

``get_cursor()`` runs in autocommit on a read-only session: one round trip per
statement, and a write fails loudly (``cannot execute INSERT in a read-only
transaction``) instead of vanishing. ``get_cursor(commit=True)`` runs one
``BEGIN READ WRITE`` … ``COMMIT`` transaction, rolled back if the block raises.
Either way the connection goes back to the pool idle, never in a transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import Connection, Cursor
from psycopg.rows import RowFactory, dict_row

from precog_db.errors import PrecogDBError
from precog_db.pool import PrecogPool, get_pool

__all__ = ["ConnectionLostError", "get_connection", "get_cursor"]


class ConnectionLostError(PrecogDBError, psycopg.OperationalError):
    """The server closed the connection while a block was using it."""


def _lost(pool: PrecogPool, exc: psycopg.OperationalError) -> ConnectionLostError:
    return ConnectionLostError(
        f"lost the connection to the {pool.settings.describe()} during the operation "
        f"({str(exc).strip().splitlines()[-1] if str(exc).strip() else 'no detail'}). "
        "The pool replaces dead connections by itself: retry the operation. "
        "If you used commit=True the transaction was not committed."
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
    try:
        if commit:
            with conn.transaction(), conn.cursor(row_factory=row_factory) as cur:
                yield cur
        else:
            with conn.cursor(row_factory=row_factory) as cur:
                yield cur
    except psycopg.OperationalError as exc:
        if conn.broken and not isinstance(exc, PrecogDBError):
            raise _lost(pool, exc) from exc
        raise
    finally:
        pool.checkin(conn)
