"""The SQLAlchemy row: a plain engine (its own QueuePool) against ``precog_db.sqlalchemy``, interleaved.

    .venv/bin/python -m bench.sa [--rounds 7] [--duration 0.5] [--dsn ...]

Both engines stay open on one server (each with a pool of 10); each round runs every
(workload, threads) cell for both, in alternating order, and the report gives per cell the median
over rounds of precog's throughput divided by the plain engine's measured right next to it: on a
shared, noisy machine paired ratios move far less than raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from time import perf_counter
from typing import Any, ClassVar

from sqlalchemy.pool import NullPool

from bench import contenders as C
from bench import extras
from bench.run import _quiet_logging
from bench.server import BenchServer

CHECKOUTS = 2000


class _ListBridge(NullPool):
    """The NullPool design without precog_db: a creator taking a kept connection, a close putting it back.

    Against a QueuePool it isolates what the design choice itself costs in SQLAlchemy (a new
    connection record and the dialect's connect events per checkout), with no pool restore.
    """

    kept: ClassVar[list[Any]] = []

    def _close_connection(self, connection: Any, *, terminate: bool = False) -> None:
        self.kept.append(connection)


def _list_bridge_engine(target: Any) -> Any:
    import psycopg
    import sqlalchemy

    _ListBridge.kept[:] = [psycopg.connect(target.conninfo())]
    return sqlalchemy.create_engine("postgresql+psycopg://", poolclass=_ListBridge, creator=_ListBridge.kept.pop)


def _checkouts(server: BenchServer, rounds: int) -> dict[str, Any]:
    """Microseconds per ``with engine.connect(): pass`` (checkout and return, no statement), interleaved."""
    plain, precog = C.SAPlain(), C.SAPrecog()
    plain.open(server.bench, 1)
    precog.open(server.bench, 1)
    engines = {
        "sa_plain": plain.engine,
        "sa_precog": precog.engine,
        "nullpool_design": _list_bridge_engine(server.bench),
    }
    out: dict[str, list[float]] = {name: [] for name in engines}
    try:
        for r in range(min(rounds, 20)):
            names = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in names:
                engine = engines[name]
                t = perf_counter()
                for _ in range(CHECKOUTS):
                    with engine.connect():
                        pass
                out[name].append((perf_counter() - t) / CHECKOUTS * 1e6)
    finally:
        engines["nullpool_design"].dispose()
        for conn in _ListBridge.kept:
            conn.close()
        precog.close()
        plain.close()
    report: dict[str, Any] = {f"{name}_us_median": round(statistics.median(v), 1) for name, v in out.items()}
    for name in ("sa_precog", "nullpool_design"):
        ratios = [b / a for a, b in zip(out["sa_plain"], out[name], strict=True)]
        report[f"{name}_ratio_median"] = round(statistics.median(ratios), 2)
        report[f"{name}_ratio_range"] = [round(min(ratios), 2), round(max(ratios), 2)]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sa", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--duration", type=float, default=0.5)
    p.add_argument("--warmup", type=float, default=0.15)
    p.add_argument("--threads", default="1,8")
    p.add_argument("--dsn", default=os.environ.get("PRECOG_BENCH_DSN"))
    p.add_argument("--checkouts-only", action="store_true", help="round trips and checkout cost only")
    args = p.parse_args(argv)
    _quiet_logging()
    threads = [int(x) for x in args.threads.split(",")]
    qps: dict[str, dict[str, list[float]]] = {}
    with BenchServer(args.dsn) as server:
        server.prepare()
        trips = extras.round_trips([C.SAPlain, C.SAPrecog], server.bench, warm=100, count=50)
        checkout_us = _checkouts(server, args.rounds)
        if args.checkouts_only:
            print(json.dumps({"round_trips": trips, "checkout_us": checkout_us}, indent=2))
            return 0
        plain, precog = C.SAPlain(), C.SAPrecog()
        plain.open(server.bench, max(threads))
        precog.open(server.bench, max(threads))
        try:
            for r in range(min(args.rounds, 20)):
                for workload in C.SAPlain.workloads:
                    for n in threads:
                        pair = (plain, precog) if r % 2 == 0 else (precog, plain)
                        for contender in pair:
                            cell = contender.run(workload, n, args.duration, args.warmup)
                            qps.setdefault(f"{workload}@{n}", {}).setdefault(contender.name, []).append(cell["qps"])
                print(f"round {r + 1} done", file=sys.stderr)
        finally:
            precog.close()
            plain.close()
    report: dict[str, Any] = {
        "load_average": os.getloadavg(),
        "round_trips": trips,
        "checkout_us": checkout_us,
        "cells": {},
    }
    for cell, by in qps.items():
        ratios = [b / a for a, b in zip(by["sa_plain"], by["sa_precog"], strict=True) if a > 0]
        report["cells"][cell] = {
            "sa_plain_qps_median": round(statistics.median(by["sa_plain"]), 1),
            "sa_precog_qps_median": round(statistics.median(by["sa_precog"]), 1),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
