"""A guarded database console: one statement through the library (`run_statement`), or psql (`run_shell`).

Both go through the chokepoint every precog_db connection takes (the naming
rule, the production guard, the identity stamp) before anything runs, and both
are read-only unless asked to write.

* `run_statement` runs one statement with `precog_db.get_cursor`
  (``get_cursor(commit=True)`` with ``write=True``); a write without
  ``write=True`` is refused by the read-only transaction and raised as
  `WriteRefusedError`.
* `prepare_shell` checks the target (one connection through
  `precog_db.connection.pin_target`, closed again) and builds psql's command
  line and environment; `run_shell` runs psql and returns its exit code. The
  password reaches psql only through a temporary ``0600`` passfile
  (``PGPASSFILE``), removed when psql ends, also on a failure or ``SIGTERM``;
  never in its argv or environment. psql is pinned to the server whose stamp
  was checked (``PGHOST``/``PGPORT``/``PGHOSTADDR``); behind a pooler
  (``DB_POOLER``) that is ``DB_DIRECT_HOST``, else refused. The session runs with
  ``default_transaction_read_only=on`` unless ``write``, and with
  ``DB_SHELL_STATEMENT_TIMEOUT`` (default 60 s on staging and prod).

``precog-db sql`` and ``precog-db shell`` are thin commands over these (docs/CLI.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from precog_db.environment import Environment
from precog_db.errors import ConfigurationError, PrecogDBError, RefusalError, UsageError
from precog_db.settings import DatabaseSettings

__all__ = [
    "PsqlNotFoundError",
    "ShellPlan",
    "StatementResult",
    "WriteRefusedError",
    "check_psql_args",
    "find_psql",
    "passfile_line",
    "prepare_shell",
    "run_shell",
    "run_statement",
    "shell_environment_summary",
    "signal_names",
]


class WriteRefusedError(RefusalError):
    """A statement that writes was run read-only (without ``write=True`` / ``--write``); nothing was written."""


class PsqlNotFoundError(PrecogDBError, RuntimeError):
    """``psql`` is not on ``PATH``."""


@dataclass(frozen=True)
class StatementResult:
    """What one statement returned: column names and rows (empty for a statement without rows), and its status."""

    columns: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]
    rowcount: int
    status: str


def run_statement(settings: DatabaseSettings, statement: str, *, write: bool = False) -> StatementResult:
    """Run one ``statement`` on ``settings``' database through the library's pool and `precog_db.get_cursor`.

    Read-only unless ``write``: a write then raises `WriteRefusedError` and
    nothing is written. With ``write`` the statement runs in one transaction,
    committed when it succeeds. A pool this opens (none was open) is closed
    again; an open pool for other settings raises `precog_db.errors.PoolStateError`.
    """
    from precog_db.cursors import get_cursor
    from precog_db.errors import ReadOnlyWriteError
    from precog_db.pool import active_pool, close_pool, initialize_pool

    if not statement.strip():
        raise ConfigurationError("the statement is empty; give one SQL statement")
    opened = active_pool() is None
    initialize_pool(settings=settings, min_size=1, max_size=1)  # the chokepoint: guard, naming rule, stamp
    try:
        try:
            with get_cursor(commit=write) as cur:
                cur.execute(statement)
                columns = tuple(d.name for d in cur.description) if cur.description else ()
                rows = tuple(cur.fetchall()) if cur.description else ()
                return StatementResult(columns, rows, cur.rowcount, cur.statusmessage or "")
        except ReadOnlyWriteError as exc:
            raise WriteRefusedError(
                f"the statement writes, and it ran read-only on the {settings.describe()}: nothing was written. "
                f"Add --write (write=True) to run it in a read-write transaction ({_first_line(exc)})"
            ) from None
    finally:
        if opened:
            close_pool()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- psql ------------------------------------------------------------------------------------------------------

#: The prompt colours, like the banner's (`precog_db.confirm`); dev and test get none.
_PROMPT_COLOURS = {Environment.PROD: "1;97;41", Environment.STAGING: "1;30;43"}
_INSTALL_HINT = (
    "psql (the PostgreSQL client) is not on PATH. Install the PostgreSQL client package "
    "(Debian/Ubuntu: apt-get install postgresql-client; macOS: brew install libpq; RHEL: dnf install postgresql), "
    "or put the bin directory of a PostgreSQL installation on PATH or in PRECOG_PG_BINDIR; "
    "`precog-db sql` needs no psql"
)
#: conninfo keys psql gets as PG* environment variables (the rest, such as keepalives, are not needed).
_ENV_OF = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "sslmode": "PGSSLMODE",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "passfile": "PGPASSFILE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
}


#: psql options that take a value (short and long), so the value is not read as a positional argument.
_PSQL_VALUE_SHORT = frozenset("cdfvFhLopPRTU")
_PSQL_VALUE_LONG = frozenset(
    {
        "command",
        "dbname",
        "file",
        "variable",
        "set",
        "field-separator",
        "host",
        "log-file",
        "output",
        "port",
        "pset",
        "record-separator",
        "table-attr",
        "username",
    }
)
#: psql options that would connect somewhere other than the checked database.
_PSQL_TARGET_SHORT = frozenset("dhpU")
_PSQL_TARGET_LONG = frozenset({"dbname", "host", "port", "username"})


def check_psql_args(args: Sequence[str]) -> None:
    """Refuse psql arguments that would connect elsewhere than the checked database (`UsageError`).

    ``-h``/``-p``/``-U``/``-d`` (and their long forms) and psql's positional
    database and user names would bypass the checks made on the resolved
    target; choose the target with ``--env`` / ``--database`` instead.
    """
    refused: str | None = None
    i = 0
    while i < len(args) and refused is None:
        arg = args[i]
        if arg == "--":
            refused = args[i + 1] if i + 1 < len(args) else None
            break
        if arg.startswith("--"):
            name, has_value, _ = arg[2:].partition("=")
            if name in _PSQL_TARGET_LONG:
                refused = arg
            elif name in _PSQL_VALUE_LONG and not has_value:
                i += 1
        elif arg.startswith("-") and len(arg) > 1:
            for pos, letter in enumerate(arg[1:], 1):
                if letter in _PSQL_TARGET_SHORT:
                    refused = arg
                    break
                if letter in _PSQL_VALUE_SHORT:
                    if pos == len(arg) - 1:
                        i += 1  # the value is the next argument
                    break
        else:
            refused = arg
        i += 1
    if refused is not None:
        raise UsageError(
            f"psql argument {refused!r} would choose the database, host, port or user, which precog-db checked "
            "and set; choose the target with --env or --database instead (nothing was run)"
        )


def find_psql(path: str | None = None) -> str:
    """The ``psql`` to run: on ``path`` (default ``PATH``), else in ``PRECOG_PG_BINDIR``, else the embedded one.

    The embedded PostgreSQL of the ``local`` extra is used when it ships a
    psql (not with ``PRECOG_PG_SEARCH=system``). `PsqlNotFoundError`, whose message says how to install one, when
    there is none.
    """
    found = shutil.which("psql", path=path)
    if found is not None:
        return found
    from precog_db.local import binaries, embedded

    dirs = []
    explicit = os.environ.get(binaries.BINDIR_ENV, "").strip()
    if explicit:
        dirs.append(explicit)
    if binaries.search_mode() != "system":  # PRECOG_PG_SEARCH=system: installed binaries only
        with contextlib.suppress(PrecogDBError):
            bundled = embedded.embedded_bindir(shared=False)
            if bundled is not None:
                dirs.append(str(bundled))
    for directory in dirs:
        candidate = os.path.join(directory, "psql")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise PsqlNotFoundError(_INSTALL_HINT)


def _escape_pgpass(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def passfile_line(host: str, port: int | str, dbname: str, user: str, password: str) -> str:
    """One ``.pgpass`` line for ``dbname`` on ``host``:``port`` as ``user``, ``:`` and ``\\`` escaped.

    Only that database: a ``\\c`` to another one inside psql gets no password from it.
    """
    fields = (str(host), str(port), dbname, user, password)
    if any("\n" in f or "\r" in f for f in fields):
        raise ConfigurationError("a line break in the host, database, user or password cannot go in a libpq passfile")
    return ":".join(_escape_pgpass(f) for f in fields) + "\n"


def _who() -> str:
    """``<os user>@<host>``, the user as the audit log names it."""
    from precog_db._secrets import current_os_user

    return f"{current_os_user()}@{socket.gethostname()}"


def _prompt(settings: DatabaseSettings, write: bool, colour: bool) -> tuple[str, str]:
    mode = "WRITE" if write else "read-only"
    label = f"{settings.env.value} {mode}"
    code = _PROMPT_COLOURS.get(settings.env)
    if colour and code is not None:
        tag = f"%[%033[{code}m%]{label}%[%033[0m%]"
    elif colour and write:
        tag = f"%[%033[1;31m%]{label}%[%033[0m%]"
    else:
        tag = f"[{label}]"
    return f"{tag} %/%R%x%# ", f"{tag} %/%R%x%# "


@dataclass
class ShellPlan:
    """psql's command line and environment for one session, and the password for its passfile (never printed)."""

    settings: DatabaseSettings
    write: bool
    argv: list[str]
    env: dict[str, str]
    pin_host: str
    pin_port: int
    statement_timeout_ms: int
    password: str = field(default="", repr=False)
    #: Signals `run_shell` received (and forwarded to psql) while the session ran.
    signals: list[int] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return "write" if self.write else "read-only"


def prepare_shell(
    settings: DatabaseSettings,
    *,
    write: bool = False,
    psql_args: Sequence[str] = (),
    prod_confirmed: bool | None = None,
    colour: bool = False,
    psql: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ShellPlan:
    """Check the target like any precog_db connection and build the psql session for it; psql does not start yet.

    Order: psql is looked up first (`PsqlNotFoundError`: nothing connects);
    then one connection through the chokepoint (naming rule, production guard,
    identity stamp; behind any ``DB_POOLER`` to ``DB_DIRECT_HOST`` or
    refused) is opened and closed, and psql is pinned to the server it reached.
    The password is resolved now (``DB_PASSWORD``, ``DB_PASSWORD_FILE``, a
    provider); a ``DB_PASSFILE`` is handed over as ``PGPASSFILE`` as it is.
    """
    from precog_db.connection import connection_kwargs, pin_target

    check_psql_args(psql_args)
    executable = psql or find_psql()
    if settings.pooler != "none":
        # The session's read-only default and timeout travel as startup options, which PgBouncer does not
        # pass on (the library's own pool sends none behind a pooler either): psql goes to the server itself.
        if not settings.direct_host:
            raise ConfigurationError(
                f"cannot open a psql shell through PgBouncer (DB_POOLER={settings.pooler}): the session's "
                "read-only default and statement timeout are startup options, which PgBouncer does not pass on. "
                "Set DB_DIRECT_HOST and DB_DIRECT_PORT to the database server itself; psql was not started"
            )
        settings = settings.replace(host=settings.direct_host, port=settings.direct_port, pooler="none")
    target, pin = pin_target(settings, operation="open a psql shell", prod_confirmed=prod_confirmed)
    params: dict[str, Any] = dict(connection_kwargs(target))
    password = str(params.pop("password", "") or "")
    params.pop("options", None)
    params.pop("host", None)
    params.pop("hostaddr", None)
    params.pop("port", None)
    params.update(pin.params())
    base = os.environ if environ is None else environ
    env = {k: v for k, v in base.items() if not k.startswith("PG")}  # PGPASSWORD, PGSERVICE … never reach psql
    for key, var in _ENV_OF.items():
        value = params.get(key)
        if value not in (None, ""):
            env[var] = str(value)
    timeout = settings.shell_statement_timeout_ms
    options = [f"-c default_transaction_read_only={'off' if write else 'on'}"]
    if timeout:
        options.append(f"-c statement_timeout={timeout}")
    env["PGOPTIONS"] = " ".join(options)
    env["PGAPPNAME"] = f"precog-db shell ({_who()})"
    prompt1, prompt2 = _prompt(settings, write, colour)
    argv = [executable, f"--set=PROMPT1={prompt1}", f"--set=PROMPT2={prompt2}", *psql_args]
    return ShellPlan(
        settings=target,
        write=write,
        argv=argv,
        env=env,
        pin_host=pin.host,
        pin_port=pin.port,
        statement_timeout_ms=timeout,
        password=password,
    )


@contextlib.contextmanager
def _passfile(plan: ShellPlan) -> Iterator[str | None]:
    """A private directory with a ``0600`` passfile for ``plan``'s password, removed when the block ends."""
    if not plan.password:
        yield None
        return
    directory = tempfile.mkdtemp(prefix="precog-shell-")  # 0700
    path = os.path.join(directory, "pgpass")
    try:
        target = plan.settings
        lines = [passfile_line(plan.pin_host, plan.pin_port, target.dbname, target.user, plan.password)]
        if plan.pin_host.startswith("/"):  # a socket directory: libpq matches the passfile on "localhost"
            lines.append(passfile_line("localhost", plan.pin_port, target.dbname, target.user, plan.password))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(lines))
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def run_shell(plan: ShellPlan) -> int:
    """Run psql for ``plan`` and return its exit code; the passfile is removed when psql ends, however it ends.

    From before the passfile exists until it is gone, ``SIGTERM`` and
    ``SIGHUP`` to this process are forwarded to psql (or, before psql started,
    stop it from starting), so the cleanup always runs; they are noted in
    ``plan.signals``. ``SIGINT`` (Ctrl-C) is left to psql, which cancels the
    running query. The exit code of psql ended by a signal is ``128 + signal``.
    Signals are only handled in the main thread (Python's rule); elsewhere the
    passfile is still removed by the ``finally``.
    """
    env = dict(plan.env)
    env.pop("PGPASSWORD", None)
    proc: subprocess.Popen[bytes] | None = None
    received = plan.signals

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    def ignore(_signum: int, _frame: FrameType | None) -> None:
        """Ctrl-C reaches psql from the terminal; this process waits for it (unlike SIG_IGN, not inherited)."""

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, forward)
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, forward)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, ignore)
    try:
        with _passfile(plan) as passfile:
            if passfile is not None:
                env["PGPASSFILE"] = passfile
            if received:  # a signal before psql started: it does not start
                return 128 + received[0]
            try:
                proc = subprocess.Popen(plan.argv, env=env)
                if received:  # a signal while the child was being created
                    proc.send_signal(received[0])
                code = proc.wait()
            finally:
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code


def shell_environment_summary(plan: ShellPlan) -> dict[str, Any]:
    """What the audit log records about a session (never the password or the passfile's path)."""
    return {
        "mode": plan.mode,
        "statement_timeout_ms": plan.statement_timeout_ms,
        "server": f"{plan.pin_host}:{plan.pin_port}",
        "application_name": plan.env.get("PGAPPNAME", ""),
    }


def signal_names(plan: ShellPlan) -> list[str]:
    """The names of the signals `run_shell` received (``SIGTERM`` …), for the audit log."""
    return [signal.Signals(s).name for s in plan.signals]
