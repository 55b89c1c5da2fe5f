"""What every ``precog-db`` command gets: the parsed arguments, output, settings, banner and confirmation.

Commands parse nothing themselves and hold no workflow: they ask the `Context`
for the target settings, call a library function (`precog_db.migrations`,
`precog_db.backup`, `precog_db.stamp`, `precog_db.local`), and print with
`Context.emit`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from precog_db._secrets import scrub_text
from precog_db.confirm import banner, confirmation, use_colour
from precog_db.environment import STRICT, Environment
from precog_db.errors import ConfigurationError, UsageError
from precog_db.settings import DatabaseSettings, environment_resolution, load_settings

if TYPE_CHECKING:
    from psycopg import Connection

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "Context",
    "Progress",
    "add_actions",
    "add_backup_options",
    "add_command",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

PROG = "precog-db"
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


def add_command(
    subparsers: Any, name: str, help_text: str, *, parents: Sequence[argparse.ArgumentParser], **kw: Any
) -> argparse.ArgumentParser:
    """A subcommand parser inheriting the global options (``parents``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help_text,
        description=kw.pop("description", help_text),
        parents=list(parents),
        **kw,
    )
    return parser


def add_actions(parser: argparse.ArgumentParser, dest: str) -> Any:
    """The ACTION subparsers of a command group (``migrate``, ``local``, ``audit``).

    Without an action the command says which actions there are (a usage error, exit 2), instead of
    argparse's bare "the following arguments are required: ACTION".
    """
    actions = parser.add_subparsers(dest=dest, metavar="ACTION")

    def missing_action(_ctx: Any) -> int:
        names = ", ".join(actions.choices)
        raise UsageError(f"which action? one of: {names} (`{parser.prog} ACTION --help` describes each)")

    parser.set_defaults(handler=missing_action)
    return actions


def add_backup_options(parser: argparse.ArgumentParser) -> None:
    """--backup-dir and --keep (``backup`` and ``migrate up``)."""
    parser.add_argument(
        "--backup-dir",
        type=Path,
        metavar="DIR",
        help="root of the dumps, which go to DIR/<env>/ (default: PRECOG_BACKUP_DIR, else ./backups)",
    )
    parser.add_argument(
        "--keep", type=int, metavar="N", help="dumps to keep per database (default: PRECOG_BACKUP_KEEP, else 7)"
    )


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

    @property
    def loaded_settings(self) -> DatabaseSettings | None:
        """The settings `settings` loaded, None before (or when loading them failed)."""
        return self._settings

    def scrub(self, text: str) -> str:
        """``text`` without the settings' password or any connection-string password."""
        return scrub_text(text, [self._settings.password] if self._settings is not None else [])

    # settings ---------------------------------------------------------------------------------

    def environment(self) -> Environment:
        """The environment, without loading settings (for commands that do not connect).

        The same resolution as `load_settings` (`precog_db.settings.environment_resolution`):
        --env, PRECOG_ENV (process, then config/.env), then inferred from --database or DB_NAME.
        """
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
            if "@" in text:
                # user:password@host/db pasted without its scheme: not a database name, and it may hold a
                # password, so it is neither used nor repeated.
                raise UsageError(
                    "--database looks like a URL without its scheme (it contains '@'); write it as "
                    "postgresql://user@host:port/dbname and give the password through DB_PASSWORD, or pass "
                    "only the database name"
                )
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
        if settings.env not in STRICT:
            return
        self.stderr.write(banner(settings, action, colour=use_colour(self.stderr)) + "\n")
        self.stderr.flush()

    def confirm(
        self, settings: DatabaseSettings, action: str, *, always: bool = False, typed_only: bool = False
    ) -> str:
        """The typed confirmation a destructive/schema-changing ``action`` needs; how it was given.

        dev and test need none unless ``always`` (restore); ``typed_only``: ``--yes`` is not enough on staging either.
        """
        return confirmation(
            settings,
            action,
            always=always,
            typed_only=typed_only,
            yes=bool(self.args.yes),
            confirm_database=self.args.confirm_database,
            stdin=self.stdin,
            prompt_to=self.stderr,
        )

    def confirmer(self, settings: DatabaseSettings, *, always: bool = False) -> Callable[[str], str]:
        """`confirm` for ``settings``, as the ``confirm(action)`` callback the library workflows take."""
        return lambda action: self.confirm(settings, action, always=always)

    def notify(self, message: str) -> None:
        """`note`, except with --json (whose stdout is for machines, and whose stderr stays quiet)."""
        if not self.json:
            self.note(message)

    def connect(self, settings: DatabaseSettings, operation: str) -> Connection[Any]:
        """A direct autocommit connection through the chokepoint (guard, naming rule, stamp, reply bound)."""
        from precog_db.connection import connect

        return connect(settings, operation=operation, direct=True)  # maintenance: never through a pooler


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
