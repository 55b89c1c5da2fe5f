"""Reading configuration text: ``.env`` files and ``DATABASE_URL``.

Files are parsed once, with python-dotenv's public `dotenv_values`, from text
this module reads itself (the lines it cannot parse are the ones it reports
on the ``dotenv.main`` logger; `_first_bad_line` turns them into errors), so
that ``os.environ`` is never mutated, a BOM or CRLF line endings are
harmless, and a malformed line is an error rather than a warning.

``DATABASE_URL`` is parsed by libpq's own parser (`url_values`) into the
fields it may set, each through the field table (`precog_db._fields`); any
other URL parameter is refused, naming it. No message ever contains a
configured value. Which source wins is the loader's business
(`precog_db._loader`); this module only reads. Import the public names from
`precog_db.settings`.
"""

from __future__ import annotations

import difflib
import io
import logging
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from precog_db._fields import BY_VAR, as_secret, parse_field
from precog_db.errors import ConfigurationError
from precog_db.log import get_logger

__all__ = [
    "DATABASE_URL",
    "PROCESS_ONLY",
    "check_file_permissions",
    "check_secret_file_mode",
    "read_env_file",
    "resolve_config_dir",
    "url_dbname",
    "url_values",
]

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

#: A settings file larger than this is not a settings file (and is not read into memory).
_MAX_ENV_FILE_BYTES = 1 << 20

#: PRECOG_* variables read only from the process environment: a file must not be able to set them.
PROCESS_ONLY = frozenset(
    {"PRECOG_PROD_CONFIRMED", "PRECOG_CONFIG_DIR", "PRECOG_AUDIT_LOG", "PRECOG_AUDIT_MAX_BYTES", "PRECOG_AUDIT_BACKUPS"}
)
_OTHER_KNOWN = {"PRECOG_ENV", *PROCESS_ONLY}

#: The twelve-factor variable: a PostgreSQL URL that fills several fields at once.
DATABASE_URL = "DATABASE_URL"
#: URL parameters (libpq's names) DATABASE_URL may set, and the field each one fills.
_URL_KEYS = {
    "host": "host",
    "port": "port",
    "dbname": "dbname",
    "user": "user",
    "password": "password",
    "sslmode": "sslmode",
    "connect_timeout": "connect_timeout",
    "application_name": "application_name",
}


def resolve_config_dir(
    config_dir: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The directory `.env` files are read from: argument, ``PRECOG_CONFIG_DIR``, else ``./config``."""
    env = os.environ if environ is None else environ
    if config_dir is not None:
        return Path(config_dir)
    from_env = env.get("PRECOG_CONFIG_DIR", "").strip()
    return Path(from_env) if from_env else Path("config")


class _InvalidLines(logging.Filter):
    """Collects the lines python-dotenv reports as unparseable while `dotenv_values` runs, and keeps them quiet.

    `dotenv_values` skips a malformed statement with the warning "could not
    parse statement starting at line N" on the ``dotenv.main`` logger; its
    argument is the line number, which is all a message may show.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if args and isinstance(args[0], int):
            self.lines.append(args[0])
            return False
        return True


_DOTENV_LOGGER = logging.getLogger("dotenv.main")


def _parse_env_text(text: str) -> tuple[dict[str, str | None], list[int]]:
    """`dotenv_values` over ``text`` (parsed once), and the numbers of the lines it could not parse."""
    catcher = _InvalidLines()
    _DOTENV_LOGGER.addFilter(catcher)
    try:
        values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    finally:
        _DOTENV_LOGGER.removeFilter(catcher)
    return dict(values), catcher.lines


def _line_of(text: str, key: str) -> int:
    """The number of the first line that starts with ``key`` (after ``export`` and an opening quote)."""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        if stripped.lstrip("'\"").startswith(key):
            return number
    return 1


def _first_bad_line(text: str, values: Mapping[str, str | None], unparseable: list[int]) -> tuple[int, bool] | None:
    """The first broken line, and whether the problem is a malformed DB_/PRECOG_ name; None when all are fine.

    A key without '=' (python-dotenv accepts it as "no value") is almost
    always a broken line, e.g. the second line of a wrapped password or
    DB_PASSWORDsecret with the '=' lost; its "key" may be a secret, so it is
    reported by line number only, like any malformed line.
    """
    problems = [(line, False) for line in unparseable]
    for key, value in values.items():
        if value is None:
            problems.append((_line_of(text, key), False))
        elif key.startswith(("DB_", "PRECOG_")) and not key.isidentifier():
            problems.append((_line_of(text, key), True))
    return min(problems) if problems else None


def read_env_file(path: Path) -> dict[str, str | None] | None:
    """Read one `.env` file; None when it does not exist."""
    try:
        info = path.stat()
        if stat.S_ISREG(info.st_mode) and info.st_size > _MAX_ENV_FILE_BYTES:
            raise ConfigurationError(
                f"{path} is larger than {_MAX_ENV_FILE_BYTES // 1024} KiB, which no settings file is; "
                "point PRECOG_CONFIG_DIR at the right directory or replace the file"
            )
        if not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode):
            # A FIFO would block the service at startup and a device like
            # /dev/zero would be read forever: refuse before opening.
            raise ConfigurationError(
                f"{path} is not a regular file (a pipe, socket or device); replace it with a text file"
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ConfigurationError(f"{path} is a directory, not a .env file; remove it or rename it") from None
    except PermissionError:
        raise ConfigurationError(
            f"{path} cannot be read (permission denied); give the service user read access, "
            f"e.g. chmod 600 {path} and chown it to that user"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"{path} cannot be read ({exc.strerror}); check the file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigurationError(f"{path} line {line} is not valid UTF-8; save the file as UTF-8") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ConfigurationError(f"{path} line {line} contains a NUL byte; this is not a text file")
    values, unparseable = _parse_env_text(text)
    problem = _first_bad_line(text, values, unparseable)
    if problem is not None:
        line, malformed_name = problem
        if malformed_name:
            raise ConfigurationError(
                f"{path} line {line} has a malformed variable name (letters, digits and _ only); fix the line"
            )
        raise ConfigurationError(
            f"{path} line {line} is not a valid KEY=VALUE line; "
            "fix or remove it (quote values that contain spaces or #)"
        )
    _warn_unknown_keys(path, values)
    return values


def _warn_unknown_keys(path: Path, values: Mapping[str, str | None]) -> None:
    known = set(BY_VAR) | _OTHER_KNOWN
    for key in values:
        if (key.startswith("DB_") or key.startswith("PRECOG_")) and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            log.warning(
                "unknown_setting",
                file=str(path),
                key=key,
                did_you_mean=close[0] if close else None,
            )


def _url_has_password(raw: str | None) -> bool:
    try:
        return bool(url_values(raw, "a .env file").get("password"))
    except ConfigurationError:
        return False  # reported, with the file's name, when the URL is applied


def check_file_permissions(path: Path, values: Mapping[str, str | None]) -> None:
    if not values.get("DB_PASSWORD") and not _url_has_password(values.get(DATABASE_URL)):
        return
    check_secret_file_mode(path, path.stat().st_mode)


def check_secret_file_mode(path: Path | str, mode: int) -> None:
    """The rule for a file holding a password: no access for group or others (POSIX; not on Windows).

    Applies to a staging/prod ``.env`` file with a ``DB_PASSWORD`` and to ``DB_PASSWORD_FILE``
    (`precog_db._credentials`); `secret_file_rule_applies` says when.
    """
    if sys.platform == "win32":
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(f"{path} holds a password and is readable by group/others; run `chmod 600 {path}`")


def url_values(raw: str | None, where: str) -> dict[str, Any]:
    """The fields a ``DATABASE_URL`` found in ``where`` sets (parsed by libpq's own parser), or {} when unset.

    Never quotes the URL: it holds the password.
    """
    text = (raw or "").strip()
    if not text:
        return {}
    if not text.startswith(("postgresql://", "postgres://")):
        raise ConfigurationError(
            f"DATABASE_URL in {where} is not a PostgreSQL URL; it must start with postgresql:// or postgres:// "
            "(e.g. postgresql://user:password@host:5432/dbname?sslmode=require), or be removed"
        )
    import psycopg  # only when a URL is set: `precog-db env` without one stays light
    from psycopg.conninfo import conninfo_to_dict

    params: dict[str, Any] | None
    try:
        params = conninfo_to_dict(text)
    except psycopg.Error:
        params = None
    if params is None:  # raised outside the except block: libpq's message may quote the URL
        raise ConfigurationError(
            f"DATABASE_URL in {where} is not a valid PostgreSQL URL (libpq cannot parse it); check its "
            "percent-encoding (a password with @, : or / must be percent-encoded) and its ?key=value parameters"
        )
    unknown = sorted(set(params) - set(_URL_KEYS))
    if unknown:
        raise ConfigurationError(
            f"DATABASE_URL in {where} sets {', '.join(unknown)}, which precog-db does not take from a URL; it "
            f"accepts {', '.join(sorted(_URL_KEYS))}. Remove the parameter and use the DB_* setting instead "
            "(e.g. DB_STATEMENT_TIMEOUT rather than options=-c statement_timeout=...)"
        )
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None or str(value) == "":
            continue
        name = _URL_KEYS[key]
        if name in ("host", "port") and "," in str(value):
            raise ConfigurationError(
                f"DATABASE_URL in {where} names several hosts or ports; precog-db connects to one server. "
                "Give one host (a pooler or a load balancer in front of the others)"
            )
        out[name] = parse_field(
            name, as_secret(str(value)) if name == "password" else str(value), f"DATABASE_URL in {where}"
        )
    return out


def url_dbname(raw: str | None, where: str) -> str | None:
    dbname = url_values(raw, where).get("dbname")
    return dbname if isinstance(dbname, str) else None
