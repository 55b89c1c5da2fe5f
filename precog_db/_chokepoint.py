"""The chokepoint's rules that need no I/O, shared by both layers: import them from `precog_db.connection`.

The gate (`gate_allows`, `check_gate`), `check_target` (the naming rule, the
gate, the production guard), `connection_kwargs` (the credentials resolved
now), `direct_settings`, the reply bound (`reply_timeout`, the `_bounded`
relay, `BoundedConnection`, `arm`, `silent_error`), `Pin`, and the error for a
server that cannot be reached. The I/O that uses them (`connect`, `prepare`,
the connection classes) is written once in `precog_db._connection_async`, from
which `precog_db._connection_sync` is generated; `precog_db.connection`
re-exports both and explains the chokepoint.
"""

from __future__ import annotations

import contextvars
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import monotonic
from typing import Any, TypeVar

from psycopg.pq import TransactionStatus
from psycopg.pq.abc import PGconn

from precog_db._credentials import resolve_credentials
from precog_db._secrets import scrub_text
from precog_db.environment import Environment
from precog_db.errors import (
    ConfigurationError,
    ConnectionLostError,
    DatabaseUnavailableError,
    EnvironmentNotAllowedError,
)
from precog_db.guard import require_production_confirmation
from precog_db.settings import DatabaseSettings, check_name_matches

__all__ = [
    "BoundedConnection",
    "Pin",
    "arm",
    "check_gate",
    "check_target",
    "connection_kwargs",
    "direct_settings",
    "failure_reason",
    "gate_allows",
    "reply_timeout",
    "silent_error",
    "unavailable_error",
]

#: Grace added to the statement timeout when DB_TCP_USER_TIMEOUT is 0 (the OS default).
_DEFAULT_REPLY_GRACE = 30.0

#: The environments the innermost running `dangerous_operation` allows; None outside any gate.
_GATE: contextvars.ContextVar[tuple[str, tuple[Environment, ...]] | None] = contextvars.ContextVar(
    "precog_db_gate", default=None
)


# --- the gate ------------------------------------------------------------------------------------


@contextmanager
def gate_allows(operation: str, allowed: tuple[Environment, ...]) -> Iterator[None]:
    """While the block runs, refuse every connection to an environment outside ``allowed``.

    Nested gates narrow: the innermost one's environments must also be
    allowed by every outer one, so a gated helper called from a gated function
    cannot widen what the outer call allows.
    """
    outer = _GATE.get()
    if outer is not None:
        allowed = tuple(e for e in allowed if e in outer[1])
    token = _GATE.set((operation, allowed))
    try:
        yield
    finally:
        _GATE.reset(token)


def check_gate(env: Environment) -> None:
    """Raise `EnvironmentNotAllowedError` if a running gated operation does not allow ``env``."""
    gate = _GATE.get()
    if gate is None or env in gate[1]:
        return
    operation, allowed = gate
    names = ", ".join(e.value for e in allowed) or "no environment"
    raise EnvironmentNotAllowedError(
        f"{operation} is allowed only in {names}, but it was about to use a {env.value} database; "
        "nothing was run on it. (The database a call actually uses is checked, not just the resolved "
        "environment: a pool inherited through fork() or opened with explicit settings counts too)"
    )


# --- before connecting ---------------------------------------------------------------------------


def check_target(
    settings: DatabaseSettings, *, operation: str, prod_confirmed: bool | None = None, quiet: bool = False
) -> None:
    """Every check that needs no connection: the naming rule, the gate, the production guard.

    ``prod_confirmed`` None reads ``PRECOG_PROD_CONFIRMED`` from the process
    environment now. ``quiet`` skips the ``production_access`` event (the pool
    logs it once, when it opens, not for each connection). Raises before any
    byte is sent to the server.
    """
    check_name_matches(settings)
    check_gate(settings.env)
    require_production_confirmation(settings, confirmed=prod_confirmed, operation=operation, quiet=quiet)


def connection_kwargs(settings: DatabaseSettings) -> dict[str, Any]:
    """Keyword arguments for one new connection to ``settings``, credentials resolved now (they include the password).

    The one place a connection's password is decided: `connect`, the pool
    (for each physical connection) and `tool_connection_args` call it.
    """
    kwargs = settings.connect_kwargs()
    kwargs.pop("password", None)
    kwargs.update(resolve_credentials(settings))
    return kwargs


def direct_settings(settings: DatabaseSettings, *, operation: str) -> DatabaseSettings:
    """The settings of a connection that must reach the database server itself, not a pooler.

    Migrations (their session advisory lock), backups, restores and the stamp
    need a session of their own. Behind a transaction-mode pooler
    (``DB_POOLER=transaction``) that is ``DB_DIRECT_HOST`` / ``DB_DIRECT_PORT``;
    without them the operation is refused (`ConfigurationError`). With no
    pooler, or a session-mode one, the settings are returned as they are.
    """
    if settings.pooler != "transaction":
        return settings
    if not settings.direct_host:
        raise ConfigurationError(
            f"cannot {operation} through a transaction-mode pooler (DB_POOLER=transaction): it needs a session "
            "of its own on the database server (a session advisory lock, pg_dump's snapshot, the stamp), which "
            "PgBouncer in transaction mode does not give. Set DB_DIRECT_HOST and DB_DIRECT_PORT to the database "
            "server itself (not the PgBouncer); nothing was run"
        )
    return settings.replace(host=settings.direct_host, port=settings.direct_port, pooler="none")


# --- the reply bound -----------------------------------------------------------------------------


def reply_timeout(settings: DatabaseSettings) -> float | None:
    """Seconds of silence tolerated while a statement runs; None when unbounded.

    The server ends every statement after ``DB_STATEMENT_TIMEOUT``; if not one
    byte of its answer has arrived ``DB_TCP_USER_TIMEOUT`` later, the path to
    the server is stalled. Without a statement timeout a statement may
    legitimately run for hours, so nothing is bounded.
    """
    if not settings.statement_timeout_ms:
        return None
    grace = settings.tcp_user_timeout_ms / 1000 if settings.tcp_user_timeout_ms else _DEFAULT_REPLY_GRACE
    return settings.statement_timeout_ms / 1000 + grace


_RV = TypeVar("_RV")


class _Silent(Exception):
    def __init__(self, waited: float) -> None:
        super().__init__(f"no reply for {waited:.1f}s")
        self.waited = waited


def _bounded(gen: Generator[Any, Any, _RV], pgconn: PGconn, limit: float) -> Generator[Any, Any, _RV]:
    """Relay psycopg's wait generator; raise `_Silent` when a running statement hears nothing for ``limit`` s.

    psycopg's wait loop wakes the generator every 0.1 s even when the socket
    is quiet (``Ready.NONE``), which is where the clock is checked. Only a
    statement in progress (``ACTIVE``) counts: waiting for notifications is not
    bounded.
    """
    last = monotonic()
    try:
        state = next(gen)
        while True:
            ready = yield state
            now = monotonic()
            if ready:
                last = now
            elif now - last >= limit and pgconn.transaction_status == TransactionStatus.ACTIVE:
                raise _Silent(now - last)
            state = gen.send(ready)
    except StopIteration as done:
        result: _RV = done.value
        return result


class BoundedConnection:
    """What `arm` sets on a connection of either layer: the reply bound and how to name the database."""

    reply_timeout: float | None = None
    description: str = "database"


def silent_error(description: str, waited: float) -> ConnectionLostError:
    """The error for a statement whose reply never came (both layers raise it)."""
    return ConnectionLostError(
        f"no reply from the {description} for {waited:.1f}s while a statement was running "
        f"(DB_STATEMENT_TIMEOUT plus DB_TCP_USER_TIMEOUT): the server or the network path to it is "
        "stalled. The connection was closed and the pool replaces it; retry the operation. "
        "If this was the COMMIT of commit=True, the transaction may or may not have been committed"
    )


def arm(conn: Any, settings: DatabaseSettings) -> None:
    """Set the reply bound and the description on a connection of either layer (no I/O)."""
    if isinstance(conn, BoundedConnection):
        conn.reply_timeout = reply_timeout(settings)
        conn.description = settings.describe()


def unavailable_error(settings: DatabaseSettings, detail: str) -> DatabaseUnavailableError:
    """The error for a server that cannot be reached (``detail``: `failure_reason`)."""
    hint = ""
    if settings.sslmode in ("require", "verify-ca", "verify-full") and "SSL" in detail:
        hint = f" DB_SSLMODE is {settings.sslmode} (from {settings.origins.get('sslmode', 'the arguments')}),"
    return DatabaseUnavailableError(
        f"cannot connect to the {settings.describe()}: {detail}.{hint} "
        "Check that the server is running and that DB_HOST, DB_PORT, DB_NAME, DB_USER, DB_PASSWORD "
        f"and DB_SSLMODE are right (`precog-db --env {settings.env.value} env` shows where each value came from)"
    )


@dataclass(frozen=True)
class Pin:
    """One server, as a checked connection reached it: ``host``, ``port`` and (over TCP) ``hostaddr``.

    `pin_target` makes it; `connect(pin=...)` and `tool_args` use it, so every
    later connection of one operation (a tool's, a re-stamp's) reaches the
    server whose stamp was checked, not whichever one a multi-host ``DB_HOST``
    list, a failover or a DNS change offers next.
    """

    host: str
    port: int
    #: The address ``host`` resolved to; "" for a Unix socket (or libpq before 12, which cannot say).
    hostaddr: str = ""

    def params(self) -> dict[str, Any]:
        """libpq parameters that replace the settings' host and port (and fix the address)."""
        params: dict[str, Any] = {"host": self.host, "port": self.port}
        if self.hostaddr:
            params["hostaddr"] = self.hostaddr
        return params


def failure_reason(exc: BaseException, settings: DatabaseSettings) -> str:
    """libpq's message on one line: "…failed: Connection refused; Is the server running…?"."""
    lines = [line.strip() for line in scrub_text(str(exc), [settings.password]).strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(exc).__name__
