"""Read replicas against a real streaming standby: get_cursor(replica=True) in both layers (docs/TOPOLOGY.md).

The asyncio source: tests/test_replicas_sync.py is generated from it
(tools/async_to_sync.py), so every scenario runs over `precog_db.aio` here and
over the sync API there. Where the layers differ (another context is another
task here, another thread there) an ``if True:  # ASYNC`` branch says so.
The parsing of DB_REPLICA_HOSTS entries is tested in tests/test_replicas.py.
"""

from __future__ import annotations

import asyncio  # ASYNC-ONLY
import contextvars  # ASYNC-ONLY
import time
import typing  # ASYNC-ONLY
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio  # ASYNC-ONLY

if True:  # ASYNC
    from precog_db import aio as api
else:
    import precog_db as api
from precog_db import ConfigurationError, dangerous_operation, stamp_database
from precog_db.local.cluster import LocalCluster, free_port
from precog_db.replicas import CHECK_INTERVAL
from tests._helpers.contexts import in_tasks, in_thread
from tests._helpers.faults import own_server
from tests._helpers.server import Server
from tests._helpers.topology import standby_of

#: The application_name of replica pools' sessions (`precog_db.replicas.replica_settings`).
REPLICA_SESSIONS = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '% replica'"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Server, LocalCluster]]:
    """A primary with a stamped precog_test database and an asynchronous streaming standby."""
    with own_server() as primary:
        assert primary.cluster is not None
        stamp_database("test", settings=primary.settings())
        with primary.connect("precog_test") as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS seen (id int)")
        standby = standby_of(primary.cluster)
        try:
            yield primary, standby
        finally:
            standby.destroy()


@pytest.fixture
def replay(pair: tuple[Server, LocalCluster]) -> Iterator[psycopg.Connection[Any]]:
    """A superuser connection to the standby that can pause its replay; replay is resumed afterwards."""
    _, standby = pair
    with psycopg.connect(standby.conninfo("precog_test"), autocommit=True) as conn:
        try:
            yield conn
        finally:
            conn.execute("SELECT pg_wal_replay_resume()")


if True:  # ASYNC

    @pytest_asyncio.fixture(autouse=True)
    async def _asyncio_pool_closed() -> typing.AsyncIterator[None]:
        """The asyncio pool (and its replicas' pools) is closed after each test, on the test's own loop."""
        try:
            yield
        finally:
            await api.close_pool()


async def _read(row_id: int) -> tuple[bool, bool]:
    """(read on a standby?, row ``row_id`` seen?) through get_cursor(replica=True)."""
    async with api.get_cursor(replica=True) as cur:
        await cur.execute(
            "SELECT pg_is_in_recovery() AS standby, exists(SELECT 1 FROM seen WHERE id = %s) AS seen", (row_id,)
        )
        row = await cur.fetchone()
    assert row is not None
    return row["standby"], row["seen"]


async def _read_elsewhere(row_id: int) -> tuple[bool, bool]:
    """`_read` in another context, which wrote nothing: a task of its own, in the sync layer a thread."""
    if True:  # ASYNC
        return await asyncio.create_task(_read(row_id), context=contextvars.Context())
    else:
        return in_thread(lambda: _read(row_id))


async def _until(expected: tuple[bool, bool], row_id: int, *, elsewhere: bool = False, timeout: float = 10.0) -> bool:
    """Whether a read (in another context with ``elsewhere``) returns ``expected`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await _read_elsewhere(row_id) if elsewhere else await _read(row_id)) == expected:
            return True
        if True:  # ASYNC
            await asyncio.sleep(0.05)
        else:
            time.sleep(0.05)
    return False


def _lag_over(replay: psycopg.Connection[Any], ms: int, timeout: float = 10.0) -> bool:
    """Whether the standby's replay lag exceeds ``ms`` within ``timeout`` seconds (replay paused)."""
    lag = "SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000 > %s"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = replay.execute(lag, (ms,)).fetchone()
        if row is not None and row[0]:
            return True
        time.sleep(0.05)
    return False


def _standby_sessions(replay: psycopg.Connection[Any]) -> int:
    """How many sessions the replica pools hold on the standby."""
    row = replay.execute(REPLICA_SESSIONS).fetchone()
    assert row is not None
    return int(row[0])


def _standby_sessions_end(replay: psycopg.Connection[Any], timeout: float = 10.0) -> bool:
    """Whether the replica pools' sessions on the standby are all gone within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _standby_sessions(replay) == 0:
            return True
        time.sleep(0.05)
    return False


def _replicas_of(pool: Any) -> list[Any]:
    """The replicas `precog_db.replicas` keeps on the pool they read for."""
    return list(vars(pool)["_precog_replicas"])


@pytest.mark.asyncio  # ASYNC-ONLY
class TestReplicaReads:
    async def test_reads_go_to_the_replica(
        self, pair: tuple[Server, LocalCluster], replay: psycopg.Connection[Any]
    ) -> None:
        """With a fresh replica configured, replica=True reads run on the standby; its pool closes with the pool's."""
        primary, standby = pair
        pool = await api.initialize_pool(settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",)))
        assert await _read(-1) == (True, False)
        async with api.get_cursor() as cur:  # the default stays on the primary
            await cur.execute("SELECT pg_is_in_recovery() AS standby")
            assert await cur.fetchone() == {"standby": False}
        replicas = _replicas_of(pool)
        assert _standby_sessions(replay) >= 1
        await api.close_pool()
        assert [r.pool.closed for r in replicas] == [True]
        assert _standby_sessions_end(replay)

    async def test_unreachable_replica_reads_the_primary(self, pair: tuple[Server, LocalCluster]) -> None:
        """A replica nothing listens on is skipped: replica=True reads from the primary, and again without waiting."""
        primary, _ = pair
        await api.initialize_pool(settings=primary.settings(replica_hosts=(f"127.0.0.1:{free_port()}",)))
        assert await _read(-1) == (False, False)
        assert await _read(-1) == (False, False)

    async def test_no_replicas_reads_the_primary(self, pair: tuple[Server, LocalCluster]) -> None:
        """replica=True with DB_REPLICA_HOSTS empty reads from the primary."""
        primary, _ = pair
        await api.initialize_pool(settings=primary.settings())
        assert await _read(-1) == (False, False)

    async def test_read_your_writes(self, pair: tuple[Server, LocalCluster], replay: psycopg.Connection[Any]) -> None:
        """Replay paused: this context's read after its commit sees the row (primary); others read the replica."""
        primary, standby = pair
        await api.initialize_pool(
            settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",), replica_max_lag_ms=600_000)
        )
        assert (await _read(-1))[0] is True  # the replica is in use
        replay.execute("SELECT pg_wal_replay_pause()")
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("INSERT INTO seen VALUES (1)")
        assert await _read(1) == (False, True)  # never older than our own write
        assert await _read_elsewhere(1) == (True, False)  # others are not held back: the (stale) replica
        replay.execute("SELECT pg_wal_replay_resume()")
        assert await _until((True, True), 1)  # once replayed, our reads go back to the replica

    async def test_read_your_writes_per_asyncio_task(
        self, pair: tuple[Server, LocalCluster], replay: psycopg.Connection[Any]
    ) -> None:
        """In one thread, the asyncio task that committed reads its row; a sibling task reads the (stale) replica."""
        primary, standby = pair
        await api.initialize_pool(
            settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",), replica_max_lag_ms=600_000)
        )
        assert (await _read(-1))[0] is True
        replay.execute("SELECT pg_wal_replay_pause()")
        committed = asyncio.Event()  # ASYNC-ONLY

        async def writer() -> tuple[bool, bool]:
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO seen VALUES (3)")
            committed.set()  # ASYNC-ONLY
            return await _read(3)

        async def sibling() -> tuple[bool, bool]:
            await committed.wait()  # ASYNC-ONLY
            return await _read(3)

        if True:  # ASYNC
            results = list(await asyncio.wait_for(asyncio.gather(writer(), sibling()), 30))
        else:
            results = in_tasks(writer, sibling)  # the sync API called from tasks: each has its own context
        assert results == [(False, True), (True, False)]

    async def test_lagging_replica_is_skipped(
        self, pair: tuple[Server, LocalCluster], replay: psycopg.Connection[Any]
    ) -> None:
        """A replica whose replay lags more than DB_REPLICA_MAX_LAG_MS is skipped, for every context."""
        primary, standby = pair
        await api.initialize_pool(
            settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",), replica_max_lag_ms=200)
        )
        assert (await _read_elsewhere(-1))[0] is True
        replay.execute("SELECT pg_wal_replay_pause()")
        with primary.connect("precog_test") as conn:
            conn.execute("INSERT INTO seen VALUES (2)")
        assert _lag_over(replay, 400)
        # Once the lag measured at most CHECK_INTERVAL ago exceeds the limit, reads skip the replica.
        assert await _until((False, True), 2, elsewhere=True, timeout=10 * CHECK_INTERVAL + 5)


@pytest.mark.asyncio  # ASYNC-ONLY
class TestNeverAReplica:
    async def test_commit_with_replica_is_refused(self, pair: tuple[Server, LocalCluster]) -> None:
        """get_cursor(commit=True, replica=True) is refused before anything is borrowed."""
        primary, standby = pair
        await api.initialize_pool(settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",)))
        with pytest.raises(ConfigurationError, match="replica cannot take writes"):
            api.get_cursor(commit=True, replica=True)

    async def test_gated_operations_read_the_primary(
        self, pair: tuple[Server, LocalCluster], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Inside a dangerous_operation gate, replica=True reads from the primary."""
        monkeypatch.setenv("PRECOG_ENV", "test")
        primary, standby = pair
        await api.initialize_pool(settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",)))

        @dangerous_operation(allowed=("test",))
        async def gated() -> tuple[bool, bool]:
            return await _read(-1)

        assert await gated() == (False, False)
        assert (await _read(-1))[0] is True  # outside the gate, the replica


if True:  # ASYNC

    @pytest.mark.asyncio
    class TestEventLoopClosed:
        async def test_replica_pools_are_dropped_with_the_pool(
            self, pair: tuple[Server, LocalCluster], replay: psycopg.Connection[Any]
        ) -> None:
            """A pool left open when its loop ended is dropped by the next loop, its replicas' pools too."""
            primary, standby = pair

            async def use() -> Any:
                pool = await api.initialize_pool(
                    settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",))
                )
                assert (await _read(-1))[0] is True
                return pool  # never closed

            pool = in_thread(lambda: asyncio.run(use()))  # another loop, closed when asyncio.run returns
            replicas = _replicas_of(pool)
            assert _standby_sessions(replay) >= 1
            await api.close_pool()  # this loop: the old pool is dropped, nothing awaited on its closed loop
            assert pool.closed and [r.pool.closed for r in replicas] == [True]
            assert _standby_sessions_end(replay)
