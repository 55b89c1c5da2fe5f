"""The PostgreSQL server the tests use (`Server`), the repository root, and throwaway clusters."""

from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from precog_db.environment import Environment
from precog_db.local.cluster import LocalCluster
from precog_db.settings import DatabaseSettings

__all__ = ["REPO", "RUN_ID", "TEST_DB", "Server", "start_throwaway_cluster"]

REPO = Path(__file__).resolve().parent.parent.parent

#: This test process's own suffix for the databases it creates on a shared server (digits only, so
#: that a name such as ``precog_test_<RUN_ID>`` still names test and nothing else: tests/conftest.py).
RUN_ID = f"{os.getpid()}_{secrets.randbelow(10**6):06d}"
#: The session's test database on the session's server (the ``test_db`` fixture creates and drops it).
TEST_DB = f"precog_test_{RUN_ID}"


@dataclass
class Server:
    """A PostgreSQL server the tests may create databases on."""

    host: str
    port: int
    user: str
    password: str
    admin_db: str
    cluster: LocalCluster | None = None
    source: str = ""
    #: The database `settings` and `env_vars` name by default: ``precog_test`` on a cluster of one
    #: test's own (`tests._helpers.faults.own_server`), the run's ``test_db`` on the session's server.
    default_db: str = "precog_test"

    def conninfo(self, dbname: str | None = None) -> str:
        parts = {"host": self.host, "port": str(self.port), "user": self.user, "dbname": dbname or self.admin_db}
        if self.password:
            parts["password"] = self.password
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def connect(self, dbname: str | None = None) -> psycopg.Connection[Any]:
        return psycopg.connect(self.conninfo(dbname), autocommit=True, connect_timeout=10)

    def fresh_database(self, name: str) -> str:
        """Drop (if present) and create database ``name``."""
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def settings(self, dbname: str | None = None, env: Environment = Environment.TEST, **kw: Any) -> DatabaseSettings:
        values: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": dbname or self.default_db,
            "pool_min": 1,
            "pool_max": 4,
            "pool_timeout": 5.0,
            "connect_timeout": 5,
            "sslmode": "disable",
        }
        values.update(kw)
        return DatabaseSettings(env=env, **values)

    def env_vars(self, dbname: str | None = None) -> dict[str, str]:
        """The DB_* variables that point at this server."""
        out = {
            "DB_HOST": self.host,
            "DB_PORT": str(self.port),
            "DB_USER": self.user,
            "DB_NAME": dbname or self.default_db,
        }
        if self.password:
            out["DB_PASSWORD"] = self.password
        return out


def start_throwaway_cluster(**server_options: str) -> LocalCluster:
    """Start a new cluster in a fresh temporary directory (caller destroys it)."""
    root = Path(tempfile.mkdtemp(prefix="precog-test-"))
    cluster = LocalCluster(root, server_options={"fsync": "off", **server_options})  # destroy() removes root
    cluster.start()
    return cluster
