"""Run the whole benchmark, print a table and JSON, and save the JSON under bench/results/.

    .venv/bin/python -m bench            # full run, about 8 minutes on 2 cores
    .venv/bin/python -m bench --quick    # smoke run, under a minute

Every contender runs in the same process against the same server, in rounds
that rotate the order, and each cell reports the median round. Ratios are
against the bare psycopg connection with the same row type (dict rows, what
`get_cursor` returns) unless a column says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import contenders as C
from bench import extras
from bench.server import BenchServer

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "bare_dict"


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    versions = {}
    for module in ("psycopg", "psycopg_pool", "psycopg2", "asyncpg"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            versions[module] = None
    info["versions"] = versions
    return info


class CpuAccount:
    """Who used the machine's CPU during the run: this benchmark (client and server) or everything else.

    Machine-wide busy time comes from /proc/stat; the client's from os.times()
    (all threads, plus finished children such as pgbench); the server's from the
    postmaster, which accumulates its backends' CPU as it reaps them, so it is
    read after every connection has closed. Linux and a benchmark-started
    server only; elsewhere it reports nothing.
    """

    def __init__(self, server: BenchServer) -> None:
        self.server = server
        self.start = self._sample()

    def _postmaster_seconds(self) -> float | None:
        cluster = self.server.cluster
        if cluster is None:
            return None
        try:
            pid = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> dict[str, float] | None:
        try:
            cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in cpu[:8])
        tick = os.sysconf("SC_CLK_TCK")
        t = os.times()
        return {
            "wall": time.monotonic(),
            "busy": (user + nice + system + irq + softirq) / tick,
            "steal": steal / tick,
            "client": t.user + t.system + t.children_user + t.children_system,
            "server": self._postmaster_seconds() or 0.0,
        }

    def report(self) -> dict[str, Any]:
        end = self._sample()
        if self.start is None or end is None:
            return {}
        d = {k: end[k] - self.start[k] for k in end}
        capacity = d["wall"] * (os.cpu_count() or 1)
        ours = d["client"] + (d["server"] if self.server.cluster is not None else 0.0)
        out = {
            "wall_s": round(d["wall"], 1),
            "machine_busy_pct": round(100 * d["busy"] / capacity, 1),
            "benchmark_client_pct": round(100 * d["client"] / capacity, 1),
            "steal_pct": round(100 * d["steal"] / capacity, 1),
        }
        if self.server.cluster is not None:
            out["benchmark_server_pct"] = round(100 * d["server"] / capacity, 1)
            out["other_processes_pct"] = round(max(0.0, 100 * (d["busy"] - ours) / capacity), 1)
        return out


def _median_cell(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each metric over the rounds; counts are summed."""
    cell: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if key in ("errors", "waited", "served_out_of_order", "ops"):
            cell[key] = sum(values)
        elif key == "first_error":
            cell[key] = next((v for v in values if v), "")
        else:
            cell[key] = round(statistics.median(values), 1)
    cell["qps_rounds"] = [r["qps"] for r in runs]
    return cell


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _paired(a: list[float], b: list[float]) -> float | None:
    """Median over rounds of a[r] / b[r]: two cells measured seconds apart move together on a busy machine."""
    ratios = [x / y for x, y in zip(a, b, strict=False) if x and y]
    return round(statistics.median(ratios), 3) if ratios else None


def matrix(
    opened: list[C.Contender], threads: tuple[int, ...], workloads: tuple[str, ...], args: argparse.Namespace
) -> dict[str, dict[str, dict[str, Any]]]:
    """results[workload][threads][contender] for every cell.

    One round runs every thread count and every contender once, in rotated
    order, so that the cells compared with each other (contender against the
    bare connection, 64 threads against 8) ran close together in time.
    """
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for workload in workloads:
        players = [c for c in opened if workload in c.workloads]
        runs: dict[int, dict[str, list[dict[str, Any]]]] = {n: {} for n in threads}
        for r in range(args.rounds):
            for n in threads if r % 2 == 0 else tuple(reversed(threads)):
                order = players[r % len(players) :] + players[: r % len(players)]
                for contender in order:
                    runs[n].setdefault(contender.name, []).append(
                        contender.run(workload, n, args.duration, args.warmup)
                    )
        for n in threads:
            cells = {name: _median_cell(v) for name, v in runs[n].items()}
            for base, key in ((BASELINE, "ratio"), ("bare_tuple", "ratio_tuple")):
                base_rounds = cells.get(base, {}).get("qps_rounds", [])
                for cell in cells.values():
                    cell[key] = _paired(cell["qps_rounds"], base_rounds)
            results.setdefault(workload, {})[str(n)] = cells
            summary = "  ".join(f"{name}={cell['qps']:,.0f}({cell['ratio']})" for name, cell in cells.items())
            _log(f"  {workload:<8} {n:>2} thr  {summary}")
        if len(threads) > 1:
            top, eight = str(max(threads)), "8" if 8 in threads else str(min(threads))
            for name, cell in results[workload][top].items():
                lower = results[workload][eight].get(name)
                if lower:
                    cell["ratio_to_8_threads"] = _paired(cell["qps_rounds"], lower["qps_rounds"])
    return results


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    m = report["matrix"]
    out: list[dict[str, Any]] = []

    def cell(workload: str, threads: int, name: str) -> dict[str, Any]:
        found: dict[str, Any] = m.get(workload, {}).get(str(threads), {}).get(name, {})
        return found

    for n in (1, 8):
        for base, key in (("bare_dict", "ratio"), ("bare_tuple", "ratio_tuple")):
            value = cell("pk", n, "precog").get(key)
            out.append(
                {
                    "target": f"get_cursor() PK read vs {base} at {n} thread(s)",
                    "value": value,
                    "wanted": ">= 0.9",
                    "met": value is not None and value >= 0.9,
                }
            )
    value = _paired(cell("pk", 1, "precog").get("qps_rounds", []), cell("pk", 1, "psycopg2").get("qps_rounds", []))
    out.append(
        {
            "target": "get_cursor() PK read vs psycopg2 pool at 1 thread",
            "value": value,
            "wanted": ">= 1.5",
            "met": value is not None and value >= 1.5,
        }
    )
    precog_cpu = cell("pk", 1, "precog").get("client_cpu_us_per_op")
    bare_cpu = cell("pk", 1, "bare_dict").get("client_cpu_us_per_op")
    over = None if precog_cpu is None or bare_cpu is None else round(precog_cpu - bare_cpu, 1)
    out.append(
        {
            "target": "client CPU per get_cursor() PK read over the bare connection's, 1 thread (us)",
            "value": over,
            "wanted": f"<= 15 (bare: {bare_cpu})",
            "met": over is not None and over <= 15,
        }
    )
    rts = report.get("round_trips", {})
    commit_rt = rts.get("precog_commit", {}).get("insert")
    tx_rt = rts.get("bare_tx", {}).get("insert")
    out.append(
        {
            "target": "get_cursor(commit=True) insert round trips (BEGIN READ WRITE with the INSERT, COMMIT = 2)",
            "value": commit_rt,
            "wanted": f"<= 2 (bare connection, same transaction: {tx_rt})",
            "met": commit_rt is not None and commit_rt <= 2,
        }
    )
    top = max((int(t) for t in m.get("pk", {})), default=0)
    if top > 8:
        cell64 = cell("pk", top, "precog")
        value = cell64.get("ratio_to_8_threads")
        reference = cell("pk", top, "bare_dict").get("ratio_to_8_threads")
        out.append(
            {
                "target": f"get_cursor() PK read, {top} threads on {C.POOL_SIZE} connections vs 8 threads",
                "value": value,
                "wanted": f">= 0.8 (for reference, bare connections, one per thread: {reference})",
                "met": value is not None and value >= 0.8,
            }
        )
        peers = {
            name: _paired(cell64.get("qps_rounds", []), cell("pk", top, name).get("qps_rounds", []))
            for name in ("psycopg_pool", "psycopg2", "asyncpg")
            if cell("pk", top, name)
        }
        out.append(
            {
                "target": f"get_cursor() PK read, {top} threads on {C.POOL_SIZE} connections, vs each peer's pool",
                "value": peers,
                "wanted": "> 1 against every peer",
                "met": bool(peers) and all(v is not None and v > 1 for v in peers.values()),
            }
        )
        out.append(
            {
                "target": f"checkout latency at {top} threads: p50 / p99 / max (us); waiters served out of order",
                "value": [
                    cell64.get("checkout_p50_us"),
                    cell64.get("checkout_p99_us"),
                    cell64.get("checkout_max_us"),
                    f"{cell64.get('served_out_of_order')} of {cell64.get('waited')}",
                ],
                "wanted": "p99 bounded (well under the pool timeout), FIFO",
                "met": bool(cell64) and (cell64.get("checkout_max_us") or 0) < 1e6,
            }
        )
    start = report.get("startup", {})
    value = start.get("import_precog_db_ms")
    out.append(
        {
            "target": "import precog_db (in a fresh interpreter, median)",
            "value": value,
            "wanted": "< 150 ms",
            "met": value is not None and value < 150,
        }
    )
    return out


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    mach = report["machine"]
    lines.append(
        f"precog_db benchmark  {report['started']}  {mach.get('cpu', '?')} x{mach['cpus']}  "
        f"python {mach['python']}  load {mach['load_average_before']} -> {mach.get('load_average_after')}"
    )
    lines.append(f"server: {report['server']['server'].split(',')[0]}  fsync={report['server']['fsync']}")
    cpu = report.get("cpu") or {}
    if "other_processes_pct" in cpu:
        lines.append(
            f"CPU over {cpu['wall_s']} s: machine {cpu['machine_busy_pct']}% busy; benchmark client "
            f"{cpu['benchmark_client_pct']}%, its server {cpu['benchmark_server_pct']}%, other processes "
            f"{cpu['other_processes_pct']}% (steal {cpu['steal_pct']}%): other processes slow every cell down"
        )
    lines.append(
        f"{report['settings']['rounds']} rounds x {report['settings']['duration']}s per cell, median round; "
        f"pool size {C.POOL_SIZE}; (ratio) = median over rounds of ops/s / the bare connection with dict rows "
        "in the same round"
    )
    names = {cls.name: cls for cls in C.ALL}
    rts = report.get("round_trips", {})
    threads = report["settings"]["threads"]
    titles = {
        "pk": "primary-key lookup",
        "fetch100": "100-row fetch",
        "insert": "single-row INSERT, committed",
        "txn3": "3-statement transaction",
    }
    for workload, per_threads in report["matrix"].items():
        lines.append("")
        lines.append(
            f"{workload}: {titles.get(workload, workload)}   (ops/s, ratio to bare dict rows; CPU/op = client CPU "
            f"microseconds per operation at {threads[0]} thread(s))"
        )
        header = f"  {'contender':<60} {'rows':<8} {'RT/op':>5} {'CPU/op':>7}"
        for n in threads:
            header += f" {f'{n} thr':>17}"
        top = str(threads[-1])
        header += f"   checkout p50/p99 @{top} (us)"
        lines.append(header)
        for name in names:
            if name not in per_threads.get(str(threads[0]), {}):
                continue
            cls = names[name]
            cpu = per_threads.get(str(threads[0]), {}).get(name, {}).get("client_cpu_us_per_op")
            rt = rts.get(name, {}).get(workload)
            row = f"  {cls.label:<60} {cls.rows:<8} {_fmt(rt, '.1f'):>5} {_fmt(cpu, '.1f'):>7}"
            for n in threads:
                cell = per_threads.get(str(n), {}).get(name, {})
                row += f" {_fmt(cell.get('qps')):>9} ({_fmt(cell.get('ratio'), '.2f'):>5})"
            cell = per_threads.get(top, {}).get(name, {})
            row += f"   {_fmt(cell.get('checkout_p50_us'), ',.0f'):>7} / {_fmt(cell.get('checkout_p99_us'), ',.0f')}"
            if cell.get("errors"):
                row += f"  ERRORS {cell['errors']}: {cell.get('first_error', '')[:60]}"
            lines.append(row)
    if report.get("pgbench"):
        lines.append("")
        parts = []
        for c, v in report["pgbench"].items():
            parts.append(f"{c} clients {_fmt(v.get('tps'))} tps" if "tps" in v else f"{c}: {v.get('error')}")
        lines.append("pgbench -S -M prepared (C client, no pool; the server's ceiling): " + ", ".join(parts))
    if report.get("scaling"):
        lines.append("")
        lines.append("rows fetched in one statement, 1 thread: median ms (us per row)")
        sizes = sorted({r["rows"] for r in report["scaling"]})
        lines.append(f"  {'contender':<60}" + "".join(f" {f'{n:,} rows':>20}" for n in sizes))
        by: dict[str, dict[int, dict[str, Any]]] = {}
        for r in report["scaling"]:
            by.setdefault(r["contender"], {})[r["rows"]] = r
        labels = {cls.name: cls.label for cls in C.SCALING}
        for name, per in by.items():
            lines.append(
                f"  {labels.get(name, name):<60}"
                + "".join(f" {per[n]['median_ms']:>10.2f} ({per[n]['us_per_row']:>5.2f})" for n in sizes)
            )
    if report.get("startup"):
        s = report["startup"]
        lines.append("")
        lines.append(
            f"start-up (median of {s['repeats']}): python itself {s.get('python_startup_ms')} ms; "
            f"import psycopg {s.get('import_psycopg_ms')} ms; import precog_db {s.get('import_precog_db_ms')} ms "
            f"(process wall {s.get('import_precog_db_wall_ms')} ms); precog-db env "
            + (f"{s['precog_db_env_wall_ms']} ms wall" if "precog_db_env_wall_ms" in s else str(s.get("precog_db_env")))
        )
    if report.get("memory"):
        lines.append("")
        lines.append("memory per pooled connection (KiB): client RSS / server backend private / server contexts")
        for m in report["memory"]:
            if "error" in m:
                lines.append(f"  {m['kind']:<14} error: {m['error']}")
            else:
                lines.append(
                    f"  {m['kind']:<14} {_fmt(m['client_kib_per_connection'], ',.0f'):>7} / "
                    f"{_fmt(m['server_private_kib_per_backend'], ',.0f'):>7} / "
                    f"{_fmt(m['server_context_kib_per_backend'], ',.0f'):>7}"
                )
    if report.get("reset_round_trips"):
        lines.append("")
        lines.append(
            "borrower isolation: round trips and session resets (DISCARD ALL) per get_cursor() block, pool of 1"
        )
        for label, value in report["reset_round_trips"].items():
            lines.append(f"  {label:<62} {value:>5}")
    lines.append("")
    lines.append("targets:")
    for t in report["targets"]:
        lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']} (wanted {t['wanted']})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: short cells, one round (under a minute)")
    p.add_argument("--duration", type=float, help="measured seconds per cell (default 0.5, quick 0.3)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each cell (default 0.15, quick 0.1)")
    p.add_argument("--rounds", type=int, help="rounds per cell, order rotated; medians are kept (default 5)")
    p.add_argument("--threads", default="1,8,64", help="comma-separated thread counts (default 1,8,64)")
    p.add_argument("--workloads", default=",".join(C.WORKLOADS), help="comma-separated subset of pk,fetch100,...")
    p.add_argument(
        "--contenders", default=",".join(c.name for c in C.ALL), help="comma-separated subset of the contenders"
    )
    p.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to skip: roundtrips,matrix,scaling,pgbench,memory,startup",
    )
    p.add_argument("--dsn", default=os.environ.get("PRECOG_BENCH_DSN"), help="use this server (PRECOG_BENCH_DSN)")
    p.add_argument("--output", type=Path, help="write the JSON here too")
    args = p.parse_args(argv)
    args.duration = args.duration or (0.3 if args.quick else 0.5)
    args.warmup = args.warmup if args.warmup is not None else (0.1 if args.quick else 0.15)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.duration = min(args.duration, 30.0)
    args.rounds = min(args.rounds, 10)
    return args


def _quiet_logging() -> None:
    """The benchmark is the application, so it owns logging: warnings and up only, as in production."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_logging()
    threads = tuple(sorted({int(x) for x in args.threads.split(",") if x.strip()}))
    workloads = tuple(w for w in C.WORKLOADS if w in args.workloads.split(","))
    wanted = set(args.contenders.split(","))
    chosen = [cls for cls in C.ALL if cls.name in wanted]
    skip = set(args.skip.split(",")) - {""}
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    t_start = time.monotonic()
    report: dict[str, Any] = {
        "started": started,
        "machine": _machine(),
        "settings": {
            "quick": args.quick,
            "duration": args.duration,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "threads": list(threads),
            "workloads": list(workloads),
            "pool_size": C.POOL_SIZE,
            "baseline": BASELINE,
        },
        "contenders": {cls.name: {"label": cls.label, "rows": cls.rows} for cls in C.ALL},
    }
    with BenchServer(args.dsn) as server:
        _log("preparing the server and the benchmark tables")
        server.prepare()
        report["server"] = server.describe()
        account = CpuAccount(server)
        if "memory" not in skip:
            # First, on a fresh database: after the matrix the first new backends
            # rebuild caches the heavy writes invalidated and look several MB larger.
            _log("memory per pooled connection")
            report["memory"] = extras.memory(server, ("precog", "bare", "psycopg_pool", "psycopg2", "asyncpg"))
        if "roundtrips" not in skip:
            _log("counting round trips per operation on the wire")
            report["round_trips"] = extras.round_trips(chosen, server.bench)
            _log("counting session resets per get_cursor() block")
            report["reset_round_trips"] = extras.reset_round_trips(server.bench)
        opened: list[C.Contender] = []
        try:
            for cls in chosen:
                contender = cls()
                contender.open(server.bench, max(threads))
                opened.append(contender)
            if "matrix" not in skip:
                _log(f"throughput matrix: {len(threads)} thread counts x {len(workloads)} workloads")
                report["matrix"] = matrix(opened, threads, workloads, args)
            if "scaling" not in skip:
                _log("cost as the rows fetched grow")
                scalers = [c for c in opened if type(c) in C.SCALING]
                if C.Precog in chosen:
                    tuple_rows = C.PrecogTuple()
                    tuple_rows.open(server.bench, 1)
                    scalers.insert(1, tuple_rows)
                sizes = (1_000, 10_000, 100_000)
                report["scaling"] = extras.scaling(
                    scalers, sizes, budget=0.2 if args.quick else 1.0, max_reps=5 if args.quick else 50
                )
        finally:
            for contender in reversed(opened):
                contender.close()
        if "pgbench" not in skip:
            _log("pgbench -S -M prepared")
            report["pgbench"] = extras.pgbench(server, threads, 1 if args.quick else 5)
        report["cpu"] = account.report()  # every benchmark connection is closed by now
        if "startup" not in skip:
            _log("start-up time")
            report["startup"] = extras.startup(server.bench, 3 if args.quick else 11)
    report.setdefault("matrix", {})
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["elapsed_s"] = round(time.monotonic() - t_start, 1)
    report["targets"] = targets(report)
    text = render(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started.replace(":", "").replace("-", "")
    payload = json.dumps(report, indent=2)
    paths = [RESULTS / f"bench-{stamp}{'-quick' if args.quick else ''}.json", RESULTS / "latest.json"]
    if args.output:
        paths.append(args.output)
    for path in paths:
        path.write_text(payload + "\n")
    print(text)
    print()
    print(payload)
    _log(f"\nwrote {paths[0]} ({report['elapsed_s']} s)")
    return 0
