"""``precog-db``: the command line for environments, local databases, migrations, backups and the audit log.

Usage: ``precog-db [global options] COMMAND [options]``; global options are
accepted after the command too. Exit codes: 0 ok, 1 refused or failed, 2
usage. Every `PrecogDBError` and `OSError` becomes one line on stderr and
exit code 1, never a traceback. The README's "Command line" section and
docs/CLI.md describe each command.

Startup stays fast (``precog-db env`` needs no connection): the pool,
migrations, backups, the stamp and the local cluster are imported inside the
commands that use them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from precog_db import audit
from precog_db._secrets import MASK, scrub_argv, scrub_text
from precog_db.confirm import banner, require_confirmation, use_colour
from precog_db.environment import Environment, environment_named_by
from precog_db.errors import ConfigurationError, PrecogDBError
from precog_db.log import mask_secrets
from precog_db.settings import FIELD_VARS, DatabaseSettings, load_settings, resolve_config_dir

if TYPE_CHECKING:
    from psycopg import Connection

    from precog_db.migrations import MigrationFile

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

PROG = "precog-db"
_STRICT = (Environment.STAGING, Environment.PROD)
#: Connection-string keys --database may set, and the setting each one fills.
_CONNINFO_KEYS = {
    "host": "host",
    "hostaddr": "host",
    "port": "port",
    "dbname": "dbname",
    "user": "user",
    "password": "password",
    "sslmode": "sslmode",
    "connect_timeout": "connect_timeout",
    "application_name": "application_name",
}


class UsageError(PrecogDBError, ValueError):
    """The command line is inconsistent (exit code 2)."""


# --- the parser ----------------------------------------------------------------------------------

_EPILOG = """\
commands:
  env                     resolved settings, where each came from, and the precedence (password masked)
  check                   connect; server version, latency, identity stamp, pool settings, environment match
  stamp                   write the identity stamp (which environment this database belongs to)
  local up|down|status|url  a throwaway PostgreSQL under .precog/ with precog_dev and precog_test
  migrate new|up|status|validate|baseline   SQL migrations with a ledger and a promotion check
  backup                  pg_dump -Fc to backups/<env>/, verified with pg_restore --list, old dumps pruned
  restore FILE            restore a dump into dev or test (never staging or prod)
  audit tail              the latest audit-log entries

safety:
  Commands on staging and prod print a banner first. Destructive or schema-changing commands on prod
  need PRECOG_PROD_CONFIRMED=yes and the database name typed at the prompt, or --confirm-database NAME
  without a terminal; --yes never confirms prod. Every operation, pool open on staging/prod and refusal
  is appended to the audit log (PRECOG_AUDIT_LOG, default logs/audit.log).

exit codes: 0 ok, 1 refused or failed, 2 usage error.
examples:
  precog-db local up
  precog-db --env test migrate up
  PRECOG_PROD_CONFIRMED=yes precog-db --env prod migrate up --confirm-database precog_prod
"""


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Add the global options; on subcommand parsers their defaults are SUPPRESS so they never clobber."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "--env",
        default=default(None),
        metavar="ENV",
        help="dev, test, staging or prod (default: PRECOG_ENV, else inferred from --database or DB_NAME, else dev)",
    )
    group.add_argument(
        "--database",
        default=default(None),
        metavar="NAME_OR_DSN",
        help="a database name, or a full connection string (postgresql://user@host:5432/db or "
        "'host=... dbname=...'); overrides the environment's settings",
    )
    group.add_argument(
        "--config-dir",
        default=default(None),
        metavar="DIR",
        help="directory of the .env files (default: PRECOG_CONFIG_DIR, else ./config)",
    )
    group.add_argument("--json", action="store_true", default=default(False), help="machine-readable JSON on stdout")
    group.add_argument(
        "--yes",
        "-y",
        action="store_true",
        default=default(False),
        help="confirm without a prompt on dev, test and staging; never enough for prod",
    )
    group.add_argument(
        "--confirm-database",
        default=default(None),
        metavar="NAME",
        help="the typed confirmation without a terminal: the exact name of the database acted on "
        "(required for destructive or schema-changing commands on prod)",
    )


def _sub(
    subparsers: Any, name: str, help_text: str, *, parents: Sequence[argparse.ArgumentParser], **kw: Any
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help_text,
        description=kw.pop("description", help_text),
        parents=list(parents),
        **kw,
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``precog-db`` argument parser."""
    from precog_db import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Environments, local databases, migrations, backups and the audit log for precog_db.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, top=False)
    parents = [common]
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _sub(
        commands,
        "env",
        "show the resolved settings, where each value came from, and the precedence",
        parents=parents,
        description="Show the resolved environment and settings without connecting. The password is masked.",
    )
    p.set_defaults(handler=cmd_env)

    p = _sub(
        commands,
        "check",
        "connect and report server version, latency, stamp, pool settings and environment match",
        parents=parents,
    )
    p.set_defaults(handler=cmd_check)

    p = _sub(
        commands,
        "stamp",
        "write the identity stamp: record in the database which environment it belongs to",
        parents=parents,
        description="Stamp the configured database as belonging to --env. Re-stamping a database stamped "
        "with another environment needs --force. On prod this needs PRECOG_PROD_CONFIRMED=yes and the "
        "typed database name.",
    )
    p.add_argument("--force", action="store_true", help="replace a stamp that names another environment")
    p.set_defaults(handler=cmd_stamp)

    p = _sub(commands, "local", "a throwaway local PostgreSQL cluster under .precog/", parents=parents)
    local = p.add_subparsers(dest="local_command", metavar="ACTION", required=True)
    local_parents = [*parents, _root_option()]
    q = _sub(
        local,
        "up",
        "start (or reuse) the cluster, create precog_dev and precog_test, write config/.env.dev and .env.test",
        parents=local_parents,
    )
    q.set_defaults(handler=cmd_local_up)
    q = _sub(local, "down", "stop the cluster (its data stays for the next `local up`)", parents=local_parents)
    q.set_defaults(handler=cmd_local_down)
    q = _sub(local, "status", "is the cluster initialized and running, and where", parents=local_parents)
    q.set_defaults(handler=cmd_local_status)
    q = _sub(local, "url", "the connection URL of precog_<env> (dev or test) on the cluster", parents=local_parents)
    q.set_defaults(handler=cmd_local_url)

    p = _sub(commands, "migrate", "SQL migrations in migrations/ with a ledger in precog_meta", parents=parents)
    _add_migrations_dir(p, top=True)
    migrate = p.add_subparsers(dest="migrate_command", metavar="ACTION", required=True)
    mig_parents = [*parents, _migrations_dir_option()]
    q = _sub(migrate, "new", "create the next numbered migration file", parents=mig_parents)
    q.add_argument("name", help="what the migration does, e.g. create_markets")
    q.set_defaults(handler=cmd_migrate_new)
    q = _sub(
        migrate,
        "up",
        "apply pending migrations, each in its own transaction",
        parents=mig_parents,
        description="Apply pending migrations in order, each file in its own transaction with its ledger "
        "row. An advisory lock serializes runs: a second run waits (up to --lock-timeout) and then applies "
        "only what is still pending. On staging every migration must first be applied to test with the same "
        "checksum, on prod to staging. On prod a verified backup is taken first.",
    )
    q.add_argument("--dry-run", action="store_true", help="print the plan and the promotion check; change nothing")
    q.add_argument("--target", type=int, metavar="VERSION", help="apply up to and including this version")
    q.add_argument(
        "--lock-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for another run's migration lock (default 300)",
    )
    q.add_argument(
        "--skip-promotion-check",
        action="store_true",
        help="migrate even though the previous environment's ledger cannot be read (needs --reason); "
        "never skips a migration the previous environment is known not to have",
    )
    q.add_argument("--no-backup", action="store_true", help="prod: do not take the backup first (needs --reason)")
    q.add_argument("--reason", help="why a check or the backup is skipped; recorded in the audit log")
    _add_backup_options(q)
    q.set_defaults(handler=cmd_migrate_up)
    q = _sub(migrate, "status", "list each migration: applied (when, by whom), pending or problem", parents=mig_parents)
    q.set_defaults(handler=cmd_migrate_status)
    q = _sub(
        migrate,
        "validate",
        "fail when an applied file was edited, a file is missing, versions have gaps or are out of order",
        parents=mig_parents,
    )
    q.set_defaults(handler=cmd_migrate_validate)
    q = _sub(
        migrate,
        "baseline",
        "mark an existing database as being at VERSION (files up to it recorded as applied)",
        parents=mig_parents,
    )
    q.add_argument("version", type=int, help="the version the database's current schema corresponds to")
    q.set_defaults(handler=cmd_migrate_baseline)

    p = _sub(
        commands,
        "backup",
        "pg_dump in custom format to backups/<env>/, verified with pg_restore --list, old dumps pruned",
        parents=parents,
    )
    _add_backup_options(p)
    p.set_defaults(handler=cmd_backup)

    p = _sub(
        commands,
        "restore",
        "restore a pg_dump archive into the dev or test database (replaces the objects it contains)",
        parents=parents,
        description="Restore a custom-format dump into the dev or test database in one transaction "
        "(--clean --if-exists --no-owner --no-privileges). Never into staging or prod. Asks for the database "
        "name at a terminal; use --yes or --confirm-database without one. The restored database is re-stamped "
        "with the target environment.",
    )
    p.add_argument("file", type=Path, help="the .dump file")
    p.set_defaults(handler=cmd_restore)

    p = _sub(commands, "audit", "read the audit log", parents=parents)
    audit_cmds = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    q = _sub(audit_cmds, "tail", "print the most recent audit-log entries", parents=parents)
    q.add_argument("-n", "--lines", type=int, default=20, metavar="N", help="how many entries (default 20)")
    q.set_defaults(handler=cmd_audit_tail)
    return parser


def _root_option() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--root", type=Path, default=Path(".precog"), help="where the cluster lives (default .precog)")
    return p


def _add_migrations_dir(parser: argparse.ArgumentParser, *, top: bool) -> None:
    parser.add_argument(
        "--migrations-dir",
        type=Path,
        default=None if top else argparse.SUPPRESS,
        metavar="DIR",
        help="where the NNNN_name.sql files are (default: ./migrations)",
    )


def _migrations_dir_option() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    _add_migrations_dir(p, top=False)
    return p


def _add_backup_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backup-dir",
        type=Path,
        metavar="DIR",
        help="root of the dumps, which go to DIR/<env>/ (default: PRECOG_BACKUP_DIR, else ./backups)",
    )
    parser.add_argument(
        "--keep", type=int, metavar="N", help="dumps to keep per database (default: PRECOG_BACKUP_KEEP, else 7)"
    )


# --- the context every command gets ----------------------------------------------------------------


class Progress:
    """A one-line progress display on a terminal; silent when not on one."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        try:
            self.active = stream.isatty()
        except (AttributeError, ValueError):
            self.active = False
        self._width = 0

    def update(self, text: str) -> None:
        if not self.active:
            return
        pad = max(self._width - len(text), 0)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)

    def done(self) -> None:
        if self.active and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class Context:
    """Parsed arguments, output streams, and the helpers commands share."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> None:
        self.args = args
        self.argv = list(argv)
        self.stdout = stdout
        self.stderr = stderr
        self.stdin: TextIO = sys.stdin
        self.json: bool = bool(args.json)
        self._settings: DatabaseSettings | None = None
        self.env_source = ""

    # output -------------------------------------------------------------------------------

    def emit(self, data: Any, lines: Sequence[str]) -> None:
        """Print ``data`` as JSON with --json, else ``lines``."""
        if self.json:
            self.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")
        else:
            for line in lines:
                self.stdout.write(line + "\n")
        self.stdout.flush()

    def note(self, message: str) -> None:
        """A message for the person at the terminal (stderr), e.g. waiting for a lock."""
        self.stderr.write(f"{PROG}: {message}\n")
        self.stderr.flush()

    def scrub(self, text: str) -> str:
        """``text`` without the settings' password or any connection-string password."""
        return scrub_text(text, [self._settings.password] if self._settings is not None else [])

    # settings ---------------------------------------------------------------------------------

    def environment(self) -> Environment:
        """The environment, without loading settings (for commands that do not connect).

        The same resolution as `load_settings` (`precog_db.settings.environment_resolution`):
        --env, PRECOG_ENV (process, then config/.env), then inferred from --database or DB_NAME.
        """
        from precog_db.settings import environment_resolution

        try:
            resolution = environment_resolution(
                self.args.env,
                config_dir=self.args.config_dir,
                dbname=self._database_overrides().get("dbname"),
            )
        except ConfigurationError as exc:
            if self.args.env is not None:
                raise UsageError(str(exc).replace("the environment argument", "--env")) from None
            raise
        self.env_source = {
            "the environment argument": "--env",
            "inferred from the dbname argument": "inferred from --database",
        }.get(resolution.source, resolution.source)
        return resolution.env

    def _database_overrides(self) -> dict[str, str]:
        value = self.args.database
        if value is None:
            return {}
        text = str(value).strip()
        if not text:
            raise UsageError("--database is empty; give a database name or a connection string")
        if "=" not in text and "://" not in text:
            return {"dbname": text}
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(text)
        except psycopg.Error:
            raise ConfigurationError(
                "--database is neither a plain database name nor a valid connection string; use a name, "
                "postgresql://user@host:port/dbname or 'host=... port=... dbname=...'"
            ) from None
        unknown = sorted(set(params) - set(_CONNINFO_KEYS))
        if unknown:
            raise ConfigurationError(
                f"--database sets {', '.join(unknown)}, which precog-db does not take from a connection "
                f"string; it accepts {', '.join(sorted(_CONNINFO_KEYS))}. Set the rest through DB_* settings"
            )
        out: dict[str, str] = {}
        for key, raw in params.items():
            if raw is None or str(raw) == "":
                continue
            if key == "hostaddr" and "host" in params:
                continue
            out[_CONNINFO_KEYS[key]] = str(raw)
        return out

    def settings(self) -> DatabaseSettings:
        """The settings of the target database: --env, --config-dir and --database applied."""
        if self._settings is None:
            overrides: dict[str, Any] = dict(self._database_overrides())
            env = self.environment()
            self._settings = load_settings(env, config_dir=self.args.config_dir, **overrides)
        return self._settings

    # safety -----------------------------------------------------------------------------------

    def show_banner(self, settings: DatabaseSettings, action: str) -> None:
        """The staging/prod banner, on stderr, before anything acts."""
        if settings.env not in _STRICT:
            return
        self.stderr.write(banner(settings, action, colour=use_colour(self.stderr)) + "\n")
        self.stderr.flush()

    def confirm(self, settings: DatabaseSettings, action: str, *, always: bool = False) -> str:
        """The typed confirmation a destructive/schema-changing ``action`` needs; how it was given.

        dev and test need none unless ``always`` (restore).
        """
        if settings.env not in _STRICT and not always:
            return "not required"
        return require_confirmation(
            settings,
            action,
            yes=bool(self.args.yes),
            confirm_database=self.args.confirm_database,
            stdin=self.stdin,
            prompt_to=self.stderr,
        )

    def connect(self, settings: DatabaseSettings, operation: str) -> Connection[Any]:
        """A direct autocommit connection through the chokepoint (guard, naming rule, stamp, reply bound)."""
        from precog_db.connection import connect

        return connect(settings, operation=operation, direct=True)  # maintenance: never through a pooler

    @contextlib.contextmanager
    def operation(self, name: str, settings: DatabaseSettings, **details: Any) -> Iterator[dict[str, Any]]:
        """Audit one operation: yields a dict for details (``confirmation`` has its own field)."""
        audit.ensure_writable()
        info: dict[str, Any] = {"confirmation": None, **details}
        started = time.monotonic()
        try:
            yield info
        except BaseException as exc:
            confirmation = info.pop("confirmation")
            outcome = audit.outcome_of(exc)
            message = "interrupted" if isinstance(exc, KeyboardInterrupt) else self.scrub(str(exc))
            audit.record(
                name,
                outcome=outcome,
                settings=settings,
                confirmation=confirmation,
                duration_s=time.monotonic() - started,
                argv=self.argv,
                error=f"{type(exc).__name__}: {message}",
                **info,
            )
            audit.mark_recorded(exc)
            raise
        confirmation = info.pop("confirmation")
        audit.record(
            name,
            outcome=audit.OK,
            settings=settings,
            confirmation=confirmation,
            duration_s=time.monotonic() - started,
            argv=self.argv,
            **info,
        )


# --- env ---------------------------------------------------------------------------------------------


def _origin(origin: str) -> str:
    return {"argument": "--database", "environment": "process environment", "default": "built-in default"}.get(
        origin, origin
    )


def cmd_env(ctx: Context) -> int:
    settings = ctx.settings()
    config_dir = resolve_config_dir(ctx.args.config_dir)
    files = [str(f) for f in settings.files]
    rows = []
    for field, var in FIELD_VARS.items():
        value: Any = getattr(settings, field)
        if field == "password":
            value = MASK if value else ""
        rows.append({"variable": var, "field": field, "value": value, "source": _origin(settings.origins[field])})
    precedence = [
        "--database",
        "process environment (DB_*)",
        str(config_dir / f".env.{settings.env.value}"),
        str(config_dir / ".env"),
        "built-in defaults",
    ]
    from precog_db.backup import backup_dir

    extra = {
        "PRECOG_PROD_CONFIRMED": "yes" if os.environ.get("PRECOG_PROD_CONFIRMED") == "yes" else "(not set)",
        "PRECOG_AUDIT_LOG": str(audit.audit_log_path()),
        "PRECOG_BACKUP_DIR": str(backup_dir()),
    }
    data = {
        "environment": settings.env.value,
        "environment_source": ctx.env_source,
        "config_dir": str(config_dir),
        "config_dir_exists": config_dir.is_dir(),
        "files": files,
        "precedence": precedence,
        "settings": rows,
        "other": extra,
        "describe": settings.describe(),
    }
    width = max(len(r["variable"]) for r in rows)
    vwidth = max(len(str(r["value"])) for r in rows)
    lines = [
        f"environment  {settings.env.value} ({ctx.env_source})",
        f"config dir   {config_dir}{'' if config_dir.is_dir() else ' (does not exist)'}",
        f"files read   {', '.join(files) if files else '(none)'}",
        f"precedence   {' > '.join(precedence)}",
        "",
    ]
    for r in rows:
        shown = str(r["value"]) if r["value"] != "" else "(empty)"
        lines.append(f"{r['variable']:<{width}}  {shown:<{vwidth}}  {r['source']}")
    lines.append("")
    lines.extend(f"{k:<{width}}  {v}" for k, v in extra.items())
    ctx.emit(data, lines)
    return EXIT_OK


# --- check -------------------------------------------------------------------------------------------


def cmd_check(ctx: Context) -> int:
    from precog_db.guard import production_confirmed
    from precog_db.pool import create_pool
    from precog_db.stamp import read_stamp, stamp_command

    settings = ctx.settings()
    ctx.show_banner(settings, "check")
    pool = create_pool(settings, prod_confirmed=production_confirmed(), min_size=1, max_size=1)
    try:
        with pool.connection() as conn:
            row = conn.execute("SHOW server_version").fetchone()
            version = str(row[0]) if row else "unknown"
            timings = []
            for _ in range(5):
                started = time.perf_counter()
                conn.execute("SELECT 1").fetchone()
                timings.append((time.perf_counter() - started) * 1000)
    finally:
        pool.close()
    latency = sorted(timings)[len(timings) // 2]  # the median of five
    stamp = read_stamp(settings)
    named = environment_named_by(settings.dbname)
    mismatches = []
    if stamp is not None and stamp.env is not settings.env:
        mismatches.append(f"the stamp says {stamp.env.value}")
    if named is not None and named is not settings.env:
        mismatches.append(f"the database name says {named.value}")
    matches = not mismatches
    if stamp is None:
        stamp_text = f"unstamped (stamp it with `{stamp_command(settings.env)}`)"
    else:
        stamp_text = stamp.describe() + (f"; a restored copy: {stamp.copy_reason}" if stamp.is_copy else "")
    evidence = [f"stamp: {stamp.env.value if stamp else 'none'}", f"name: {named.value if named else 'neutral'}"]
    match_text = (
        f"{settings.env.value}: matches ({', '.join(evidence)})"
        if matches
        else f"{settings.env.value}: MISMATCH ({'; '.join(mismatches)})"
    )
    data = {
        "environment": settings.env.value,
        "database": {"host": settings.host, "port": settings.port, "name": settings.dbname, "user": settings.user},
        "server_version": version,
        "latency_ms": round(latency, 3),
        "stamp": None
        if stamp is None
        else {
            "env": stamp.env.value,
            "stamped_by": stamp.stamped_by,
            "stamped_at": stamp.stamped_at.isoformat(),
            "is_copy": stamp.is_copy,
        },
        "pool": {
            "min": settings.pool_min,
            "max": settings.pool_max,
            "timeout_s": settings.pool_timeout,
            "connect_timeout_s": settings.connect_timeout,
            "statement_timeout_ms": settings.statement_timeout_ms,
        },
        "environment_matches": matches,
    }
    lines = [
        f"database     {settings.describe()}",
        f"server       PostgreSQL {version}",
        f"latency      {latency:.2f} ms (median of 5 round trips)",
        f"stamp        {stamp_text}",
        f"pool         min {settings.pool_min}, max {settings.pool_max}, checkout timeout {settings.pool_timeout:g}s, "
        f"connect timeout {settings.connect_timeout}s, statement timeout "
        f"{settings.statement_timeout_ms or 'none'}{' ms' if settings.statement_timeout_ms else ''}",
        f"environment  {match_text}",
    ]
    ctx.emit(data, lines)
    return EXIT_OK if matches else EXIT_FAILED


# --- stamp --------------------------------------------------------------------------------------------


def cmd_stamp(ctx: Context) -> int:
    from precog_db.stamp import stamp_database

    settings = ctx.settings()
    ctx.show_banner(settings, "stamp")
    with ctx.operation("stamp", settings, force=bool(ctx.args.force)) as info:
        info["confirmation"] = ctx.confirm(settings, f"stamp the database as {settings.env.value}")
        stamp = stamp_database(settings.env, force=bool(ctx.args.force), settings=settings)
    ctx.emit(
        {"environment": settings.env.value, "database": settings.dbname, "stamp": stamp.describe()},
        [f"stamped the {settings.describe()}: {stamp.describe()}"],
    )
    return EXIT_OK


# --- local -----------------------------------------------------------------------------------------------


def cmd_local_up(ctx: Context) -> int:
    from precog_db.local_cluster import local_up

    config_dir = resolve_config_dir(ctx.args.config_dir)
    # Creates and stamps precog_dev and precog_test, so that opening them does not warn.
    cluster, done = local_up(Path(ctx.args.root), config_dir)
    ctx.emit({"actions": done, "status": cluster.status(), "url": cluster.url("precog_dev")}, done)
    return EXIT_OK


def cmd_local_down(ctx: Context) -> int:
    from precog_db.local_cluster import LocalCluster

    cluster = LocalCluster(Path(ctx.args.root))
    if not cluster.initialized():
        message = f"no local cluster under {ctx.args.root}; nothing to stop"
    elif not cluster.running():
        message = f"the local cluster under {ctx.args.root} is not running"
    else:
        cluster.stop()
        message = f"stopped the local cluster under {ctx.args.root} (its data stays for the next `local up`)"
    ctx.emit({"message": message, "status": cluster.status()}, [message])
    return EXIT_OK


def cmd_local_status(ctx: Context) -> int:
    from precog_db.local_cluster import LocalCluster

    status = LocalCluster(Path(ctx.args.root)).status()
    ctx.emit(status, [f"{k:<12} {v}" for k, v in status.items()])
    return EXIT_OK


def cmd_local_url(ctx: Context) -> int:
    from precog_db.errors import EnvironmentNotAllowedError
    from precog_db.local_cluster import LocalCluster, LocalClusterError

    env = ctx.environment()
    if env not in (Environment.DEV, Environment.TEST):
        # Name what chose the environment: telling someone who typed --env to set PRECOG_ENV misleads.
        if ctx.env_source == "--env":
            fix = "use --env dev or --env test"
        else:
            fix = "pass --env dev or --env test, or set PRECOG_ENV to dev or test"
        raise EnvironmentNotAllowedError(
            f"`local url` works in dev, test only (the local cluster holds precog_dev and precog_test), "
            f"but the environment is {env.value} ({ctx.env_source}); {fix}"
        )
    cluster = LocalCluster(Path(ctx.args.root))
    if not cluster.initialized():
        raise LocalClusterError(f"no local cluster under {ctx.args.root}; start one with `{PROG} local up`")
    url = cluster.url(f"precog_{env.value}")
    ctx.emit({"environment": env.value, "url": url}, [url])
    return EXIT_OK


# --- migrate ------------------------------------------------------------------------------------------


def _migrations_dir(ctx: Context) -> Path:
    configured = getattr(ctx.args, "migrations_dir", None)
    return Path(configured) if configured is not None else Path("migrations")


def cmd_migrate_new(ctx: Context) -> int:
    from precog_db.migrations import new_migration

    path = new_migration(_migrations_dir(ctx), ctx.args.name)
    ctx.emit({"path": str(path)}, [f"created {path}"])
    return EXIT_OK


def _status_rows(
    files: Sequence[MigrationFile], ledger: dict[int, Any], problems: Sequence[Any]
) -> list[dict[str, Any]]:
    by_version: dict[int, list[str]] = {}
    for p in problems:
        by_version.setdefault(p.version, []).append(p.kind)
    rows = []
    names = {f.version: f.name for f in files} | {v: r.name for v, r in ledger.items()}
    for version in sorted(set(names) | set(by_version)):
        row = ledger.get(version)
        kinds = by_version.get(version, [])
        if "missing" in kinds:
            state = "FILE MISSING"
        elif "edited" in kinds:
            state = "EDITED"
        elif "gap" in kinds:
            state = "GAP"
        elif "out_of_order" in kinds:
            state = "OUT OF ORDER"
        elif "transaction_control" in kinds:
            state = "ENDS ITS TRANSACTION"
        elif row is not None:
            state = row.kind
        else:
            state = "pending"
        rows.append(
            {
                "version": version,
                "name": names.get(version, ""),
                "state": state,
                "applied_at": row.applied_at.isoformat(timespec="seconds") if row is not None else None,
                "applied_by": row.applied_by if row is not None else None,
                "duration_ms": row.duration_ms if row is not None else None,
            }
        )
    return rows


def _load_ledger(ctx: Context, settings: DatabaseSettings, action: str) -> tuple[list[MigrationFile], dict[int, Any]]:
    from precog_db.migrations import discover, read_ledger

    files = discover(_migrations_dir(ctx))
    conn = ctx.connect(settings, action)
    try:
        return files, read_ledger(conn)
    finally:
        conn.close()


def cmd_migrate_status(ctx: Context) -> int:
    from precog_db.migrations import validate

    settings = ctx.settings()
    ctx.show_banner(settings, "migrate status")
    files, ledger = _load_ledger(ctx, settings, "read the migration ledger")
    problems = validate(files, ledger)
    rows = _status_rows(files, ledger, problems)
    applied = sum(1 for r in rows if r["state"] in ("applied", "baseline"))
    pending_count = sum(1 for r in rows if r["state"] == "pending")
    summary = (
        f"{len(files)} file(s) in {_migrations_dir(ctx)}: {applied} applied, {pending_count} pending, "
        f"{len(problems)} problem(s)"
    )
    lines = [f"migrations of the {settings.describe()}"]
    for r in rows:
        when = f"  {r['applied_at']} by {r['applied_by']} ({r['duration_ms']} ms)" if r["applied_at"] else ""
        lines.append(f"  {r['version']:>4}  {r['name']:<32} {r['state']:<12}{when}")
    lines.append(summary)
    lines.extend(f"  problem: {p.message}" for p in problems)
    ctx.emit(
        {
            "environment": settings.env.value,
            "database": settings.dbname,
            "migrations": rows,
            "problems": [p.__dict__ for p in problems],
        },
        lines,
    )
    return EXIT_OK


def cmd_migrate_validate(ctx: Context) -> int:
    from precog_db.migrations import validate

    settings = ctx.settings()
    ctx.show_banner(settings, "migrate validate")
    files, ledger = _load_ledger(ctx, settings, "read the migration ledger")
    problems = validate(files, ledger)
    lines = [f"{len(files)} file(s), {len(ledger)} ledger row(s) in the {settings.describe()}"]
    if problems:
        lines.extend(f"  {p.kind}: {p.message}" for p in problems)
        lines.append(f"INVALID: {len(problems)} problem(s)")
    else:
        lines.append("valid: every applied file is unchanged, none is missing, versions have no gaps")
    ctx.emit({"valid": not problems, "problems": [p.__dict__ for p in problems]}, lines)
    return EXIT_FAILED if problems else EXIT_OK


def _predecessor_ledger(ctx: Context, settings: DatabaseSettings, predecessor: Environment) -> dict[int, Any]:
    """The ledger of the previous environment, read through its own settings (files, not DB_* of this process)."""
    from precog_db.migrations import read_ledger

    # DB_* variables in this process describe the database being migrated, not its predecessor.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DB_") and k != "PRECOG_ENV"}
    other = load_settings(predecessor, config_dir=ctx.args.config_dir, environ=environ)
    if (other.host, other.port, other.dbname) == (settings.host, settings.port, settings.dbname):
        raise ConfigurationError(
            f"the {predecessor.value} settings point at the same database as {settings.env.value} "
            f"({settings.dbname} on {settings.host}:{settings.port}); fix config/.env.{predecessor.value}"
        )
    conn = ctx.connect(other, f"read the {predecessor.value} migration ledger")
    try:
        return read_ledger(conn)
    finally:
        conn.close()


def cmd_migrate_up(ctx: Context) -> int:
    from precog_db.migrations import (
        PREDECESSOR,
        PromotionError,
        apply_migration,
        check_promotion,
        discover,
        ensure_ledger,
        migration_lock,
        pending,
        read_ledger,
    )

    args = ctx.args
    reason = (args.reason or "").strip() or None
    if args.skip_promotion_check and not reason:
        raise UsageError('--skip-promotion-check needs --reason "..." (it goes to the audit log)')
    if args.no_backup and not reason:
        raise UsageError('--no-backup needs --reason "..." (it goes to the audit log)')
    if args.lock_timeout < 0:
        raise UsageError("--lock-timeout must be zero or more seconds")
    settings = ctx.settings()
    env = settings.env
    ctx.show_banner(settings, "migrate up" + (" --dry-run" if args.dry_run else ""))
    directory = _migrations_dir(ctx)
    name = "migrate up (dry run)" if args.dry_run else "migrate up"
    with ctx.operation(name, settings, migrations_dir=str(directory), reason=reason) as info:
        files = discover(directory)
        conn = ctx.connect(settings.replace(application_name=f"precog-db migrate {env.value}"), "migrate")
        try:
            plan = pending(files, read_ledger(conn), args.target)
            info["planned"] = [m.filename for m in plan]
            promotion = "not needed"
            predecessor = PREDECESSOR.get(env)
            if predecessor is not None and plan:
                try:
                    before = _predecessor_ledger(ctx, settings, predecessor)
                except (PrecogDBError, OSError) as exc:
                    problem = ctx.scrub(str(exc))
                    if not args.skip_promotion_check:
                        raise PromotionError(
                            f"cannot check that {predecessor.value} has these migrations, because its database is "
                            f"unavailable: {problem}. Fix config/.env.{predecessor.value}, or, if you must migrate "
                            f'{env.value} anyway, pass --skip-promotion-check --reason "..." (recorded in the '
                            "audit log); nothing was applied"
                        ) from None
                    promotion = f"skipped ({predecessor.value} unavailable: {problem})"
                else:
                    check_promotion(plan, before, env=env, predecessor=predecessor)
                    promotion = f"passed: {predecessor.value} has applied all {len(plan)} with the same checksums"
            info["promotion"] = promotion
            plan_lines = [f"  {m.filename}" for m in plan]
            if args.dry_run or not plan:
                head = "would apply" if args.dry_run else "nothing to apply"
                lines = [
                    f"{head} {len(plan)} migration(s) to the {settings.describe()}"
                    if plan
                    else f"{settings.describe()} is up to date; nothing to apply",
                    *plan_lines,
                ]
                if plan:
                    lines.append(f"promotion check: {promotion}")
                    if env is Environment.PROD:
                        lines.append(
                            "a verified backup would be taken first"
                            if not args.no_backup
                            else "no backup would be taken (--no-backup)"
                        )
                ctx.emit({"dry_run": bool(args.dry_run), "plan": info["planned"], "promotion": promotion}, lines)
                return EXIT_OK
            if not ctx.json:
                ctx.note(
                    f"plan: {len(plan)} migration(s) for the {settings.describe()}: "
                    + ", ".join(m.filename for m in plan)
                )
            info["confirmation"] = ctx.confirm(settings, f"apply {len(plan)} migration(s)")
            if env is Environment.PROD:
                if args.no_backup:
                    info["backup"] = "skipped (--no-backup)"
                else:
                    made = _take_backup(ctx, settings, conn, purpose="before migrate up")
                    info["backup"] = str(made.path)
                    if not ctx.json:
                        ctx.note(_backup_summary(made))
            applied: list[dict[str, Any]] = []
            info["applied"] = applied
            progress = Progress(ctx.stderr)
            with migration_lock(conn, timeout=args.lock_timeout, on_wait=ctx.note):
                ensure_ledger(conn)
                todo = pending(discover(directory), read_ledger(conn), args.target)
                skipped = len(plan) - len(todo)
                if skipped and not ctx.json:
                    ctx.note(f"{skipped} of the planned migration(s) were applied by another run meanwhile")
                try:
                    for index, migration in enumerate(todo, 1):
                        if migration.filename not in info["planned"]:
                            raise PromotionError(
                                f"{migration.filename} appeared while waiting for the lock and was not part of "
                                "the confirmed plan; run migrate up again"
                            )
                        progress.update(f"[{index}/{len(todo)}] applying {migration.filename} ...")
                        row = apply_migration(conn, migration)
                        applied.append(
                            {
                                "version": row.version,
                                "file": migration.filename,
                                "checksum": row.checksum,
                                "duration_ms": row.duration_ms,
                            }
                        )
                finally:
                    progress.done()
        finally:
            conn.close()
    lines = [f"applied {a['file']} ({a['duration_ms']} ms)" for a in applied]
    lines.append(f"{len(applied)} migration(s) applied to the {settings.describe()}")
    ctx.emit({"applied": applied, "promotion": promotion, "backup": info.get("backup")}, lines)
    return EXIT_OK


def cmd_migrate_baseline(ctx: Context) -> int:
    from precog_db.migrations import baseline, discover, migration_lock

    settings = ctx.settings()
    ctx.show_banner(settings, f"migrate baseline {ctx.args.version}")
    with ctx.operation("migrate baseline", settings, version=ctx.args.version) as info:
        files = discover(_migrations_dir(ctx))
        conn = ctx.connect(settings, "baseline the migration ledger")
        try:
            info["confirmation"] = ctx.confirm(settings, f"record migrations up to {ctx.args.version} as applied")
            with migration_lock(conn, timeout=60, on_wait=ctx.note):
                rows = baseline(conn, files, ctx.args.version)
        finally:
            conn.close()
        info["baselined"] = [r.version for r in rows]
    ctx.emit(
        {"baselined": [r.version for r in rows]},
        [
            f"recorded {len(rows)} migration(s) up to {ctx.args.version} as applied (baseline) in the "
            f"{settings.describe()}"
        ],
    )
    return EXIT_OK


# --- backup and restore -----------------------------------------------------------------------------------


def _take_backup(ctx: Context, settings: DatabaseSettings, conn: Connection[Any], *, purpose: str) -> Any:
    from precog_db.backup import backup

    major = conn.info.server_version // 10000
    progress = Progress(ctx.stderr)

    def show(elapsed: float, size: int) -> None:
        progress.update(f"pg_dump {settings.dbname}: {elapsed:.0f}s, {size / 1_048_576:.1f} MiB")

    with ctx.operation("backup", settings, purpose=purpose) as info:
        info["confirmation"] = "PRECOG_PROD_CONFIRMED=yes" if settings.env is Environment.PROD else "not required"
        try:
            made = backup(
                settings,
                server_major=major,
                root=getattr(ctx.args, "backup_dir", None),
                keep=getattr(ctx.args, "keep", None),
                progress=show,
            )
        finally:
            progress.done()
        info.update(dump=str(made.path), size=made.size, entries=made.entries, pruned=[str(p) for p in made.pruned])
    return made


def _backup_summary(made: Any) -> str:
    pruned = f"; pruned {len(made.pruned)} old dump(s)" if made.pruned else ""
    return (
        f"verified backup {made.path} ({made.entries} archive entries, {made.size / 1_048_576:.1f} MiB, "
        f"{made.duration_s:.1f}s){pruned}"
    )


def cmd_backup(ctx: Context) -> int:
    settings = ctx.settings()
    ctx.show_banner(settings, "backup")
    conn = ctx.connect(settings, "back up")
    try:
        made = _take_backup(ctx, settings, conn, purpose="backup command")
    finally:
        conn.close()
    ctx.emit(
        {
            "path": str(made.path),
            "size": made.size,
            "entries": made.entries,
            "verified": True,
            "pruned": [str(p) for p in made.pruned],
            "tool": str(made.tool),
        },
        [_backup_summary(made)],
    )
    return EXIT_OK


def cmd_restore(ctx: Context) -> int:
    from precog_db.backup import check_restore_target, restore
    from precog_db.stamp import read_stamp, stamp_database

    settings = ctx.settings()
    path = Path(ctx.args.file)
    ctx.show_banner(settings, "restore")
    with ctx.operation("restore", settings, file=str(path)) as info:
        check_restore_target(settings, path)
        conn = ctx.connect(settings, "restore")
        try:
            major = conn.info.server_version // 10000
        finally:
            conn.close()
        info["confirmation"] = ctx.confirm(
            settings, f"restore {path.name} (replacing the objects it contains)", always=True
        )
        entries = restore(settings, path, server_major=major)
        info["entries"] = entries
        stamp = read_stamp(settings)
        if stamp is not None and (stamp.env is not settings.env or stamp.is_copy):
            stamp_database(settings.env, force=True, settings=settings)
            info["restamped"] = f"{stamp.env.value} -> {settings.env.value}"
    lines = [f"restored {path} into the {settings.describe()} ({entries} archive entries)"]
    if "restamped" in info:
        lines.append(
            f"re-stamped it as {settings.env.value} (the dump carried the {info['restamped'].split()[0]} stamp)"
        )
    ctx.emit({"restored": str(path), "entries": entries, "restamped": info.get("restamped")}, lines)
    return EXIT_OK


# --- audit ----------------------------------------------------------------------------------------------


def _entry_line(entry: dict[str, Any]) -> str:
    if "unreadable" in entry:
        return f"(unreadable line) {entry['unreadable'][:200]}"
    db = entry.get("database") or {}
    where = f"{db.get('name')}@{db.get('host')}:{db.get('port')}" if db else "-"
    parts = [
        str(entry.get("ts", "?")),
        f"{entry.get('who', '?')}@{entry.get('host', '?')}",
        str(entry.get("environment") or "-"),
        where,
        str(entry.get("operation", "?")),
        str(entry.get("outcome", "?")).upper(),
    ]
    if entry.get("confirmation"):
        parts.append(f"[{entry['confirmation']}]")
    if entry.get("duration_ms") is not None:
        parts.append(f"{entry['duration_ms']} ms")
    if entry.get("error"):
        parts.append(f"- {entry['error']}")
    return "  ".join(parts)


def cmd_audit_tail(ctx: Context) -> int:
    if ctx.args.lines < 1:
        raise UsageError("-n must be at least 1")
    path = audit.audit_log_path()
    entries = audit.tail(ctx.args.lines, path)
    lines = [_entry_line(e) for e in entries] if entries else [f"no audit entries in {path}"]
    ctx.emit(entries, lines)
    return EXIT_OK


# --- main ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cli_logging(stream: TextIO, as_json: bool) -> Iterator[None]:
    """Library log events (warnings and up) go to stderr while a command runs; the previous setup is restored."""
    was_configured = structlog.is_configured()
    previous = structlog.get_config()
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[structlog.processors.add_log_level, mask_secrets, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        if was_configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()


def _fail(ctx: Context | None, stderr: TextIO, exc: BaseException, settings: DatabaseSettings | None) -> int:
    outcome = audit.outcome_of(exc)
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, PrecogDBError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = ctx.scrub(text) if ctx is not None else scrub_text(text)
    label = "refused" if outcome == audit.REFUSED else "error"
    stderr.write(f"{PROG}: {label}: {' '.join(text.split())}\n")
    stderr.flush()
    if ctx is not None and outcome == audit.REFUSED and not audit.was_recorded(exc):
        # Every refusal is audited, including the ones before any operation started.
        command = " ".join(
            str(x)
            for x in (
                ctx.args.command,
                getattr(ctx.args, "migrate_command", None),
                getattr(ctx.args, "local_command", None),
            )
            if x
        )
        with contextlib.suppress(audit.AuditLogError):
            audit.record(
                command,
                outcome=audit.REFUSED,
                settings=settings,
                environment=None if settings is not None else ctx.args.env,
                argv=ctx.argv,
                error=f"{type(exc).__name__}: {text}",
            )
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``precog-db`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    stdout, stderr = sys.stdout, sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_USAGE)
    command_line = [PROG, *scrub_argv(arguments)]  # parsed: a DSN keeps no password
    ctx = Context(args, command_line, stdout, stderr)
    handler: Callable[[Context], int] = args.handler
    try:
        with _cli_logging(stderr, ctx.json), audit.command_line(command_line):
            return handler(ctx)
    except KeyboardInterrupt:
        stderr.write(f"{PROG}: interrupted\n")
        return EXIT_FAILED
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stop the interpreter complaining at exit
        return EXIT_FAILED
    except Exception as exc:
        import psycopg

        if isinstance(exc, PrecogDBError | OSError | psycopg.Error):
            return _fail(ctx, stderr, exc, ctx._settings)
        raise


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
