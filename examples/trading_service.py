"""A tiny trading service: the kind of code that imports precog_db instead of psycopg.

It creates its tables if needed, records a few fills in one transaction each,
and prints positions computed by a read-only query. Run it through
``make demo`` (which makes sure a dev database exists) or directly with
``python examples/trading_service.py`` once your dev settings point at a server.
"""

from __future__ import annotations

import random
from decimal import Decimal

from precog_db import get_cursor, get_pool

SCHEMA = """
CREATE TABLE IF NOT EXISTS markets (
    id      serial PRIMARY KEY,
    symbol  text NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS fills (
    id         bigserial PRIMARY KEY,
    market_id  int NOT NULL REFERENCES markets(id),
    side       text NOT NULL CHECK (side IN ('buy', 'sell')),
    qty        int NOT NULL CHECK (qty > 0),
    price      numeric(12, 2) NOT NULL,
    filled_at  timestamptz NOT NULL DEFAULT now()
);
"""

SYMBOLS = ("BTC-USD", "ETH-USD", "SOL-USD")


def ensure_schema() -> None:
    """Create the service's tables (idempotent)."""
    with get_cursor(commit=True) as cur:
        cur.execute(SCHEMA)
        for symbol in SYMBOLS:
            cur.execute("INSERT INTO markets (symbol) VALUES (%s) ON CONFLICT (symbol) DO NOTHING", (symbol,))


def record_fill(symbol: str, side: str, qty: int, price: Decimal) -> int:
    """Record one fill in its own transaction; return its id."""
    with get_cursor(commit=True) as cur:
        cur.execute(
            "INSERT INTO fills (market_id, side, qty, price) "
            "SELECT id, %s, %s, %s FROM markets WHERE symbol = %s RETURNING id",
            (side, qty, price, symbol),
        )
        row = cur.fetchone()
        if row is None:
            raise LookupError(f"unknown market {symbol}")
        return int(row["id"])


def positions() -> list[dict[str, object]]:
    """Net position and fill count per market (a read-only query)."""
    with get_cursor() as cur:
        cur.execute(
            """
            SELECT m.symbol,
                   coalesce(sum(CASE WHEN f.side = 'buy' THEN f.qty ELSE -f.qty END), 0) AS net_qty,
                   count(f.id) AS fills
              FROM markets m LEFT JOIN fills f ON f.market_id = m.id
             GROUP BY m.symbol ORDER BY m.symbol
            """
        )
        return list(cur.fetchall())


def main() -> None:
    pool = get_pool()
    print(f"trading service connected to the {pool.settings.describe()} (pool {pool.name})")
    ensure_schema()
    rng = random.Random()  # noqa: S311 - demo data, not security
    for _ in range(5):
        symbol = rng.choice(SYMBOLS)
        side = rng.choice(("buy", "sell"))
        fill_id = record_fill(symbol, side, rng.randint(1, 10), Decimal(rng.randint(100, 50_000)) / 100)
        print(f"  recorded fill #{fill_id}: {side} {symbol}")
    print("positions:")
    for row in positions():
        print(f"  {row['symbol']:<8} net {row['net_qty']:>5}  ({row['fills']} fills)")


if __name__ == "__main__":
    main()
