"""Exceptions raised by precog_db: every one of them is defined here.

Every exception derives from `PrecogDBError` and also from the builtin (or
psycopg) class that callers already catch, so ``except ValueError`` keeps
working for configuration mistakes and ``except RuntimeError`` for refusals.
A safety refusal (wrong environment, unconfirmed production, a missing
confirmation, an unpromoted migration...) derives from `RefusalError`: the
audit log records it as ``refused`` and the CLI prints ``refused:``. Messages
name the thing, the reason and the fix, and never echo a value that could be
a secret.

The classes that must also inherit a psycopg class
(`DatabaseUnavailableError`, `PoolExhaustedError`, `ConnectionLostError`,
`CommitOutcomeUnknownError`, `ReadOnlyWriteError`) are created on first access (PEP 562), in
`precog_db._driver_errors`, so that importing this module (the settings layer
and ``precog-db env`` do) never imports the driver. `PrecogDBError`, the root
both build on, lives in `precog_db._error_root` so that `_driver_errors` does
not import this module back; all three are importable from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from precog_db._error_root import PrecogDBError

if TYPE_CHECKING:
    from precog_db._driver_errors import (
        CommitOutcomeUnknownError,
        ConnectionLostError,
        DatabaseUnavailableError,
        PoolExhaustedError,
        ReadOnlyWriteError,
        SessionStateError,
        TransactionControlError,
    )

__all__ = [
    "AuditLogError",
    "AuditSettingError",
    "BackupError",
    "CommitOutcomeUnknownError",
    "ConfigurationError",
    "ConfirmationError",
    "ConnectionLostError",
    "DatabaseUnavailableError",
    "EmbeddedPostgresError",
    "EnvironmentMismatchError",
    "EnvironmentNotAllowedError",
    "ForeignConnectionError",
    "LocalClusterError",
    "MigrationError",
    "MigrationLockError",
    "MigrationLockTimeoutError",
    "MigrationValidationError",
    "PoolExhaustedError",
    "PoolStateError",
    "PrecogDBError",
    "ProductionAccessError",
    "PromotionError",
    "ReadOnlyWriteError",
    "RefusalError",
    "RestoredCopyError",
    "SessionStateError",
    "StampError",
    "TransactionControlError",
    "UnstampedDatabaseError",
    "UsageError",
]


class RefusalError(PrecogDBError, RuntimeError):
    """Base class of the safety refusals: precog_db declined to act, and nothing was changed."""


class ConfigurationError(PrecogDBError, ValueError):
    """A setting, a `.env` file or an environment name is invalid."""


class UsageError(PrecogDBError, ValueError):
    """The ``precog-db`` command line is inconsistent (exit code 2)."""


class EnvironmentNotAllowedError(RefusalError):
    """The operation is not allowed in the current environment."""


class EnvironmentMismatchError(RefusalError):
    """The configured database belongs to another environment than the resolved one."""


class RestoredCopyError(EnvironmentMismatchError):
    """The database is a restored copy of another environment's database and must be re-stamped before use."""


class UnstampedDatabaseError(RefusalError):
    """A staging or production database carries no identity stamp."""


class ProductionAccessError(RefusalError):
    """Production was requested without `PRECOG_PROD_CONFIRMED=yes`."""


class ConfirmationError(RefusalError):
    """A command that needs a confirmation did not get the right one; it did nothing."""


class StampError(PrecogDBError, RuntimeError):
    """The identity stamp could not be read or written (usually missing privileges)."""


class PoolStateError(PrecogDBError, RuntimeError):
    """The global pool was used in a way its current state does not allow."""


class ForeignConnectionError(PoolStateError, ValueError):
    """A connection given back to a pool that did not lend it: another pool's, no pool's, or one already returned.

    Also a `ValueError`, which psycopg_pool's ``putconn`` raises for the same mistake.
    """


class MigrationError(PrecogDBError, RuntimeError):
    """A migration file could not be applied, or the migrations directory is unusable."""


class MigrationValidationError(MigrationError, RefusalError):
    """The files and the ledger disagree (edited, missing, gaps, out of order); nothing was applied."""


class PromotionError(MigrationError, RefusalError):
    """A migration has not been applied to the previous environment first; nothing was applied."""


class MigrationLockError(MigrationError):
    """Another migration run held the lock for longer than the timeout."""


class MigrationLockTimeoutError(MigrationError):
    """A migration statement waited longer than ``DB_MIGRATION_LOCK_TIMEOUT`` for a table lock; rolled back."""


class BackupError(PrecogDBError, RuntimeError):
    """pg_dump or pg_restore failed, could not be found, or produced an archive that does not verify."""


class AuditLogError(PrecogDBError, OSError):
    """The audit log could not be written."""


class AuditSettingError(AuditLogError, ConfigurationError):
    """``PRECOG_AUDIT_MAX_BYTES`` or ``PRECOG_AUDIT_BACKUPS`` is invalid (so the audit log cannot be written)."""


class LocalClusterError(PrecogDBError, RuntimeError):
    """The local throwaway cluster could not be found, created, started or stopped."""


class EmbeddedPostgresError(PrecogDBError, RuntimeError):
    """The embedded PostgreSQL is installed but cannot be made usable."""


_DRIVER_ERRORS = frozenset(
    {
        "CommitOutcomeUnknownError",
        "ConnectionLostError",
        "DatabaseUnavailableError",
        "PoolExhaustedError",
        "ReadOnlyWriteError",
        "SessionStateError",
        "TransactionControlError",
    }
)


def __getattr__(name: str) -> type[PrecogDBError]:
    """The psycopg-derived classes, imported with the driver on first use."""
    if name in _DRIVER_ERRORS:
        from precog_db import _driver_errors

        cls: type[PrecogDBError] = getattr(_driver_errors, name)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
