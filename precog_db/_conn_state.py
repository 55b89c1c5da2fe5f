"""What precog_db keeps on one psycopg connection: one typed object, `ConnState`, at ``conn._precog``.

Every pooled connection of either layer carries one (`state`), created on
first use (a connection precog_db opened has it from its construction, by
`AsyncPrecogConnection` / `PrecogConnection`; a foreign one gets it when the
library first looks, `precog_db.session.adopt` at the latest). Each field is written by the module
named beside it; nothing else lives on the connection under a ``_precog``
name. Plain attributes with ``__slots__``: the checkout/checkin path reads
several of them per block (docs/PERFORMANCE.md).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConnState", "state"]


class ConnState:
    """precog_db's per-connection state (no I/O)."""

    __slots__ = (
        "adapters_owned",
        "adapters_template",
        "busy",
        "dirty",
        "factories",
        "handlers",
        "lent",
        "own",
        "pending_begin",
        "poller",
        "prepare_threshold",
        "reported",
        "row_factory",
        "setup",
        "shared",
        "writer",
    )

    def __init__(self) -> None:
        # precog_db.session: the borrower isolation.
        #: A statement or call that may have changed the session ran: the return resets it (DISCARD ALL).
        self.dirty = False
        #: A pipeline, a wrapper transaction or a reset is in flight: an interrupt now leaves it set, and the
        #: pool closes the connection instead of lending it again.
        self.busy = False
        #: The next statement comes from one of the library's own cursors (its text is judged there).
        self.own = False
        #: The server session is not this connection's own (a transaction-mode pooler): never DISCARD ALL,
        #: session-level statements refused.
        self.shared = False
        #: The caller's ``configure=`` callback is running (its statements are its own business).
        self.setup = False
        #: The cursor classes installed by `precog_db.session.adopt` (client, server).
        self.factories: tuple[type[Any], type[Any]] | None = None
        #: The state recorded by `precog_db.session.baseline`, put back on every return.
        self.reported: tuple[bytes | None, ...] = ()
        self.row_factory: Any = None
        self.prepare_threshold: int | None = None
        self.handlers: tuple[int, int] = (0, 0)
        self.adapters_template: Any = None
        self.adapters_owned: tuple[Any, ...] = ()
        # precog_db._pipelining: a commit=True block whose BEGIN is not sent yet.
        self.pending_begin: Any = None
        # precog_db._pool_base: lending metrics, the writer rule, the liveness poller.
        #: monotonic() when lent (negative: lent after a wait, recorded already); None when not lent.
        self.lent: float | None = None
        #: The pool that opened it only keeps writers (a hot standby is not lent).
        self.writer = True
        #: (socket, its `precog_db._readable.poller_for` check) for the zero-round-trip liveness check.
        self.poller: tuple[int, Any] | None = None


def state(conn: Any) -> ConnState:
    """``conn``'s `ConnState`, created on first use."""
    try:
        found: ConnState = conn._precog
    except AttributeError:
        found = conn._precog = ConnState()
    return found
