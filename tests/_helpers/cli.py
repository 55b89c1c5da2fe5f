"""Helpers for the ``precog-db`` tests: per-environment databases with config files, and running the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from precog_db.cli import main
from precog_db.environment import Environment
from precog_db.settings import DatabaseSettings
from precog_db.stamp import stamp_database
from tests._helpers.server import REPO, Server

#: Every database of these tests is configured with this password; it must never show up anywhere.
SENTINEL = "s3ntinel-Pa55word-zq81"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Workspace:
    """A project directory (the test's cwd) with ``config/.env.<env>`` files pointing at fresh databases."""

    server: Server
    root: Path
    monkeypatch: pytest.MonkeyPatch
    databases: dict[str, DatabaseSettings] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def audit_log(self) -> Path:
        return self.root / "logs" / "audit.log"

    def add(self, env: str, *, stamp: bool = True, dbname: str | None = None) -> DatabaseSettings:
        """Create a fresh database for ``env``, write its .env file, and stamp it (staging/prod always need it)."""
        name = dbname or f"cli_{env}_{uuid.uuid4().hex[:8]}"
        self.server.fresh_database(name)
        settings = self.server.settings(name, env=Environment(env), password=SENTINEL)
        self.config.mkdir(exist_ok=True)
        path = self.config / f".env.{env}"
        lines = [f"{k}={v}" for k, v in self.server.env_vars(name).items() if k != "DB_PASSWORD"]
        lines += [f"DB_PASSWORD={SENTINEL}", "DB_SSLMODE=disable", "DB_POOL_MIN_CONN=1", "DB_POOL_MAX_CONN=4"]
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        if stamp:
            with self.monkeypatch.context() as m:
                m.setenv("PRECOG_PROD_CONFIRMED", "yes")
                stamp_database(env, settings=settings)
        self.databases[env] = settings
        return settings

    def drop_all(self) -> None:
        from psycopg import sql

        with self.server.connect() as conn:
            for settings in self.databases.values():
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(settings.dbname)))

    def run(self, *argv: str, stdin: io.TextIOBase | Any | None = None) -> Result:
        """Run ``precog-db argv`` in this process."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(err))
            m = stack.enter_context(self.monkeypatch.context())
            m.setattr(sys, "stdin", stdin if stdin is not None else io.StringIO(""))
            code = main(list(argv))
        return Result(code, out.getvalue(), err.getvalue())

    def write_migration(self, filename: str, body: str) -> Path:
        directory = self.root / "migrations"
        directory.mkdir(exist_ok=True)
        path = directory / filename
        path.write_text(body)
        return path

    def audit_entries(self) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]

    def query(self, env: str, statement: str) -> list[tuple[Any, ...]]:
        with self.server.connect(self.databases[env].dbname) as conn:
            return list(conn.execute(statement).fetchall())

    def ledger(self, env: str) -> list[tuple[int, str]]:
        rows = self.query(
            env,
            "SELECT version, checksum FROM precog_meta.schema_migrations ORDER BY version"
            if self.has_table(env, "precog_meta.schema_migrations")
            else "SELECT 1 WHERE false",
        )
        return [(int(r[0]), str(r[1])) for r in rows]

    def has_table(self, env: str, name: str) -> bool:
        rows = self.query(env, f"SELECT to_regclass('{name}') IS NOT NULL")
        return bool(rows[0][0])


@contextlib.contextmanager
def workspace(server: Server, root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    ws = Workspace(server, root, monkeypatch)
    try:
        yield ws
    finally:
        ws.drop_all()


@contextlib.contextmanager
def tty_stdin(answer: str) -> Iterator[io.TextIOWrapper]:
    """A real pseudo-terminal as stdin, with ``answer`` already typed into it."""
    master, slave = pty.openpty()
    stream = open(slave, encoding="utf-8", closefd=True)  # noqa: SIM115 - closed below
    try:
        os.write(master, answer.encode())
        yield stream
    finally:
        stream.close()
        os.close(master)


def console_script(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    stdin_tty: str | None = None,
    timeout: float = 120,
) -> Result:
    """Run the real ``precog-db`` console script in a subprocess (optionally with a pty as stdin)."""
    script = Path(sys.executable).with_name("precog-db")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "precog_db"]
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if stdin_tty is None:
        proc = subprocess.run(
            [*command, *argv], cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout, check=False
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)
    master, slave = pty.openpty()
    try:
        os.write(master, stdin_tty.encode())
        proc = subprocess.run(
            [*command, *argv],
            cwd=cwd,
            env=environ,
            stdin=slave,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    finally:
        os.close(slave)
        os.close(master)
    return Result(proc.returncode, proc.stdout, proc.stderr)
