"""examples/fastapi_service.py with FastAPI's TestClient against the real server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from precog_db import apool
from tests._helpers.faults import wait_until
from tests._helpers.server import Server
from tests.test_chokepoint import drop_database, make_database, sessions_on


@pytest.fixture
def dev_env(pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = make_database(pg_server, f"sa_api_{uuid.uuid4().hex[:8]}")
    for key, value in {**pg_server.env_vars(name), "PRECOG_ENV": "dev", "DB_SSLMODE": "disable"}.items():
        monkeypatch.setenv(key, value)
    yield name
    drop_database(pg_server, name)


def test_read_and_write_endpoints(pg_server: Server, dev_env: str) -> None:
    from examples.fastapi_service import app

    with TestClient(app) as client:
        assert client.get("/notes").json() == []
        created = client.post("/notes", json={"body": "first"})
        assert created.status_code == 201 and created.json()["body"] == "first"
        assert [n["body"] for n in client.get("/notes").json()] == ["first"]
        assert client.post("/notes", json={}).status_code == 422  # bad input: nothing written
        assert len(client.get("/notes").json()) == 1
        assert apool.active_pool() is not None
    # the lifespan closed the pool: no session of ours is left on the server (a backend leaves
    # pg_stat_activity a moment after its client closed the socket: wait for it, bounded)
    assert apool.active_pool() is None
    assert wait_until(lambda: sessions_on(pg_server, dev_env) == 0, timeout=10), "a session outlived the pool"


def test_prod_without_confirmation_never_serves(pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from examples.fastapi_service import app
    from precog_db.errors import ProductionAccessError

    name = make_database(pg_server, f"x_precogprod_{uuid.uuid4().hex[:8]}")
    try:
        for key, value in {**pg_server.env_vars(name), "DB_SSLMODE": "disable"}.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(ProductionAccessError), TestClient(app):
            pass
        assert sessions_on(pg_server, name) == 0
    finally:
        drop_database(pg_server, name)
