"""Issue 16 in precog_db.aio only: cancelled committed blocks, and the connection class the deferred BEGIN needs.

The scenarios both layers share are in tests/test_pipeline_common_async.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest
import pytest_asyncio

from precog_db import CommitOutcomeUnknownError, ConfigurationError, aio
from precog_db.apool import AsyncPrecogPool
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server

INSERT = "INSERT INTO apipe_items (id, qty) VALUES (%s, %s)"

pytestmark = pytest.mark.asyncio


@pytest.fixture
def table(pg_server: Server, test_db: str) -> str:
    with pg_server.connect(test_db) as admin:
        admin.execute("DROP TABLE IF EXISTS apipe_items")
        admin.execute("CREATE TABLE apipe_items (id int PRIMARY KEY, qty int NOT NULL CHECK (qty >= 0))")
        admin.execute("INSERT INTO apipe_items VALUES (0, 0)")
    return "apipe_items"


@pytest_asyncio.fixture
async def apool(test_settings: DatabaseSettings, table: str) -> AsyncIterator[AsyncPrecogPool]:
    pool = await aio.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
    await pool.wait(timeout=10)
    try:
        yield pool
    finally:
        await aio.close_pool()


def assert_clean(pool: AsyncPrecogPool, pg_server: Server, dbname: str) -> None:
    """Every connection the pool counts is back in it, and none is idle in a transaction on the server."""
    stats = pool.get_stats()
    assert stats["pool_available"] == stats["pool_size"], stats
    with pg_server.connect(dbname) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'precog-test' "
            "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
        ).fetchone()
    assert row == (0,)


def _rows(pg_server: Server, test_db: str) -> list[tuple[int, int]]:
    with pg_server.connect(test_db) as admin:
        return [(int(a), int(b)) for a, b in admin.execute("SELECT id, qty FROM apipe_items WHERE id > 0 ORDER BY id")]


class TestCancelled:
    """Cancellation of a task in a committed block (the sync twin: signal interrupts, tests/test_pipeline.py)."""

    async def test_cancelled_first_statement_loses_nothing(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        """A task cancelled while its BEGIN+first statement is in flight: cancelled, not committed, no leak."""

        async def slow() -> None:
            async with aio.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO apipe_items SELECT 30, 1 FROM pg_sleep(5)")

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _rows(pg_server, test_db) == []
        async with aio.get_cursor(commit=True) as cur:  # the pool lends a working connection
            await cur.execute(INSERT, (31, 1))
        assert _rows(pg_server, test_db) == [(31, 1)]
        assert_clean(apool, pg_server, test_db)

    async def test_cancelled_at_the_end_is_ambiguous(
        self, apool: AsyncPrecogPool, pg_server: Server, test_db: str
    ) -> None:
        """Cancelled while the block (COMMIT included) is in flight: CommitOutcomeUnknownError, connection replaced."""

        async def slow() -> None:
            async with aio.get_cursor(commit=True, pipeline=True) as cur:
                await cur.execute("INSERT INTO apipe_items SELECT 600, 1 FROM pg_sleep(5)")

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(CommitOutcomeUnknownError):
            await task
        async with aio.get_cursor(commit=True) as cur:
            await cur.execute(INSERT, (601, 1))
        assert (601, 1) in _rows(pg_server, test_db)
        assert_clean(apool, pg_server, test_db)


class TestConnectionClass:
    async def test_plain_connection_class_refused(self, test_settings: DatabaseSettings) -> None:
        """The deferred BEGIN lives in PrecogAsyncConnection.wait: a plain class is refused, with what to do."""
        with pytest.raises(ConfigurationError, match=r"subclass of precog_db\.aio\.PrecogAsyncConnection"):
            await aio.initialize_pool(settings=test_settings, connection_class=psycopg.AsyncConnection)
