"""The chokepoint: every connection precog_db opens to a database is opened here.

Pool connections, the pool's probe, the CLI's connections, the pytest
plugin's, `stamp_database` / `read_stamp`, and the targets handed to
``pg_dump`` / ``pg_restore`` / ``psql`` all pass through this module, which
enforces every invariant on the settings it is given, however they were built
(`load_settings`, by hand, `replace`, inherited through ``fork()``):

1. **the naming rule**: a database whose name names another environment than
   the settings' is refused (`precog_db.settings.check_name_matches`);
2. **the gate**: inside a call decorated with
   `precog_db.gates.dangerous_operation`, no connection to an environment the
   gate does not allow is opened or lent (`gate_allows`, `check_gate`);
3. **the production guard**: production needs ``PRECOG_PROD_CONFIRMED=yes``
   before any byte is sent (`precog_db.guard.require_production_confirmation`);
4. **the reply bound**: with ``DB_STATEMENT_TIMEOUT`` set, a statement whose
   reply never comes fails after the statement timeout plus
   ``DB_TCP_USER_TIMEOUT`` (`PrecogConnection`), on every connection, the
   probe and the CLI's included;
5. **the identity stamp**: the database's stamp is checked against the
   settings' environment on every new connection (`verify_stamp`), so a
   failover or DNS change to another environment's database is caught too.

`check_target` runs 1 to 3 (no I/O); `prepare` runs 4 and 5 on a fresh connection;
`connect` does both around ``psycopg.connect``; `tool_connection_args` runs `connect`
on a tool's target (so 1 to 5 hold for it too) before handing the tool its arguments. The pool calls `check_target`
before each physical connection and `prepare` on it. The asyncio twins
(`aconnect`, `aprepare`, `PrecogAsyncConnection`) live next door in
`precog_db._aconnection` and share every check, bound and message defined here.

`connection_kwargs` is what reaches libpq for every connection, the pool's
included: the settings' parameters with the password resolved now
(`precog_db._credentials.resolve_credentials`: ``DB_PASSWORD_FILE`` re-read,
the password provider called), so a rotated credential needs no restart.
"""

from __future__ import annotations

import contextvars
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import monotonic
from typing import Any, TypeVar

import psycopg
from psycopg import Connection
from psycopg.pq import TransactionStatus
from psycopg.pq.abc import PGconn

from precog_db._credentials import resolve_credentials
from precog_db._pipeline_sync import begin_pending
from precog_db._secrets import scrub_text
from precog_db._stamp_check import verify_stamp
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
    "PrecogConnection",
    "arm",
    "check_gate",
    "check_target",
    "connect",
    "connection_kwargs",
    "direct_settings",
    "gate_allows",
    "pin_of",
    "pin_target",
    "prepare",
    "reply_timeout",
    "silent_error",
    "tool_args",
    "tool_connection_args",
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


class PrecogConnection(BoundedConnection, Connection[Any]):
    """A psycopg connection that does not wait forever for a server that went silent.

    `reply_timeout` (set by `prepare` from the settings, see `reply_timeout()`)
    bounds how long a statement in progress may go without a byte from the
    server. When it expires the connection is closed and `ConnectionLostError`
    raised; the pool replaces the connection. Set ``conn.reply_timeout = None``
    on a connection from `get_connection` before lifting ``statement_timeout``
    for a deliberately long statement.
    """

    #: A ``commit=True`` block whose ``BEGIN`` is not sent yet (`precog_db._pipelining`); any I/O
    #: other than the block's pipelined first statement sends it here first.
    _precog_pending_begin: Any = None

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        block = self._precog_pending_begin
        if block is not None:
            self._precog_pending_begin = None
            try:
                begin_pending(self, block)
            except BaseException:
                self._precog_busy = True
                self.close()
                raise
        limit = self.reply_timeout
        if limit is None:
            return super().wait(gen, *args, **kwargs)
        try:
            return super().wait(_bounded(gen, self.pgconn, limit), *args, **kwargs)
        except _Silent as silent:
            waited = silent.waited
        # Outside the except block: the half-finished statement leaves the
        # protocol out of step, so the connection cannot be reused.
        self.close()
        raise silent_error(self.description, waited)


def silent_error(description: str, waited: float) -> ConnectionLostError:
    """The error for a statement whose reply never came (both layers raise it)."""
    return ConnectionLostError(
        f"no reply from the {description} for {waited:.1f}s while a statement was running "
        f"(DB_STATEMENT_TIMEOUT plus DB_TCP_USER_TIMEOUT): the server or the network path to it is "
        "stalled. The connection was closed and the pool replaces it; retry the operation. "
        "If this was the COMMIT of commit=True, the transaction may or may not have been committed"
    )


# --- after connecting ----------------------------------------------------------------------------


def prepare(conn: Connection[Any], settings: DatabaseSettings, *, verify: bool = True, quiet: bool = False) -> None:
    """The checks that need the fresh connection: arm the reply bound, then verify the identity stamp.

    ``verify`` False skips the stamp (only for `stamp_database`, which writes
    it, and for maintenance connections to a server's admin database).
    ``quiet`` suppresses the warnings an unstamped dev/test database or a
    same-environment copy log (the pool logs them once, at open). Closes the
    connection and re-raises if a check fails.
    """
    arm(conn, settings)
    if not verify:
        return
    try:
        verify_stamp(settings, conn, quiet=quiet)
    except BaseException:
        conn.close()
        raise


def arm(conn: Any, settings: DatabaseSettings) -> None:
    """Set the reply bound and the description on a connection of either layer (no I/O)."""
    if isinstance(conn, BoundedConnection):
        conn.reply_timeout = reply_timeout(settings)
        conn.description = settings.describe()


def connect(
    settings: DatabaseSettings,
    *,
    operation: str,
    prod_confirmed: bool | None = None,
    verify: bool = True,
    autocommit: bool = True,
    direct: bool = False,
    pin: Pin | None = None,
) -> PrecogConnection:
    """Open one connection after every check (see the module docstring), or raise.

    ``direct`` True: to the database server itself even behind a pooler
    (`direct_settings`; migrations, backups, restores, the stamp). A server
    that cannot be reached raises `DatabaseUnavailableError` with libpq's
    reason (password scrubbed). The connection is autocommit unless told
    otherwise; the caller closes it. Behind a transaction-mode pooler it
    prepares no statement on the server (``prepare_threshold=None``).
    ``pin`` (`pin_target`) sends it to exactly that server, whatever
    ``settings``' host list or DNS say now.
    """
    if direct:
        settings = direct_settings(settings, operation=operation)
    check_target(settings, operation=operation, prod_confirmed=prod_confirmed)
    prepare_threshold = None if settings.pooler == "transaction" else 5
    # Resolved before the try: a provider's DatabaseUnavailableError is an OperationalError, and is not
    # a server that cannot be reached (it must not be wrapped as one).
    kwargs = connection_kwargs(settings)
    if pin is not None:
        kwargs.update(pin.params())
    try:
        conn = PrecogConnection.connect(**kwargs, autocommit=autocommit, prepare_threshold=prepare_threshold)
    except psycopg.OperationalError as exc:
        detail = failure_reason(exc, settings)
    else:
        prepare(conn, settings, verify=verify)
        return conn
    # Raised outside the except block on purpose: the psycopg error (and the
    # frames of psycopg.connect, whose locals hold the full conninfo with the
    # password) must not stay reachable as __context__ of what we raise.
    raise unavailable_error(settings, detail)


def unavailable_error(settings: DatabaseSettings, detail: str) -> DatabaseUnavailableError:
    """The error for a server that cannot be reached (``detail``: `failure_reason`)."""
    hint = ""
    if settings.sslmode in ("require", "verify-ca", "verify-full") and "SSL" in detail:
        hint = f" DB_SSLMODE is {settings.sslmode} (from {settings.origins.get('sslmode', 'the arguments')}),"
    return DatabaseUnavailableError(
        f"cannot connect to the {settings.describe()}: {detail}.{hint} "
        "Check that the server is running and that DB_HOST, DB_PORT, DB_NAME, DB_USER, DB_PASSWORD "
        "and DB_SSLMODE are right (`precog-db env` shows where each value came from)"
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


def pin_target(
    settings: DatabaseSettings, *, operation: str, prod_confirmed: bool | None = None, pin: Pin | None = None
) -> tuple[DatabaseSettings, Pin]:
    """Check ``settings``' target like a connection (`connect`, stamp included) and pin the server it reached.

    Returns the settings the work goes to (``DB_DIRECT_HOST`` behind a
    transaction pooler, `direct_settings`) and the `Pin` of the server whose
    stamp was just verified. With ``pin`` the check goes to that server (to
    check it again later in one operation) and the same server is returned.
    """
    settings = direct_settings(settings, operation=operation)
    checked = connect(settings, operation=operation, prod_confirmed=prod_confirmed, pin=pin)
    try:
        return settings, pin_of(checked)
    finally:
        checked.close()


def pin_of(conn: Connection[Any]) -> Pin:
    """The `Pin` of the server an open connection reached."""
    try:
        hostaddr = conn.info.hostaddr
    except psycopg.NotSupportedError:  # libpq before 12 cannot say; host and port still pin it
        hostaddr = ""
    return Pin(conn.info.host, conn.info.port, hostaddr)


def tool_args(settings: DatabaseSettings, pin: Pin) -> tuple[list[str], dict[str, str]]:
    """The ``--dbname=<conninfo>`` argument and the environment of a tool pinned to ``pin``.

    See `tool_connection_args`.
    """
    import os

    from psycopg.conninfo import make_conninfo

    # No password (PGPASSWORD below) and no ``options``: the tools set their own statement_timeout.
    params = connection_kwargs(settings)
    password = params.pop("password", None)
    params.pop("options", None)
    params.update(pin.params())
    params["application_name"] = f"{settings.application_name} backup".strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password:
        env["PGPASSWORD"] = password
    return [f"--dbname={make_conninfo('', **params)}", "--no-password"], env


def tool_connection_args(
    settings: DatabaseSettings, *, operation: str = "run a PostgreSQL tool", prod_confirmed: bool | None = None
) -> tuple[list[str], dict[str, str]]:
    """The ``--dbname=<conninfo>`` argument and the environment that point ``pg_dump`` / ``pg_restore`` at ``settings``.

    The target is checked exactly like a connection, here, so no caller can
    skip it: behind a transaction-mode pooler it is ``DB_DIRECT_HOST``
    (`direct_settings`); then `connect` opens one connection to it (the naming
    rule, the gate, the production guard, and the identity stamp verified on
    the server itself) and closes it (`pin_target`). The tool is then pinned to the server
    whose stamp was read: the ``host`` and ``port`` that connection used and,
    over TCP, the address it resolved to (``hostaddr``), so a multi-host list
    or a DNS change cannot send the tool elsewhere.

    Every connection parameter is a quoted value inside one conninfo string
    (``psycopg.conninfo.make_conninfo``), so a database name such as
    ``dbname=x`` or ``postgresql://…`` is a name and never expanded as a
    connection string by libpq. The password is not in it: it travels only as
    ``PGPASSWORD`` in the returned environment, from which every other ``PG*``
    variable is removed (none of them may redirect the tool). The password is
    resolved now (`connection_kwargs`): a ``DB_PASSWORD_FILE`` is read, a
    provider called; a ``DB_PASSFILE`` goes in the conninfo as ``passfile``.
    """
    settings, pin = pin_target(settings, operation=operation, prod_confirmed=prod_confirmed)
    return tool_args(settings, pin)


def failure_reason(exc: BaseException, settings: DatabaseSettings) -> str:
    """libpq's message on one line: "…failed: Connection refused; Is the server running…?"."""
    lines = [line.strip() for line in scrub_text(str(exc), [settings.password]).strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(exc).__name__
