"""The server the benchmark runs against, and the data it reads and writes.

By default a throwaway cluster is started with `precog_db.local.cluster.LocalCluster`
in a temporary directory and destroyed at the end. ``PRECOG_BENCH_DSN`` (a libpq
conninfo or URL whose user may create databases) points the benchmark at an
existing server instead; it then creates ``precog_bench`` and
``precog_bench_pgbench`` there and drops them at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from precog_db.local.cluster import LocalCluster

BENCH_DB = "precog_bench"
PGBENCH_DB = "precog_bench_pgbench"
ITEMS = 100_000
ACCOUNTS = 10_000

SCHEMA = f"""
CREATE TABLE bench_items (
    id integer PRIMARY KEY,
    name text NOT NULL,
    qty integer NOT NULL,
    price double precision NOT NULL
);
INSERT INTO bench_items
    SELECT g, 'item-' || g, g % 1000, g * 0.01 FROM generate_series(1, {ITEMS}) AS g;
CREATE TABLE bench_accounts (id integer PRIMARY KEY, balance bigint NOT NULL);
INSERT INTO bench_accounts SELECT g, 1000 FROM generate_series(1, {ACCOUNTS}) AS g;
CREATE TABLE bench_writes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    item_id integer NOT NULL,
    qty integer NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
"""

#: Options for the throwaway cluster. fsync is off, as in the test harness:
#: the benchmark measures client and protocol overhead, not this machine's disk.
SERVER_OPTIONS = {"fsync": "off", "max_connections": "200", "shared_buffers": "128MB"}


@dataclass(frozen=True)
class Target:
    """Where to connect: one database on one server (the password never reaches a message)."""

    host: str
    port: int
    user: str
    password: str
    dbname: str

    def conninfo(self) -> str:
        parts = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": self.dbname,
            "sslmode": "disable",
            "gssencmode": "disable",
        }
        if self.password:
            parts["password"] = self.password
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def connect_kwargs(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password or None,
            "database": self.dbname,
        }

    def at(self, host: str, port: int) -> Target:
        return replace(self, host=host, port=port)

    def on(self, dbname: str) -> Target:
        return replace(self, dbname=dbname)


class BenchServer:
    """A PostgreSQL server for one benchmark run (context manager)."""

    def __init__(self, dsn: str | None = None) -> None:
        self.dsn = dsn
        self.cluster: LocalCluster | None = None
        self._tmp: Path | None = None
        self.admin: Target | None = None
        self.bindir: Path | None = None

    def __enter__(self) -> BenchServer:
        if self.dsn:
            params = conninfo_to_dict(self.dsn)
            self.admin = Target(
                host=str(params.get("host", "127.0.0.1")),
                port=int(params.get("port", 5432)),
                user=str(params.get("user", "postgres")),
                password=str(params.get("password", "")),
                dbname=str(params.get("dbname", "postgres")),
            )
        else:
            self._tmp = Path(tempfile.mkdtemp(prefix="precog-bench-"))
            self.cluster = LocalCluster(self._tmp / "cluster", server_options=SERVER_OPTIONS)
            self.cluster.start()
            self.bindir = self.cluster.bindir
            self.admin = Target(self.cluster.host, self.cluster.port, "postgres", "", "postgres")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cluster is not None:
            self.cluster.destroy()
        elif self.admin is not None:
            try:
                with self.connect(self.admin) as conn:
                    for name in (BENCH_DB, PGBENCH_DB):
                        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            except psycopg.Error:
                pass
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def bench(self) -> Target:
        assert self.admin is not None
        return self.admin.on(BENCH_DB)

    @property
    def local(self) -> bool:
        """True when the server's processes are on this machine and readable (server-side memory)."""
        return self.cluster is not None

    @staticmethod
    def connect(target: Target) -> psycopg.Connection[Any]:
        return psycopg.connect(target.conninfo(), autocommit=True, connect_timeout=10)

    def describe(self) -> dict[str, Any]:
        with self.connect(self.bench) as conn:
            row = conn.execute("SELECT version(), current_setting('fsync'), current_setting('max_connections')")
            version, fsync, max_conn = row.fetchone() or ("?", "?", "?")
        return {
            "server": version,
            "started_by_bench": self.cluster is not None,
            "fsync": fsync,
            "max_connections": int(max_conn),
        }

    def prepare(self) -> None:
        """(Re)create the benchmark database and its tables, then VACUUM ANALYZE."""
        assert self.admin is not None
        with self.connect(self.admin) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(BENCH_DB)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BENCH_DB)))
        with self.connect(self.bench) as conn:
            conn.execute(SCHEMA)  # no parameters: simple protocol, several statements
            conn.execute("VACUUM ANALYZE")

    def pgbench_path(self) -> str | None:
        if self.bindir is not None and (self.bindir / "pgbench").is_file():
            return str(self.bindir / "pgbench")
        return shutil.which("pgbench")

    def pgbench_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.admin is not None and self.admin.password:
            env["PGPASSWORD"] = self.admin.password
        env["PGSSLMODE"] = "disable"
        env["PGGSSENCMODE"] = "disable"
        return env

    def prepare_pgbench(self, pgbench: str) -> Target:
        """Create and initialize the pgbench database (scale 1: 100,000 accounts)."""
        assert self.admin is not None
        with self.connect(self.admin) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(PGBENCH_DB)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PGBENCH_DB)))
        target = self.admin.on(PGBENCH_DB)
        subprocess.run(
            [pgbench, "-i", "-s", "1", "-q", "-h", target.host, "-p", str(target.port), "-U", target.user, PGBENCH_DB],
            check=True,
            capture_output=True,
            timeout=120,
            env=self.pgbench_env(),
        )
        return target
