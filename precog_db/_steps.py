"""Sans-I/O steps: how the sync and the asyncio layers share everything that is not I/O.

A procedure that needs a few queries (reading the identity stamp, for
instance) is written once, as a generator that yields the `Query` it needs and
receives the first row of its result (a tuple, or None). It holds the SQL
text, the parameters and every decision; it never touches a connection. Two
small drivers run it, both named `run`: `precog_db._steps_async.run` on a
`psycopg.AsyncConnection`, and `precog_db._steps_sync.run`, generated from it,
on a `psycopg.Connection` (docs/DESIGN.md, "Sync and async from one source").

A `Query` marked ``guarded`` may fail for lack of privileges without breaking
an open transaction: the driver runs it in a savepoint when a transaction is
open, and sends a `psycopg.Error` it raises into the generator, which decides.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from psycopg import AsyncConnection, Connection
from psycopg.pq import TransactionStatus

__all__ = ["Query", "Steps", "in_transaction"]

_RV = TypeVar("_RV")


@dataclass(frozen=True, slots=True)
class Query:
    """One statement a procedure needs, and whether a failure of it is the procedure's to handle."""

    sql: str
    params: tuple[Any, ...] | None = None
    guarded: bool = False


#: A procedure: yields queries, receives each one's first row, returns its result.
Steps = Generator[Query, "tuple[Any, ...] | None", _RV]


def in_transaction(conn: Connection[Any] | AsyncConnection[Any]) -> bool:
    """A transaction is open (or will be, at the next statement): a guarded query needs a savepoint."""
    return not conn.autocommit or conn.pgconn.transaction_status != TransactionStatus.IDLE
