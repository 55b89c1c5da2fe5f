"""The process-wide pool of each layer, no I/O: `Registry` and the `initialize_pool` reuse rules.

`precog_db.pool` (sync) and `precog_db.apool` (asyncio) each keep one
`Registry`; they differ only in how they serialize opening a pool (a thread
lock; an `asyncio.Lock` of the loop the pool serves) and in awaiting. The
rules are here once: when an open pool is reused, the error naming what
differs when it cannot be, what a forked child keeps of its parent's pool,
and how `get_pool` reopens it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar

from precog_db._pool_base import PoolBase
from precog_db.connection import check_gate
from precog_db.errors import PoolStateError
from precog_db.settings import DatabaseSettings

#: `DatabaseSettings` fields that do not change what a pooled connection is: the pool's sizing and
#: where the values came from. Every other field must match for `initialize_pool` to reuse a pool.
_NOT_CONNECTION_SETTINGS = frozenset({"pool_min", "pool_max", "pool_timeout", "files", "origins"})
#: Fields whose values are never shown in an error.
_SECRET_SETTINGS = frozenset({"password", "password_provider"})


def same_target(a: DatabaseSettings, b: DatabaseSettings) -> bool:
    """Whether two settings name the same database through the same route (no I/O)."""
    return (a.env, a.host, a.port, a.dbname, a.user, a.pooler, a.replica_hosts) == (
        b.env,
        b.host,
        b.port,
        b.dbname,
        b.user,
        b.pooler,
        b.replica_hosts,
    )


def connection_difference(current: DatabaseSettings, wanted: DatabaseSettings) -> str | None:
    """The first connection setting in which ``wanted`` differs from the open pool's ``current``, or None (no I/O).

    Named with both values, except a secret (the password, the password provider), which is only named.
    """
    for f in dataclasses.fields(current):
        if f.name in _NOT_CONNECTION_SETTINGS:
            continue
        have, want = getattr(current, f.name), getattr(wanted, f.name)
        if have == want:
            continue
        if f.name in _SECRET_SETTINGS:
            return f"a different {f.name}"
        return f"{f.name}={want!r} (the open pool has {f.name}={have!r})"
    return None


def already_open(current: DatabaseSettings, wanted: DatabaseSettings) -> PoolStateError:
    """`initialize_pool` (either layer) for another target while a pool is open."""
    return PoolStateError(
        f"the pool is already open for the {current.describe()}; "
        f"call close_pool() before initializing it for the {wanted.describe()}"
    )


def settings_differ(current: DatabaseSettings, wanted: DatabaseSettings, difference: str) -> PoolStateError:
    """`initialize_pool` (either layer) for the open pool's target but with another connection setting."""
    return PoolStateError(
        f"the pool is already open for the {current.describe()} with other connection settings: "
        f"initialize_pool() asked for {difference}. The open pool's connections do not have what was asked "
        "for; call close_pool() first to reopen it with the new settings, or pass the same settings"
    )


_P = TypeVar("_P", bound=PoolBase)


class Registry(Generic[_P]):
    """The process-wide pool of one layer (sync in `precog_db.pool`, asyncio in `precog_db.apool`), no I/O.

    Holds the open pool; in a forked child, the settings and arguments of the
    pool the parent had open (the child reopens it with them on first use), and
    the inherited pool objects, kept referenced so that their finalizers never
    run in the child (they would talk to the parent's workers).
    """

    def __init__(self) -> None:
        self.pool: _P | None = None
        self.inherited: tuple[DatabaseSettings, dict[str, Any]] | None = None
        self.orphans: list[_P] = []

    def forget_in_child(self) -> None:
        # After fork the child shares the parent's sockets. Closing them would
        # send Terminate on the parent's connections, so the child just drops the
        # inherited pool (psycopg does not PQfinish in a forked child) and opens
        # its own on first use, with the same settings as the parent's pool.
        pool = self.pool
        if pool is not None:
            self.inherited = (pool.settings, pool.pool_kwargs)
            self.orphans.append(pool)
        self.pool = None

    def reuse(self, settings: DatabaseSettings) -> _P | None:
        """The open pool if it serves ``settings``' target with the same connection settings (gate checked),
        None if none is open; else raise `PoolStateError` naming what differs."""
        current = self.pool
        if current is None:
            return None
        if not same_target(current.settings, settings):
            raise already_open(current.settings, settings)
        difference = connection_difference(current.settings, settings)
        if difference is not None:
            raise settings_differ(current.settings, settings, difference)
        check_gate(current.env)
        return current

    def lend_open(self) -> _P | None:
        """`get_pool`'s first step: the open pool (gate checked), or None when one has to be opened."""
        pool = self.pool
        if pool is not None:
            check_gate(pool.env)
        return pool

    def reopen_kwargs(self) -> dict[str, Any]:
        """The `initialize_pool` arguments of `get_pool` when no pool is open: in a forked child, the parent
        pool's settings and arguments; otherwise none (the settings come from the environment)."""
        if self.inherited is None:
            return {}
        settings, pool_kwargs = self.inherited
        return {**pool_kwargs, "settings": settings}

    def take(self) -> _P | None:
        """`close_pool`'s first step: the open pool, no longer registered (None if none was open)."""
        pool, self.pool = self.pool, None
        return pool

    def inherited_settings(self) -> DatabaseSettings | None:
        return None if self.inherited is None else self.inherited[0]
