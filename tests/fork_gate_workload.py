"""Run by tests/test_chokepoint.py in a subprocess: the fork attack on the environment gates.

The parent opens a pool with explicit staging settings (as a service does
with ``initialize_pool(settings=load_settings("staging", ...))``) while its
own environment resolves to ``dev``, then forks. The child, which sees no open
pool and resolves ``dev``, calls the gated `truncate_tables`. Prints one JSON
object: what the child saw and how many rows the parent still counts.
Usage: python fork_gate_workload.py '<json of DatabaseSettings fields>' <table>
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from precog_db import get_cursor, initialize_pool, truncate_tables
from precog_db.environment import Environment
from precog_db.settings import DatabaseSettings


def count(table: str) -> int:
    with get_cursor() as cur:
        cur.execute(f"SELECT count(*) AS n FROM {table}")
        row = cur.fetchone()
        assert row is not None
        return int(row["n"])


def main() -> None:
    settings = DatabaseSettings(env=Environment.STAGING, **json.loads(sys.argv[1]))
    table = sys.argv[2]
    initialize_pool(settings=settings)
    before = count(table)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        out: dict[str, Any] = {}
        try:
            truncate_tables(table)
            out["child"] = "truncated"
        except Exception as exc:  # report whatever happened to the parent
            out["child"] = type(exc).__name__
            out["message"] = str(exc)
        os.write(write_end, json.dumps(out).encode())
        os.close(write_end)
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as reader:
        result = json.loads(reader.read() or "{}")
    result["rows_before"] = before
    result["rows_after"] = count(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
