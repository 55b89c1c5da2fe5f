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
before each physical connection and `prepare` on it.

Where the code is: the rules that need no I/O (1 to 3, the reply bound's
relay, the messages) in `precog_db._chokepoint`; `connect`, `prepare` and
`PrecogConnection` in `precog_db._connection_sync`, generated from the asyncio
source `precog_db._connection_async` (`connect`, `prepare`,
`AsyncPrecogConnection`: the same names, awaited; docs/DESIGN.md, "Sync and
async from one source"). This module re-exports them and keeps what only the
sync layer does: pinning a tool's target.

`connection_kwargs` is what reaches libpq for every connection, the pool's
included: the settings' parameters with the password resolved now
(`precog_db._credentials.resolve_credentials`: ``DB_PASSWORD_FILE`` re-read,
the password provider called), so a rotated credential needs no restart.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import Connection

from precog_db._chokepoint import (
    _GATE,
    BoundedConnection,
    Pin,
    _bounded,
    _Silent,
    arm,
    check_gate,
    check_target,
    connection_kwargs,
    direct_settings,
    failure_reason,
    gate_allows,
    reply_timeout,
    silent_error,
    unavailable_error,
)
from precog_db._connection_sync import PrecogConnection, connect, prepare
from precog_db.settings import DatabaseSettings

__all__ = [
    "_GATE",
    "BoundedConnection",
    "Pin",
    "PrecogConnection",
    "_Silent",
    "_bounded",
    "arm",
    "check_gate",
    "check_target",
    "connect",
    "connection_kwargs",
    "direct_settings",
    "failure_reason",
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
