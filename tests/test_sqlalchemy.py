"""precog_db.sqlalchemy against the real server: Core, ORM, the guard, the stamp, read-only, the pool's bounds."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from precog_db import pool as precog_pool
from precog_db.environment import Environment
from precog_db.errors import (
    ConfigurationError,
    EnvironmentMismatchError,
    PoolExhaustedError,
    PoolStateError,
    ProductionAccessError,
)
from precog_db.settings import load_settings
from precog_db.sqlalchemy import create_async_engine, create_engine
from precog_db.stamp import stamp_database
from tests._helpers.server import REPO, Server
from tests.test_chokepoint import drop_database, make_database, sessions_on

UNIQUE = uuid.uuid4().hex[:8]


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "sa_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(100))


@pytest.fixture
def dev_db(pg_server: Server) -> Iterator[str]:
    name = make_database(pg_server, f"sa_dev_{UNIQUE}_{uuid.uuid4().hex[:4]}")
    with pg_server.connect(name) as conn:
        conn.execute("CREATE TABLE sa_notes (id int PRIMARY KEY, body varchar(100) NOT NULL)")
    yield name
    precog_pool.close_pool()
    drop_database(pg_server, name)


def dev_settings(pg_server: Server, name: str, **kw: Any) -> Any:
    return pg_server.settings(name, env=Environment.DEV, **kw)


def session_state(conn: sqlalchemy.Connection) -> tuple[str, str]:
    """The pooled session's search_path and transaction status as the next borrower sees them."""
    raw: Any = conn.connection.driver_connection
    return str(raw.execute("SHOW search_path").fetchone()[0]), str(raw.info.transaction_status.name)


def test_core_and_orm_read_and_write_on_dev(pg_server: Server, dev_db: str) -> None:
    engine = create_engine(settings=dev_settings(pg_server, dev_db))
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sa_notes VALUES (1, 'core')"))
    with Session(engine) as session, session.begin():
        session.add(Note(id=2, body="orm"))
    with Session(engine) as session:
        bodies = session.scalars(select(Note.body).order_by(Note.id)).all()
        assert bodies == ["core", "orm"]
        session.add(Note(id=3, body="rolled back"))
        session.flush()
        session.rollback()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sa_notes")).scalar_one() == 2
    # Every DBAPI connection was precog_db's: the one pool holds them, SQLAlchemy's keeps none.
    pool = precog_pool.get_pool()
    assert engine.pool.status() == "NullPool"
    assert pool.get_stats()["pool_size"] <= pool.settings.pool_max


def test_exception_inside_session_begin_rolls_back_and_returns_clean(pg_server: Server, dev_db: str) -> None:
    engine = create_engine(settings=dev_settings(pg_server, dev_db, pool_min=1, pool_max=1))
    with pytest.raises(RuntimeError, match="boom"), Session(engine) as session, session.begin():
        session.add(Note(id=10, body="lost"))
        session.flush()
        session.execute(text("SET search_path TO pg_catalog"))
        session.execute(text("SET SESSION statement_timeout = 1234"))
        raise RuntimeError("boom")
    with engine.connect() as conn:  # pool_max=1: the same physical connection
        assert session_state(conn)[0] == '"$user", public'
        assert conn.execute(text("SHOW statement_timeout")).scalar_one() != "1234ms"
        assert conn.execute(text("SELECT count(*) FROM sa_notes")).scalar_one() == 0
    with precog_pool.get_pool().connection() as raw:
        assert raw.info.transaction_status.name == "IDLE" and raw.autocommit


def test_committed_set_does_not_leak_to_get_cursor(pg_server: Server, dev_db: str) -> None:
    engine = create_engine(settings=dev_settings(pg_server, dev_db, pool_min=1, pool_max=1))
    with engine.begin() as conn:
        conn.execute(text("SET search_path TO pg_catalog"))
    from precog_db.cursors import get_cursor

    with get_cursor() as cur:
        row = cur.execute("SHOW search_path").fetchone()
        assert row is not None and row["search_path"] == '"$user", public'


def test_read_only_engine_is_read_only_on_the_server(pg_server: Server, dev_db: str) -> None:
    settings = dev_settings(pg_server, dev_db)
    reports = create_engine(settings=settings, read_only=True)
    with reports.connect() as conn:
        assert conn.execute(text("SHOW transaction_read_only")).scalar_one() == "on"
        with pytest.raises(sqlalchemy.exc.InternalError, match="read-only transaction"):
            conn.execute(text("INSERT INTO sa_notes VALUES (5, 'no')"))
    with pytest.raises(ConfigurationError, match="read-only"), reports.connect() as conn:
        conn.execution_options(postgresql_readonly=False)
    with pytest.raises(ConfigurationError, match="read-only"), reports.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
    # the writer engine of the same environment shares the one pool
    writer = create_engine(settings=settings)
    with writer.begin() as conn:
        assert conn.execute(text("SHOW transaction_read_only")).scalar_one() == "off"


def test_prod_without_confirmation_is_refused_before_any_session(pg_server: Server) -> None:
    name = make_database(pg_server, f"x_precogprod_{UNIQUE}")
    try:
        settings = load_settings(environ={**pg_server.env_vars(name), "DB_SSLMODE": "disable"})
        assert settings.env is Environment.PROD
        with pytest.raises(ProductionAccessError, match="PRECOG_PROD_CONFIRMED"):
            create_engine(settings=settings)
        assert sessions_on(pg_server, name) == 0
        assert precog_pool.active_pool() is None
    finally:
        drop_database(pg_server, name)


def test_database_stamped_for_another_environment_is_refused(pg_server: Server) -> None:
    name = make_database(pg_server, f"sa_stamped_{UNIQUE}")
    try:
        stamp_database(settings=pg_server.settings(name, env=Environment.STAGING))
        with pytest.raises(EnvironmentMismatchError, match="stamped staging"):
            create_engine(settings=dev_settings(pg_server, name))
    finally:
        drop_database(pg_server, name)


def test_hand_built_kwargs_that_would_make_a_second_pool_are_refused(pg_server: Server, dev_db: str) -> None:
    for kwargs in ({"pool_size": 20}, {"poolclass": sqlalchemy.pool.QueuePool}, {"creator": lambda: None}):
        with pytest.raises(ConfigurationError, match="not accepted"):
            create_engine(settings=dev_settings(pg_server, dev_db), **kwargs)


def test_more_borrowers_than_pool_max_wait_then_time_out_with_precog_error(pg_server: Server, dev_db: str) -> None:
    engine = create_engine(settings=dev_settings(pg_server, dev_db, pool_min=1, pool_max=2, pool_timeout=0.5))
    held = [engine.connect(), engine.connect()]
    try:
        with pytest.raises(PoolExhaustedError):
            engine.connect()
        # a waiter is served as soon as a connection comes back
        got: list[int] = []

        def waiter() -> None:
            with engine.connect() as conn:
                got.append(conn.execute(text("SELECT 1")).scalar_one())

        t = threading.Thread(target=waiter)
        t.start()
        held.pop().close()
        t.join(10)
        assert got == [1]
    finally:
        for c in held:
            c.close()
    assert sessions_on(pg_server, dev_db) <= 2


def test_dispose_and_close_pool_then_reuse(pg_server: Server, dev_db: str) -> None:
    settings = dev_settings(pg_server, dev_db)
    engine = create_engine(settings=settings)
    first = precog_pool.get_pool()
    engine.dispose()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert precog_pool.get_pool() is first  # dispose leaves precog_db's pool alone
    precog_pool.close_pool()
    with engine.connect() as conn:  # reopened for the engine's own settings
        assert conn.execute(text("SELECT current_database()")).scalar_one() == dev_db
    assert precog_pool.get_pool() is not first


def test_engine_refuses_a_pool_open_for_another_database(pg_server: Server, dev_db: str, test_settings: Any) -> None:
    engine = create_engine(settings=dev_settings(pg_server, dev_db))
    precog_pool.close_pool()
    precog_pool.initialize_pool(settings=test_settings)
    with pytest.raises(PoolStateError):
        engine.connect()


def test_fork_child_uses_its_own_connections(pg_server: Server, dev_db: str) -> None:
    engine = create_engine(settings=dev_settings(pg_server, dev_db))
    with engine.connect() as conn:
        parent_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            with engine.connect() as conn:
                child = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            os.write(w, str(child).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    out = os.read(r, 100).decode()
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert int(out) != parent_pid
    # The parent's pool may lend any of its connections; the one the child inherited is still alive
    # (the child neither used nor closed it) and the parent still reads.
    with engine.connect() as conn:
        alive = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": parent_pid})
        assert alive.scalar_one() == 1


def test_async_engine_under_asyncio_run_exits(pg_server: Server, dev_db: str) -> None:
    """A fresh process: the async engine reads and writes under asyncio.run and the process exits."""
    script = """
import asyncio
from sqlalchemy import text
from precog_db import aio
from precog_db.sqlalchemy import create_async_engine

async def main():
    engine = await create_async_engine()
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO sa_notes VALUES (7, 'async')"))
    async with engine.connect() as conn:
        print(await conn.scalar(text("SELECT body FROM sa_notes WHERE id = 7")))
    await engine.dispose()
    await aio.close_pool()

asyncio.run(main())
"""
    env = {**os.environ, **pg_server.env_vars(dev_db), "PRECOG_ENV": "dev", "DB_SSLMODE": "disable"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "async"


def test_async_engine_exhaustion_and_read_only(pg_server: Server, dev_db: str) -> None:
    from precog_db import aio

    async def main() -> None:
        settings = dev_settings(pg_server, dev_db, pool_min=1, pool_max=1, pool_timeout=0.5)
        engine = await create_async_engine(settings=settings)
        reports = await create_async_engine(settings=settings, read_only=True)
        try:
            async with engine.connect() as held:
                await held.execute(text("SELECT 1"))
                with pytest.raises(PoolExhaustedError):
                    async with engine.connect():
                        pass
            async with reports.connect() as conn:
                with pytest.raises(sqlalchemy.exc.InternalError, match="read-only"):
                    await conn.execute(text("INSERT INTO sa_notes VALUES (8, 'no')"))
            async with engine.begin() as conn:
                await conn.execute(text("SET search_path TO pg_catalog"))
            async with engine.connect() as conn:
                assert await conn.scalar(text("SHOW search_path")) == '"$user", public'
                first_pid = await conn.scalar(text("SELECT pg_backend_pid()"))
            async with reports.connect() as conn:  # given back to precog_db's pool, not closed
                assert await conn.scalar(text("SELECT pg_backend_pid()")) == first_pid
        finally:
            await engine.dispose()
            await aio.close_pool()

    asyncio.run(main())


def test_replica_engine_without_replicas_reads_the_primary_read_only(pg_server: Server, dev_db: str) -> None:
    engine = create_engine(settings=dev_settings(pg_server, dev_db), replica=True)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT current_database()")).scalar_one() == dev_db
        with pytest.raises(sqlalchemy.exc.InternalError, match="read-only"):
            conn.execute(text("INSERT INTO sa_notes VALUES (9, 'no')"))


def test_async_engine_prod_refused_before_any_session(pg_server: Server) -> None:
    name = make_database(pg_server, f"x_precogprod_{UNIQUE}a")
    try:
        settings = load_settings(environ={**pg_server.env_vars(name), "DB_SSLMODE": "disable"})
        with pytest.raises(ProductionAccessError, match="PRECOG_PROD_CONFIRMED"):
            asyncio.run(create_async_engine(settings=settings))
        assert sessions_on(pg_server, name) == 0
    finally:
        drop_database(pg_server, name)


def test_two_engines_share_one_pool_and_isolation_does_not_leak(pg_server: Server, dev_db: str) -> None:
    settings = dev_settings(pg_server, dev_db, pool_min=1, pool_max=1)
    first = create_engine(settings=settings)
    pool = precog_pool.active_pool()
    second = create_engine(settings=settings, read_only=True)
    assert precog_pool.active_pool() is pool
    with first.connect() as conn:
        conn = conn.execution_options(isolation_level="SERIALIZABLE")
        assert conn.execute(text("SHOW transaction_isolation")).scalar_one() == "serializable"
        conn.execute(text("SET application_name = 'leaky'"))
    with second.connect() as conn:  # pool_max=1: the same physical connection
        assert conn.execute(text("SHOW transaction_isolation")).scalar_one() == "read committed"
        assert conn.execute(text("SHOW application_name")).scalar_one() != "leaky"
    from precog_db.cursors import get_cursor

    with get_cursor(commit=True) as cur:
        row = cur.execute("SHOW transaction_isolation").fetchone()
        assert row is not None and row["transaction_isolation"] == "read committed"
    assert precog_pool.active_pool() is pool
