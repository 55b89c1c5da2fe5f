"""``python -m bench.aio``: precog_db.aio against asyncpg's pool, psycopg's AsyncConnectionPool and a bare connection.

One workload, the issue-12 targets: a primary-key lookup (one row) by 1, 8 and
64 tasks on one event loop, pools of 10. Contenders, each used the way its
users would:

* ``precog_aio``: ``async with precog_db.aio.get_cursor() as cur`` (dict rows,
  read-only autocommit, liveness check and borrower isolation included);
* ``asyncpg``: ``async with pool.acquire() as conn: await conn.fetchrow(...)``
  (Record rows; the pool resets each connection on release);
* ``psycopg_pool``: ``async with pool.connection() as conn: await
  (await conn.execute(...)).fetchone()``, psycopg_pool's default (not autocommit:
  the block is a transaction, committed on exit; tuple rows);
* ``bare``: one `psycopg.AsyncConnection` per task, autocommit, dict rows: no
  pool at all, the floor at 1 task.

Cells run in rounds with the contenders' order rotated; the table keeps the
median and each contender's ratio to precog_aio measured in the same round.
Round trips per operation are counted on the wire (`bench.wire`).

    .venv/bin/python -m bench.aio --quick   # about 30 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench.contenders import PK, POOL_SIZE, _dollar, _key
from bench.loadgen import run_tasks
from bench.run import _quiet_logging
from bench.server import BenchServer, Target
from bench.wire import RoundTripCounter

AsyncOp = Callable[[random.Random], Awaitable[float]]
NAMES = ("precog_aio", "asyncpg", "psycopg_pool", "bare")
RESULTS = Path(__file__).resolve().parent / "results"


class Contender:
    name = ""

    async def open(self, target: Target, tasks: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def op(self, task: int) -> AsyncOp:
        raise NotImplementedError


class PrecogAio(Contender):
    name = "precog_aio"

    async def open(self, target: Target, tasks: int) -> None:
        from precog_db import aio
        from precog_db.environment import Environment
        from precog_db.settings import DatabaseSettings

        settings = DatabaseSettings(
            env=Environment.DEV,
            host=target.host,
            port=target.port,
            dbname=target.dbname,
            user=target.user,
            password=target.password,
            pool_min=POOL_SIZE,
            pool_max=POOL_SIZE,
            pool_timeout=60.0,
            sslmode="disable",
        )
        pool = await aio.initialize_pool(settings=settings)
        await pool.wait(timeout=60)
        self.aio = aio

    async def close(self) -> None:
        await self.aio.close_pool()

    def op(self, task: int) -> AsyncOp:
        get_cursor = self.aio.get_cursor

        async def pk(rng: random.Random) -> float:
            key = _key(rng)
            async with get_cursor() as cur:
                t = perf_counter()
                await cur.execute(PK, (key,))
                await cur.fetchone()
            return t

        return pk


class Asyncpg(Contender):
    name = "asyncpg"

    async def open(self, target: Target, tasks: int) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(
            **target.connect_kwargs(), ssl=False, min_size=POOL_SIZE, max_size=POOL_SIZE
        )

    async def close(self) -> None:
        await self.pool.close()

    def op(self, task: int) -> AsyncOp:
        pool, sql = self.pool, _dollar(PK)

        async def pk(rng: random.Random) -> float:
            key = _key(rng)
            async with pool.acquire() as conn:
                t = perf_counter()
                await conn.fetchrow(sql, key)
            return t

        return pk


class PsycopgPool(Contender):
    name = "psycopg_pool"

    async def open(self, target: Target, tasks: int) -> None:
        from psycopg_pool import AsyncConnectionPool

        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            target.conninfo(), min_size=POOL_SIZE, max_size=POOL_SIZE, open=False
        )
        await self.pool.open(wait=True, timeout=60)

    async def close(self) -> None:
        await self.pool.close()

    def op(self, task: int) -> AsyncOp:
        pool = self.pool

        async def pk(rng: random.Random) -> float:
            key = _key(rng)
            async with pool.connection() as conn:
                t = perf_counter()
                cur = await conn.execute(PK, (key,))
                await cur.fetchone()
            return t

        return pk


class Bare(Contender):
    name = "bare"

    async def open(self, target: Target, tasks: int) -> None:
        self.conns = [
            await psycopg.AsyncConnection.connect(target.conninfo(), autocommit=True, row_factory=dict_row)
            for _ in range(tasks)
        ]

    async def close(self) -> None:
        for conn in self.conns:
            await conn.close()

    def op(self, task: int) -> AsyncOp:
        conn = self.conns[task]

        async def pk(rng: random.Random) -> float:
            key = _key(rng)
            t = perf_counter()
            cur = await conn.execute(PK, (key,))
            await cur.fetchone()
            return t

        return pk


CONTENDERS: dict[str, type[Contender]] = {c.name: c for c in (PrecogAio, Asyncpg, PsycopgPool, Bare)}


async def cell(cls: type[Contender], target: Target, tasks: int, duration: float, warmup: float) -> float:
    """Operations per second of one contender with ``tasks`` tasks on this loop."""
    contender = cls()
    await contender.open(target, tasks)
    try:
        result = await run_tasks(contender.op, tasks, duration, warmup)
    finally:
        await contender.close()
    if result.get("errors"):
        raise RuntimeError(f"{cls.name}: {result.get('first_error')}")
    return float(result["qps"])


async def round_trips(target: Target, *, warm: int = 200, count: int = 100) -> dict[str, float]:
    """ReadyForQuery messages per PK lookup on the wire, one task, after ``warm`` lookups."""
    out: dict[str, float] = {}
    with RoundTripCounter(target.host, target.port) as proxy:
        via = target.at("127.0.0.1", proxy.port)
        for name, cls in CONTENDERS.items():
            contender = cls()
            await contender.open(via, 1)
            try:
                op, rng = contender.op(0), random.Random(1)
                for _ in range(warm):
                    await op(rng)
                proxy.reset()
                for _ in range(count):
                    await op(rng)
                out[name] = round(proxy.round_trips / count, 2)
            finally:
                await contender.close()
    return out


async def measure(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    tasks_list = [int(t) for t in args.tasks.split(",")]
    runs: dict[str, dict[str, list[float]]] = {}
    ratios: dict[str, dict[str, list[float]]] = {}
    for r in range(args.rounds):
        for tasks in tasks_list:
            names = list(NAMES) if tasks <= POOL_SIZE or args.bare_all else [n for n in NAMES if n != "bare"]
            order = names[r % len(names) :] + names[: r % len(names)]
            got: dict[str, float] = {}
            for name in order:
                got[name] = await cell(CONTENDERS[name], target, tasks, args.duration, args.warmup)
                runs.setdefault(str(tasks), {}).setdefault(name, []).append(got[name])
            for name, qps in got.items():
                ratios.setdefault(str(tasks), {}).setdefault(name, []).append(got["precog_aio"] / qps)
            print(
                f"round {r + 1} tasks {tasks}: " + ", ".join(f"{n} {q:,.0f}/s" for n, q in got.items()), file=sys.stderr
            )
    return {
        "qps": {t: {n: statistics.median(v) for n, v in cells.items()} for t, cells in runs.items()},
        "precog_over": {
            t: {n: round(statistics.median(v), 3) for n, v in cells.items()} for t, cells in ratios.items()
        },
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        "| tasks | precog_db.aio get_cursor() | asyncpg pool | psycopg AsyncConnectionPool | bare AsyncConnection |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for tasks, cells in report["qps"].items():
        over = report["precog_over"][tasks]
        row = [tasks]
        for name in NAMES:
            if name not in cells:
                row.append("—")
            elif name == "precog_aio":
                row.append(f"{cells[name]:,.0f}/s")
            else:
                row.append(f"{cells[name]:,.0f}/s (precog {over[name]:.2f}x)")
        lines.append("| " + " | ".join(row) + " |")
    rts = report["round_trips"]
    lines.append("")
    lines.append("Round trips per PK lookup on the wire: " + ", ".join(f"{n} {rts[n]:g}" for n in NAMES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aio", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short cells, one round")
    p.add_argument("--tasks", default="1,8,64")
    p.add_argument("--duration", type=float)
    p.add_argument("--warmup", type=float)
    p.add_argument("--rounds", type=int)
    p.add_argument("--bare-all", action="store_true", help="run the bare connection (one per task) above 10 tasks too")
    p.add_argument("--dsn", default=os.environ.get("PRECOG_BENCH_DSN"))
    args = p.parse_args(argv)
    args.duration = args.duration or (0.5 if args.quick else 2.0)
    args.warmup = args.warmup if args.warmup is not None else (0.2 if args.quick else 0.5)
    args.rounds = args.rounds or (1 if args.quick else 5)
    _quiet_logging()  # the benchmark is the application: warnings and up only
    with BenchServer(args.dsn) as server:
        server.prepare()
        report = asyncio.run(measure(server.bench, args))
        report["round_trips"] = asyncio.run(round_trips(server.bench))
        report["args"] = {k: v for k, v in vars(args).items() if k != "dsn"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"aio{'-quick' if args.quick else ''}.json").write_text(json.dumps(report, indent=2))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
