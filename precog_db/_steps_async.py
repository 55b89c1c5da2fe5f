"""The driver of `precog_db._steps` procedures, written once: this asyncio source generates `precog_db._steps_sync`."""

from __future__ import annotations

from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import tuple_row

from precog_db._steps import Steps, in_transaction

_RV = TypeVar("_RV")


async def run(conn: AsyncConnection[Any], steps: Steps[_RV]) -> _RV:
    """Run ``steps`` on ``conn``; return what the procedure returns."""
    async with conn.cursor(row_factory=tuple_row) as cur:
        try:
            query = next(steps)
            while True:
                try:
                    if query.guarded and in_transaction(conn):
                        async with conn.transaction():
                            await cur.execute(query.sql, query.params)
                    else:
                        await cur.execute(query.sql, query.params)
                    row = await cur.fetchone() if cur.pgresult is not None and cur.pgresult.ntuples else None
                except psycopg.Error as exc:
                    if not query.guarded:
                        raise
                    query = steps.throw(exc)
                    continue
                query = steps.send(row)
        except StopIteration as done:
            result: _RV = done.value
            return result
