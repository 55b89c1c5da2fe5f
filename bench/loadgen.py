"""Load generation: N threads (or asyncio tasks) running one operation until a deadline.

An operation is a callable taking a `random.Random` and returning the
`time.perf_counter` reading at which it *had* its connection (for a bare
connection: at once). The caller's reading just before the call is the
request time, so ``acquired - requested`` is the checkout latency and the whole
call is the operation latency. Every loop is bounded in time and in count.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter, process_time
from typing import Any

Op = Callable[[random.Random], float]
AsyncOp = Callable[[random.Random], Awaitable[float]]

#: Per-thread cap on operations in one cell, whatever the duration.
MAX_OPS_PER_WORKER = 2_000_000
#: A worker gives up after this many failed operations in one cell.
MAX_ERRORS = 20
#: A waiter counts as served out of order when someone who asked this much later got a connection first.
FIFO_SLACK_S = 0.005


@dataclass
class _Worker:
    ops: int = 0
    all_ops: int = 0
    errors: int = 0
    first_error: str = ""
    checkout: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    waits: list[tuple[float, float]] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index]


def summarize(workers: list[_Worker], seconds: float, cpu_seconds: float) -> dict[str, Any]:
    """Throughput, latency percentiles (microseconds), FIFO order and client CPU per operation for one cell.

    ``cpu_seconds`` is this process's CPU time (all threads) over the whole
    cell, warm-up included, so it is divided by every operation of the cell:
    the client-side cost of one operation, which a busy machine disturbs far
    less than it disturbs throughput.
    """
    ops = sum(w.ops for w in workers)
    all_ops = sum(w.all_ops for w in workers)
    checkout = sorted(c for w in workers for c in w.checkout)
    latency = sorted(x for w in workers for x in w.latency)
    waits = sorted((acq, req) for w in workers for (req, acq) in w.waits)
    overtaken = 0
    latest_request = float("-inf")
    for _acquired, requested in waits:
        if latest_request > requested + FIFO_SLACK_S:
            overtaken += 1
        latest_request = max(latest_request, requested)
    errors = sum(w.errors for w in workers)
    return {
        "ops": ops,
        "seconds": round(seconds, 3),
        "qps": round(ops / seconds, 1) if seconds > 0 else 0.0,
        "checkout_p50_us": round(_percentile(checkout, 0.50) * 1e6, 1),
        "checkout_p99_us": round(_percentile(checkout, 0.99) * 1e6, 1),
        "checkout_max_us": round((checkout[-1] if checkout else 0.0) * 1e6, 1),
        "op_p50_us": round(_percentile(latency, 0.50) * 1e6, 1),
        "op_p99_us": round(_percentile(latency, 0.99) * 1e6, 1),
        "waited": len(waits),
        "served_out_of_order": overtaken,
        "client_cpu_us_per_op": round(cpu_seconds * 1e6 / all_ops, 1) if all_ops else None,
        "errors": errors,
        "first_error": next((w.first_error for w in workers if w.first_error), ""),
    }


#: A checkout slower than this is a wait in the pool's queue (for the FIFO check).
_WAIT_THRESHOLD_S = 0.0002


def _record(w: _Worker, requested: float, acquired: float, done: float) -> None:
    w.ops += 1
    wait = acquired - requested
    w.checkout.append(wait)
    w.latency.append(done - requested)
    if wait > _WAIT_THRESHOLD_S:
        w.waits.append((requested, acquired))


def run_threads(make_op: Callable[[int], Op], threads: int, duration: float, warmup: float) -> dict[str, Any]:
    """Run ``make_op(i)`` in thread i for ``warmup`` + ``duration`` seconds; measure the last ``duration``."""
    ops = [make_op(i) for i in range(threads)]
    workers = [_Worker() for _ in range(threads)]
    window: dict[str, float] = {}

    def set_window() -> None:
        now = perf_counter()
        window["start"] = now + warmup
        window["end"] = now + warmup + duration
        window["cpu"] = process_time()

    barrier = threading.Barrier(threads, action=set_window)

    def body(i: int) -> None:
        op, w = ops[i], workers[i]
        rng = random.Random(i)
        barrier.wait(timeout=60)
        start, end = window["start"], window["end"]
        for _ in range(MAX_OPS_PER_WORKER):
            requested = perf_counter()
            if requested >= end:
                break
            try:
                acquired = op(rng)
            except Exception as exc:
                w.errors += 1
                w.first_error = w.first_error or f"{type(exc).__name__}: {exc}"
                if w.errors >= MAX_ERRORS:
                    break
                continue
            done = perf_counter()
            w.all_ops += 1
            if requested >= start:
                _record(w, requested, acquired, done)

    pool = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=warmup + duration + 60)
        if t.is_alive():
            raise RuntimeError(f"a benchmark thread did not finish within {warmup + duration + 60:.0f}s")
    return summarize(workers, duration, process_time() - window["cpu"])


async def run_tasks(make_op: Callable[[int], AsyncOp], tasks: int, duration: float, warmup: float) -> dict[str, Any]:
    """The asyncio twin of `run_threads`: ``tasks`` coroutines on the running loop."""
    ops = [make_op(i) for i in range(tasks)]
    workers = [_Worker() for _ in range(tasks)]
    now = perf_counter()
    start, end = now + warmup, now + warmup + duration
    cpu = process_time()

    async def body(i: int) -> None:
        op, w = ops[i], workers[i]
        rng = random.Random(i)
        for _ in range(MAX_OPS_PER_WORKER):
            requested = perf_counter()
            if requested >= end:
                break
            try:
                acquired = await op(rng)
            except Exception as exc:
                w.errors += 1
                w.first_error = w.first_error or f"{type(exc).__name__}: {exc}"
                if w.errors >= MAX_ERRORS:
                    break
                continue
            done = perf_counter()
            w.all_ops += 1
            if requested >= start:
                _record(w, requested, acquired, done)

    await asyncio.wait_for(asyncio.gather(*(body(i) for i in range(tasks))), timeout=warmup + duration + 60)
    return summarize(workers, duration, process_time() - cpu)


def interleaved_times(candidates: dict[str, Callable[[], None]], batches: int, batch: int) -> dict[str, list[float]]:
    """µs per call of each candidate, one entry per batch.

    Every candidate is warmed up once, then each round runs one batch of every
    candidate in a shuffled (but seeded) order, so slow drift of a noisy machine
    hits all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        for _ in range(batch):
            fn()
    for b in range(batches):
        order = list(candidates.items())
        random.Random(b).shuffle(order)
        for name, fn in order:
            t0 = perf_counter()
            for _ in range(batch):
                fn()
            times[name].append((perf_counter() - t0) / batch * 1e6)
    return times
