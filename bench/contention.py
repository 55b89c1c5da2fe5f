"""Where the time goes under contention: ``python -m bench.contention [--threads 8] [--rounds 5]``.

Runs PK reads from N threads, interleaved in rounds, through variants that
add one piece of `get_cursor()` at a time to a bare connection:

* ``bare``: a psycopg connection per thread, ``conn.execute(...).fetchone()``;
* ``held``: a connection checked out of the pool once per thread, a cursor per read
  (the pool's cursor class and statement tracking, no checkout per read);
* ``held+block``: the same, plus an empty ``get_cursor()`` block per read on another
  connection (the checkout and checkin, no statement);
* ``held+sleep0``: ``held`` plus one ``time.sleep(0)`` per read, i.e. one extra release of
  the GIL and nothing else;
* ``held+py300`` / ``held+py1100``: ``held`` plus an empty loop of 300 / 1,100 iterations per
  read (about 2 / 7 µs of pure Python on the development VM): where the GIL's knee is;
* ``get_cursor``: what a service runs.

Each is reported as ops/s, the median over rounds of its ratio to ``bare`` in the
same round, and the client's CPU per read (all threads, from ``time.process_time``).
Context switches and GIL releases per read come from outside the process (see
docs/PERFORMANCE.md, "Under contention"): ``perf stat -e context-switches`` and a
uprobe on ``PyEval_SaveThread``. Uses its own throwaway cluster, or ``PRECOG_BENCH_DSN``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from collections.abc import Callable

import psycopg
from psycopg.rows import dict_row

from bench.contenders import PK, POOL_SIZE, open_precog_pool
from bench.run import _quiet_logging
from bench.server import ITEMS, BenchServer
from precog_db.pool import create_pool

Op = Callable[[random.Random], None]
Maker = Callable[[int], Op]


def run(make: Maker, threads: int, duration: float) -> tuple[float, float]:
    """(ops/s, client CPU microseconds per op) of ``threads`` threads running ``make(i)``'s op for ``duration``."""
    stop = threading.Event()
    counts = [0] * threads
    start = threading.Barrier(threads + 1)

    def body(i: int) -> None:
        op, rng = make(i), random.Random(i)
        for _ in range(20):  # warm-up, bounded
            op(rng)
        start.wait()
        n = 0
        while not stop.is_set() and n < 2_000_000:
            op(rng)
            n += 1
        counts[i] = n

    workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    cpu0, t0 = time.process_time(), time.monotonic()
    time.sleep(duration)
    stop.set()
    for w in workers:
        w.join()
    elapsed, total = time.monotonic() - t0, max(sum(counts), 1)
    return total / elapsed, (time.process_time() - cpu0) / total * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.contention", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=8, help=f"reader threads (at most the pool's {POOL_SIZE})")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=1.0)
    args = p.parse_args(argv)
    threads = max(1, min(args.threads, POOL_SIZE))
    rounds, duration = min(max(args.rounds, 1), 20), min(args.duration, 10.0)
    _quiet_logging()
    import precog_db

    with BenchServer(os.environ.get("PRECOG_BENCH_DSN")) as server:
        server.prepare()
        target = server.bench
        get_cursor = open_precog_pool(precog_db, target)
        pool = precog_db.get_pool()
        bare = [psycopg.connect(target.conninfo(), autocommit=True, row_factory=dict_row) for _ in range(threads)]
        # The held connections come from a second pool of the same kind: the global one stays free.
        holder = create_pool(pool.settings, prod_confirmed=False, min_size=threads, max_size=threads, name="held")
        holder.wait(timeout=60)
        held = [holder.checkout() for _ in range(threads)]

        def m_bare(i: int) -> Op:
            conn = bare[i]

            def op(rng: random.Random) -> None:
                conn.execute(PK, (rng.randint(1, ITEMS),)).fetchone()

            return op

        def m_held(i: int) -> Op:
            conn = held[i]

            def op(rng: random.Random) -> None:
                with conn.cursor(row_factory=dict_row) as cur:
                    cur.execute(PK, (rng.randint(1, ITEMS),))
                    cur.fetchone()

            return op

        def m_held_block(i: int) -> Op:
            inner = m_held(i)

            def op(rng: random.Random) -> None:
                with get_cursor():
                    pass
                inner(rng)

            return op

        def m_held_sleep0(i: int) -> Op:
            inner = m_held(i)

            def op(rng: random.Random) -> None:
                time.sleep(0)
                inner(rng)

            return op

        def m_held_python(loops: int) -> Maker:
            def make(i: int) -> Op:
                inner = m_held(i)

                def op(rng: random.Random) -> None:
                    for _ in range(loops):  # pure Python, no call that releases the GIL
                        pass
                    inner(rng)

                return op

            return make

        def m_get_cursor(i: int) -> Op:
            def op(rng: random.Random) -> None:
                with get_cursor() as cur:
                    cur.execute(PK, (rng.randint(1, ITEMS),))
                    cur.fetchone()

            return op

        variants: dict[str, Maker] = {
            "bare": m_bare,
            "held": m_held,
            "held+block": m_held_block,
            "held+sleep0": m_held_sleep0,
            "held+py300": m_held_python(300),  # about 2 us of Python per read on the development VM
            "held+py1100": m_held_python(1100),  # about 7 us
            "get_cursor": m_get_cursor,
        }
        qps: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        try:
            for r in range(rounds):
                order = list(variants.items())
                random.Random(r).shuffle(order)
                for name, make in order:
                    q, c = run(make, threads, duration)
                    qps[name].append(q)
                    cpu[name].append(c)
        finally:
            for conn in held:
                holder.checkin(conn)
            holder.close()
            for b in bare:
                b.close()
            precog_db.close_pool()
    print(
        f"PK reads, {threads} threads, pool of {POOL_SIZE}, {rounds} rounds of {duration}s (medians; ratios per round)"
    )
    for name in variants:
        ratio = statistics.median(a / b for a, b in zip(qps[name], qps["bare"], strict=True))
        ops, per_op = statistics.median(qps[name]), statistics.median(cpu[name])
        print(f"  {name:<12} {ops:>9,.0f} ops/s   x bare {ratio:.2f}   client CPU/op {per_op:6.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
