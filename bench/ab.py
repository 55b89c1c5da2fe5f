"""Before/after: an older precog_db against the current one, interleaved in one process.

    .venv/bin/python -m bench.ab --before <git revision>      # e.g. --before 5dd34b4
    .venv/bin/python -m bench.ab --before-dir /path/holding/precog_db

The older package is copied to a temporary directory under the name
``precog_db_before`` (imports rewritten), so both versions run side by side,
each with its own pool of 10 on the same server. Candidates run in short
alternating batches and the report gives, per candidate, the median over
batches of its time relative to the bare connection measured right next to
it: on a shared, noisy machine paired ratios move far less than raw numbers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench.contenders import INSERT, PK, open_precog_pool
from bench.loadgen import interleaved_times, run_threads
from bench.run import _quiet_logging
from bench.server import ITEMS, BenchServer

REPO = Path(__file__).resolve().parent.parent


def install_before(where: Path, *, revision: str | None, directory: Path | None) -> None:
    """Write the older precog_db into ``where/precog_db_before``."""
    dest = where / "precog_db_before"
    if directory is not None:
        shutil.copytree(directory / "precog_db", dest, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        assert revision is not None
        files = subprocess.run(
            ["git", "ls-tree", "-r", "--name-only", revision, "precog_db/"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        for name in files:
            blob = subprocess.run(["git", "show", f"{revision}:{name}"], cwd=REPO, capture_output=True, check=True)
            target = dest / Path(name).relative_to("precog_db")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob.stdout)
    for path in dest.rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\bprecog_db\b", "precog_db_before", text))


def sequential(candidates: dict[str, Callable[[], None]], batches: int, batch: int) -> dict[str, Any]:
    """Per candidate: median µs per call over batches, and the median of its ratio to ``bare`` in the same round."""
    times = interleaved_times(candidates, batches, batch)
    bare = times["bare"]
    return {
        name: {
            "median_us": round(statistics.median(v), 2),
            "min_us": round(min(v), 2),
            "x_bare_time": round(statistics.median(a / b for a, b in zip(v, bare, strict=True)), 3),
        }
        for name, v in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--before", help="git revision holding the older precog_db")
    src.add_argument("--before-dir", type=Path, help="directory holding the older precog_db/")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--threads", default="1,8,64", help="thread counts for the throughput rounds ('' to skip)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--duration", type=float, default=0.6)
    args = p.parse_args(argv)
    _quiet_logging()
    tmp = Path(tempfile.mkdtemp(prefix="precog-ab-"))
    try:
        install_before(tmp, revision=args.before, directory=args.before_dir)
        sys.path.insert(0, str(tmp))
        before = importlib.import_module("precog_db_before")
        after = importlib.import_module("precog_db")
        with BenchServer(os.environ.get("PRECOG_BENCH_DSN")) as server:
            server.prepare()
            target = server.bench
            cursors = {"before": open_precog_pool(before, target), "after": open_precog_pool(after, target)}
            bare = psycopg.connect(target.conninfo(), autocommit=True, row_factory=dict_row)
            rng = random.Random(3)

            def pk_with(get_cursor: Callable[..., Any]) -> Callable[[], None]:
                def run() -> None:
                    with get_cursor() as cur:
                        cur.execute(PK, (rng.randint(1, ITEMS),))
                        cur.fetchone()

                return run

            def empty_with(get_cursor: Callable[..., Any]) -> Callable[[], None]:
                def run() -> None:
                    with get_cursor():
                        pass

                return run

            def bare_pk() -> None:
                bare.execute(PK, (rng.randint(1, ITEMS),)).fetchone()

            def bare_cursor() -> None:
                with bare.cursor():
                    pass

            report: dict[str, Any] = {}
            report["pk_sequential"] = sequential(
                {"bare": bare_pk, **{k: pk_with(v) for k, v in cursors.items()}}, args.batches, args.batch
            )
            report["empty_block"] = sequential(
                {"bare": bare_cursor, **{k: empty_with(v) for k, v in cursors.items()}}, args.batches, args.batch * 5
            )
            for name, section in report.items():
                print(f"{name}: per call (median of {args.batches} batches); time relative to bare in the same round")
                for cand, r in section.items():
                    print(
                        f"  {cand:<8} {r['median_us']:9.2f} us   min {r['min_us']:9.2f}   x bare {r['x_bare_time']:.3f}"
                    )
            bare.close()
            threads = [int(t) for t in args.threads.split(",") if t.strip()]
            if threads:
                conns = [psycopg.connect(target.conninfo(), autocommit=True, row_factory=dict_row) for _ in threads]
                conns += [
                    psycopg.connect(target.conninfo(), autocommit=True, row_factory=dict_row)
                    for _ in range(max(threads) - len(conns))
                ]

                def make_pool_op(get_cursor: Callable[..., Any], workload: str) -> Callable[[int], Any]:
                    def make(i: int) -> Any:
                        def op(r: random.Random) -> float:
                            if workload == "pk":
                                with get_cursor() as cur:
                                    t = perf_counter()
                                    cur.execute(PK, (r.randint(1, ITEMS),))
                                    cur.fetchone()
                            else:
                                with get_cursor(commit=True) as cur:
                                    t = perf_counter()
                                    cur.execute(INSERT, (r.randint(1, ITEMS), 1))
                            return t

                        return op

                    return make

                def make_bare_op(workload: str) -> Callable[[int], Any]:
                    def make(i: int) -> Any:
                        conn = conns[i]

                        def op(r: random.Random) -> float:
                            t = perf_counter()
                            if workload == "pk":
                                conn.execute(PK, (r.randint(1, ITEMS),)).fetchone()
                            else:
                                with conn.transaction():
                                    conn.execute(INSERT, (r.randint(1, ITEMS), 1))
                            return t

                        return op

                    return make

                for workload in ("pk", "insert"):
                    bare_kind = "bare in a transaction" if workload == "insert" else "bare"
                    print(
                        f"throughput, {workload} ({args.rounds} rounds of {args.duration}s; median ops/s; "
                        f"median ratio to {bare_kind} in the same round)"
                    )
                    for n in threads:
                        makers = {"bare": make_bare_op(workload)}
                        makers.update({k: make_pool_op(v, workload) for k, v in cursors.items()})
                        qps: dict[str, list[float]] = {k: [] for k in makers}
                        for r in range(args.rounds):
                            order = list(makers.items())
                            random.Random(r).shuffle(order)
                            for name, make in order:
                                qps[name].append(run_threads(make, n, args.duration, 0.1)["qps"])
                        line = f"  {n:>2} threads:"
                        for name, v in qps.items():
                            ratio = statistics.median(a / b for a, b in zip(v, qps["bare"], strict=True))
                            line += f"   {name} {statistics.median(v):>8,.0f} ({ratio:.2f})"
                        print(line, flush=True)
                for conn in conns:
                    conn.close()
            after.close_pool()
            before.close_pool()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
