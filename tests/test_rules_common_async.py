"""Both layers keep the safety rules: the production guard and the stamp before any session, and the gates.

The asyncio source: tests/test_rules_common.py is generated from it
(tools/async_to_sync.py), so every scenario runs over `precog_db.aio` here and
over the sync API there (where tests/test_chokepoint.py and tests/test_gates.py
go further). The shape of `precog_db.aio` and fork() stay in tests/test_aio_rules.py.
"""

from __future__ import annotations

import asyncio  # ASYNC-ONLY
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio  # ASYNC-ONLY

from precog_db import (
    EnvironmentMismatchError,
    EnvironmentNotAllowedError,
    ProductionAccessError,
    dangerous_operation,
    stamp_database,
)
from precog_db.environment import Environment
from precog_db.settings import DatabaseSettings
from tests._helpers.faults import wait_until
from tests._helpers.server import Server
from tests.test_chokepoint import drop_database, make_database, sessions_on

if True:  # ASYNC
    from precog_db import aio as api

    @pytest_asyncio.fixture(autouse=True)
    async def _asyncio_pool_closed() -> AsyncIterator[None]:
        """The asyncio pool is closed after each test, on the test's own loop."""
        try:
            yield
        finally:
            await api.close_pool()
else:
    import precog_db as api

pytestmark = pytest.mark.asyncio  # ASYNC-ONLY

UNIQUE = uuid.uuid4().hex[:8]


def rows_in(pg_server: Server, dbname: str) -> int:
    with pg_server.connect(dbname) as conn:
        row = conn.execute("SELECT count(*) FROM accounts").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def staging_db(pg_server: Server) -> Iterator[tuple[str, DatabaseSettings]]:
    """A stamped staging database with 4 rows in ``accounts``, and its settings."""
    name = make_database(pg_server, f"rules_staging_{UNIQUE}", rows=4)
    settings = pg_server.settings(name, env=Environment.STAGING)
    stamp_database(settings=settings)
    # The setup's own sessions are closed, but their backends may still be listed for a moment
    # under load: start from none, so that a session counted by the test is one the test opened.
    assert wait_until(lambda: sessions_on(pg_server, name) == 0, timeout=10), "setup sessions did not end"
    yield name, settings
    drop_database(pg_server, name)


class TestChokepoint:
    async def test_production_needs_confirmation_before_any_connection(self, pg_server: Server) -> None:
        """initialize_pool on prod without PRECOG_PROD_CONFIRMED=yes is refused and opens no session."""
        name = make_database(pg_server, f"rules_prod_{UNIQUE}")
        assert wait_until(lambda: sessions_on(pg_server, name) == 0, timeout=10), "setup sessions did not end"
        try:
            settings = pg_server.settings(name, env=Environment.PROD, sslmode="disable")
            with pytest.raises(ProductionAccessError):
                await api.initialize_pool(settings=settings)
            assert sessions_on(pg_server, name) == 0
        finally:
            drop_database(pg_server, name)

    async def test_a_database_stamped_for_another_environment_is_refused(self, pg_server: Server) -> None:
        """A database stamped dev is refused when opened as test (the probe runs the shared stamp decision)."""
        name = make_database(pg_server, f"rules_devstamp_{UNIQUE}")
        try:
            stamp_database(settings=pg_server.settings(name, env=Environment.DEV))
            with pytest.raises(EnvironmentMismatchError, match="stamped dev"):
                await api.initialize_pool(settings=pg_server.settings(name, env=Environment.TEST))
        finally:
            drop_database(pg_server, name)


class TestGates:
    async def test_refused_before_the_body_runs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """In staging, a gated function raises EnvironmentNotAllowedError and its body never runs."""
        monkeypatch.setenv("PRECOG_ENV", "staging")
        ran: list[bool] = []

        @dangerous_operation()
        async def wipe() -> None:
            ran.append(True)

        with pytest.raises(EnvironmentNotAllowedError, match="allowed only in dev, test"):
            await wipe()
        assert ran == []

    async def test_the_gate_covers_the_whole_body(
        self, pg_server: Server, staging_db: tuple[str, DatabaseSettings]
    ) -> None:
        """Inside the body (after an await in asyncio), opening a staging pool is refused, before any session opens."""
        name, settings = staging_db

        @dangerous_operation()
        async def wipe() -> None:
            await asyncio.sleep(0)  # ASYNC-ONLY
            await api.initialize_pool(settings=settings)

        with pytest.raises(EnvironmentNotAllowedError, match="about to use a staging database"):
            await wipe()
        assert sessions_on(pg_server, name) == 0

    async def test_truncate_refused_on_a_staging_pool(
        self, pg_server: Server, staging_db: tuple[str, DatabaseSettings]
    ) -> None:
        """With the pool open on staging, truncate_tables and delete_all refuse and the rows stay."""
        name, settings = staging_db
        await api.initialize_pool(settings=settings)
        with pytest.raises(EnvironmentNotAllowedError, match="staging"):
            await api.truncate_tables("accounts")
        with pytest.raises(EnvironmentNotAllowedError, match="staging"):
            await api.delete_all("accounts")
        assert rows_in(pg_server, name) == 4

    async def test_truncate_and_delete_in_test(self, pg_server: Server) -> None:
        """In test, truncate_tables and delete_all empty the table and report the row counts."""
        name = make_database(pg_server, f"rules_wipe_{UNIQUE}", rows=3)
        try:
            await api.initialize_pool(settings=pg_server.settings(name, env=Environment.TEST))
            assert await api.truncate_tables("accounts") == {"accounts": 3}
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO accounts VALUES (1, 0), (2, 0)")
            assert await api.delete_all("accounts") == 2
            assert rows_in(pg_server, name) == 0
        finally:
            await api.close_pool()
            drop_database(pg_server, name)
