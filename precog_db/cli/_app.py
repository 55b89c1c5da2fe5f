"""``precog-db``'s parser, its logging while a command runs, the error line, and `main`.

Every `PrecogDBError`, `OSError` and psycopg error becomes one line on stderr
and exit code 1 (2 for a usage error), never a traceback; a refusal nobody has
audited yet is audited here.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import structlog

from precog_db import audit
from precog_db._secrets import scrub_argv, scrub_text
from precog_db.cli import _audit_log, _backups, _console, _database, _local, _migrate
from precog_db.cli._context import EXIT_FAILED, EXIT_OK, EXIT_USAGE, PROG, Context
from precog_db.errors import AuditLogError, PrecogDBError, UsageError
from precog_db.log import mask_secrets
from precog_db.settings import DatabaseSettings

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

_EPILOG = """\
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
    # The order of --help: env, check, stamp, local, migrate, backup, restore, sql, shell, audit.
    for group in (_database, _local, _migrate, _backups, _console, _audit_log):
        group.register(commands, parents)
    return parser


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
    """Print one line for ``exc``, audit it if it is a refusal nobody audited yet; the exit code."""
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
        with contextlib.suppress(AuditLogError):
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
            try:
                return handler(ctx)
            except (KeyboardInterrupt, BrokenPipeError):
                raise
            except Exception as exc:
                # Inside the command_line block, which knows which errors were audited already.
                if _reported(exc):
                    return _fail(ctx, stderr, exc, ctx.loaded_settings)
                raise
    except KeyboardInterrupt:
        stderr.write(f"{PROG}: interrupted\n")
        return EXIT_FAILED
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stop the interpreter complaining at exit
        return EXIT_FAILED


def _reported(exc: Exception) -> bool:
    """Errors that become one line on stderr (exit 1 or 2) rather than a traceback."""
    if isinstance(exc, PrecogDBError | OSError):
        return True
    import psycopg  # only on this path: `precog-db env` never imports the driver

    return isinstance(exc, psycopg.Error)
