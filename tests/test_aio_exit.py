"""Issue 21.14: an asyncio pool that was never closed does not hang the interpreter's exit.

``asyncio.run`` (and pytest-asyncio's loop teardown) cancels every task left and waits for
them. psycopg_pool's maintenance workers swallow a cancellation that lands while they open a
connection and wait for the next task: before the fix, ``asyncio.run(main())`` after
``aio.get_cursor()`` without ``close_pool()`` never returned in most runs. Each run here is a
separate interpreter, bounded by a subprocess timeout; the runs go four at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests._helpers.server import Server

REPO = Path(__file__).resolve().parent.parent
_RUNS = 20
_RUN_TIMEOUT = 30.0  # seconds, per interpreter: a hang shows as a timeout, never as a stuck suite

_NEVER_CLOSED = textwrap.dedent(
    """
    import asyncio
    from precog_db import aio
    from precog_db.apool import create_pool

    async def main(n):
        async with aio.get_cursor() as cur:  # opens the module-level pool; close_pool() is never called
            await cur.execute("SELECT %s::int AS n", (n,))
            print("read", (await cur.fetchone())["n"], flush=True)

    async def own_pool():
        settings = (await aio.get_pool()).settings
        pool = await create_pool(settings, prod_confirmed=False)  # a pool of the caller's own, never closed
        async with pool.connection() as conn:
            print("own", (await (await conn.execute("SELECT 3")).fetchone())[0], flush=True)

    asyncio.run(main(1))
    asyncio.run(main(2))  # a new loop: the pool of the closed one is dropped, a new one opened
    asyncio.run(own_pool())
    asyncio.run(aio.close_pool())  # on yet another loop: the pool of a closed loop is dropped, not awaited
    print("exited", flush=True)
    """
)

_PYTEST_FILE = textwrap.dedent(
    """
    import pytest
    from precog_db import aio

    @pytest.mark.asyncio
    @pytest.mark.parametrize("n", range(5))
    async def test_read_without_close_pool(n):
        async with aio.get_cursor() as cur:
            await cur.execute("SELECT %s::int AS n", (n,))
            assert (await cur.fetchone())["n"] == n
    """
)


def _env(pg_server: Server, test_db: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_")) and k != "DATABASE_URL"}
    env.update(pg_server.env_vars(test_db), PRECOG_ENV="test", PYTHONPATH=str(REPO))  # this checkout's code
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int | str, str, str]:
    """(exit code or "timeout", stdout, stderr's tail) of one interpreter."""
    try:
        done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=_RUN_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:  # the child is killed
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return "timeout", out, ""
    return done.returncode, done.stdout, done.stderr[-1500:]


def test_asyncio_run_without_close_pool_exits(pg_server: Server, test_db: str, tmp_path: Path) -> None:
    """20 interpreters run ``asyncio.run(main())`` with ``aio.get_cursor()`` and no close_pool (and more): all exit 0.

    Each also runs a second loop (the first loop's pool is dropped, a new one opened), a loop with a
    pool of its own it never closes, and ``close_pool()`` on a fourth loop.
    """
    env = _env(pg_server, test_db)
    with ThreadPoolExecutor(max_workers=4) as runner:
        results = list(runner.map(lambda _: _run([sys.executable, "-c", _NEVER_CLOSED], env, tmp_path), range(_RUNS)))
    codes = [code for code, _, _ in results]
    assert codes == [0] * _RUNS, [(code, out, err) for code, out, err in results if code != 0][:2]
    for _, out, err in results:
        assert out.split() == ["read", "1", "read", "2", "own", "3", "exited"], out
        assert "pool_loop_closed" in err and "close_pool()" in err  # the dropped pool is reported, with the fix


def test_pytest_asyncio_tests_without_close_pool_finish(pg_server: Server, test_db: str, tmp_path: Path) -> None:
    """A pytest-asyncio file whose 5 tests (one loop each) use aio.get_cursor() and never close the pool: it ends."""
    (tmp_path / "test_never_closed.py").write_text(_PYTEST_FILE)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_never_closed.py"]
    code, out, err = _run(args, _env(pg_server, test_db), tmp_path)
    assert code == 0, (code, out[-2000:], err)
    assert "5 passed" in out, out[-2000:]
