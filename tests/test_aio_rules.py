"""precog_db.aio keeps the sync API's safety rules: chokepoint, guard, stamp, gates, fork, secrets."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from precog_db import (
    EnvironmentMismatchError,
    EnvironmentNotAllowedError,
    ProductionAccessError,
    aio,
    dangerous_operation,
    stamp_database,
)
from precog_db.environment import Environment
from precog_db.settings import DatabaseSettings
from tests._helpers.faults import wait_until
from tests._helpers.server import Server
from tests.test_chokepoint import drop_database, make_database, sessions_on

REPO = Path(__file__).resolve().parent.parent
UNIQUE = uuid.uuid4().hex[:8]


def rows_in(pg_server: Server, dbname: str) -> int:
    with pg_server.connect(dbname) as conn:
        row = conn.execute("SELECT count(*) FROM accounts").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def staging_db(pg_server: Server) -> Iterator[tuple[str, DatabaseSettings]]:
    """A stamped staging database with 4 rows in ``accounts``, and its settings."""
    name = make_database(pg_server, f"aio_staging_{UNIQUE}", rows=4)
    settings = pg_server.settings(name, env=Environment.STAGING)
    stamp_database(settings=settings)
    # The setup's own sessions are closed, but their backends may still be listed for a moment
    # under load: start from none, so that a session counted by the test is one the test opened.
    assert wait_until(lambda: sessions_on(pg_server, name) == 0, timeout=10), "setup sessions did not end"
    yield name, settings
    drop_database(pg_server, name)


@pytest_asyncio.fixture
async def closing() -> AsyncIterator[None]:
    """Close the asyncio pool after the test, whatever it opened."""
    yield
    await aio.close_pool()


@pytest.mark.asyncio
class TestChokepoint:
    async def test_production_needs_confirmation_before_any_connection(self, pg_server: Server, closing: None) -> None:
        """aio.initialize_pool on prod without PRECOG_PROD_CONFIRMED=yes is refused and opens no session."""
        name = make_database(pg_server, f"aio_prod_{UNIQUE}")
        assert wait_until(lambda: sessions_on(pg_server, name) == 0, timeout=10), "setup sessions did not end"
        try:
            settings = pg_server.settings(name, env=Environment.PROD, sslmode="disable")
            with pytest.raises(ProductionAccessError):
                await aio.initialize_pool(settings=settings)
            assert sessions_on(pg_server, name) == 0
        finally:
            drop_database(pg_server, name)

    async def test_a_database_stamped_for_another_environment_is_refused(
        self, pg_server: Server, closing: None
    ) -> None:
        """A database stamped dev is refused when opened as test (the probe runs the shared stamp decision)."""
        name = make_database(pg_server, f"aio_devstamp_{UNIQUE}")
        try:
            stamp_database(settings=pg_server.settings(name, env=Environment.DEV))
            with pytest.raises(EnvironmentMismatchError, match="stamped dev"):
                await aio.initialize_pool(settings=pg_server.settings(name, env=Environment.TEST))
        finally:
            drop_database(pg_server, name)


@pytest.mark.asyncio
class TestGates:
    async def test_refused_before_the_body_runs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """In staging, a gated async def raises EnvironmentNotAllowedError and its body never runs."""
        monkeypatch.setenv("PRECOG_ENV", "staging")
        ran: list[bool] = []

        @dangerous_operation()
        async def wipe() -> None:
            ran.append(True)

        with pytest.raises(EnvironmentNotAllowedError, match="allowed only in dev, test"):
            await wipe()
        assert ran == []

    async def test_the_gate_covers_the_awaited_body(
        self, pg_server: Server, staging_db: tuple[str, DatabaseSettings], closing: None
    ) -> None:
        """After an await inside the body, opening a staging pool is still refused, before any session opens."""
        name, settings = staging_db

        @dangerous_operation()
        async def wipe() -> None:
            await asyncio.sleep(0)
            await aio.initialize_pool(settings=settings)

        with pytest.raises(EnvironmentNotAllowedError, match="about to use a staging database"):
            await wipe()
        assert sessions_on(pg_server, name) == 0

    async def test_async_truncate_refused_on_a_staging_pool(
        self, pg_server: Server, staging_db: tuple[str, DatabaseSettings], closing: None
    ) -> None:
        """With the asyncio pool open on staging, aio.truncate_tables refuses and the rows stay."""
        name, settings = staging_db
        await aio.initialize_pool(settings=settings)
        with pytest.raises(EnvironmentNotAllowedError, match="staging"):
            await aio.truncate_tables("accounts")
        with pytest.raises(EnvironmentNotAllowedError, match="staging"):
            await aio.delete_all("accounts")
        assert rows_in(pg_server, name) == 4

    async def test_async_truncate_and_delete_in_test(self, pg_server: Server, closing: None) -> None:
        """In test, aio.truncate_tables and aio.delete_all empty the table and report the row counts."""
        name = make_database(pg_server, f"aio_wipe_{UNIQUE}", rows=3)
        try:
            await aio.initialize_pool(settings=pg_server.settings(name, env=Environment.TEST))
            assert await aio.truncate_tables("accounts") == {"accounts": 3}
            async with aio.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO accounts VALUES (1, 0), (2, 0)")
            assert await aio.delete_all("accounts") == 2
            assert rows_in(pg_server, name) == 0
        finally:
            await aio.close_pool()
            drop_database(pg_server, name)


class TestShape:
    def test_only_the_chokepoint_opens_async_connections(self) -> None:
        """No module but precog_db/_aconnection.py calls AsyncConnection.connect (psycopg_pool's worker aside)."""
        offenders = [
            p.name
            for p in (REPO / "precog_db").rglob("*.py")
            if p.name != "_aconnection.py" and "AsyncConnection.connect(" in p.read_text()
        ]
        assert offenders == []

    def test_the_module_exports_exactly_the_issue_names(self) -> None:
        """precog_db.aio's public names are the seven of the issue, and the class a connection_class= subclasses."""
        assert sorted(aio.__all__) == sorted(
            [
                "PrecogAsyncConnection",
                "get_cursor",
                "get_connection",
                "initialize_pool",
                "get_pool",
                "close_pool",
                "truncate_tables",
                "delete_all",
            ]
        )

    def test_a_gated_async_def_is_still_a_coroutine_function(self) -> None:
        """dangerous_operation keeps an async def a coroutine function (and the helpers are too)."""

        @dangerous_operation()
        async def wipe() -> None:
            return None

        assert inspect.iscoroutinefunction(wipe)
        assert inspect.iscoroutinefunction(aio.truncate_tables)
        assert inspect.iscoroutinefunction(aio.delete_all)


def test_fork_child_never_uses_the_parents_asyncio_pool(pg_server: Server, test_db: str) -> None:
    """A forked child is refused the inherited asyncio pool and opens its own with the same settings."""
    settings = pg_server.settings(test_db)
    fields: dict[str, Any] = {k: getattr(settings, k) for k in ("host", "port", "dbname", "user", "sslmode")}
    fields["password"] = str(settings.password) if settings.password else ""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_"))}
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "aio_fork_workload.py"), json.dumps(fields)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO / "tests",
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["inherited"] == "PoolStateError", result
    assert "fork" in result["message"]
    assert result["own_pool"] is True and result["same_target"] is True
    assert result["child_pid"] != result["parent_pid"]
    assert result["parent_alive"] is True  # the child did not close the parent's connection
