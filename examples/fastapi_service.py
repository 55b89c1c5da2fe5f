"""A small FastAPI service on precog_db: SQLAlchemy's async ORM over precog_db.aio's pool.

* the lifespan opens the pool (``create_async_engine`` opens or reuses ``precog_db.aio``'s process-wide
  pool: the production guard, the naming rule and the identity stamp are checked before the app serves)
  and closes it at shutdown;
* a dependency yields a session: ``read_session`` from a read-only engine (every transaction
  ``BEGIN READ ONLY``), ``write_session`` from the normal one, committed when the request succeeds;
* ``GET /notes`` reads, ``POST /notes`` writes.

Run it with ``uvicorn examples.fastapi_service:app`` once your dev settings point at a server
(``make demo`` starts one). Needs ``pip install 'precog-db[sqlalchemy]' fastapi``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from precog_db import aio
from precog_db.sqlalchemy import create_async_engine


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(500))


class NoteIn(BaseModel):
    body: str


class NoteOut(BaseModel):
    id: int
    body: str


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = await create_async_engine()  # the environment: PRECOG_ENV, DB_NAME, config/.env
    reports = await create_async_engine(read_only=True)  # the same pool, read-only transactions
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    app.state.writer = async_sessionmaker(engine, expire_on_commit=False)
    app.state.reader = async_sessionmaker(reports)
    try:
        yield
    finally:
        await reports.dispose()
        await engine.dispose()
        await aio.close_pool()


async def read_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.reader() as session:
        yield session


async def write_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.writer() as session, session.begin():  # commit, or roll back on error
        yield session


app = FastAPI(lifespan=lifespan)


@app.get("/notes")
async def list_notes(session: Annotated[AsyncSession, Depends(read_session)]) -> list[NoteOut]:
    notes = await session.scalars(select(Note).order_by(Note.id))
    return [NoteOut(id=n.id, body=n.body) for n in notes]


@app.post("/notes", status_code=201)
async def add_note(note: NoteIn, session: Annotated[AsyncSession, Depends(write_session)]) -> NoteOut:
    row = Note(body=note.body)
    session.add(row)
    await session.flush()
    return NoteOut(id=row.id, body=row.body)
