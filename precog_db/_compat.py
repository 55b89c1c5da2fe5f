"""Every private part of psycopg and psycopg_pool that precog_db uses, in one place, for both layers.

precog_db subclasses psycopg_pool's pools, psycopg's cursors, pipelines and
prepared-statement manager, and reads or writes some of their private members
(docs/DESIGN.md, "Coupling to psycopg_pool"). A private name can change in any
release without notice, so they are all here:

1. the private classes and functions, imported here and nowhere else (the
   pools and `precog_db._pipelining` / `precog_db.session` import them from
   this module). A release that drops one fails at import with a message
   naming this module;
2. `PRIVATE`: every private attribute the library reads, writes, calls or
   overrides on a psycopg / psycopg_pool object, grouped by the class that owns
   it, with the kind it must have and what it is used for; `INTERFACES`: the
   public members of those private classes the library relies on.

tests/test_compat.py checks both directions on the installed releases (the
newest, and the lowest pinned in .ci/lowest-versions.txt by ``make test-lowest``):
every private attribute a precog_db module touches on a name that is not
precog_db's own is declared here, every name declared here is used, and each
exists with its kind. This module has no logic and imports nothing of precog_db.
"""

from __future__ import annotations

from typing import NamedTuple

try:
    from psycopg._preparing import PrepareManager
    from psycopg.generators import send
    from psycopg.transaction import OutOfOrderTransactionNesting
    from psycopg_pool.base import AttemptWithBackoff
    from psycopg_pool.pool import AddConnection, MaintenanceTask
    from psycopg_pool.pool_async import AddConnection as AsyncAddConnection
    from psycopg_pool.pool_async import MaintenanceTask as AsyncMaintenanceTask
    from psycopg_pool.pool_async import ReturnConnection as AsyncReturnConnection
    from psycopg_pool.pool_async import StopWorker as AsyncStopWorker
except ImportError as exc:  # pragma: no cover - only with a psycopg/psycopg_pool outside pyproject.toml's ranges
    raise ImportError(
        f"precog_db relies on a private part of psycopg/psycopg_pool that the installed release lacks ({exc}). "
        "Install psycopg and psycopg-pool within the ranges of pyproject.toml, or adapt precog_db/_compat.py "
        "(docs/DESIGN.md, 'Coupling to psycopg_pool')"
    ) from exc

__all__ = [
    "INTERFACES",
    "PRIVATE",
    "AddConnection",
    "AsyncAddConnection",
    "AsyncMaintenanceTask",
    "AsyncReturnConnection",
    "AsyncStopWorker",
    "AttemptWithBackoff",
    "MaintenanceTask",
    "OutOfOrderTransactionNesting",
    "PrepareManager",
    "Private",
    "send",
]


class Private(NamedTuple):
    """One private member of a psycopg / psycopg_pool class that precog_db relies on."""

    name: str
    #: ``method`` (callable on the class; ``params``: its parameters after self, when precog_db overrides it
    #: or passes them by name), ``stats key`` (a string class constant), or the kind of an instance attribute
    #: on a live object (tests/test_compat.py, ``KINDS``).
    kind: str
    #: What precog_db uses it for.
    use: str
    params: tuple[str, ...] | None = None


_METHOD = "method"
_STATS_KEY = "stats key"

#: The members both pool classes share (psycopg_pool's ``BasePool`` / the pool and its asyncio twin).
_POOL_COMMON = (
    Private("_connect", _METHOD, "overridden: remember why a connection attempt failed", ("timeout",)),
    Private("_add_connection", _METHOD, "overridden: cap the reconnect back-off", ("attempt", "growing")),
    Private("_check_open_getconn", _METHOD, "lend refuses a closed pool (and warns for an implicit open)", ()),
    Private("_maybe_grow_pool", _METHOD, "a queued caller lets the pool grow, as getconn does", ()),
    Private("_pool", "deque", "the idle connections: lend pops the newest (LIFO), give_back appends"),
    Private("_waiting", "deque", "the queued callers: precog_db appends its own waiters"),
    Private("_stats", "counter", "the statistics lend/give_back keep, as getconn/putconn do"),
    Private("_nconns_min", "int", "low-water mark of idle connections, for max_idle shrinking"),
    Private("_nconns", "int", "connections the pool counts: the metrics' used count"),
    Private("_min_size", "int", "the pool is full (wait()) once this many are idle"),
    Private("_closed", "bool", "a closed pool closes returned connections; the asyncio registry closes one"),
    Private("_drained_at", "float", "connections opened before a drain() are replaced on return"),
    Private("_reset", "optional callable", "checkin_verdict: a reset= hook sends the connection through it"),
    Private("_check", "optional callable", "lend runs the check= hook on the connection it lends"),
    Private("_pool_full_event", "optional event", "set when the pool is full, as psycopg_pool's return does"),
    Private("_REQUESTS_NUM", _STATS_KEY, "requests_num: one per lend"),
    Private("_REQUESTS_QUEUED", _STATS_KEY, "requests_queued: a lend that waits"),
    Private("_REQUESTS_ERRORS", _STATS_KEY, "requests_errors: a lend that fails"),
    Private("_REQUESTS_WAIT_MS", _STATS_KEY, "requests_wait_ms: time spent queued"),
    Private("_CONNECTIONS_LOST", _STATS_KEY, "connections_lost: a dead idle connection, a failed check="),
    Private("_RETURNS_BAD", _STATS_KEY, "returns_bad: a connection given back broken"),
    Private("_USAGE_MS", _STATS_KEY, "usage_ms: the time connections were lent, by any entry point"),
)

#: The members of both connection classes (psycopg's ``BaseConnection``, and what psycopg_pool sets on it).
_CONNECTION_COMMON = (
    Private("_pool", "pool or None", "psycopg_pool's owner mark: lend sets it, give_back checks and clears it"),
    Private("_created_at", "float", "give_back replaces a connection opened before a drain()"),
    Private("_expire_at", "float", "give_back replaces a connection past max_lifetime"),
    Private("_pipeline", "pipeline or None", "pipelined blocks install theirs; a connection in pipeline mode"),
    Private("_num_transactions", "int", "in a transaction block (the session reset, the pooler's guard)"),
    Private("_autocommit", "bool", "the session reset compares the client attributes without a round trip"),
    Private("_read_only", "optional bool", "the same"),
    Private("_isolation_level", "optional isolation", "the same"),
    Private("_deferrable", "optional bool", "the same"),
    Private("_notice_handlers", "list", "a borrower's notice handlers are removed on return"),
    Private("_notify_handlers", "list", "a borrower's notify handlers are removed on return"),
    Private("_prepared", "prepare manager", "replaced by the tracking PrepareManager; emptied by DISCARD ALL"),
    Private("_adapters", "adapters map", "a borrower's adapters are dropped on return"),
    Private("_start_query", _METHOD, "every cursor calls it before sending: the pooler's guard hooks it"),
    Private("_exec_command", _METHOD, "the session reset's and the pooler's statements, in a generator"),
    Private("_rollback_gen", _METHOD, "the session reset, one generator for both layers"),
    Private("_set_autocommit_gen", _METHOD, "the same"),
    Private("_set_read_only_gen", _METHOD, "the same"),
    Private("_set_isolation_level_gen", _METHOD, "the same"),
    Private("_set_deferrable_gen", _METHOD, "the same"),
)

_CURSOR_COMMON = (
    Private("_conn", "connection", "the connection of a cursor precog_db made (statement marking, pipelining)"),
    Private("_execute_gen", _METHOD, "a commit=True block's first statement, sent behind its BEGIN"),
    Private("_executemany_gen_pipeline", _METHOD, "the same for executemany"),
    Private("_convert_query", _METHOD, "overridden: the session tracker sees each statement's text"),
    Private("_start_query", _METHOD, "overridden: the statement is marked as judged"),
)

_SERVER_CURSOR_COMMON = (
    Private("_make_declare_statement", _METHOD, "overridden: a DECLARE is seen by the session tracker"),
    Private("_withhold", "bool", "WITH HOLD cursors are refused behind a transaction pooler"),
)

_PIPELINE_COMMON = (
    Private("_communicate_gen", _METHOD, "overridden by QueueingPipeline: results fetched once per sync"),
    Private("_sync_gen", _METHOD, "called and overridden: one sync for a whole block"),
    Private("_enter_gen", _METHOD, "entered without psycopg's sync at BEGIN"),
    Private("_enqueue_sync", _METHOD, "QueueingPipeline queues the sync itself"),
    Private("_fetch_gen", _METHOD, "QueueingPipeline reads the results"),
    Private("_exit", _METHOD, "leaving pipeline mode after the block"),
)

#: Owner class ("module.Class") -> its private members precog_db uses. Each pool, connection, cursor and
#: pipeline class is listed with its asyncio twin: both layers rely on the same members.
PRIVATE: dict[str, tuple[Private, ...]] = {
    "psycopg_pool.ConnectionPool": (
        *_POOL_COMMON,
        Private("_get_ready_connection", _METHOD, "overridden: LIFO for psycopg_pool's own getconn", ("timeout",)),
        Private("_putconn", _METHOD, "a connection for the reset= hook goes back through it", ("conn", "from_getconn")),
        Private("_lock", "lock", "the pool lock the sync lending takes"),
        Private("_open_implicit", "bool", "a pool opened by its constructor: psycopg_pool's warning on first use"),
    ),
    "psycopg_pool.AsyncConnectionPool": _POOL_COMMON,
    "psycopg.Connection": _CONNECTION_COMMON,
    "psycopg.AsyncConnection": (
        *_CONNECTION_COMMON,
        Private("_closed", "bool", "the asyncio pool closes a connection without awaiting (pgconn.finish)"),
    ),
    "psycopg.Cursor": _CURSOR_COMMON,
    "psycopg.AsyncCursor": _CURSOR_COMMON,
    "psycopg.ServerCursor": _SERVER_CURSOR_COMMON,
    "psycopg.AsyncServerCursor": _SERVER_CURSOR_COMMON,
    "psycopg.Pipeline": _PIPELINE_COMMON,
    "psycopg.AsyncPipeline": _PIPELINE_COMMON,
    "psycopg.Transaction": (Private("_enter_gen", _METHOD, "a pipelined block's BEGIN, entered under the lock"),),
    "psycopg.AsyncTransaction": (Private("_enter_gen", _METHOD, "the same, asyncio"),),
    "psycopg_pool.pool.MaintenanceTask": (
        Private(
            "_run", _METHOD, "overridden: the sync pool's own worker tasks (replacing retired connections)", ("pool",)
        ),
    ),
    "psycopg._preparing.PrepareManager": (
        Private("_counts", "ordered dict", "emptied with the prepared statements (DISCARD ALL)"),
        Private("_names", "ordered dict", "the same"),
        Private("_to_flush", "deque", "the same"),
    ),
    "psycopg.adapt.AdaptersMap": (
        Private("_dumpers", "dict", "whether a borrower registered adapters (compared by identity)"),
        Private("_dumpers_by_oid", "list", "the same"),
        Private("_loaders", "list", "the same"),
    ),
    "psycopg.types.TypesRegistry": (Private("_registry", "dict", "the same, for registered types"),),
    "psycopg.Error": (Private("_info", "object", "a statement error's diagnostics, kept when it is translated"),),
}

#: Public members of the private classes above that precog_db relies on: class -> member names.
INTERFACES: dict[str, tuple[str, ...]] = {
    "psycopg_pool.base.AttemptWithBackoff": ("delay", "DELAY_BACKOFF", "update_delay", "time_to_give_up"),
    "psycopg_pool.pool.WaitingClient": ("set", "fail"),  # what the pools' own waiters implement
    "psycopg_pool.pool_async.WaitingClient": ("set", "fail"),
    "psycopg._preparing.PrepareManager": ("prepare_threshold", "prepared_max"),
    "psycopg.Pipeline": ("command_queue", "result_queue", "level"),
    "psycopg.AsyncPipeline": ("command_queue", "result_queue", "level"),
}
