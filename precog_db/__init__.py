"""precog_db: environment-aware, safe PostgreSQL access for Precog services.

Import this instead of psycopg. See the README for the rules it enforces.
"""

from __future__ import annotations

from precog_db.cursors import CommitOutcomeUnknownError, ConnectionLostError, get_connection, get_cursor
from precog_db.environment import Environment, get_environment, require_environment
from precog_db.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    EnvironmentMismatchError,
    EnvironmentNotAllowedError,
    PoolExhaustedError,
    PoolStateError,
    PrecogDBError,
    ProductionAccessError,
    ReadOnlyWriteError,
    RestoredCopyError,
    SessionStateError,
    StampError,
    UnstampedDatabaseError,
)
from precog_db.gates import dangerous_operation, delete_all, truncate_tables
from precog_db.log import configure_logging
from precog_db.pool import PrecogPool, close_pool, get_pool, initialize_pool
from precog_db.settings import DatabaseSettings, load_settings
from precog_db.stamp import Stamp, read_stamp, stamp_database

__version__ = "0.1.0"

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
    "RestoredCopyError",
    "SessionStateError",
    "Stamp",
    "StampError",
    "UnstampedDatabaseError",
    "close_pool",
    "configure_logging",
    "dangerous_operation",
    "delete_all",
    "get_connection",
    "get_cursor",
    "get_environment",
    "get_pool",
    "initialize_pool",
    "load_settings",
    "read_stamp",
    "require_environment",
    "stamp_database",
    "truncate_tables",
]
