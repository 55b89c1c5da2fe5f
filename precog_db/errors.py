"""Exceptions raised by precog_db.

Every exception derives from `PrecogDBError` and also from the builtin (or
psycopg) class that callers already catch, so ``except ValueError`` keeps
working for configuration mistakes and ``except RuntimeError`` for refusals.
Messages name the thing, the reason and the fix, and never echo a value that
could be a secret.
"""

from __future__ import annotations

import psycopg
import psycopg_pool

__all__ = [
    "CommitOutcomeUnknownError",
    "ConfigurationError",
    "ConnectionLostError",
    "DatabaseUnavailableError",
    "EnvironmentMismatchError",
    "EnvironmentNotAllowedError",
    "PoolExhaustedError",
    "PoolStateError",
    "PrecogDBError",
    "ProductionAccessError",
    "ReadOnlyWriteError",
    "RestoredCopyError",
    "SessionStateError",
    "StampError",
    "UnstampedDatabaseError",
]


class PrecogDBError(Exception):
    """Base class of every error raised by precog_db."""


class ConfigurationError(PrecogDBError, ValueError):
    """A setting, a `.env` file or an environment name is invalid."""


class EnvironmentNotAllowedError(PrecogDBError, RuntimeError):
    """The operation is not allowed in the current environment."""


class EnvironmentMismatchError(PrecogDBError, RuntimeError):
    """The configured database belongs to another environment than the resolved one."""


class RestoredCopyError(EnvironmentMismatchError):
    """The database is a restored copy of another environment's database and must be re-stamped before use."""


class UnstampedDatabaseError(PrecogDBError, RuntimeError):
    """A staging or production database carries no identity stamp."""


class StampError(PrecogDBError, RuntimeError):
    """The identity stamp could not be read or written (usually missing privileges)."""


class ProductionAccessError(PrecogDBError, RuntimeError):
    """Production was requested without `PRECOG_PROD_CONFIRMED=yes`."""


class PoolStateError(PrecogDBError, RuntimeError):
    """The global pool was used in a way its current state does not allow."""


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
