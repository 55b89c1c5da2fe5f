"""Sans-I/O steps: how the sync and the asyncio layers share everything that is not I/O.

A procedure that needs a few queries (reading the identity stamp, for
instance) is written once, as a generator that yields the `Query` it needs and
receives the first row of its result (a tuple, or None). It holds the SQL
text, the parameters and every decision; it never touches a connection. Two
small drivers run it: `run` on a `psycopg.Connection`, `arun` on a
`psycopg.AsyncConnection`. They are the only twins, and they differ only by
``await`` (docs/DESIGN.md, "Sync and async from one source").

A `Query` marked ``guarded`` may fail for lack of privileges without breaking
an open transaction: the driver runs it in a savepoint when a transaction is
open, and sends a `psycopg.Error` it raises into the generator, which decides.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection, Connection
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

__all__ = ["Query", "Steps", "arun", "run"]

_RV = TypeVar("_RV")


@dataclass(frozen=True, slots=True)
class Query:
    """One statement a procedure needs, and whether a failure of it is the procedure's to handle."""

    sql: str
    params: tuple[Any, ...] | None = None
    guarded: bool = False


#: A procedure: yields queries, receives each one's first row, returns its result.
Steps = Generator[Query, "tuple[Any, ...] | None", _RV]


def _in_transaction(conn: Connection[Any] | AsyncConnection[Any]) -> bool:
    return not conn.autocommit or conn.pgconn.transaction_status != TransactionStatus.IDLE


def run(conn: Connection[Any], steps: Steps[_RV]) -> _RV:
    """Run ``steps`` on a sync connection; return what the procedure returns."""
    with conn.cursor(row_factory=tuple_row) as cur:
        try:
            query = next(steps)
            while True:
                try:
                    if query.guarded and _in_transaction(conn):
                        with conn.transaction():
                            cur.execute(query.sql, query.params)
                    else:
                        cur.execute(query.sql, query.params)
                    row = cur.fetchone() if cur.pgresult is not None and cur.pgresult.ntuples else None
                except psycopg.Error as exc:
                    if not query.guarded:
                        raise
                    query = steps.throw(exc)
                    continue
                query = steps.send(row)
        except StopIteration as done:
            result: _RV = done.value
            return result


async def arun(conn: AsyncConnection[Any], steps: Steps[_RV]) -> _RV:
    """Run ``steps`` on an asyncio connection; return what the procedure returns."""
    async with conn.cursor(row_factory=tuple_row) as cur:
        try:
            query = next(steps)
            while True:
                try:
                    if query.guarded and _in_transaction(conn):
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
