"""The measurements beside the throughput matrix.

Round trips per operation (on the wire), cost as the rows fetched grow, start-up
time (``import precog_db``, ``precog-db env``), memory per pooled connection,
and ``pgbench -S`` as the server's own ceiling.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter
from typing import Any

from bench.contenders import Contender
from bench.server import BenchServer, Target
from bench.wire import RoundTripCounter

# --- round trips ------------------------------------------------------------------------


def round_trips(
    contenders: list[type[Contender]], target: Target, *, warm: int = 300, count: int = 50
) -> dict[str, dict[str, float]]:
    """ReadyForQuery messages per operation, counted by a proxy, after ``warm`` operations."""
    out: dict[str, dict[str, float]] = {}
    with RoundTripCounter(target.host, target.port) as proxy:
        via = target.at("127.0.0.1", proxy.port)
        for cls in contenders:
            if not cls.workloads:
                continue
            contender = cls()
            contender.open(via, 1)
            try:
                for workload in cls.workloads:
                    contender.run_ops(workload, warm)
                    proxy.reset()
                    contender.run_ops(workload, count)
                    out.setdefault(cls.name, {})[workload] = round(proxy.round_trips / count, 2)
            finally:
                contender.close()
    return out


def reset_round_trips(target: Target, *, count: int = 50) -> dict[str, float]:
    """Round trips per ``get_cursor()`` block on the wire, and how many of them were session resets.

    The borrower-isolation budget (docs/RELIABILITY.md, issue 10): a plain read
    is one round trip and a committed write three, with no reset; only a block
    that changed the session pays one ``DISCARD ALL`` at checkin. asyncpg pays
    its reset on every release (see ``round_trips``: 2 per primary-key read).
    """
    import precog_db
    from precog_db.session import PrecogCursor

    out: dict[str, float] = {}
    resets = 0
    original = PrecogCursor._convert_query

    def counting(self: Any, query: Any, params: Any = None) -> Any:
        nonlocal resets
        pgq = original(self, query, params)
        if pgq.query == b"DISCARD ALL":
            resets += 1
        return pgq

    blocks: dict[str, tuple[tuple[str, ...], bool]] = {
        "plain read": (("SELECT 1",), False),
        "committed write (SET LOCAL, UPDATE)": (
            ("SET LOCAL statement_timeout = 5000", "UPDATE bench_items SET id = id WHERE id = 1"),
            True,
        ),
        "session-changing read (SET search_path)": (("SET search_path = public",), False),
    }
    with RoundTripCounter(target.host, target.port) as proxy:
        via = target.at("127.0.0.1", proxy.port)
        settings = precog_db.DatabaseSettings(
            env=precog_db.Environment.DEV,
            host=via.host,
            port=via.port,
            dbname=via.dbname,
            user=via.user,
            password=via.password,
            pool_min=1,
            pool_max=1,
            sslmode="disable",
        )
        precog_db.initialize_pool(settings=settings).wait(timeout=60)
        PrecogCursor._convert_query = counting  # type: ignore[method-assign]
        try:
            for label, (statements, commit) in blocks.items():
                for n in range(10 + count):
                    if n == 10:  # after warming up (psycopg prepares a statement on its 6th run)
                        proxy.reset()
                        resets = 0
                    with precog_db.get_cursor(commit=commit) as cur:
                        for sql in statements:
                            cur.execute(sql)
                out[f"{label}: round trips per block"] = round(proxy.round_trips / count, 2)
                out[f"{label}: resets per block"] = round(resets / count, 2)
        finally:
            PrecogCursor._convert_query = original  # type: ignore[method-assign]
            precog_db.close_pool()
    return out


# --- cost as the work grows --------------------------------------------------------------


def scaling(
    contenders: list[Contender], sizes: tuple[int, ...], *, budget: float, max_reps: int = 50
) -> list[dict[str, Any]]:
    """Median time to fetch N rows in one statement, per contender (one thread)."""
    rows: list[dict[str, Any]] = []
    for n in sizes:
        for contender in contenders:
            got = contender.fetch_rows(n)  # warm-up, and check the row count
            if got != n:
                raise RuntimeError(f"{contender.name} fetched {got} rows instead of {n}")
            times: list[float] = []
            deadline = perf_counter() + budget
            while len(times) < max_reps and (len(times) < 3 or perf_counter() < deadline):
                t0 = perf_counter()
                contender.fetch_rows(n)
                times.append(perf_counter() - t0)
            median = statistics.median(times)
            rows.append(
                {
                    "rows": n,
                    "contender": contender.name,
                    "reps": len(times),
                    "median_ms": round(median * 1e3, 2),
                    "us_per_row": round(median * 1e6 / n, 3),
                }
            )
    return rows


# --- start-up ------------------------------------------------------------------------------

_TIMED_IMPORT = "import time; t = time.perf_counter(); import {module}; print((time.perf_counter() - t) * 1000)"


def _wall(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None) -> tuple[float, str]:
    t0 = perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=cwd, check=False)
    elapsed = (perf_counter() - t0) * 1e3
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"{' '.join(argv[:3])} exited {result.returncode}: {lines[-1] if lines else ''}")
    return elapsed, result.stdout


def startup(target: Target, repeats: int) -> dict[str, Any]:
    """Median over ``repeats`` fresh processes: interpreter start, import psycopg, import precog_db, the CLI."""
    python = sys.executable
    samples: dict[str, list[float]] = {
        "python_startup_ms": [],
        "import_psycopg_ms": [],
        "import_precog_db_ms": [],
        "import_precog_db_wall_ms": [],
    }
    cli = Path(python).parent / "precog-db"
    has_cli = cli.is_file() and importlib.util.find_spec("precog_db.cli") is not None
    cli_error = ""
    if has_cli:
        samples["precog_db_env_wall_ms"] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_"))}
    env.update(
        {
            "PRECOG_ENV": "dev",
            "DB_HOST": target.host,
            "DB_PORT": str(target.port),
            "DB_NAME": target.dbname,
            "DB_USER": target.user,
            "DB_SSLMODE": "disable",
        }
    )
    if target.password:
        env["DB_PASSWORD"] = target.password
    with tempfile.TemporaryDirectory(prefix="precog-bench-cli-") as cwd:
        for _ in range(repeats):
            samples["python_startup_ms"].append(_wall([python, "-c", "pass"])[0])
            for module, key in (("psycopg", "import_psycopg_ms"), ("precog_db", "import_precog_db_ms")):
                wall, out = _wall([python, "-c", _TIMED_IMPORT.format(module=module)])
                samples[key].append(float(out.strip()))
                if module == "precog_db":
                    samples["import_precog_db_wall_ms"].append(wall)
            if has_cli and not cli_error:
                try:
                    samples["precog_db_env_wall_ms"].append(_wall([str(cli), "env"], env=env, cwd=cwd)[0])
                except RuntimeError as exc:
                    cli_error = str(exc)
    result: dict[str, Any] = {k: round(statistics.median(v), 1) for k, v in samples.items() if v}
    result["repeats"] = repeats
    if not has_cli:
        result["precog_db_env"] = "precog_db.cli is not installed in this environment"
    elif cli_error:
        result["precog_db_env"] = cli_error
    return result


# --- memory --------------------------------------------------------------------------------


def memory(server: BenchServer, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """Memory per pooled connection for each kind, each in a fresh process."""
    env = dict(os.environ)
    env["PRECOG_BENCH_TARGET"] = json.dumps(dataclasses.asdict(server.bench))
    env["PRECOG_BENCH_LOCAL"] = "1" if server.local else "0"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = []
    with server.connect(server.bench) as warm:  # one backend start before measuring, so none pays first-use costs
        warm.execute("SELECT count(*) FROM bench_items WHERE id = 1")
    for kind in kinds:
        result = subprocess.run(
            [sys.executable, "-m", "bench.memory", kind],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=root,
            check=False,
        )
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            out.append({"kind": kind, "error": lines[-1] if lines else f"exit {result.returncode}"})
        else:
            out.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return out


# --- pgbench ---------------------------------------------------------------------------------

_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")
_LATENCY = re.compile(r"latency average = ([0-9.]+) ms")


def pgbench(server: BenchServer, clients: tuple[int, ...], seconds: int) -> dict[str, Any]:
    """``pgbench -S -M prepared`` (select-only, prepared statements) for each client count."""
    exe = server.pgbench_path()
    if exe is None:
        return {"error": "pgbench not found (it ships with the PostgreSQL client tools)"}
    target = server.prepare_pgbench(exe)
    out: dict[str, Any] = {}
    for c in clients:
        argv = [
            exe,
            "-S",
            "-M",
            "prepared",
            "-n",
            "-c",
            str(c),
            "-j",
            str(min(c, os.cpu_count() or 1)),
            "-T",
            str(seconds),
            "-h",
            target.host,
            "-p",
            str(target.port),
            "-U",
            target.user,
            target.dbname,
        ]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 60, env=server.pgbench_env(), check=False
        )
        tps = _TPS.search(result.stdout)
        latency = _LATENCY.search(result.stdout)
        if result.returncode != 0 or tps is None:
            lines = (result.stderr or result.stdout).strip().splitlines()
            out[str(c)] = {"error": lines[-1] if lines else f"exit {result.returncode}"}
        else:
            out[str(c)] = {
                "tps": round(float(tps.group(1)), 1),
                "latency_ms": float(latency.group(1)) if latency else None,
            }
    return out
