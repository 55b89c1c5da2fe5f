"""precog_db: environment-aware, safe PostgreSQL access for Precog services.

Import this instead of psycopg. See the README for the rules it enforces.

The names below are loaded on first use (PEP 562), so ``import precog_db``
(and ``precog-db env``, ``precog-db --help``) does not import psycopg,
psycopg_pool or the pool: the driver is imported by the first name that needs
it (`get_cursor`, `initialize_pool`, ...). ``from precog_db import get_cursor``
works as usual, and type checkers see the plain imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from precog_db.cursors import get_connection, get_cursor
    from precog_db.environment import Environment, get_environment, require_environment
    from precog_db.errors import (
        CommitOutcomeUnknownError,
        ConfigurationError,
        ConnectionLostError,
        DatabaseUnavailableError,
        EnvironmentMismatchError,
        EnvironmentNotAllowedError,
        PoolExhaustedError,
        PoolStateError,
        PrecogDBError,
        ProductionAccessError,
        ReadOnlyWriteError,
        RefusalError,
        RestoredCopyError,
        SessionStateError,
        StampError,
        TransactionControlError,
        UnstampedDatabaseError,
    )
    from precog_db.gates import dangerous_operation, delete_all, truncate_tables
    from precog_db.log import configure_logging
    from precog_db.metrics import pool_metrics
    from precog_db.pool import PrecogPool, close_pool, create_pool, get_pool, initialize_pool
    from precog_db.settings import DatabaseSettings, load_settings
    from precog_db.stamp import Stamp, read_stamp, stamp_database

#: The one place the version is written: pyproject.toml reads it from here (setuptools ``attr:``).
__version__ = "0.1.0"

#: Each public name and the module that defines it.
_EXPORTS: dict[str, str] = {
    "CommitOutcomeUnknownError": "precog_db.errors",
    "ConfigurationError": "precog_db.errors",
    "ConnectionLostError": "precog_db.errors",
    "DatabaseSettings": "precog_db.settings",
    "DatabaseUnavailableError": "precog_db.errors",
    "Environment": "precog_db.environment",
    "EnvironmentMismatchError": "precog_db.errors",
    "EnvironmentNotAllowedError": "precog_db.errors",
    "PoolExhaustedError": "precog_db.errors",
    "PoolStateError": "precog_db.errors",
    "PrecogDBError": "precog_db.errors",
    "PrecogPool": "precog_db.pool",
    "ProductionAccessError": "precog_db.errors",
    "ReadOnlyWriteError": "precog_db.errors",
    "SessionStateError": "precog_db.errors",
    "RefusalError": "precog_db.errors",
    "RestoredCopyError": "precog_db.errors",
    "Stamp": "precog_db.stamp",
    "StampError": "precog_db.errors",
    "TransactionControlError": "precog_db.errors",
    "UnstampedDatabaseError": "precog_db.errors",
    "close_pool": "precog_db.pool",
    "configure_logging": "precog_db.log",
    "create_pool": "precog_db.pool",
    "dangerous_operation": "precog_db.gates",
    "delete_all": "precog_db.gates",
    "get_connection": "precog_db.cursors",
    "get_cursor": "precog_db.cursors",
    "get_environment": "precog_db.environment",
    "get_pool": "precog_db.pool",
    "initialize_pool": "precog_db.pool",
    "load_settings": "precog_db.settings",
    "pool_metrics": "precog_db.metrics",
    "read_stamp": "precog_db.stamp",
    "require_environment": "precog_db.environment",
    "stamp_database": "precog_db.stamp",
    "truncate_tables": "precog_db.gates",
}

__all__ = [
    "CommitOutcomeUnknownError",
    "ConfigurationError",
    "ConnectionLostError",
    "DatabaseSettings",
    "DatabaseUnavailableError",
    "Environment",
    "EnvironmentMismatchError",
    "EnvironmentNotAllowedError",
    "PoolExhaustedError",
    "PoolStateError",
    "PrecogDBError",
    "PrecogPool",
    "ProductionAccessError",
    "ReadOnlyWriteError",
    "RefusalError",
    "RestoredCopyError",
    "SessionStateError",
    "Stamp",
    "StampError",
    "TransactionControlError",
    "UnstampedDatabaseError",
    "close_pool",
    "configure_logging",
    "create_pool",
    "dangerous_operation",
    "delete_all",
    "get_connection",
    "get_cursor",
    "get_environment",
    "get_pool",
    "initialize_pool",
    "load_settings",
    "pool_metrics",
    "read_stamp",
    "require_environment",
    "stamp_database",
    "truncate_tables",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use and cache the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
