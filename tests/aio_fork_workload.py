"""Run by tests/test_aio_rules.py in a subprocess: the fork rule for the asyncio pool.

The parent opens the asyncio pool (on a loop that is not running at fork
time, as a pre-fork server does before its workers start), then forks. The
child tries the inherited pool (refused) and then `aio.get_pool()` (its own
pool, same settings). Prints one JSON object with what each side saw.
Usage: python aio_fork_workload.py '<json of DatabaseSettings fields>'
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from precog_db import aio
from precog_db.apool import AsyncPrecogPool
from precog_db.environment import Environment
from precog_db.settings import DatabaseSettings


async def backend_pid() -> int:
    async with aio.get_cursor() as cur:
        await cur.execute("SELECT pg_backend_pid() AS pid")
        row = await cur.fetchone()
        assert row is not None
        return int(row["pid"])


async def alive(pid: int) -> bool:
    """Whether the server still has the session ``pid`` (asked through the parent's own pool)."""
    async with aio.get_cursor() as cur:
        await cur.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = await cur.fetchone()
        assert row is not None
        return bool(row["n"])


async def child(inherited: AsyncPrecogPool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        await inherited.lend()
        out["inherited"] = "lent"
    except Exception as exc:
        out["inherited"] = type(exc).__name__
        out["message"] = str(exc)
    pool = await aio.get_pool()
    out["own_pool"] = pool is not inherited
    out["same_target"] = pool.settings.dbname == inherited.settings.dbname
    out["child_pid"] = await backend_pid()
    await aio.close_pool()
    return out


def main() -> None:
    settings = DatabaseSettings(env=Environment.TEST, **json.loads(sys.argv[1]))
    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(aio.initialize_pool(settings=settings))
    parent_pid = loop.run_until_complete(backend_pid())
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            out = asyncio.run(child(pool))
        except Exception as exc:
            out = {"child_error": f"{type(exc).__name__}: {exc}"}
        os.write(write_end, json.dumps(out).encode())
        os.close(write_end)
        os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 65536):
        data += chunk
    os.waitpid(pid, 0)
    result = json.loads(data)
    result["parent_pid"] = parent_pid
    result["parent_alive"] = loop.run_until_complete(alive(parent_pid))  # the child did not end it
    loop.run_until_complete(aio.close_pool())
    loop.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
