"""Start-up cost of ``import precog_db`` and of ``precog-db env`` / ``precog-db --help``.

    .venv/bin/python -m bench.startup            # 15 runs each, medians
    .venv/bin/python -m bench.startup --runs 5

Each run is a fresh interpreter (``python -c 'import precog_db'`` or the
``precog-db`` console script), timed wall-clock from the parent, so it
includes interpreter start-up as a user sees it. The import is also timed
inside the child (``time.perf_counter`` around the import alone). It also
reports whether psycopg was imported. The targets (issue 11, on the 2-core
development machine): ``import precog_db`` under 150 ms, ``precog-db env``
under 0.25 s. A timing is never a test: the suite only asserts the fact that
psycopg stays unimported (tests/test_repository.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_CHILD_IMPORT = (
    "import sys, time; t = time.perf_counter(); import precog_db; "
    "print(time.perf_counter() - t, 'psycopg' in sys.modules)"
)
TARGETS_S = {"import precog_db (in process)": 0.150, "precog-db env": 0.25}


def _script() -> str:
    candidate = Path(sys.executable).parent / "precog-db"
    return str(candidate) if candidate.exists() else "precog-db"


def _wall(argv: list[str], cwd: str, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, check=True, timeout=60)
    return time.perf_counter() - started, out.stdout


def measure(runs: int) -> dict[str, Any]:
    """Median (and min/max) seconds for each start-up path over ``runs`` fresh processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_"))}
    samples: dict[str, list[float]] = {
        "python -c pass (interpreter alone)": [],
        "python -c 'import precog_db' (wall)": [],
        "import precog_db (in process)": [],
        "precog-db env": [],
        "precog-db --help": [],
    }
    psycopg_loaded = {"import precog_db": False, "precog-db env": False}
    probe = (
        "import sys; sys.argv = ['precog-db', 'env']; "
        "from precog_db.cli import main; code = main(); "
        "sys.stderr.write('psycopg=%s\\n' % ('psycopg' in sys.modules))"
    )
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(runs):
            wall, _ = _wall([sys.executable, "-c", "pass"], cwd, env)
            samples["python -c pass (interpreter alone)"].append(wall)
            wall, out = _wall([sys.executable, "-c", _CHILD_IMPORT], cwd, env)
            samples["python -c 'import precog_db' (wall)"].append(wall)
            inside, loaded = out.split()
            samples["import precog_db (in process)"].append(float(inside))
            psycopg_loaded["import precog_db"] |= loaded == "True"
            wall, _ = _wall([_script(), "env"], cwd, env)
            samples["precog-db env"].append(wall)
            wall, _ = _wall([_script(), "--help"], cwd, env)
            samples["precog-db --help"].append(wall)
        check = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, env=env, check=True, timeout=60
        )
        psycopg_loaded["precog-db env"] = "psycopg=True" in check.stderr
    rows = {
        name: {
            "median_s": round(statistics.median(values), 4),
            "min_s": round(min(values), 4),
            "max_s": round(max(values), 4),
            "target_s": TARGETS_S.get(name),
            "meets_target": None if name not in TARGETS_S else statistics.median(values) < TARGETS_S[name],
        }
        for name, values in samples.items()
    }
    return {
        "runs": runs,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "timings": rows,
        "psycopg_imported": psycopg_loaded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="fresh processes per path (default 15)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    result = measure(max(args.runs, 1))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"start-up, median of {result['runs']} fresh processes (load average {result['load_average']})")
    for name, row in result["timings"].items():
        target = (
            ""
            if row["target_s"] is None
            else f"  target < {row['target_s']:.3f} s: " + ("met" if row["meets_target"] else "MISSED")
        )
        print(f"  {name:<40} {row['median_s'] * 1000:7.1f} ms  (min {row['min_s'] * 1000:.1f}){target}")
    for name, loaded in result["psycopg_imported"].items():
        print(f"  psycopg imported by {name}: {'yes' if loaded else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
