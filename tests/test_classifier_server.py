"""What the parser's verdicts do on a real direct pool, in both layers (issue 21 items 2, 6, 7).

Each scenario is written once as a coroutine over `Layer`, which runs it on the
sync pool (awaiting nothing) or on `precog_db.aio`'s pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

from precog_db import ReadOnlyWriteError, TransactionControlError, aio, close_pool, get_cursor, initialize_pool
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server


class Layer:
    """One scenario, two layers: ``cursor()``/``connection()`` are async context managers over either pool."""

    def __init__(self, name: str) -> None:
        self.name = name

    @asynccontextmanager
    async def cursor(self, *, commit: bool = False) -> AsyncIterator[Any]:
        if self.name == "sync":
            with get_cursor(commit=commit) as cur:
                yield _Sync(cur)
        else:
            async with aio.get_cursor(commit=commit) as acur:
                yield acur

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        if self.name == "sync":
            from precog_db import get_connection

            with get_connection() as conn:
                yield _Sync(conn)
        else:
            async with aio.get_connection() as aconn:
                yield aconn

    def run(self, settings: DatabaseSettings, scenario: Callable[[Layer], Coroutine[Any, Any, None]]) -> None:
        if self.name == "sync":
            initialize_pool(settings=settings.replace(pool_min=1, pool_max=1))
            try:
                asyncio.run(scenario(self))
            finally:
                close_pool()
            return

        async def main() -> None:
            await aio.initialize_pool(settings=settings.replace(pool_min=1, pool_max=1))
            try:
                await scenario(self)
            finally:
                await aio.close_pool()

        asyncio.run(main())


class _Sync:
    """A sync cursor or connection whose methods can be awaited, so a scenario is written once."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.target, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            return _Sync(result) if isinstance(result, psycopg.Cursor) else result

        return call


@pytest.fixture(params=["sync", "asyncio"])
def layer(request: pytest.FixtureRequest) -> Iterator[Layer]:
    yield Layer(request.param)


@pytest.fixture
def orders(pg_server: Server, test_db: str) -> Iterator[None]:
    """public.orders and an evil.orders a hijacked search_path would send inserts to."""
    with pg_server.connect(test_db) as admin:
        admin.execute("DROP SCHEMA IF EXISTS evil CASCADE")
        admin.execute("DROP TABLE IF EXISTS public.orders")
        admin.execute("CREATE SCHEMA evil")
        admin.execute("CREATE TABLE public.orders (ref int)")
        admin.execute("CREATE TABLE evil.orders (ref int)")
        admin.execute("CREATE EXTENSION IF NOT EXISTS dblink")
        admin.execute(
            "CREATE OR REPLACE PROCEDURE commits_and_writes() LANGUAGE plpgsql AS $$ BEGIN COMMIT; "
            "SET TRANSACTION READ WRITE; INSERT INTO public.orders VALUES (99); END $$"
        )
    yield
    with pg_server.connect(test_db) as admin:
        admin.execute("DROP SCHEMA IF EXISTS evil CASCADE")
        admin.execute("DROP TABLE IF EXISTS public.orders")
        admin.execute("DROP PROCEDURE IF EXISTS commits_and_writes()")


def _counts(pg_server: Server, test_db: str) -> tuple[int, int]:
    with pg_server.connect(test_db) as admin:
        public = admin.execute("SELECT count(*) FROM public.orders").fetchone()
        evil = admin.execute("SELECT count(*) FROM evil.orders").fetchone()
    assert public is not None and evil is not None
    return int(public[0]), int(evil[0])


_EVIL = "SELECT set_config('search_path', 'evil', false)::tsvector"
SEARCH_PATH_HIJACKS: dict[str, tuple[str, tuple[Any, ...] | None]] = {
    "ts_stat runs SQL bound as a parameter": ("SELECT count(*) FROM ts_stat(%s)", (_EVIL,)),
    "ts_rewrite runs SQL bound as a parameter": (
        "SELECT ts_rewrite('a'::tsquery, %s)",
        ("SELECT 'a'::tsquery, set_config('search_path', 'evil', false)::tsquery",),
    ),
    "set_config with a bound false": ("SELECT set_config('search_path', 'evil', %s)", (False,)),
    "SET with a comment for a space": ("SET/**/search_path = evil", None),
    "a second statement": ("SELECT 1; SET search_path = evil", None),
}


@pytest.mark.parametrize("how", sorted(SEARCH_PATH_HIJACKS))
def test_hijacked_search_path_does_not_reach_the_next_borrower(
    layer: Layer, test_settings: DatabaseSettings, orders: None, pg_server: Server, test_db: str, how: str
) -> None:
    """A read that sets search_path through any door leaves the next committed INSERT in public.orders (21.6)."""
    sql, params = SEARCH_PATH_HIJACKS[how]

    async def scenario(db: Layer) -> None:
        async with db.cursor() as cur:  # a get_cursor() block: only the verdict decides the reset
            await cur.execute(sql, params)
        async with db.cursor(commit=True) as cur:
            await cur.execute("INSERT INTO orders VALUES (1)")

    layer.run(test_settings, scenario)
    assert _counts(pg_server, test_db) == (1, 0)


def test_hand_built_cursors_are_tracked(
    test_settings: DatabaseSettings, orders: None, pg_server: Server, test_db: str
) -> None:
    """stream() and a WITH HOLD server cursor built by hand on cur.connection cannot leave search_path set (21.6)."""
    initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
    try:
        with get_cursor() as cur:
            rows = list(psycopg.Cursor(cur.connection).stream("SELECT set_config('search_path', 'evil', false)"))
            assert rows == [("evil",)]
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO orders VALUES (1)")
        with get_cursor(commit=True) as cur:
            held = psycopg.ServerCursor(cur.connection, "held", withhold=True)
            held.execute("SELECT set_config('search_path', 'evil', false)")
            held.fetchall()
            held.close()
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO orders VALUES (2)")
            cur.execute("SHOW search_path")
            assert cur.fetchone() == {"search_path": '"$user", public'}
    finally:
        close_pool()
    assert _counts(pg_server, test_db) == (2, 0)


READ_ONLY_ESCAPES = {
    "begin read write in one string": "begin read write; insert into orders values (1); commit",
    "a procedure that commits and writes": "CALL commits_and_writes()",
    "lo_create": "SELECT lo_create(0)",
    "lo_from_bytea": "SELECT lo_from_bytea(0, 'x')",
    "dblink_exec": "SELECT dblink_exec('dbname=' || current_database(), 'insert into orders values (7)')",
    "set_config of the read-only default": "SELECT set_config('default_transaction_read_only', 'off', false)",
}


@pytest.mark.parametrize("how", sorted(READ_ONLY_ESCAPES))
def test_writes_past_the_read_only_default_are_refused(
    layer: Layer, test_settings: DatabaseSettings, orders: None, pg_server: Server, test_db: str, how: str
) -> None:
    """Each way a read-only block used to write is refused unsent with what to do, and nothing is written (21.7)."""

    async def scenario(db: Layer) -> None:
        with pytest.raises(ReadOnlyWriteError, match=r"refused before it was sent.*commit=True"):
            async with db.cursor() as cur:
                await cur.execute(READ_ONLY_ESCAPES[how])
        async with db.cursor(commit=True) as cur:  # inside a transaction, writing was always allowed
            await cur.execute("SELECT 1")

    layer.run(test_settings, scenario)
    with pg_server.connect(test_db) as admin:
        objects = admin.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()
    assert _counts(pg_server, test_db) == (0, 0)
    assert objects == (0,)


def test_copy_from_in_a_read_only_block_says_what_to_do(
    layer: Layer, test_settings: DatabaseSettings, orders: None
) -> None:
    """COPY FROM outside a transaction is ReadOnlyWriteError with its hint, not the raw server error (21.7)."""

    async def scenario(db: Layer) -> None:
        with pytest.raises(ReadOnlyWriteError, match="get_cursor\\(commit=True\\)"):
            async with db.cursor() as cur:
                if db.name == "sync":
                    with cur.target.copy("COPY orders FROM STDIN") as copy:
                        copy.write_row((1,))
                else:
                    async with cur.copy("COPY orders FROM STDIN") as acopy:
                        await acopy.write_row((1,))

    layer.run(test_settings, scenario)


def test_commit_statement_inside_a_block_is_refused(
    layer: Layer, test_settings: DatabaseSettings, orders: None, pg_server: Server, test_db: str
) -> None:
    """``insert; commit`` inside get_cursor(commit=True) is refused as transaction control (21.7)."""

    async def scenario(db: Layer) -> None:
        with pytest.raises(TransactionControlError, match="would end the block's transaction"):
            async with db.cursor(commit=True) as cur:
                await cur.execute("INSERT INTO orders VALUES (1)")
                await cur.execute("insert into orders values (2); commit")
                await cur.execute("INSERT INTO orders VALUES (3)")

    layer.run(test_settings, scenario)
    assert _counts(pg_server, test_db) == (0, 0)


def test_own_begin_then_read_write_is_refused(
    layer: Layer, test_settings: DatabaseSettings, orders: None, pg_server: Server, test_db: str
) -> None:
    """A borrower's own BEGIN does not lift the check: SET TRANSACTION READ WRITE after it is refused (21.7)."""

    async def scenario(db: Layer) -> None:
        with pytest.raises(ReadOnlyWriteError, match="READ WRITE"):
            async with db.cursor() as cur:
                await cur.execute("BEGIN")
                await cur.execute("SET TRANSACTION READ WRITE")
                await cur.execute("INSERT INTO orders VALUES (1)")
                await cur.execute("COMMIT")

    layer.run(test_settings, scenario)
    assert _counts(pg_server, test_db) == (0, 0)


def test_three_part_names_and_pg_temp_search_path_do_not_leak(
    layer: Layer, test_settings: DatabaseSettings, orders: None, pg_server: Server, test_db: str
) -> None:
    """``db.pg_catalog.set_config`` and a temp table made through ``SET LOCAL search_path = pg_temp`` are reset."""

    async def scenario(db: Layer) -> None:
        async with db.cursor() as cur:
            await cur.execute(f"SELECT {test_db}.pg_catalog.set_config('search_path', 'evil, public', false)")
        async with db.cursor(commit=True) as cur:
            await cur.execute("SET LOCAL search_path = pg_temp")
            await cur.execute("CREATE TABLE orders (ref int)")
        async with db.cursor(commit=True) as cur:
            await cur.execute("INSERT INTO orders VALUES (1)")

    layer.run(test_settings, scenario)
    assert _counts(pg_server, test_db) == (1, 0)


def test_a_failed_pool_cursor_leaves_no_pass_for_a_hand_built_one(
    test_settings: DatabaseSettings, orders: None, pg_server: Server, test_db: str
) -> None:
    """A pool cursor that fails before sending does not let the next hand-built statement pass unjudged."""
    initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
    try:
        with get_cursor() as cur:
            closed = cur.connection.cursor()
            closed.close()
            with pytest.raises(psycopg.InterfaceError):
                closed.execute("SELECT 1")
            psycopg.ClientCursor(cur.connection).execute("SET search_path = evil, public")
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO orders VALUES (1)")
    finally:
        close_pool()
    assert _counts(pg_server, test_db) == (1, 0)
