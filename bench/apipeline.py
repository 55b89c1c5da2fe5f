"""Committed writes on asyncio: precog_db.aio against asyncpg (issue 16, run by `bench.pipeline`).

Workloads ``insert`` (one committed single-row INSERT) and ``insert10`` (ten
INSERTs in one transaction), by 1 and 8 tasks on one event loop, pools of 10:

* ``aio_commit``: ``async with aio.get_cursor(commit=True) as cur`` (the BEGIN
  travels with the first statement);
* ``aio_pipeline``: ``aio.get_cursor(commit=True, pipeline=True)`` (one round trip);
* ``asyncpg_tx``: ``async with pool.acquire() as conn: async with
  conn.transaction():`` (what a committed block is in asyncpg);
* ``asyncpg``: asyncpg's autocommit ``conn.execute`` for ``insert`` (no
  transaction at all: one round trip plus the pool's reset), its transaction for
  ``insert10``.

Cells and rounds work as in `bench.pipeline`: each cell reports the median over
rounds and keeps the per-round figures for paired ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
from time import perf_counter
from typing import Any

from bench.aio import AsyncOp, Asyncpg, PrecogAio
from bench.contenders import INSERT, _dollar, _key
from bench.loadgen import run_tasks
from bench.server import Target
from bench.wire import RoundTripCounter

WORKLOADS = ("insert", "insert10")
_INSERT_DOLLAR = _dollar(INSERT)


def _row(rng: random.Random) -> tuple[int, int]:
    return _key(rng), rng.randint(1, 100)


class AioCommit(PrecogAio):
    name = "aio_commit"
    label = "precog_db aio.get_cursor(commit=True)"
    pipeline = False

    def workload_op(self, workload: str) -> AsyncOp:
        get_cursor, pipeline = self.aio.get_cursor, self.pipeline
        rows = 10 if workload == "insert10" else 1

        async def op(rng: random.Random) -> float:
            args = [_row(rng) for _ in range(rows)]
            t = perf_counter()
            async with get_cursor(commit=True, pipeline=pipeline) as cur:
                for row in args:
                    await cur.execute(INSERT, row)
            return t

        return op


class AioPipeline(AioCommit):
    name = "aio_pipeline"
    label = "precog_db aio.get_cursor(commit=True, pipeline=True)"
    pipeline = True


class AsyncpgTx(Asyncpg):
    name = "asyncpg_tx"
    label = "asyncpg pool, explicit transaction"
    autocommit_single = False

    def workload_op(self, workload: str) -> AsyncOp:
        pool = self.pool
        rows = 10 if workload == "insert10" else 1
        autocommit = self.autocommit_single and rows == 1

        async def op(rng: random.Random) -> float:
            args = [_row(rng) for _ in range(rows)]
            t = perf_counter()
            async with pool.acquire() as conn:
                if autocommit:
                    await conn.execute(_INSERT_DOLLAR, *args[0])
                else:
                    async with conn.transaction():
                        for row in args:
                            await conn.execute(_INSERT_DOLLAR, *row)
            return t

        return op


class AsyncpgAuto(AsyncpgTx):
    name = "asyncpg"
    label = "asyncpg pool, autocommit insert (no transaction)"
    autocommit_single = True


CONTENDERS: tuple[type[AioCommit] | type[AsyncpgTx], ...] = (AioCommit, AioPipeline, AsyncpgTx, AsyncpgAuto)
LABELS = {cls.name: cls.label for cls in CONTENDERS}


async def count_round_trips(target: Target, *, warm: int = 50, count: int = 50) -> dict[str, dict[str, float]]:
    """ReadyForQuery messages per operation on the wire, one task."""
    out: dict[str, dict[str, float]] = {}
    with RoundTripCounter(target.host, target.port) as proxy:
        via = target.at("127.0.0.1", proxy.port)
        for cls in CONTENDERS:
            contender = cls()
            await contender.open(via, 1)
            try:
                for workload in WORKLOADS:
                    op, rng = contender.workload_op(workload), random.Random(1)
                    for _ in range(warm):
                        await op(rng)
                    proxy.reset()
                    for _ in range(count):
                        await op(rng)
                    out.setdefault(cls.name, {})[workload] = round(proxy.round_trips / count, 2)
            finally:
                await contender.close()
    return out


async def measure(target: Target, tasks: tuple[int, ...], args: argparse.Namespace) -> dict[str, Any]:
    """results[workload][tasks][contender] = median cell, with per-round ops/s kept for pairing."""
    opened: list[AioCommit | AsyncpgTx] = []
    results: dict[str, Any] = {}
    try:
        for cls in CONTENDERS:
            contender = cls()
            await contender.open(target, max(tasks))
            opened.append(contender)
        for workload in WORKLOADS:
            runs: dict[int, dict[str, list[dict[str, Any]]]] = {n: {} for n in tasks}
            for r in range(args.rounds):
                for n in tasks:
                    order = opened[r % len(opened) :] + opened[: r % len(opened)]
                    for contender in order:
                        op = contender.workload_op(workload)
                        cell = await run_tasks(lambda _i, op=op: op, n, args.duration, args.warmup)
                        runs[n].setdefault(contender.name, []).append(cell)
            for n in tasks:
                results.setdefault(workload, {})[str(n)] = {
                    name: {
                        "qps": round(statistics.median(c["qps"] for c in rounds), 1),
                        "op_p50_us": round(statistics.median(c["op_p50_us"] for c in rounds), 1),
                        "errors": sum(c["errors"] for c in rounds),
                        "first_error": next((c["first_error"] for c in rounds if c["first_error"]), ""),
                        "qps_rounds": [c["qps"] for c in rounds],
                    }
                    for name, rounds in runs[n].items()
                }
    finally:
        for contender in reversed(opened):
            await contender.close()
    return results


def run(target: Target, tasks: tuple[int, ...], args: argparse.Namespace) -> dict[str, Any]:
    """`measure` on a fresh event loop."""
    return asyncio.run(measure(target, tasks, args))


def run_count(target: Target) -> dict[str, dict[str, float]]:
    """`count_round_trips` on a fresh event loop."""
    return asyncio.run(count_round_trips(target))
