"""The pool base (precog_db._pool_base) drives both pools the same way: one scenario, run on each layer.

Each scenario is written once as a coroutine against `Side`, which puts one
pool of either layer behind the same awaitable calls (the sync pool's calls
simply run). They pin the shape both `lend`s share (the connection is
returned; the sync one also stores it into the caller's holder) and the
checkin decision: `checkin_verdict` says what the asyncio pool does and what
the sync pool's inlined chain does, on real connections in each state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from precog_db import apool
from precog_db._pool_base import BAD, CLOSE, EXPIRED, KEEP, checkin_verdict
from precog_db._pool_lending import _Slot
from precog_db.pool import PrecogPool, create_pool
from precog_db.settings import DatabaseSettings
from tests._helpers.faults import wait_until

LAYERS = ["sync", "asyncio"]


class Side:
    """One pool of either layer, behind one set of awaitable calls."""

    def __init__(self, pool: PrecogPool | apool.AsyncPrecogPool) -> None:
        self.pool = pool
        self.slots: dict[int, _Slot] = {}

    @classmethod
    async def open(cls, layer: str, settings: DatabaseSettings) -> Side:
        if layer == "sync":
            return cls(create_pool(settings, prod_confirmed=False))
        return cls(await apool.create_pool(settings, prod_confirmed=False))

    async def lend(self) -> Any:
        pool = self.pool
        if isinstance(pool, PrecogPool):
            slot = _Slot()
            conn = pool.lend(slot)
            assert slot._conn is conn, "the sync lend stores the connection it returns into the holder"
            self.slots[id(conn)] = slot
            return conn
        return await pool.lend()

    async def give_back(self, conn: Any) -> None:
        pool = self.pool
        if isinstance(pool, PrecogPool):
            slot = self.slots.pop(id(conn))
            pool.give_back(slot)
            assert slot._conn is None
        else:
            await pool.give_back(conn)

    async def drain(self) -> None:
        if isinstance(self.pool, PrecogPool):
            self.pool.drain()
        else:
            await self.pool.drain()

    async def close(self) -> None:
        if isinstance(self.pool, PrecogPool):
            self.pool.close()
        else:
            await self.pool.close()

    def idle(self) -> list[Any]:
        return list(self.pool._pool)


def run(layer: str, settings: DatabaseSettings, scenario: Callable[[Side], Awaitable[None]]) -> None:
    """Run ``scenario`` on a fresh pool of ``layer`` (closed afterwards), in an event loop of its own."""

    async def main() -> None:
        side = await Side.open(layer, settings.replace(pool_min=1, pool_max=2))
        try:
            await scenario(side)
        finally:
            await side.close()

    asyncio.run(main())


@pytest.mark.parametrize("layer", LAYERS)
class TestOneShape:
    def test_lend_returns_a_live_connection_lent_by_this_pool(
        self, layer: str, test_settings: DatabaseSettings
    ) -> None:
        async def scenario(side: Side) -> None:
            conn = await side.lend()
            assert conn._pool is side.pool and not conn.closed
            assert conn.pgconn.parameter_status(b"default_transaction_read_only") == b"on"
            await side.give_back(conn)
            assert conn._pool is None, "given back: detached until lent again"

        run(layer, test_settings, scenario)


@pytest.mark.parametrize("layer", LAYERS)
class TestCheckinVerdict:
    """What `checkin_verdict` says of a connection is what the pool of either layer then does with it."""

    def test_an_untouched_connection_is_kept(self, layer: str, test_settings: DatabaseSettings) -> None:
        async def scenario(side: Side) -> None:
            conn = await side.lend()
            assert checkin_verdict(side.pool, conn) == KEEP
            await side.give_back(conn)
            assert not conn.closed and any(c is conn for c in side.idle())

        run(layer, test_settings, scenario)

    def test_a_connection_opened_before_a_drain_is_replaced(self, layer: str, test_settings: DatabaseSettings) -> None:
        async def scenario(side: Side) -> None:
            conn = await side.lend()
            await side.drain()
            assert checkin_verdict(side.pool, conn) == EXPIRED
            await side.give_back(conn)
            assert conn.closed and not any(c is conn for c in side.idle())

        run(layer, test_settings, scenario)

    def test_a_broken_connection_is_replaced_and_counted(self, layer: str, test_settings: DatabaseSettings) -> None:
        async def scenario(side: Side) -> None:
            conn = await side.lend()
            before = side.pool.get_stats().get("returns_bad", 0)
            conn.pgconn.finish()  # the socket is gone, as after a server crash
            assert checkin_verdict(side.pool, conn) == BAD
            await side.give_back(conn)
            assert not any(c is conn for c in side.idle())
            # The sync pool counts it in a worker (where no signal handler runs): bounded wait.
            assert wait_until(lambda: side.pool.get_stats().get("returns_bad", 0) == before + 1, timeout=10)

        run(layer, test_settings, scenario)

    def test_a_connection_given_back_to_a_closed_pool_is_closed(
        self, layer: str, test_settings: DatabaseSettings
    ) -> None:
        async def scenario(side: Side) -> None:
            conn = await side.lend()
            await side.close()
            assert checkin_verdict(side.pool, conn) == CLOSE
            await side.give_back(conn)
            assert conn.closed

        run(layer, test_settings, scenario)
