"""Committed writes: round trips and throughput on loopback and behind a delay (issue 16).

    .venv/bin/python -m bench.pipeline                 # about 3 minutes on 2 cores
    .venv/bin/python -m bench.pipeline --rounds 1 --duration 0.3   # smoke run

Workloads ``insert``, ``txn3`` and ``insert10`` (ten INSERTs in one
transaction) at 1 and 8 threads, for ``get_cursor(commit=True)``,
``get_cursor(commit=True, pipeline=True)``, a bare psycopg connection with an
explicit transaction, psycopg_pool used the default way and psycopg2's pool;
then, on asyncio, ``precog_db.aio`` against asyncpg (`bench.apipeline`; asyncpg
is also counted in the synchronous table). Two conditions: straight to the
server on loopback, and through a proxy process (`bench.delay`) that holds
every chunk ``--delay-ms`` in each direction (0.5 ms: about 1 ms more per
round trip). Round trips are the server's ``ReadyForQuery`` messages counted
by `bench.wire.RoundTripCounter`.
Each cell reports the median over rounds; ratios are paired per round.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
from datetime import UTC, datetime
from multiprocessing.synchronize import Event
from typing import Any

from bench import apipeline
from bench import contenders as C
from bench.delay import serve
from bench.run import RESULTS, _machine, _quiet_logging
from bench.server import BenchServer, Target
from bench.wire import RoundTripCounter

WORKLOADS = C.COMMITTED
#: Contenders whose throughput is measured, in table order.
MEASURED: tuple[type[C.Contender], ...] = (
    C.PrecogCommit,
    C.PrecogPipeline,
    C.BareTransaction,
    C.PsycopgPool,
    C.Psycopg2Pool,
)
#: Contenders whose round trips are counted.
COUNTED: tuple[type[C.Contender], ...] = (*MEASURED, C.AsyncpgPool)
#: The peers a committed single-row insert is compared with (asyncpg: count only).
PEERS = ("bare_tx", "psycopg_pool", "psycopg2")
TITLES = {
    "insert": "single-row INSERT, committed",
    "txn3": "SELECT (fetched), UPDATE, INSERT in one transaction",
    "insert10": "ten single-row INSERTs in one transaction",
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _proxy_main(host: str, port: int, delay: float, ports: Any, stop: Event) -> None:
    serve((host, port), delay, ports.put, stop.is_set)


class DelayProxy:
    """`bench.delay.serve` in a process of its own (it must not share the client's GIL)."""

    def __init__(self, target: Target, delay: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        ports = ctx.Queue()
        self._process = ctx.Process(
            target=_proxy_main, args=(target.host, target.port, delay, ports, self._stop), daemon=True
        )
        self._process.start()
        self.target = target.at("127.0.0.1", int(ports.get(timeout=60)))

    def close(self) -> None:
        self._stop.set()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()


def count_round_trips(target: Target, *, warm: int, count: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with RoundTripCounter(target.host, target.port) as proxy:
        via = target.at("127.0.0.1", proxy.port)
        for cls in COUNTED:
            contender = cls()
            contender.open(via, 1)
            try:
                for workload in WORKLOADS:
                    contender.run_ops(workload, warm)
                    proxy.reset()
                    contender.run_ops(workload, count)
                    out.setdefault(cls.name, {})[workload] = round(proxy.round_trips / count, 2)
            finally:
                contender.close()
    return out


def measure(target: Target, threads: tuple[int, ...], args: argparse.Namespace) -> dict[str, Any]:
    """results[workload][threads][contender] = median cell, with per-round ops/s kept for pairing."""
    opened: list[C.Contender] = []
    results: dict[str, Any] = {}
    try:
        for cls in MEASURED:
            contender = cls()
            contender.open(target, max(threads))
            opened.append(contender)
        for workload in WORKLOADS:
            runs: dict[int, dict[str, list[dict[str, Any]]]] = {n: {} for n in threads}
            for r in range(args.rounds):
                for n in threads:
                    order = opened[r % len(opened) :] + opened[: r % len(opened)]
                    for contender in order:
                        cell = contender.run(workload, n, args.duration, args.warmup)
                        runs[n].setdefault(contender.name, []).append(cell)
            for n in threads:
                cells: dict[str, Any] = {}
                for name, rounds in runs[n].items():
                    cells[name] = {
                        "qps": round(statistics.median(c["qps"] for c in rounds), 1),
                        "op_p50_us": round(statistics.median(c["op_p50_us"] for c in rounds), 1),
                        "client_cpu_us_per_op": statistics.median(c["client_cpu_us_per_op"] or 0.0 for c in rounds),
                        "errors": sum(c["errors"] for c in rounds),
                        "first_error": next((c["first_error"] for c in rounds if c["first_error"]), ""),
                        "qps_rounds": [c["qps"] for c in rounds],
                    }
                results.setdefault(workload, {})[str(n)] = cells
                _log(f"  {workload:<8} {n:>2} thr  " + "  ".join(f"{k}={v['qps']:,.0f}" for k, v in cells.items()))
    finally:
        for contender in reversed(opened):
            contender.close()
    return results


def _paired(a: list[float], b: list[float]) -> float | None:
    ratios = [x / y for x, y in zip(a, b, strict=False) if x and y]
    return round(statistics.median(ratios), 2) if ratios else None


def _best_peer(cells: dict[str, Any]) -> list[float]:
    """Per round, the best of the peers' ops/s."""
    rounds = [cells[p]["qps_rounds"] for p in PEERS if p in cells]
    return [max(values) for values in zip(*rounds, strict=False)] if rounds else []


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    delayed = report["conditions"].get("delay", {})
    for n in report["settings"]["threads"]:
        cells = delayed.get("insert", {}).get(str(n), {})
        if "precog_commit" in cells:
            value = _paired(cells["precog_commit"]["qps_rounds"], _best_peer(cells))
            out.append(
                {
                    "target": f"behind the delay, committed single-row insert at {n} thread(s): "
                    "get_cursor(commit=True) / best peer (bare_tx, psycopg_pool, psycopg2)",
                    "value": value,
                    "wanted": ">= 1.4",
                    "met": value is not None and value >= 1.4,
                }
            )
        cells = delayed.get("insert10", {}).get(str(n), {})
        if "precog_pipeline" in cells and "bare_tx" in cells:
            value = _paired(cells["precog_pipeline"]["qps_rounds"], cells["bare_tx"]["qps_rounds"])
            out.append(
                {
                    "target": f"behind the delay, batches of 10 inserts at {n} thread(s): "
                    "get_cursor(commit=True, pipeline=True) / bare explicit transaction",
                    "value": value,
                    "wanted": ">= 3",
                    "met": value is not None and value >= 3,
                }
            )
    return out


def render(report: dict[str, Any]) -> str:
    mach = report["machine"]
    s = report["settings"]
    lines = [
        f"precog_db committed writes  {report['started']}  {mach.get('cpu', '?')} x{mach['cpus']}  "
        f"python {mach['python']}  load {mach['load_average_before']} -> {mach.get('load_average_after')}",
        f"{s['rounds']} rounds x {s['duration']}s per cell, median; pool size {C.POOL_SIZE}; delay condition: "
        f"+{s['delay_ms']} ms each way through a proxy process; ops/s (p50 latency ms at 1 thread); "
        "CPU/op: client CPU microseconds per operation, loopback, 1 thread",
    ]
    labels = {cls.name: cls.label for cls in COUNTED}
    rts = report["round_trips"]
    threads = s["threads"]
    for workload in WORKLOADS:
        lines.append("")
        lines.append(f"{workload}: {TITLES[workload]}")
        header = f"  {'contender':<58} {'RT/op':>5} {'CPU/op':>7}"
        for cond in ("loopback", "delay"):
            for n in threads:
                header += f" {f'{cond} {n} thr':>22}"
        lines.append(header)
        for cls in COUNTED:
            cpu = report["conditions"].get("loopback", {}).get(workload, {}).get(str(threads[0]), {}).get(cls.name)
            cpu_text = f"{cpu['client_cpu_us_per_op']:.0f}" if cpu else "-"
            row = f"  {labels[cls.name]:<58} {rts.get(cls.name, {}).get(workload, '-'):>5} {cpu_text:>7}"
            for cond in ("loopback", "delay"):
                for n in threads:
                    cell = report["conditions"].get(cond, {}).get(workload, {}).get(str(n), {}).get(cls.name)
                    missing = "count only" if cls is C.AsyncpgPool else "-"
                    row += f" {_cell_text(cell, n == threads[0], missing):>22}"
            lines.append(row)
    lines += _render_async(report)
    lines.append("")
    lines.append("targets:")
    for t in report["targets"]:
        lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']} (wanted {t['wanted']})")
    return "\n".join(lines)


def _cell_text(cell: dict[str, Any] | None, with_latency: bool, missing: str) -> str:
    """ops/s, with the p50 latency in ms for the first thread count, ERR if any operation failed."""
    if cell is None:
        return missing
    text = f"{cell['qps']:,.0f}"
    if with_latency:
        text += f" ({cell['op_p50_us'] / 1000:.2f})"
    if cell["errors"]:
        text += " ERR"
    return text


def _render_async(report: dict[str, Any]) -> list[str]:
    part = report.get("async") or {}
    if not part.get("conditions"):
        return []
    threads = report["settings"]["threads"]
    lines = ["", "asyncio (threads are tasks on one event loop):"]
    for workload in apipeline.WORKLOADS:
        lines.append(f"{workload}: {TITLES[workload]}")
        header = f"  {'contender':<58} {'RT/op':>5} {'':>7}"
        for cond in ("loopback", "delay"):
            for n in threads:
                header += f" {f'{cond} {n} task':>22}"
        lines.append(header)
        for name, label in apipeline.LABELS.items():
            row = f"  {label:<58} {part['round_trips'].get(name, {}).get(workload, '-'):>5} {'':>7}"
            for cond in ("loopback", "delay"):
                for n in threads:
                    cell = part["conditions"].get(cond, {}).get(workload, {}).get(str(n), {}).get(name)
                    row += f" {_cell_text(cell, n == threads[0], '-'):>22}"
            lines.append(row)
    return lines


def _async_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    delayed = (report.get("async") or {}).get("conditions", {}).get("delay", {})
    for n in report["settings"]["threads"]:
        for workload, ours, wanted, what in (
            ("insert", "aio_commit", 1.4, "committed single-row insert: aio.get_cursor(commit=True)"),
            ("insert10", "aio_pipeline", 3.0, "batches of 10 inserts: aio.get_cursor(commit=True, pipeline=True)"),
        ):
            cells = delayed.get(workload, {}).get(str(n), {})
            if ours in cells and "asyncpg_tx" in cells:
                value = _paired(cells[ours]["qps_rounds"], cells["asyncpg_tx"]["qps_rounds"])
                out.append(
                    {
                        "target": f"behind the delay, asyncio, {what} / asyncpg explicit transaction, {n} task(s)",
                        "value": value,
                        "wanted": f">= {wanted:g}",
                        "met": value is not None and value >= wanted,
                    }
                )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,8")
    p.add_argument("--duration", type=float, default=0.5, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--delay-ms", type=float, default=0.5, help="added in each direction by the delay proxy")
    p.add_argument("--dsn", default=os.environ.get("PRECOG_BENCH_DSN"))
    p.add_argument("--no-async", action="store_true", help="skip the asyncio table (precog_db.aio against asyncpg)")
    args = p.parse_args(argv)
    args.duration = min(args.duration, 10.0)
    args.rounds = max(1, min(args.rounds, 10))
    threads = tuple(sorted({int(x) for x in args.threads.split(",") if x.strip()}))
    _quiet_logging()
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    report: dict[str, Any] = {
        "started": started,
        "machine": _machine(),
        "settings": {
            "threads": list(threads),
            "duration": args.duration,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "delay_ms": args.delay_ms,
        },
        "conditions": {},
    }
    with BenchServer(args.dsn) as server:
        _log("preparing the server")
        server.prepare()
        _log("counting round trips on the wire")
        report["round_trips"] = count_round_trips(server.bench, warm=50, count=50)
        _log("loopback")
        report["conditions"]["loopback"] = measure(server.bench, threads, args)
        report["async"] = {"round_trips": {}, "conditions": {}}
        if not args.no_async:
            _log("asyncio: counting round trips, then loopback")
            report["async"]["round_trips"] = apipeline.run_count(server.bench)
            report["async"]["conditions"]["loopback"] = apipeline.run(server.bench, threads, args)
        _log(f"behind a proxy adding {args.delay_ms} ms each way")
        proxy = DelayProxy(server.bench, args.delay_ms / 1000)
        try:
            report["conditions"]["delay"] = measure(proxy.target, threads, args)
            if not args.no_async:
                _log("asyncio: behind the delay")
                report["async"]["conditions"]["delay"] = apipeline.run(proxy.target, threads, args)
        finally:
            proxy.close()
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = targets(report) + _async_targets(report)
    text = render(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"pipeline-{started.replace(':', '').replace('-', '')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    _log(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
