"""The exceptions that also inherit a psycopg class; import them from `precog_db.errors`.

They live apart only so that `precog_db.errors` can be imported without the
driver (see its docstring); `precog_db.errors` is their public home.
"""

from __future__ import annotations

import psycopg
import psycopg_pool

from precog_db._error_root import PrecogDBError

__all__ = [
    "CommitOutcomeUnknownError",
    "ConnectionLostError",
    "DatabaseUnavailableError",
    "PoolExhaustedError",
    "ReadOnlyWriteError",
    "SessionStateError",
    "TransactionControlError",
]


class DatabaseUnavailableError(PrecogDBError, psycopg.OperationalError):
    """The database server could not be reached or refused the connection."""


class PoolExhaustedError(PrecogDBError, psycopg_pool.PoolTimeout):
    """No pooled connection became free within the checkout timeout."""


class ConnectionLostError(PrecogDBError, psycopg.OperationalError):
    """The server closed the connection, or stopped answering, while a block was using it."""


class CommitOutcomeUnknownError(ConnectionLostError):
    """The connection was lost while COMMIT was in flight: the transaction may or may not be committed."""


class ReadOnlyWriteError(PrecogDBError, psycopg.errors.ReadOnlySqlTransaction):
    """A write ran outside a transaction on a read-only pooled connection: use ``get_cursor(commit=True)``."""


class SessionStateError(PrecogDBError, psycopg.ProgrammingError):
    """A statement that would change the server session, refused behind a transaction-mode pooler."""


class TransactionControlError(PrecogDBError, psycopg.ProgrammingError):
    """A block's transaction cannot be ended as the library manages it.

    A BEGIN, COMMIT or ROLLBACK statement inside a block whose transaction the library manages; or a
    ``commit=True`` block that ended with one of its ``stream()`` results half-read (nothing committed).
    """
