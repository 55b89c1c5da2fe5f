"""precog_db.aio: the asyncio API keeps the sync API's rules, against a real server."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from precog_db import ConfigurationError, aio
from precog_db.apool import AsyncPrecogPool
from precog_db.settings import DatabaseSettings


@pytest_asyncio.fixture
async def apool(test_settings: DatabaseSettings) -> AsyncIterator[AsyncPrecogPool]:
    """The process-wide asyncio pool on the test database, full before the test starts, closed after it."""
    pool = await aio.initialize_pool(settings=test_settings)
    await pool.wait(timeout=10)
    try:
        yield pool
    finally:
        await aio.close_pool()


@pytest.mark.asyncio
class TestSharedSessionRules:
    """The asyncio pool in precog_db.metrics (borrower isolation in both layers: tests/test_cursor_common_async.py)."""

    async def test_pool_metrics_include_the_asyncio_pool(self, apool: AsyncPrecogPool) -> None:
        """pool_metrics() reports the asyncio pool: its uses and the connections it created."""
        from precog_db.metrics import pool_metrics

        for _ in range(3):
            async with aio.get_cursor() as cur:
                await cur.execute("SELECT 1")
        snapshots = [s for s in pool_metrics() if s.pool_name == apool.name]
        assert len(snapshots) == 1
        snap = snapshots[0]
        assert sum(snap.use_time.counts) >= 3
        assert sum(snap.create_time.counts) >= 1
        assert snap.max == apool.max_size


class TestParity:
    @pytest.mark.parametrize(
        "name",
        ["get_cursor", "get_connection", "initialize_pool", "get_pool", "close_pool", "truncate_tables", "delete_all"],
    )
    def test_aio_accepts_every_keyword_of_its_sync_twin(self, name: str) -> None:
        """Same parameter names, kinds and defaults as the sync function (issue 22: replica= was missing)."""
        import precog_db

        def shape(fn: Any) -> list[tuple[str, Any, Any]]:
            return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

        assert shape(getattr(aio, name)) == shape(getattr(precog_db, name))

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"pipeline": True},
            {"replica": True, "commit": True},
            {"replica": True, "commit": True, "pipeline": True},
            {"replica": True, "pipeline": True},
        ],
    )
    def test_aio_refuses_what_its_sync_twin_refuses(self, kwargs: dict[str, bool]) -> None:
        """22.17: get_cursor's keyword combinations that cannot work are refused alike in both layers (same class,
        same words but for the ``aio.`` prefix), before anything is borrowed."""
        import precog_db

        outcomes = []
        for fn in (precog_db.get_cursor, aio.get_cursor):
            with pytest.raises((ValueError, ConfigurationError)) as info:
                fn(**kwargs)
            outcomes.append((type(info.value), str(info.value).removeprefix("aio.")))
        assert outcomes[0] == outcomes[1], outcomes
