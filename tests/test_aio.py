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


class TestTopologyRefusals:
    @pytest.mark.asyncio
    async def test_a_transaction_mode_pooler_is_refused(self, test_settings: DatabaseSettings) -> None:
        """DB_POOLER=transaction is sync-only: the asyncio pool refuses it before connecting, saying what to do."""
        settings = test_settings.replace(pooler="transaction")
        with pytest.raises(ConfigurationError, match="DB_POOLER=transaction"):
            await aio.initialize_pool(settings=settings)
        assert aio_pool_is_closed()


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


def aio_pool_is_closed() -> bool:
    from precog_db.apool import active_pool

    return active_pool() is None


class TestPoolArguments:
    @pytest.mark.parametrize("key", ["check", "reset", "kwargs", "conninfo"])
    def test_arguments_that_would_bypass_the_rules_are_refused(self, test_settings: DatabaseSettings, key: str) -> None:
        """check=/reset= (liveness and reset are the library's) and kwargs=/conninfo= raise ConfigurationError."""
        value: Any = (lambda *a: None) if key in ("check", "reset") else {}
        with pytest.raises(ConfigurationError, match=f"{key}="):
            AsyncPrecogPool(test_settings, **{key: value})


@pytest.mark.asyncio
class TestContract:
    async def test_the_psycopg_pool_private_names_apool_relies_on_exist(self, apool: AsyncPrecogPool) -> None:
        """Every psycopg_pool internal listed in precog_db/apool.py exists: an upgrade that renames one fails here."""
        from psycopg_pool import AsyncConnectionPool
        from psycopg_pool.pool_async import AddConnection, MaintenanceTask, StopWorker

        for method in ("_connect", "_add_connection", "schedule_task", "_check_open_getconn", "_maybe_grow_pool"):
            assert callable(getattr(AsyncConnectionPool, method, None)), method
        # The maintenance worker apool overrides (21.14): what _start_workers spawns, and its stop signal.
        assert "self.worker" in inspect.getsource(AsyncConnectionPool._start_workers)
        assert issubclass(StopWorker, MaintenanceTask)
        spawned = [getattr(t.get_coro(), "__qualname__", None) for t in apool._workers]
        assert spawned == ["AsyncPrecogPool.worker"] * apool.num_workers, spawned
        for key in ("_REQUESTS_NUM", "_REQUESTS_QUEUED", "_REQUESTS_ERRORS", "_REQUESTS_WAIT_MS"):
            assert isinstance(getattr(AsyncConnectionPool, key, None), str), key
        for key in ("_CONNECTIONS_LOST", "_RETURNS_BAD"):
            assert isinstance(getattr(AsyncConnectionPool, key, None), str), key
        assert issubclass(AddConnection, MaintenanceTask)
        assert type(apool._pool).__name__ == type(apool._waiting).__name__ == "deque"
        assert type(apool._stats).__name__ == "Counter"
        assert isinstance(apool._nconns_min, int) and isinstance(apool._min_size, int)
        assert isinstance(apool._nconns, int)
        assert isinstance(apool._closed, bool) and isinstance(apool._drained_at, float)
        assert hasattr(apool, "_pool_full_event")
        assert apool._reset is None  # read by _pool_base.checkin_verdict; reset= is refused
        async with aio.get_connection() as conn:
            assert conn._pool is apool
            assert isinstance(conn._created_at, float) and isinstance(conn._expire_at, float)
            assert conn._closed is False
