"""Where `get_cursor` spends its time: ``python -m bench.profile [--ops N] [--html PATH]``.

1. The Python cost of a checkout and checkin with no statement, per call, against
   a bare ``conn.cursor()``: the part of `get_cursor` that is not the server.
   CPU-only, so it is far less sensitive to a busy machine than throughput is;
   the best of several repeats is kept.
2. Python function calls per PK lookup (exact, from cProfile), bare against `get_cursor`.
3. Sequential PK lookups in interleaved batches: a bare connection, `get_cursor`, and the same
   pool handing out the connection idle the longest (psycopg_pool's order) instead of the most
   recently used one.
4. A pyinstrument profile of N primary-key lookups through `get_cursor`.

Uses its own throwaway cluster, or ``PRECOG_BENCH_DSN``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
from time import perf_counter
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from bench.contenders import PK, POOL_SIZE, Precog
from bench.loadgen import interleaved_times
from bench.run import _quiet_logging
from bench.server import ITEMS, BenchServer, Target
from precog_db.pool import PrecogPool


def per_call_us(fn: Any, n: int, repeats: int = 7) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (perf_counter() - t0) / n)
    return best * 1e6


def overhead(n: int, bare: psycopg.Connection[Any]) -> dict[str, float]:
    from precog_db import get_connection, get_cursor, get_pool

    pool = get_pool()

    def precog_cursor() -> None:
        with get_cursor():
            pass

    def precog_connection() -> None:
        with get_connection():
            pass

    def checkout_checkin() -> None:
        pool.checkin(pool.checkout())

    def psycopg_pool_getconn_putconn() -> None:
        pool.putconn(pool.getconn())

    def bare_cursor() -> None:
        with bare.cursor(row_factory=dict_row):
            pass

    return {
        name: round(per_call_us(fn, n), 2)
        for name, fn in (
            ("get_cursor() enter+exit, no statement", precog_cursor),
            ("get_connection() enter+exit", precog_connection),
            ("PrecogPool.checkout()+checkin()", checkout_checkin),
            ("psycopg_pool getconn()+putconn()", psycopg_pool_getconn_putconn),
            ("bare conn.cursor(row_factory=dict_row) enter+exit", bare_cursor),
        )
    }


class _OldestFirst(PrecogPool):
    """PrecogPool handing out the connection idle the longest, psycopg_pool's own order (for comparison only)."""

    def _get_ready_connection(self, timeout: float | None) -> Any:
        return ConnectionPool._get_ready_connection(self, timeout)


def pk_latency(batches: int, batch: int, bare: psycopg.Connection[Any], target: Target) -> dict[str, float]:
    """Median µs per sequential PK lookup over interleaved batches: bare, get_cursor, and oldest-first order."""
    from precog_db import get_cursor, get_pool

    rng = random.Random(1)
    oldest = _OldestFirst(get_pool().settings)
    oldest.open(wait=True, timeout=60)

    def precog() -> None:
        with get_cursor() as cur:
            cur.execute(PK, (rng.randint(1, ITEMS),))
            cur.fetchone()

    def oldest_first() -> None:
        conn = oldest.checkout()
        try:
            with conn.cursor(row_factory=dict_row) as cur:
                cur.execute(PK, (rng.randint(1, ITEMS),))
                cur.fetchone()
        finally:
            oldest.checkin(conn)

    def plain() -> None:
        bare.execute(PK, (rng.randint(1, ITEMS),)).fetchone()

    candidates = {
        "bare dict-row connection": plain,
        "get_cursor (most recently used first)": precog,
        "same pool, oldest idle connection first": oldest_first,
    }
    try:
        out = interleaved_times(candidates, batches, batch)
    finally:
        oldest.close()
    return {k: round(statistics.median(v), 1) for k, v in out.items()}


def calls_per_lookup(bare: psycopg.Connection[Any], n: int = 1000) -> dict[str, float]:
    """Python function calls per PK lookup (cProfile's exact count, not a timing)."""
    import cProfile
    import pstats

    from precog_db import get_cursor

    rng = random.Random(4)

    def precog() -> None:
        with get_cursor() as cur:
            cur.execute(PK, (rng.randint(1, ITEMS),))
            cur.fetchone()

    def plain() -> None:
        bare.execute(PK, (rng.randint(1, ITEMS),)).fetchone()

    out = {}
    for name, fn in (("bare dict-row connection", plain), ("get_cursor", precog)):
        for _ in range(100):
            fn()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(n):
            fn()
        profiler.disable()
        out[name] = round(pstats.Stats(profiler).total_calls / n, 1)  # type: ignore[attr-defined]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, default=5000, help="PK lookups to profile (default 5000)")
    p.add_argument("--html", help="also write pyinstrument's HTML report here")
    args = p.parse_args(argv)
    _quiet_logging()
    from pyinstrument import Profiler

    from precog_db import get_cursor

    with BenchServer(os.environ.get("PRECOG_BENCH_DSN")) as server:
        server.prepare()
        precog = Precog()
        precog.open(server.bench, 1)
        bare = psycopg.connect(server.bench.conninfo(), autocommit=True, row_factory=dict_row)
        try:
            print(f"pool size {POOL_SIZE}; per call, best of 7 (us):")
            for name, us in overhead(20_000, bare).items():
                print(f"  {name:<52} {us:8.2f}")
            print("function calls per PK lookup (exact):")
            for name, calls in calls_per_lookup(bare).items():
                print(f"  {name:<52} {calls:8.1f}")
            print("sequential PK lookups, us per lookup (median of 30 interleaved batches of 200):")
            for name, us in pk_latency(30, 200, bare, server.bench).items():
                print(f"  {name:<52} {us:8.1f}")
            rng = random.Random(2)
            profiler = Profiler(interval=0.0002)
            with profiler:
                for _ in range(min(args.ops, 200_000)):
                    with get_cursor() as cur:
                        cur.execute(PK, (rng.randint(1, ITEMS),))
                        cur.fetchone()
            print(profiler.output_text(unicode=True, color=False, show_all=False))
            if args.html:
                with open(args.html, "w") as fh:
                    fh.write(profiler.output_html())
        finally:
            bare.close()
            precog.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
