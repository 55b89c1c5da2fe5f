"""A tiny asyncio market-data consumer: the kind of service that imports precog_db.aio instead of asyncpg.

Several consumer tasks record ticks concurrently (one ``commit=True`` block per
tick), a reporter reads the latest prices with plain read-only cursors, and a
slow query is bounded with ``asyncio.timeout``: the statement is cancelled on
the server and the pool replaces the connection it used. Run it with
``python examples/async_service.py`` once your dev settings point at a server
(``make demo`` starts one), or ``PRECOG_ENV=test`` for the test database.
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

from precog_db import CommitOutcomeUnknownError, aio

SCHEMA = """
CREATE TABLE IF NOT EXISTS ticks (
    id         bigserial PRIMARY KEY,
    symbol     text NOT NULL,
    price      numeric(12, 2) NOT NULL,
    seen_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ticks_symbol_id ON ticks (symbol, id DESC);
"""

SYMBOLS = ("BTC-USD", "ETH-USD", "SOL-USD")


async def ensure_schema() -> None:
    """Create the service's table (idempotent)."""
    async with aio.get_cursor(commit=True) as cur:
        await cur.execute(SCHEMA)


async def consume(symbol: str, ticks: int, rng: random.Random) -> int:
    """Record ``ticks`` prices for ``symbol``, one transaction each; return how many were surely stored."""
    stored = 0
    price = Decimal(rng.randint(100, 60_000))
    for _ in range(ticks):
        price += Decimal(rng.randint(-50, 50)) / 10
        try:
            async with aio.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO ticks (symbol, price) VALUES (%s, %s)", (symbol, price))
        except CommitOutcomeUnknownError:
            continue  # the COMMIT's outcome is unknown: a real service would check before re-sending
        stored += 1
    return stored


async def latest_prices() -> dict[str, Decimal]:
    """The last price of each symbol: a read-only cursor, one round trip, dict rows."""
    async with aio.get_cursor() as cur:
        await cur.execute(
            "SELECT DISTINCT ON (symbol) symbol, price FROM ticks WHERE symbol = ANY(%s) ORDER BY symbol, id DESC",
            (list(SYMBOLS),),
        )
        return {row["symbol"]: row["price"] for row in await cur.fetchall()}


async def bounded_report() -> str:
    """A report that must not take more than 0.2 s: on timeout the server stops the query too."""
    try:
        async with asyncio.timeout(0.2):
            async with aio.get_cursor() as cur:
                await cur.execute("SELECT pg_sleep(5)")  # stands for an unexpectedly slow query
        return "report done"
    except TimeoutError:
        return "report timed out (cancelled on the server; the pool replaced the connection it used)"


async def main() -> None:
    await ensure_schema()
    rng = random.Random(7)  # noqa: S311 - made-up prices
    stored = await asyncio.gather(*(consume(symbol, 20, rng) for symbol in SYMBOLS))
    print(f"stored {sum(stored)} ticks from {len(SYMBOLS)} concurrent consumers")
    for symbol, price in sorted((await latest_prices()).items()):
        print(f"{symbol:8} {price:>10}")
    print(await bounded_report())
    pool = await aio.get_pool()
    stats = pool.get_stats()
    print(f"pool {pool.name}: {stats.get('pool_available', 0)} of {stats.get('pool_size', 0)} connections idle")
    await aio.close_pool()


if __name__ == "__main__":
    asyncio.run(main())
