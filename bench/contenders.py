"""The ways of talking to PostgreSQL that the benchmark compares, each used the way its users would.

Every contender runs the same four workloads on the same tables:

* ``pk``: one primary-key lookup, one row;
* ``fetch100``: a 100-row range scan, all rows fetched;
* ``insert``: one single-row INSERT, committed;
* ``txn3``: a 3-statement transaction (SELECT, UPDATE, INSERT), committed;

and, for the committed-write comparison of `bench.pipeline` (issue 16):

* ``insert10``: ten single-row INSERTs in one committed transaction.

and can fetch N rows once (`fetch_rows`) for the cost-as-work-grows table.
"""

from __future__ import annotations

import asyncio
import importlib
import random
import threading
from collections.abc import Awaitable, Callable
from time import perf_counter
from types import ModuleType
from typing import Any, ClassVar

import psycopg
from psycopg.rows import dict_row, tuple_row

from bench.loadgen import AsyncOp, Op, run_tasks, run_threads
from bench.server import ACCOUNTS, ITEMS, Target

POOL_SIZE = 10
WORKLOADS = ("pk", "fetch100", "insert", "txn3")
READS = ("pk", "fetch100")
WRITES = ("insert", "txn3")
#: The committed-write workloads of `bench.pipeline`.
COMMITTED = ("insert", "txn3", "insert10")
BATCH = 10

PK = "SELECT id, name, qty, price FROM bench_items WHERE id = %s"
RANGE = "SELECT id, name, qty, price FROM bench_items WHERE id BETWEEN %s AND %s"
FIRST_N = "SELECT id, name, qty, price FROM bench_items WHERE id <= %s"
INSERT = "INSERT INTO bench_writes (item_id, qty) VALUES (%s, %s)"
TX_SELECT = "SELECT balance FROM bench_accounts WHERE id = %s"
TX_UPDATE = "UPDATE bench_accounts SET balance = balance + %s WHERE id = %s"


def _dollar(query: str) -> str:
    """The same query with asyncpg's $n placeholders."""
    parts = query.split("%s")
    return "".join(p + (f"${i + 1}" if i < len(parts) - 1 else "") for i, p in enumerate(parts))


def _key(rng: random.Random) -> int:
    return rng.randint(1, ITEMS)


def _range(rng: random.Random) -> tuple[int, int]:
    lo = rng.randint(1, ITEMS - 99)
    return lo, lo + 99


def _account(rng: random.Random) -> int:
    return rng.randint(1, ACCOUNTS)


class Contender:
    """One way of talking to the server. Subclasses fill in `_op` (threads) or override `run`."""

    name: ClassVar[str]
    label: ClassVar[str]
    rows: ClassVar[str]
    workloads: ClassVar[tuple[str, ...]] = WORKLOADS

    def open(self, target: Target, max_threads: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def run(self, workload: str, threads: int, duration: float, warmup: float) -> dict[str, Any]:
        return run_threads(lambda i: self._op(workload, i), threads, duration, warmup)

    def _op(self, workload: str, thread: int) -> Op:
        raise NotImplementedError

    def fetch_rows(self, n: int) -> int:
        raise NotImplementedError

    def run_ops(self, workload: str, count: int) -> None:
        """Run ``count`` operations one after another (for round-trip counting)."""
        op = self._op(workload, 0)
        rng = random.Random(1)
        for _ in range(count):
            op(rng)


# --- precog_db ---------------------------------------------------------------------


def open_precog_pool(package: ModuleType, target: Target) -> Callable[..., Any]:
    """Open ``package``'s global pool of `POOL_SIZE` on ``target``; return its get_cursor.

    ``package`` is `precog_db`, or an older copy of it loaded by `bench.ab`.
    """
    settings_mod = importlib.import_module(f"{package.__name__}.settings")
    settings = settings_mod.DatabaseSettings(
        env=package.Environment.DEV,
        host=target.host,
        port=target.port,
        dbname=target.dbname,
        user=target.user,
        password=target.password,
        pool_min=POOL_SIZE,
        pool_max=POOL_SIZE,
        pool_timeout=60.0,
        sslmode="disable",
    )
    package.initialize_pool(settings=settings).wait(timeout=60)
    get_cursor: Callable[..., Any] = package.get_cursor
    return get_cursor


class Precog(Contender):
    """``precog_db.get_cursor()`` for reads; writes need ``commit=True`` and use it."""

    name = "precog"
    label = "precog_db get_cursor()"
    rows = "dict"
    workloads = READS
    commit = False
    pipeline = False
    row_factory = staticmethod(dict_row)

    def open(self, target: Target, max_threads: int) -> None:
        import precog_db

        open_precog_pool(precog_db, target)

    def close(self) -> None:
        from precog_db import close_pool

        close_pool()

    def _op(self, workload: str, thread: int) -> Op:
        from precog_db import get_cursor

        commit = self.commit
        if workload == "pk":

            def pk(rng: random.Random) -> float:
                key = _key(rng)
                with get_cursor(commit=commit) as cur:
                    t = perf_counter()
                    cur.execute(PK, (key,))
                    cur.fetchone()
                return t

            return pk
        if workload == "fetch100":

            def fetch100(rng: random.Random) -> float:
                bounds = _range(rng)
                with get_cursor(commit=commit) as cur:
                    t = perf_counter()
                    cur.execute(RANGE, bounds)
                    cur.fetchall()
                return t

            return fetch100
        pipeline = self.pipeline
        if workload == "insert":

            def insert(rng: random.Random) -> float:
                args = (_key(rng), rng.randint(1, 100))
                with get_cursor(commit=True, pipeline=pipeline) as cur:
                    t = perf_counter()
                    cur.execute(INSERT, args)
                return t

            return insert
        if workload == "insert10":

            def insert10(rng: random.Random) -> float:
                rows = [(_key(rng), rng.randint(1, 100)) for _ in range(BATCH)]
                with get_cursor(commit=True, pipeline=pipeline) as cur:
                    t = perf_counter()
                    for row in rows:
                        cur.execute(INSERT, row)
                return t

            return insert10

        def txn3(rng: random.Random) -> float:
            account, amount, item = _account(rng), rng.randint(1, 100), _key(rng)
            with get_cursor(commit=True, pipeline=pipeline) as cur:
                t = perf_counter()
                cur.execute(TX_SELECT, (account,))
                cur.fetchone()
                cur.execute(TX_UPDATE, (amount, account))
                cur.execute(INSERT, (item, amount))
            return t

        return txn3

    def fetch_rows(self, n: int) -> int:
        from precog_db import get_cursor

        with get_cursor(row_factory=self.row_factory) as cur:
            cur.execute(FIRST_N, (n,))
            return len(cur.fetchall())


class PrecogCommit(Precog):
    """``precog_db.get_cursor(commit=True)``: every block is one BEGIN READ WRITE … COMMIT."""

    name = "precog_commit"
    label = "precog_db get_cursor(commit=True)"
    workloads = WORKLOADS
    commit = True


class PrecogPipeline(Precog):
    """``precog_db.get_cursor(commit=True, pipeline=True)``: the whole block in one round trip."""

    name = "precog_pipeline"
    label = "precog_db get_cursor(commit=True, pipeline=True)"
    workloads = WRITES
    commit = True
    pipeline = True


class PrecogTuple(Precog):
    """``get_cursor(row_factory=tuple_row)``: only in the rows-fetched table, to separate row building."""

    name = "precog_tuple"
    label = "precog_db get_cursor(row_factory=tuple_row)"
    rows = "tuple"
    workloads = ()
    row_factory = staticmethod(tuple_row)


# --- a bare psycopg connection per thread --------------------------------------------


class _BareConnections:
    """Connections shared by the bare contenders: one per thread, opened on demand, autocommit."""

    conns: ClassVar[list[psycopg.Connection[Any]]] = []
    target: ClassVar[Target | None] = None
    users: ClassVar[int] = 0

    @classmethod
    def ensure(cls, target: Target, n: int) -> list[psycopg.Connection[Any]]:
        cls.target = target
        while len(cls.conns) < n:
            cls.conns.append(psycopg.connect(target.conninfo(), autocommit=True))
        return cls.conns

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users <= 0:
            for conn in cls.conns:
                conn.close()
            cls.conns = []
            cls.users = 0


class Bare(Contender):
    """One psycopg connection per thread in autocommit, no pool: the practical limit."""

    name = "bare_tuple"
    label = "bare psycopg connection per thread, autocommit, tuple rows"
    rows = "tuple"
    row_factory = staticmethod(tuple_row)
    transaction_for_single_write = False

    def open(self, target: Target, max_threads: int) -> None:
        self.target = target
        _BareConnections.users += 1
        _BareConnections.ensure(target, 1)

    def close(self) -> None:
        _BareConnections.release()

    def run(self, workload: str, threads: int, duration: float, warmup: float) -> dict[str, Any]:
        self._prepare(threads)
        return super().run(workload, threads, duration, warmup)

    def run_ops(self, workload: str, count: int) -> None:
        self._prepare(1)
        super().run_ops(workload, count)

    def _prepare(self, threads: int) -> None:
        for conn in _BareConnections.ensure(self.target, threads)[:threads]:
            conn.row_factory = self.row_factory

    def _op(self, workload: str, thread: int) -> Op:
        conn = _BareConnections.conns[thread]
        if workload == "pk":

            def pk(rng: random.Random) -> float:
                t = perf_counter()
                conn.execute(PK, (_key(rng),)).fetchone()
                return t

            return pk
        if workload == "fetch100":

            def fetch100(rng: random.Random) -> float:
                t = perf_counter()
                conn.execute(RANGE, _range(rng)).fetchall()
                return t

            return fetch100
        if workload == "insert" and not self.transaction_for_single_write:

            def insert(rng: random.Random) -> float:
                t = perf_counter()
                conn.execute(INSERT, (_key(rng), rng.randint(1, 100)))
                return t

            return insert
        if workload == "insert":

            def insert_tx(rng: random.Random) -> float:
                t = perf_counter()
                with conn.transaction():
                    conn.execute(INSERT, (_key(rng), rng.randint(1, 100)))
                return t

            return insert_tx
        if workload == "insert10":

            def insert10(rng: random.Random) -> float:
                rows = [(_key(rng), rng.randint(1, 100)) for _ in range(BATCH)]
                t = perf_counter()
                with conn.transaction():
                    for row in rows:
                        conn.execute(INSERT, row)
                return t

            return insert10

        def txn3(rng: random.Random) -> float:
            account, amount, item = _account(rng), rng.randint(1, 100), _key(rng)
            t = perf_counter()
            with conn.transaction():
                conn.execute(TX_SELECT, (account,)).fetchone()
                conn.execute(TX_UPDATE, (amount, account))
                conn.execute(INSERT, (item, amount))
            return t

        return txn3

    def fetch_rows(self, n: int) -> int:
        conn = _BareConnections.ensure(self.target, 1)[0]
        with conn.cursor(row_factory=self.row_factory) as cur:
            cur.execute(FIRST_N, (n,))
            return len(cur.fetchall())


class BareDict(Bare):
    """The bare connection with dict rows, the same rows `get_cursor` returns."""

    name = "bare_dict"
    label = "bare psycopg connection per thread, autocommit, dict rows"
    rows = "dict"
    row_factory = staticmethod(dict_row)


class BareTransaction(BareDict):
    """The bare connection, dict rows, the single INSERT wrapped in BEGIN … COMMIT like get_cursor(commit=True)."""

    name = "bare_tx"
    label = "bare psycopg connection, dict rows, explicit transaction"
    workloads = ("insert",)
    transaction_for_single_write = True


# --- psycopg_pool used the default way ------------------------------------------------


class PsycopgPool(Contender):
    """``psycopg_pool.ConnectionPool``, ``with pool.connection() as conn``: a transaction per checkout."""

    name = "psycopg_pool"
    label = "psycopg_pool default (transaction per checkout), dict rows"
    rows = "dict"

    def open(self, target: Target, max_threads: int) -> None:
        from psycopg_pool import ConnectionPool

        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            target.conninfo(),
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            kwargs={"row_factory": dict_row},
            timeout=60.0,
            name="bench-psycopg-pool",
            open=True,
        )
        self.pool.wait(timeout=60)

    def close(self) -> None:
        self.pool.close()

    def _op(self, workload: str, thread: int) -> Op:
        pool = self.pool
        if workload == "pk":

            def pk(rng: random.Random) -> float:
                key = _key(rng)
                with pool.connection() as conn:
                    t = perf_counter()
                    conn.execute(PK, (key,)).fetchone()
                return t

            return pk
        if workload == "fetch100":

            def fetch100(rng: random.Random) -> float:
                bounds = _range(rng)
                with pool.connection() as conn:
                    t = perf_counter()
                    conn.execute(RANGE, bounds).fetchall()
                return t

            return fetch100
        if workload == "insert":

            def insert(rng: random.Random) -> float:
                args = (_key(rng), rng.randint(1, 100))
                with pool.connection() as conn:
                    t = perf_counter()
                    conn.execute(INSERT, args)
                return t

            return insert
        if workload == "insert10":

            def insert10(rng: random.Random) -> float:
                rows = [(_key(rng), rng.randint(1, 100)) for _ in range(BATCH)]
                with pool.connection() as conn:
                    t = perf_counter()
                    for row in rows:
                        conn.execute(INSERT, row)
                return t

            return insert10

        def txn3(rng: random.Random) -> float:
            account, amount, item = _account(rng), rng.randint(1, 100), _key(rng)
            with pool.connection() as conn:
                t = perf_counter()
                conn.execute(TX_SELECT, (account,)).fetchone()
                conn.execute(TX_UPDATE, (amount, account))
                conn.execute(INSERT, (item, amount))
            return t

        return txn3

    def fetch_rows(self, n: int) -> int:
        with self.pool.connection() as conn:
            return len(conn.execute(FIRST_N, (n,)).fetchall())


# --- psycopg2 ThreadedConnectionPool + RealDictCursor ------------------------------------


class Psycopg2Pool(Contender):
    """psycopg2's ThreadedConnectionPool with RealDictCursor (the original design).

    ThreadedConnectionPool raises instead of waiting when it is empty, so a
    semaphore of the pool's size queues the threads, as its users have to.
    Reads end with putconn, which rolls the implicit transaction back.
    """

    name = "psycopg2"
    label = "psycopg2 ThreadedConnectionPool + RealDictCursor"
    rows = "RealDict"

    def open(self, target: Target, max_threads: int) -> None:
        from psycopg2.pool import ThreadedConnectionPool

        self.pool = ThreadedConnectionPool(POOL_SIZE, POOL_SIZE, target.conninfo())
        self.gate = threading.BoundedSemaphore(POOL_SIZE)

    def close(self) -> None:
        self.pool.closeall()

    def _op(self, workload: str, thread: int) -> Op:
        from psycopg2.extras import RealDictCursor

        pool, gate = self.pool, self.gate
        if workload == "pk":

            def pk(rng: random.Random) -> float:
                key = _key(rng)
                gate.acquire()
                conn = pool.getconn()
                t = perf_counter()
                try:
                    with conn.cursor(cursor_factory=RealDictCursor) as cur:
                        cur.execute(PK, (key,))
                        cur.fetchone()
                finally:
                    pool.putconn(conn)
                    gate.release()
                return t

            return pk
        if workload == "fetch100":

            def fetch100(rng: random.Random) -> float:
                bounds = _range(rng)
                gate.acquire()
                conn = pool.getconn()
                t = perf_counter()
                try:
                    with conn.cursor(cursor_factory=RealDictCursor) as cur:
                        cur.execute(RANGE, bounds)
                        cur.fetchall()
                finally:
                    pool.putconn(conn)
                    gate.release()
                return t

            return fetch100
        if workload == "insert":

            def insert(rng: random.Random) -> float:
                args = (_key(rng), rng.randint(1, 100))
                gate.acquire()
                conn = pool.getconn()
                t = perf_counter()
                try:
                    with conn.cursor(cursor_factory=RealDictCursor) as cur:
                        cur.execute(INSERT, args)
                    conn.commit()
                finally:
                    pool.putconn(conn)
                    gate.release()
                return t

            return insert
        if workload == "insert10":

            def insert10(rng: random.Random) -> float:
                rows = [(_key(rng), rng.randint(1, 100)) for _ in range(BATCH)]
                gate.acquire()
                conn = pool.getconn()
                t = perf_counter()
                try:
                    with conn.cursor(cursor_factory=RealDictCursor) as cur:
                        for row in rows:
                            cur.execute(INSERT, row)
                    conn.commit()
                finally:
                    pool.putconn(conn)
                    gate.release()
                return t

            return insert10

        def txn3(rng: random.Random) -> float:
            account, amount, item = _account(rng), rng.randint(1, 100), _key(rng)
            gate.acquire()
            conn = pool.getconn()
            t = perf_counter()
            try:
                with conn.cursor(cursor_factory=RealDictCursor) as cur:
                    cur.execute(TX_SELECT, (account,))
                    cur.fetchone()
                    cur.execute(TX_UPDATE, (amount, account))
                    cur.execute(INSERT, (item, amount))
                conn.commit()
            finally:
                pool.putconn(conn)
                gate.release()
            return t

        return txn3

    def fetch_rows(self, n: int) -> int:
        from psycopg2.extras import RealDictCursor

        conn = self.pool.getconn()
        try:
            with conn.cursor(cursor_factory=RealDictCursor) as cur:
                cur.execute(FIRST_N, (n,))
                return len(cur.fetchall())
        finally:
            self.pool.putconn(conn)


# --- asyncpg pool -------------------------------------------------------------------------


class AsyncpgPool(Contender):
    """asyncpg's pool (Record rows), the async reference; "threads" are tasks on one event loop."""

    name = "asyncpg"
    label = "asyncpg pool (tasks on one event loop), Record rows"
    rows = "Record"

    def open(self, target: Target, max_threads: int) -> None:
        import asyncpg

        self.loop = asyncio.new_event_loop()
        kwargs = target.connect_kwargs()

        async def make() -> Any:
            return await asyncpg.create_pool(**kwargs, ssl=False, min_size=POOL_SIZE, max_size=POOL_SIZE)

        self.pool = self.loop.run_until_complete(make())

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.close())
        self.loop.close()

    def run(self, workload: str, threads: int, duration: float, warmup: float) -> dict[str, Any]:
        return self.loop.run_until_complete(run_tasks(lambda i: self._aop(workload), threads, duration, warmup))

    def run_ops(self, workload: str, count: int) -> None:
        op = self._aop(workload)

        async def go() -> None:
            rng = random.Random(1)
            for _ in range(count):
                await op(rng)

        self.loop.run_until_complete(go())

    def _aop(self, workload: str) -> AsyncOp:
        pool = self.pool
        pk_sql, range_sql, insert_sql = _dollar(PK), _dollar(RANGE), _dollar(INSERT)
        select_sql, update_sql = _dollar(TX_SELECT), _dollar(TX_UPDATE)

        async def pk(rng: random.Random) -> float:
            key = _key(rng)
            async with pool.acquire() as conn:
                t = perf_counter()
                await conn.fetchrow(pk_sql, key)
            return t

        async def fetch100(rng: random.Random) -> float:
            lo, hi = _range(rng)
            async with pool.acquire() as conn:
                t = perf_counter()
                await conn.fetch(range_sql, lo, hi)
            return t

        async def insert(rng: random.Random) -> float:
            item, qty = _key(rng), rng.randint(1, 100)
            async with pool.acquire() as conn:
                t = perf_counter()
                await conn.execute(insert_sql, item, qty)
            return t

        async def txn3(rng: random.Random) -> float:
            account, amount, item = _account(rng), rng.randint(1, 100), _key(rng)
            async with pool.acquire() as conn:
                t = perf_counter()
                async with conn.transaction():
                    await conn.fetchrow(select_sql, account)
                    await conn.execute(update_sql, amount, account)
                    await conn.execute(insert_sql, item, amount)
            return t

        async def insert10(rng: random.Random) -> float:
            rows = [(_key(rng), rng.randint(1, 100)) for _ in range(BATCH)]
            async with pool.acquire() as conn:
                t = perf_counter()
                async with conn.transaction():
                    for item, qty in rows:
                        await conn.execute(insert_sql, item, qty)
            return t

        ops: dict[str, Callable[[random.Random], Awaitable[float]]] = {
            "pk": pk,
            "fetch100": fetch100,
            "insert": insert,
            "txn3": txn3,
            "insert10": insert10,
        }
        return ops[workload]

    def fetch_rows(self, n: int) -> int:
        async def go() -> int:
            async with self.pool.acquire() as conn:
                return len(await conn.fetch(_dollar(FIRST_N), n))

        return self.loop.run_until_complete(go())


# --- SQLAlchemy Core: a plain engine (its own QueuePool) against precog_db.sqlalchemy ----------


class SAPlain(Contender):
    """``sqlalchemy.create_engine("postgresql+psycopg://...")``: its own QueuePool of `POOL_SIZE`, Core ``text()``."""

    name = "sa_plain"
    label = "SQLAlchemy engine, own QueuePool (postgresql+psycopg)"
    rows = "Row"
    workloads = ("pk", "insert", "txn3")

    def open(self, target: Target, max_threads: int) -> None:
        import sqlalchemy

        url = sqlalchemy.URL.create(
            "postgresql+psycopg",
            username=target.user,
            password=target.password or None,
            host=target.host,
            port=target.port,
            database=target.dbname,
            query={"sslmode": "disable"},
        )
        self.engine = sqlalchemy.create_engine(url, pool_size=POOL_SIZE, max_overflow=0, pool_timeout=60)
        self._warm()

    def _warm(self) -> None:
        conns = [self.engine.connect() for _ in range(POOL_SIZE)]
        for conn in conns:
            conn.close()

    def close(self) -> None:
        self.engine.dispose()

    def _op(self, workload: str, thread: int) -> Op:
        from sqlalchemy import text

        engine = self.engine
        pk_q, insert_q = text(_named(PK, "k")), text(_named(INSERT, "i", "q"))
        sel_q, upd_q = text(_named(TX_SELECT, "a")), text(_named(TX_UPDATE, "m", "a"))
        if workload == "pk":

            def pk(rng: random.Random) -> float:
                key = _key(rng)
                with engine.connect() as conn:
                    t = perf_counter()
                    conn.execute(pk_q, {"k": key}).fetchone()
                return t

            return pk
        if workload == "insert":

            def insert(rng: random.Random) -> float:
                args = {"i": _key(rng), "q": rng.randint(1, 100)}
                with engine.begin() as conn:
                    t = perf_counter()
                    conn.execute(insert_q, args)
                return t

            return insert

        def txn3(rng: random.Random) -> float:
            account, amount, item = _account(rng), rng.randint(1, 100), _key(rng)
            with engine.begin() as conn:
                t = perf_counter()
                conn.execute(sel_q, {"a": account}).fetchone()
                conn.execute(upd_q, {"m": amount, "a": account})
                conn.execute(insert_q, {"i": item, "q": amount})
            return t

        return txn3

    def fetch_rows(self, n: int) -> int:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return len(conn.execute(text(_named(FIRST_N, "n")), {"n": n}).fetchall())


class SAPrecog(SAPlain):
    """``precog_db.sqlalchemy.create_engine()``: every connection borrowed from precog_db's pool of `POOL_SIZE`."""

    name = "sa_precog"
    label = "precog_db.sqlalchemy engine (precog_db's pool)"

    def open(self, target: Target, max_threads: int) -> None:
        import precog_db
        from precog_db.sqlalchemy import create_engine

        open_precog_pool(precog_db, target)
        self.engine = create_engine(settings=precog_db.get_pool().settings)
        self._warm()

    def close(self) -> None:
        from precog_db import close_pool

        self.engine.dispose()
        close_pool()


def _named(query: str, *names: str) -> str:
    """``%s`` placeholders as SQLAlchemy's ``:name`` ones, in order."""
    for name in names:
        query = query.replace("%s", f":{name}", 1)
    return query


ALL: tuple[type[Contender], ...] = (
    Precog,
    PrecogCommit,
    PrecogPipeline,
    Bare,
    BareDict,
    BareTransaction,
    PsycopgPool,
    Psycopg2Pool,
    AsyncpgPool,
    SAPlain,
    SAPrecog,
)
SCALING: tuple[type[Contender], ...] = (Precog, PrecogTuple, Bare, BareDict, PsycopgPool, Psycopg2Pool, AsyncpgPool)
