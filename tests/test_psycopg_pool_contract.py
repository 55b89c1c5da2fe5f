"""The private parts of psycopg_pool that `precog_db.pool` relies on, checked on the installed release.

`PrecogPool` subclasses `psycopg_pool.ConnectionPool` and uses some of its
private members (docs/DESIGN.md, "Coupling to psycopg_pool"). A private name
can change in any release without notice. These tests list every one of them
in one place (`CONTRACT`) and fail loudly, naming docs/DESIGN.md, when one is
missing or has changed kind on the installed psycopg_pool; `make test-lowest`
runs them against the lowest release pyproject.toml allows. They also fail
when one of the sync pool's modules (`POOL_SOURCES`: precog_db/pool.py and
the private modules it is built from) starts using a private name that is not listed here.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest
from psycopg_pool import ConnectionPool
from psycopg_pool.base import AttemptWithBackoff
from psycopg_pool.pool import AddConnection, MaintenanceTask, WaitingClient

import precog_db._pool_lending as pool_lending
import precog_db.pool as precog_pool
from tests._helpers.server import Server

#: The modules `PrecogPool` is written in: itself, its lending and janitor halves, the pool base and
#: the registry it shares with the asyncio pool (docs/DESIGN.md, "The pool base").
POOL_SOURCES = tuple(
    Path(precog_pool.__file__).with_name(name)
    for name in ("pool.py", "_pool_base.py", "_pool_lending.py", "_pool_janitor.py", "_pool_registry.py")
)
WHY = (
    "precog_db.pool depends on this private part of psycopg_pool (see docs/DESIGN.md, 'Coupling to "
    "psycopg_pool'). The installed psycopg_pool {version} changed it: adapt precog_db/pool.py and "
    "docs/DESIGN.md, or exclude this release from the psycopg-pool range in pyproject.toml"
)

#: Methods of `ConnectionPool` that `PrecogPool` calls or overrides, with their parameters (after self).
#: An override whose name changed upstream would silently never be called again.
METHODS: dict[str, tuple[str, ...]] = {
    "_connect": ("timeout",),  # overridden: remembers why a connection attempt failed
    "_add_connection": ("attempt", "growing"),  # overridden: caps the reconnect back-off
    "_get_ready_connection": ("timeout",),  # overridden (LIFO) and called by lend
    "_add_to_pool": ("conn",),  # give_back's fast path
    "_putconn": ("conn", "from_getconn"),  # a connection lent through psycopg_pool's own path goes back
    "_check_open_getconn": (),
    "_maybe_grow_pool": (),
    "schedule_task": ("task", "delay"),  # overridden: counts the retries of failed connection attempts
    "drain": (),  # public, wrapped: replaces every connection after a credential rotation (3.3+)
}
#: Statistics keys (class constants) that `PrecogPool` increments itself.
STAT_KEYS = (
    "_REQUESTS_NUM",
    "_REQUESTS_QUEUED",
    "_REQUESTS_ERRORS",
    "_REQUESTS_WAIT_MS",
    "_CONNECTIONS_LOST",
    "_RETURNS_BAD",
    "_USAGE_MS",  # give_back records the time a connection was lent, as connection() does
)
#: Attributes of an open pool, with what they must be.
POOL_ATTRIBUTES: dict[str, str] = {
    "_pool": "deque",  # the idle connections
    "_waiting": "deque",  # the queued callers (PrecogPool appends its own _Waiter)
    "_lock": "lock",
    "_stats": "counter",
    "_nconns_min": "int",  # low-water mark of idle connections, for max_idle shrinking
    "_closed": "bool",
    "_reset": "optional callable",
    "_check": "optional callable",
    "_drained_at": "float",  # connections created before this are discarded on return (3.3+)
    "_nconns": "int",  # connections the pool counts (the "used" metric: not idle)
    "_min_size": "int",  # how many connections a retired one is replaced up to
    "_pool_full_event": "optional event",  # set when the pool is full (wait()); None once it was
    "_open_implicit": "bool",  # opened by the constructor (open= not given): first use warns
}
#: Attributes psycopg_pool sets on each connection it opens or hands out.
CONNECTION_ATTRIBUTES: dict[str, str] = {
    "_pool": "pool",
    "_created_at": "float",  # 3.3+: with 3.2 every checkin raised AttributeError
    "_expire_at": "float",
}
#: Everything above, plus the back-off class and the waiter interface: the whole contract.
CONTRACT = (
    set(METHODS)
    | set(STAT_KEYS)
    | set(POOL_ATTRIBUTES)
    | set(CONNECTION_ATTRIBUTES)
    | {"AttemptWithBackoff", "AddConnection", "MaintenanceTask", "WaitingClient.set", "WaitingClient.fail"}
)
#: Private names that precog_db.pool defines itself (they must not collide with psycopg_pool's).
OWN_NAMES = {
    "_configure_connection",
    "_last_connect_failure",
    "_last_connect_ok",
    "_retries_pending",
    "_retries_lock",
    "_reply_timeout",
    "_timed_out",
    "_exhausted",
    "_init_faults",
    "_setup",
    "_check_target",
    "_connect_failed",
    "_retry_scheduled",
    "_retry_started",
    "_gate",
    "_precog_poller",
    "_abandon",
    "_bury",
    "_conn",
    "_graves",
    "_hand_over",
    "_lend_once",
    "_passes_check",
    "_lend_waiting",
    "_retire",
    "_served",
    "_user_configure",
    "_connection_kwargs",
    "_lent_after_wait",
    "_metrics_state",
    "_precog_lent",
    "_fold_metrics_soon",
    "_returns",
    "_deferred",
    "_deferred_from_main_thread",
    "_janitor",
    "_init_janitor",
    # issue 22: the pool base shared with the asyncio pool (precog_db._pool_base)
    "_KIND",
    "_API_HINT",
    "_connected",
    "_inherited_through_fork",
    "_returned",
    "_state",
    # issue 21: refusals reported as such, check= back-off
    "_last_refusal",
    "_fail_waiters",
    "_refused",
    "_check_rejected",
    # issue 13 (precog_db.topology): pooler setup, failover reconnect cap, hot-standby discard
    "_max_reconnect_delay",
    "_refuse_standby",
    "_precog_writer",
    "_reconfigure",
    "_session_setup",
    "_writer",
}


def broken(name: str, detail: str) -> str:
    """The failure message for a contract item that no longer holds."""
    return f"psycopg_pool.{name}: {detail}. " + WHY.format(version=psycopg_pool.__version__)


def is_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` is what `POOL_ATTRIBUTES` / `CONNECTION_ATTRIBUTES` expect."""
    checks = {
        "deque": lambda v: type(v).__name__ == "deque",
        "lock": lambda v: all(hasattr(v, m) for m in ("acquire", "release", "__enter__", "__exit__")),
        "counter": lambda v: type(v).__name__ == "Counter",
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "float": lambda v: isinstance(v, float),
        "optional callable": lambda v: v is None or callable(v),
        "optional event": lambda v: v is None or all(hasattr(v, m) for m in ("set", "wait", "is_set")),
        "pool": lambda v: v is None or isinstance(v, ConnectionPool),
    }
    return bool(checks[kind](value))


@pytest.fixture
def open_pool(pg_server: Server, test_db: str) -> Iterator[ConnectionPool[psycopg.Connection[Any]]]:
    """A plain psycopg_pool.ConnectionPool, open on the session's test database."""
    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        pg_server.conninfo(test_db), min_size=1, max_size=1, open=False, name="contract"
    )
    pool.open(wait=True, timeout=30)
    try:
        yield pool
    finally:
        pool.close()


class TestPsycopgPoolContract:
    @pytest.mark.parametrize("name", sorted(METHODS))
    def test_method(self, name: str) -> None:
        """Each ConnectionPool method PrecogPool calls or overrides exists with the expected parameters."""
        method = inspect.getattr_static(ConnectionPool, name, None)
        assert callable(method), broken(f"ConnectionPool.{name}", "the method is gone")
        params = tuple(inspect.signature(method).parameters)[1:]
        assert params == METHODS[name], broken(f"ConnectionPool.{name}", f"its parameters are now {params}")

    @pytest.mark.parametrize("name", STAT_KEYS)
    def test_stat_key(self, name: str) -> None:
        """Each statistics key PrecogPool counts itself is a string constant of ConnectionPool."""
        value = getattr(ConnectionPool, name, None)
        assert isinstance(value, str), broken(f"ConnectionPool.{name}", f"expected a stats key, found {value!r}")

    def test_open_pool_attributes(self, open_pool: ConnectionPool[psycopg.Connection[Any]]) -> None:
        """An open pool has every private attribute PrecogPool reads, each of the expected kind."""
        for name, kind in POOL_ATTRIBUTES.items():
            assert hasattr(open_pool, name), broken(f"ConnectionPool.{name}", "the attribute is gone")
            value = getattr(open_pool, name)
            assert is_kind(value, kind), broken(f"ConnectionPool.{name}", f"expected {kind}, found {value!r}")

    def test_connection_attributes(self, open_pool: ConnectionPool[psycopg.Connection[Any]]) -> None:
        """A connection from the pool carries the private attributes PrecogPool's checkin reads."""
        with open_pool.connection() as conn:
            for name, kind in CONNECTION_ATTRIBUTES.items():
                assert hasattr(conn, name), broken(f"connection.{name}", "the pool no longer sets it")
                value = getattr(conn, name)
                assert is_kind(value, kind), broken(f"connection.{name}", f"expected {kind}, found {value!r}")

    def test_backoff_attempt(self) -> None:
        """AttemptWithBackoff still has the delay and DELAY_BACKOFF PrecogPool uses to cap reconnect pauses."""
        attempt = AttemptWithBackoff(timeout=10.0)
        assert isinstance(attempt.delay, float), broken("base.AttemptWithBackoff.delay", "not a float")
        assert isinstance(AttemptWithBackoff.DELAY_BACKOFF, float | int) and AttemptWithBackoff.DELAY_BACKOFF > 1, (
            broken("base.AttemptWithBackoff.DELAY_BACKOFF", "not a factor above 1")
        )
        attempt.update_delay(0.0)
        assert attempt.delay > 0, broken("base.AttemptWithBackoff.update_delay", "no longer sets a delay")
        assert attempt.time_to_give_up(1000.0), broken("base.AttemptWithBackoff.time_to_give_up", "never gives up")

    def test_add_connection_task(self, open_pool: ConnectionPool[psycopg.Connection[Any]]) -> None:
        """AddConnection is still the maintenance task that (re)opens one connection, taking an attempt."""
        assert isinstance(AddConnection, type) and issubclass(AddConnection, MaintenanceTask), broken(
            "pool.AddConnection", "no longer a MaintenanceTask"
        )
        params = tuple(inspect.signature(AddConnection).parameters)
        assert params[:3] == ("pool", "attempt", "growing"), broken("pool.AddConnection", f"now takes {params}")

    def test_callable_kwargs_are_resolved_for_every_connection(self, pg_server: Server, test_db: str) -> None:
        """A callable ``kwargs=`` is called for each new connection, drain() included (how rotated passwords work)."""
        calls: list[int] = []

        def kwargs() -> dict[str, Any]:
            calls.append(1)
            return {"application_name": f"contract-{len(calls)}"}

        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            pg_server.conninfo(test_db), kwargs=kwargs, min_size=1, max_size=1, open=False, name="contract-kw"
        )
        pool.open(wait=True, timeout=30)
        try:
            with pool.connection() as conn:
                first = conn.execute("SELECT current_setting('application_name')").fetchone()
            pool.drain()
            with pool.connection(timeout=30) as conn:
                second = conn.execute("SELECT current_setting('application_name')").fetchone()
        finally:
            pool.close()
        assert first == ("contract-1",), broken("ConnectionPool(kwargs=callable)", "the callable is not used")
        assert second == ("contract-2",), broken("ConnectionPool.drain", "did not reopen with fresh kwargs")

    @pytest.mark.parametrize(("name", "params"), [("set", ("conn",)), ("fail", ("error",))])
    def test_waiter_interface(self, name: str, params: tuple[str, ...]) -> None:
        """psycopg_pool's waiting client still has the set/fail interface PrecogPool's _Waiter implements."""
        method = getattr(WaitingClient, name, None)
        assert callable(method), broken(f"pool.WaitingClient.{name}", "the method is gone")
        assert tuple(inspect.signature(method).parameters)[1:] == params, broken(
            f"pool.WaitingClient.{name}", "its parameters changed"
        )
        assert callable(getattr(pool_lending._Waiter, name, None))


class TestContractIsComplete:
    def private_names_used(self) -> set[str]:
        """Every ``x._name`` attribute that the sync pool's modules read or write (dunders excluded)."""
        return {
            node.attr
            for source in POOL_SOURCES
            for node in ast.walk(ast.parse(source.read_text()))
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        }

    def test_the_sources_are_the_pools_modules(self) -> None:
        """`POOL_SOURCES` names existing files, and every module `precog_db.pool` builds `PrecogPool` from."""
        assert all(source.is_file() for source in POOL_SOURCES), POOL_SOURCES
        homes = {
            Path(inspect.getfile(cls)).name
            for cls in precog_pool.PrecogPool.__mro__
            if cls.__module__.startswith("precog_db")
        }
        assert homes <= {source.name for source in POOL_SOURCES}, homes

    def test_every_private_name_is_listed(self) -> None:
        """Each private name the sync pool's modules use is either in the contract above or precog_db's own."""
        unlisted = self.private_names_used() - CONTRACT - OWN_NAMES
        assert not unlisted, (
            f"the sync pool's modules use {sorted(unlisted)}, which tests/test_psycopg_pool_contract.py does not list. "
            "If they are psycopg_pool's, add them to the contract and to docs/DESIGN.md ('Coupling to "
            "psycopg_pool'); if precog_db defines them, add them to OWN_NAMES"
        )

    def test_every_name_imported_from_psycopg_pool_internals_is_listed(self) -> None:
        """Each name the sync pool's modules import from a psycopg_pool submodule is in the contract above."""
        imported = {
            alias.name
            for source in POOL_SOURCES
            for node in ast.walk(ast.parse(source.read_text()))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("psycopg_pool.")
            for alias in node.names
        }
        assert imported and not imported - CONTRACT, (
            f"the sync pool's modules import {sorted(imported - CONTRACT)} from psycopg_pool's internals; "
            "list them in tests/test_psycopg_pool_contract.py and docs/DESIGN.md ('Coupling to psycopg_pool')"
        )

    def test_own_names_do_not_shadow_psycopg_pool(self) -> None:
        """No private name precog_db.pool defines for itself overrides one of psycopg_pool's by accident."""
        upstream = set(dir(ConnectionPool)) | set(vars(ConnectionPool("", open=False))) | set(dir(WaitingClient))
        clashes = OWN_NAMES & upstream
        assert not clashes, broken(", ".join(sorted(clashes)), "now also defined by psycopg_pool")
