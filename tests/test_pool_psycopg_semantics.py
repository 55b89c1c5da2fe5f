"""The pools keep psycopg_pool's contract where precog_db does not document a difference (issue 21, 15-21).

Each test compares with what psycopg_pool itself does where that is the rule
(``min_size=`` alone, the implicit open, ``putconn`` of a foreign connection),
against the session's real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Coroutine, Iterator
from time import monotonic
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from precog_db import PoolExhaustedError, PoolStateError, aio, close_pool, get_connection, get_cursor, initialize_pool
from precog_db.apool import AsyncPrecogPool
from precog_db.apool import create_pool as acreate_pool
from precog_db.errors import ForeignConnectionError
from precog_db.pool import PrecogPool, create_pool
from precog_db.settings import DatabaseSettings
from tests._helpers.faults import wait_until
from tests._helpers.server import Server
from tests.test_chokepoint import drop_database, make_database, sessions_on
from tests.test_classifier_server import _Sync

UNIQUE = uuid.uuid4().hex[:8]
LAYERS = ["sync", "asyncio"]


@pytest.fixture
def own_db(pg_server: Server) -> Iterator[str]:
    """A database of this test's own, with no session on it: sessions counted there are the test's."""
    name = make_database(pg_server, f"pool_sem_{uuid.uuid4().hex[:8]}")
    assert wait_until(lambda: sessions_on(pg_server, name) == 0, timeout=10), "setup sessions did not end"
    yield name
    drop_database(pg_server, name)


def finishes(call: Callable[[], object], limit: float = 20.0) -> BaseException | None:
    """Run ``call`` in a daemon thread; fail if it has not finished within ``limit`` s; return what it raised."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # reported to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True, name="pool-sem-call")
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"{call} did not finish within {limit}s (the return loops)"
    return outcome[0]


class TestCloseReturns:
    """21.15: with close_returns=True, returning an expired, drained or closed-pool connection ends."""

    @pytest.mark.timeout(120)
    def test_expired_connections_come_back_through_every_path(self, test_settings: DatabaseSettings) -> None:
        """max_lifetime=0: every return is of an expired connection; getconn+close, connection(), get_cursor."""
        pool = initialize_pool(
            settings=test_settings.replace(pool_min=1, pool_max=2), close_returns=True, max_lifetime=0.0
        )

        def getconn_close() -> None:
            conn = pool.getconn()
            conn.execute("SELECT 1")
            conn.close()  # close_returns: back to the pool, which closes it (expired)
            assert conn.closed

        def pool_connection() -> None:
            with pool.connection() as conn:
                conn.execute("SELECT 1")

        def cursor_block() -> None:
            with get_cursor() as cur:
                cur.execute("SELECT 1")

        for call in (getconn_close, pool_connection, cursor_block, getconn_close):
            assert finishes(call) is None
        assert finishes(lambda: pool.wait(timeout=15)) is None  # the replacements opened: the pool still works

    @pytest.mark.timeout(120)
    def test_drained_and_closed_pool_returns_end(self, test_settings: DatabaseSettings) -> None:
        """A connection returned after drain(), and one returned after close_pool(), is closed and nothing loops."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=3), close_returns=True)
        drained = pool.getconn()
        pool.drain()
        assert finishes(drained.close) is None
        assert drained.closed
        after_close = pool.getconn()
        in_block: list[psycopg.Connection[Any]] = []

        def close_inside_connection_block() -> None:
            with pool.connection() as conn:
                in_block.append(conn)
                close_pool()

        assert finishes(close_inside_connection_block) is None
        assert finishes(after_close.close) is None
        assert after_close.closed and in_block[0].closed

    @pytest.mark.timeout(120)
    def test_close_inside_get_connection_ends(self, test_settings: DatabaseSettings) -> None:
        """Attack: conn.close() inside a get_connection() block (close_returns): it ends, the pool still serves."""
        pool = initialize_pool(
            settings=test_settings.replace(pool_min=1, pool_max=2), close_returns=True, max_lifetime=0.0
        )

        def close_in_block() -> None:
            with get_connection() as conn:
                conn.close()  # given back (and, expired, closed) while the block still holds it

        outcome = finishes(close_in_block)
        assert outcome is None or isinstance(outcome, ForeignConnectionError), outcome
        assert finishes(lambda: pool.wait(timeout=15)) is None

        def read() -> None:
            with get_cursor() as cur:
                cur.execute("SELECT 1 AS one")
                assert cur.fetchone() == {"one": 1}

        assert finishes(read) is None


class TestCollected:
    """21.16: a pool dropped without close() is collected, its threads end and its server sessions close."""

    @pytest.mark.timeout(120)
    def test_dropped_pool_is_collected(self, pg_server: Server, own_db: str) -> None:
        name = f"gc-{UNIQUE}"
        pool: PrecogPool | None = create_pool(
            pg_server.settings(own_db, pool_min=2, pool_max=2), prod_confirmed=False, name=name
        )
        assert pool is not None
        pool.wait(timeout=30)
        conn = pool.checkout()  # the main thread's requests go through the janitor thread
        pool.checkin(conn)
        del conn
        threads = [t for t in threading.enumerate() if t.name.startswith(f"{name}-")]
        assert any(t.name.endswith("-janitor") for t in threads) and len(threads) >= 3, threads
        assert wait_until(lambda: sessions_on(pg_server, own_db) == 2, timeout=10)
        ref = weakref.ref(pool)
        pool = None
        gc.collect()
        assert ref() is None, gc.get_referrers(ref())
        for thread in threads:
            thread.join(10)
        assert not [t.name for t in threads if t.is_alive()]
        assert wait_until(lambda: sessions_on(pg_server, own_db) == 0, timeout=10)


class PoolLayer:
    """One pool scenario, two layers: the scenario is a coroutine; on the sync pool nothing in it suspends.

    ``hook`` turns an ``async def`` callback written once into the layer's ``check=`` / ``reset=``
    callback (a plain function over the sync connection for `PrecogPool`).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def hook(self, body: Callable[[Any], Coroutine[Any, Any, None]]) -> Callable[[Any], Any]:
        if self.name == "asyncio":
            return body
        return lambda conn: run_now(body(_Sync(conn)))

    async def create(self, settings: DatabaseSettings, **kwargs: Any) -> Any:
        if self.name == "sync":
            return create_pool(settings, prod_confirmed=False, **kwargs)
        return await acreate_pool(settings, prod_confirmed=False, **kwargs)

    async def wait(self, pool: Any) -> None:
        await self._call(pool.wait, timeout=30)

    async def checkout(self, pool: Any) -> Any:
        """A raw checkout (psycopg_pool's ``getconn``): its return always runs the library's session reset."""
        if self.name == "sync":
            return _Sync(pool.checkout())
        return await pool.getconn()

    async def checkin(self, pool: Any, conn: Any) -> None:
        await self._call(pool.checkin if self.name == "sync" else pool.putconn, getattr(conn, "target", conn))

    async def close(self, pool: Any) -> None:
        await self._call(pool.close)

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        result = method(*args, **kwargs)
        if self.name == "asyncio":
            await result

    def run(self, scenario: Callable[[PoolLayer], Coroutine[Any, Any, None]]) -> None:
        if self.name == "sync":
            run_now(scenario(self))
        else:
            asyncio.run(scenario(self))


def run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (a scenario over the sync layer) to its end; its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("a scenario over the sync layer suspended")


@pytest.fixture(params=LAYERS)
def pool_layer(request: pytest.FixtureRequest) -> PoolLayer:
    return PoolLayer(request.param)


class TestCheckHook:
    """psycopg_pool's check= in both layers: awaited/run on each lend, a failing one replaced with a back-off
    (21.17: a check= that keeps failing backs off and the error says that the check failed)."""

    @pytest.mark.timeout(120)
    def test_failing_check_opens_few_connections(self, pool_layer: PoolLayer, pg_server: Server, own_db: str) -> None:
        checked: list[int] = []
        outcome: dict[str, Any] = {}

        async def check(conn: Any) -> None:
            checked.append(conn.info.backend_pid)
            raise RuntimeError("the check says no")

        async def scenario(db: PoolLayer) -> None:
            settings = pg_server.settings(own_db, pool_min=1, pool_max=1, pool_timeout=4.0)
            pool = await db.create(settings, check=db.hook(check), name=f"check-{db.name}-{UNIQUE}")
            try:
                with pytest.raises(PoolExhaustedError, match=r"check= callback rejected \d+ connection") as info:
                    await db.checkout(pool)
                outcome["error"] = info.value
                outcome["opened"] = pool.get_stats().get("connections_num", 0)
            finally:
                await db.close(pool)

        pool_layer.run(scenario)
        assert "RuntimeError: the check says no" in str(outcome["error"])
        assert "fix the check or what it tests" in str(outcome["error"])
        # psycopg_pool's back-off within 4 s: checks at about 0, 0, 1, 3 s. Without it: one per new connection.
        assert 2 <= len(checked) <= 6, len(checked)
        assert len(set(checked)) <= 6 and outcome["opened"] <= 7, (len(set(checked)), outcome["opened"])
        assert wait_until(lambda: sessions_on(pg_server, own_db) == 0, timeout=10)

    @pytest.mark.timeout(120)
    def test_a_check_that_fails_once_still_serves(self, pool_layer: PoolLayer, pg_server: Server, own_db: str) -> None:
        """Attack: the first connection fails the check; it is replaced and the caller is served by a good one."""
        failed: list[int] = []
        checked: list[int] = []
        served: list[tuple[int, Any]] = []

        async def check(conn: Any) -> None:
            checked.append(conn.info.backend_pid)
            if not failed:
                failed.append(conn.info.backend_pid)
                raise RuntimeError("first one is bad")

        async def scenario(db: PoolLayer) -> None:
            settings = pg_server.settings(own_db, pool_min=2, pool_max=2, pool_timeout=30.0)
            pool = await db.create(settings, check=db.hook(check), name=f"check1-{db.name}-{UNIQUE}")
            try:
                await db.wait(pool)
                conn = await db.checkout(pool)
                try:
                    cur = await conn.execute("SELECT pg_backend_pid(), 1")
                    served.append(await cur.fetchone())
                finally:
                    await db.checkin(pool, conn)
                await db.wait(pool)  # the rejected connection was replaced: the pool is full again
                assert pool.get_stats()["pool_available"] == 2
            finally:
                await db.close(pool)

        pool_layer.run(scenario)
        ((pid, one),) = served
        assert one == 1 and pid != failed[0] and checked == [failed[0], pid], (served, failed, checked)

    @pytest.mark.timeout(60)
    def test_check_is_cancellation_safe(self, pg_server: Server, own_db: str) -> None:
        """A caller cancelled during an asyncio check=: the cancellation propagates, the connection is replaced."""
        started = asyncio.Event()

        async def check(conn: Any) -> None:
            started.set()
            await conn.execute("SELECT pg_sleep(30)")

        async def scenario() -> None:
            settings = pg_server.settings(own_db, pool_min=1, pool_max=1, pool_timeout=30.0)
            pool = await acreate_pool(settings, prod_confirmed=False, check=check, name=f"checkc-{UNIQUE}")
            try:
                await pool.wait(timeout=30)
                task = asyncio.create_task(pool.lend())
                await asyncio.wait_for(started.wait(), 10)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert pool.get_stats().get("connections_lost", 0) == 0  # a cancellation is not a lost connection
                await pool.wait(timeout=30)  # replaced
                assert pool.get_stats()["pool_available"] == 1
            finally:
                await pool.close()

        asyncio.run(scenario())


class TestResetHook:
    """psycopg_pool's reset= in both layers: run on each return, after the library's own session reset."""

    @pytest.mark.timeout(60)
    def test_reset_runs_on_return(self, pool_layer: PoolLayer, pg_server: Server, own_db: str) -> None:
        seen: list[tuple[int, str]] = []
        lent: list[int] = []

        async def reset(conn: Any) -> None:
            cur = await conn.execute("SELECT pg_backend_pid(), current_setting('application_name')")
            seen.append(await cur.fetchone())

        async def scenario(db: PoolLayer) -> None:
            settings = pg_server.settings(own_db, pool_min=1, pool_max=1, pool_timeout=30.0)
            pool = await db.create(settings, reset=db.hook(reset), name=f"reset-{db.name}-{UNIQUE}")
            try:
                await db.wait(pool)
                for _ in range(3):
                    conn = await db.checkout(pool)  # waits for the previous return's reset, in a worker
                    await conn.execute("SET application_name = 'borrower'")
                    lent.append(conn.info.backend_pid)
                    await db.checkin(pool, conn)
                await db.wait(pool)
                for _ in range(100):  # the last reset runs in a worker: bounded in count and time
                    if len(seen) == 3:
                        break
                    await (asyncio.sleep(0.05) if db.name == "asyncio" else _sleep_now(0.05))
                assert pool.get_stats()["pool_available"] == 1
            finally:
                await db.close(pool)

        pool_layer.run(scenario)
        # Same connection each time; the hook saw it after the library undid the borrower's SET.
        assert len(set(lent)) == 1 and len(seen) == 3, (lent, seen)
        assert all(pid == lent[0] and name != "borrower" for pid, name in seen), seen


async def _sleep_now(seconds: float) -> None:
    """A pause in a sync-layer scenario (a plain sleep: nothing suspends)."""
    time.sleep(seconds)


class TestForeignReturns:
    """21.18: a connection from no pool, another pool, or returned twice: an error that is also a ValueError."""

    def test_reference_psycopg_pool_raises_value_error(self, pg_server: Server, test_db: str) -> None:
        with psycopg.connect(pg_server.conninfo(test_db)) as stranger, pytest.raises(ValueError):
            ConnectionPool(pg_server.conninfo(test_db), open=False).putconn(stranger)

    @pytest.mark.parametrize("layer", LAYERS)
    def test_foreign_and_double_returns(self, layer: str, pg_server: Server, test_settings: DatabaseSettings) -> None:
        errors: list[BaseException] = []
        if layer == "sync":
            one = create_pool(test_settings.replace(pool_min=1, pool_max=1), prod_confirmed=False, name="one")
            two = create_pool(test_settings.replace(pool_min=1, pool_max=1), prod_confirmed=False, name="two")
            try:
                with pg_server.connect() as stranger, pytest.raises(ValueError) as info:
                    one.checkin(stranger)
                errors.append(info.value)
                conn = two.checkout()
                with pytest.raises(ValueError) as info:
                    one.checkin(conn)
                errors.append(info.value)
                two.checkin(conn)
                with pytest.raises(ValueError) as info:
                    two.putconn(conn)  # twice
                errors.append(info.value)
                with two.connection() as again:  # the pool still lends its connection
                    again.execute("SELECT 1")
            finally:
                one.close()
                two.close()
        else:

            async def run() -> None:
                one = AsyncPrecogPool(test_settings.replace(pool_min=1, pool_max=1), name="aone")
                two = AsyncPrecogPool(test_settings.replace(pool_min=1, pool_max=1), name="atwo")
                await one.open()
                await two.open()
                try:
                    stranger = await psycopg.AsyncConnection.connect(pg_server.conninfo())
                    try:
                        with pytest.raises(ValueError) as info:
                            await one.putconn(stranger)
                        errors.append(info.value)
                    finally:
                        await stranger.close()
                    conn = await two.lend()
                    with pytest.raises(ValueError) as info:
                        await one.give_back(conn)
                    errors.append(info.value)
                    await two.give_back(conn)
                    with pytest.raises(ValueError) as info:
                        await two.putconn(conn)
                    errors.append(info.value)
                    async with two.connection() as again:
                        await again.execute("SELECT 1")
                finally:
                    await one.close()
                    await two.close()

            asyncio.run(run())
        assert len(errors) == 3
        for error in errors:
            assert isinstance(error, ForeignConnectionError) and isinstance(error, PoolStateError), error
        assert "any pool" in str(errors[0]) and "lent by pool" in str(errors[1]) and "given back" in str(errors[2])


class TestMinSizeAlone:
    """21.19: min_size= alone means max_size = min_size, as in psycopg_pool (DB_POOL_MAX_CONN does not apply)."""

    @pytest.mark.parametrize("layer", LAYERS)
    def test_min_size_alone_is_a_fixed_size_pool(self, layer: str, test_settings: DatabaseSettings) -> None:
        reference = ConnectionPool("", min_size=3, open=False)
        settings = test_settings.replace(pool_min=1, pool_max=2)
        if layer == "sync":
            pools = [
                PrecogPool(settings, min_size=3, open=False),
                PrecogPool(settings, min_size=1, max_size=5, open=False),
            ]
            sizes = [(p.min_size, p.max_size) for p in pools]
        else:

            async def build() -> list[tuple[int, int]]:
                pools = [
                    AsyncPrecogPool(settings, min_size=3),
                    AsyncPrecogPool(settings, min_size=1, max_size=5),
                ]
                return [(p.min_size, p.max_size) for p in pools]

            sizes = asyncio.run(build())
        assert sizes[0] == (reference.min_size, reference.max_size) == (3, 3)
        assert sizes[1] == (1, 5)

    def test_initialize_pool_with_min_size_alone(self, test_settings: DatabaseSettings) -> None:
        pool = initialize_pool(settings=test_settings.replace(pool_max=2), min_size=3)
        assert (pool.min_size, pool.max_size) == (3, 3)
        pool.wait(timeout=30)


def usage_ms(pool: PrecogPool | AsyncPrecogPool) -> int:
    return int(pool.get_stats().get("usage_ms", 0))


class TestUsageStatistic:
    """21.20: usage_ms counts the time a connection was lent, whichever API lent it, once."""

    def test_sync_entry_points(self, test_settings: DatabaseSettings) -> None:
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=2))
        pool.wait(timeout=30)

        def hold(conn: psycopg.Connection[Any]) -> None:
            conn.execute("SELECT pg_sleep(0.05)")

        def checkout() -> None:
            conn = pool.checkout()
            hold(conn)
            pool.checkin(conn)

        def cursor() -> None:
            with get_cursor() as cur:
                hold(cur.connection)

        def connection() -> None:
            with get_connection() as conn:
                hold(conn)

        def psycopg_pool_connection() -> None:
            with pool.connection() as conn:
                hold(conn)

        for entry in (checkout, cursor, connection, psycopg_pool_connection):
            before = usage_ms(pool)
            started = monotonic()
            entry()
            elapsed_ms = 1000.0 * (monotonic() - started)
            grown = usage_ms(pool) - before
            assert 50 <= grown <= elapsed_ms + 1, (entry.__name__, grown, elapsed_ms)

    def test_asyncio_entry_points(self, test_settings: DatabaseSettings) -> None:
        async def run() -> None:
            pool = await aio.initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=2))
            try:
                await pool.wait(timeout=30)

                async def lend() -> None:
                    conn = await pool.lend()
                    await conn.execute("SELECT pg_sleep(0.05)")
                    await pool.give_back(conn)

                async def cursor() -> None:
                    async with aio.get_cursor() as cur:
                        await cur.execute("SELECT pg_sleep(0.05)")

                async def connection() -> None:
                    async with aio.get_connection() as conn:
                        await conn.execute("SELECT pg_sleep(0.05)")

                async def psycopg_pool_connection() -> None:
                    async with pool.connection() as conn:
                        await conn.execute("SELECT pg_sleep(0.05)")

                for entry in (lend, cursor, connection, psycopg_pool_connection):
                    before = usage_ms(pool)
                    started = monotonic()
                    await entry()
                    elapsed_ms = 1000.0 * (monotonic() - started)
                    grown = usage_ms(pool) - before
                    assert 50 <= grown <= elapsed_ms + 1, (entry.__name__, grown, elapsed_ms)
            finally:
                await aio.close_pool()

        asyncio.run(run())


def janitor_of(pool: PrecogPool) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"{pool.name}-janitor" and t.is_alive()]


class TestOpenArgument:
    """21.21: PrecogPool(...) opens like psycopg_pool's pool, and open=True starts the janitor thread."""

    def test_open_not_given_opens_with_psycopg_pools_warning(self, pg_server: Server, test_db: str) -> None:
        reference = ConnectionPool(pg_server.conninfo(test_db), min_size=1, name=f"ref-{UNIQUE}")
        try:
            with pytest.warns(DeprecationWarning, match="'open' parameter"), reference.connection() as conn:
                conn.execute("SELECT 1")
        finally:
            reference.close()
        pool = PrecogPool(pg_server.settings(test_db, pool_min=1, pool_max=1), name=f"implicit-{UNIQUE}")
        try:
            assert not pool.closed and janitor_of(pool)
            with pytest.warns(DeprecationWarning, match="'open' parameter"):
                conn = pool.checkout()
            pool.checkin(conn)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # once, as psycopg_pool
                pool.checkin(pool.checkout())
        finally:
            pool.close()

    def test_open_true_starts_the_janitor(self, pg_server: Server, test_db: str) -> None:
        pool = PrecogPool(pg_server.settings(test_db, pool_min=1, pool_max=1), open=True, name=f"explicit-{UNIQUE}")
        try:
            assert not pool.closed and janitor_of(pool)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                pool.checkin(pool.checkout())
        finally:
            pool.close()
        assert wait_until(lambda: not janitor_of(pool), timeout=10)

    def test_context_manager_does_not_warn(self, pg_server: Server, test_db: str) -> None:
        with PrecogPool(pg_server.settings(test_db, pool_min=1, pool_max=1), name=f"ctx-{UNIQUE}") as pool:
            assert janitor_of(pool)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                pool.checkin(pool.checkout())
