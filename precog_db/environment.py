"""Which environment this process runs in.

Resolution, first match wins: the explicit argument, ``PRECOG_ENV`` (process,
then ``config/.env``), an inference from the database name, then ``dev``
(`resolve_environment`). One naming rule (`environment_named_by`) serves both
the inference and the consistency check, and errs toward the stricter
environment: a whole word ``prod`` in the name is production, and a name with ``prod``
inside a word is decided by its identity stamp.

`environment_resolution` (and `get_environment`, built on it) reads the
shared ``config/.env`` through `precog_db._dotenv`, as `load_settings` does:
the settings layer builds on this module, never the other way round.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from precog_db._dotenv import DATABASE_URL, read_env_file, resolve_config_dir, url_dbname
from precog_db.errors import ConfigurationError, EnvironmentNotAllowedError

__all__ = [
    "STRICT",
    "STRICTNESS",
    "Environment",
    "Resolution",
    "ambiguous_environment",
    "environment_named_by",
    "environment_resolution",
    "get_environment",
    "infer_environment",
    "parse_environment",
    "require_environment",
    "resolve_environment",
]


class Environment(StrEnum):
    """The four database environments, from the most to the least forgiving."""

    DEV = "dev"
    TEST = "test"
    STAGING = "staging"
    PROD = "prod"


#: Every environment, from the most to the least forgiving (the order gates report them in).
STRICTNESS: tuple[Environment, ...] = tuple(Environment)
#: The environments that show a banner, need typed confirmations and must carry an identity stamp.
STRICT: tuple[Environment, ...] = (Environment.STAGING, Environment.PROD)

_ALIASES: dict[str, Environment] = {
    "dev": Environment.DEV,
    "development": Environment.DEV,
    "local": Environment.DEV,
    "test": Environment.TEST,
    "testing": Environment.TEST,
    "ci": Environment.TEST,
    "staging": Environment.STAGING,
    "stage": Environment.STAGING,
    "prod": Environment.PROD,
    "production": Environment.PROD,
}

_VALID = ", ".join(e.value for e in Environment)


def parse_environment(
    value: str | Environment, *, source: str = "environment name", show_value: bool = True
) -> Environment:
    """Turn a user-supplied name into an `Environment`, or raise `ConfigurationError`.

    Names are trimmed and case-insensitive; ``production``, ``development``
    and ``testing`` are accepted. ``source`` names where the value came from
    so that the error message can point at it. ``show_value`` False keeps the
    value out of the message (a value read from a file may be a misplaced secret).
    """
    if isinstance(value, Environment):
        return value
    key = str(value).strip().lower()
    try:
        return _ALIASES[key]
    except KeyError:
        shown = repr(value) if show_value and len(str(value)) <= 40 else "(value not shown)"
        raise ConfigurationError(f"{source} {shown} is not a known environment; use one of: {_VALID}") from None


def environment_named_by(dbname: str) -> Environment | None:
    """The environment a database name names, or None: the one naming rule.

    Both the inference (`infer_environment`, when neither ``--env`` nor
    ``PRECOG_ENV`` says) and the consistency check (a database that names
    another environment than the resolved one is refused) use this function,
    so a name can never be inferred as one environment and yet pass as another.

    Whole words decide (the name is lowercased and split on everything but
    letters, so ``precog_prod2`` is ``precog`` + ``prod``): ``prod`` or
    ``production`` names production, ``staging`` or ``stag`` staging,
    ``test``/``testing``/``ci`` test and ``dev``/``development`` dev. When a
    name mentions several, the strictest wins. A name that has ``prod`` or
    ``stag`` only *inside* a word (``products_dev``, ``backstage``,
    ``x_precogprod``) is ambiguous (`ambiguous_environment`): its whole words
    decide here, and its identity stamp must agree before it is opened.
    """
    words = set(_WORD.findall(dbname.lower()))
    if words & _PROD_WORDS:
        return Environment.PROD
    if words & _STAGING_WORDS:
        return Environment.STAGING
    if words & _TEST_WORDS:
        return Environment.TEST
    if words & _DEV_WORDS:
        return Environment.DEV
    return None


def ambiguous_environment(dbname: str) -> Environment | None:
    """The stricter environment a name mentions only inside a word, or None when its words are clear.

    ``products_dev``, ``reproduction``, ``productivity`` → production;
    ``stagger``, ``backstage`` → staging; ``x_precogprod`` → production. Such a
    name cannot be trusted either way: it may be an ordinary word, or a
    production database under a careless name. So its identity stamp decides:
    `precog_db.stamp.judge_stamp` refuses to open an unstamped one in any
    environment (stamp it once to say which it is), and a stamp of another
    environment is refused as always. Nothing is inferred as ``dev`` from it:
    `infer_environment` picks this stricter environment when no whole word
    names one.
    """
    name = dbname.lower()
    words = set(_WORD.findall(name))
    if "prod" in name and not words & _PROD_WORDS:
        return Environment.PROD
    if "stag" in name and not words & (_STAGING_WORDS | _PROD_WORDS):
        return Environment.STAGING
    return None


def infer_environment(dbname: str) -> Environment:
    """Infer the environment from a database name: its whole words (`environment_named_by`), else the
    environment it mentions inside a word (`ambiguous_environment`), else ``dev``."""
    return environment_named_by(dbname) or ambiguous_environment(dbname) or Environment.DEV


_WORD = re.compile(r"[a-z]+")
_PROD_WORDS = frozenset({"prod", "production"})
_STAGING_WORDS = frozenset({"staging", "stag"})
_TEST_WORDS = frozenset({"test", "testing", "ci"})
_DEV_WORDS = frozenset({"dev", "development"})


@dataclass(frozen=True)
class Resolution:
    """The environment and where it came from (for messages and ``precog-db env``)."""

    env: Environment
    source: str


def resolve_environment(
    explicit: str | Environment | None = None,
    *,
    explicit_source: str = "the environment argument",
    dbname: str | None = None,
    dbname_source: str = "the database argument",
    environ: Mapping[str, str] | None = None,
    file_values: Mapping[str, str | None] | None = None,
    file_name: str = "config/.env",
) -> Resolution:
    """Resolve the environment and say where it came from. First match wins:

    1. ``explicit`` (an argument, ``--env``);
    2. ``PRECOG_ENV`` in the process environment;
    3. ``PRECOG_ENV`` in the shared ``config/.env`` (``file_values``);
    4. inferred from ``dbname`` (a ``dbname=`` argument, ``--database``);
    5. inferred from ``DB_NAME`` in the process environment;
    6. inferred from ``DB_NAME`` in ``config/.env``;
    7. ``dev``.

    This is the only implementation of the order; `get_environment`,
    `load_settings`, the CLI and the pytest plugin all call it.
    """
    env = os.environ if environ is None else environ
    files = file_values or {}
    if explicit is not None and str(explicit).strip():
        return Resolution(parse_environment(explicit, source=explicit_source), explicit_source)
    declared = env.get("PRECOG_ENV", "").strip()
    if declared:
        return Resolution(parse_environment(declared, source="PRECOG_ENV"), "PRECOG_ENV")
    declared = (files.get("PRECOG_ENV") or "").strip()
    if declared:
        where = f"PRECOG_ENV in {file_name}"
        return Resolution(parse_environment(declared, source=where, show_value=False), where)
    for name, where in (
        (dbname, dbname_source),
        (env.get("DB_NAME"), "DB_NAME"),
        (files.get("DB_NAME"), f"DB_NAME in {file_name}"),
    ):
        if name and name.strip():
            return Resolution(infer_environment(name.strip()), f"inferred from {where}")
    return Resolution(Environment.DEV, "default")


def resolve_with_files(
    env: str | Environment | None,
    dbname: object,
    environ: Mapping[str, str],
    shared_path: Path,
    shared: Mapping[str, str | None] | None,
) -> Resolution:
    """`resolve_environment`, with a DATABASE_URL's database name where its precedence puts it.

    ``shared`` is ``config/.env`` already read (from ``shared_path``; None
    when there is none), so that `load_settings` reads it once. The inference
    reads, first match wins: the dbname argument, ``DB_NAME`` in the process,
    ``DATABASE_URL`` in the process, ``DB_NAME`` in ``config/.env``,
    ``DATABASE_URL`` in ``config/.env``.
    """
    source = "the dbname argument"
    name = dbname if isinstance(dbname, str) and dbname.strip() else None
    files = shared or {}
    if name is None and not (environ.get("DB_NAME") or "").strip():
        name = url_dbname(environ.get(DATABASE_URL), "the process environment")
        source = "the database name in DATABASE_URL"
        if name is None and not (files.get("DB_NAME") or "").strip():
            name = url_dbname(files.get(DATABASE_URL), str(shared_path))
            source = f"the database name in DATABASE_URL in {shared_path}"
    return resolve_environment(
        env,
        dbname=name,
        dbname_source=source,
        environ=environ,
        file_values=shared,
        file_name=str(shared_path),
    )


def environment_resolution(
    env: str | Environment | None = None,
    *,
    config_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    dbname: str | None = None,
) -> Resolution:
    """Which environment `load_settings` would resolve, and where it came from, without loading the rest.

    Reads ``config/.env`` (its PRECOG_ENV and DB_NAME count, see
    `precog_db.environment.resolve_environment`); for commands that do not connect.
    """
    process_env = os.environ if environ is None else environ
    shared_path = resolve_config_dir(config_dir, process_env) / ".env"
    try:
        shared = read_env_file(shared_path)
    except ConfigurationError as exc:
        error = exc
    else:
        return resolve_with_files(env, dbname, process_env, shared_path, shared)
    error.__traceback__ = None  # the frames below hold the file's raw values
    raise error


def get_environment(
    explicit: str | Environment | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Environment:
    """Resolve the current environment exactly as `load_settings` does (see `resolve_environment`).

    That includes ``PRECOG_ENV`` and ``DB_NAME`` in the shared ``config/.env``
    (``PRECOG_CONFIG_DIR``), so `require_environment` and the gates never see
    another environment than the one the settings load. ``environ`` defaults
    to `os.environ` and exists for tests.
    """
    return environment_resolution(explicit, environ=environ).env


def require_environment(*allowed: str | Environment, current: Environment | None = None) -> Environment:
    """Raise `EnvironmentNotAllowedError` unless the current environment is one of ``allowed``.

    Returns the current environment so callers can use it.
    """
    wanted = [parse_environment(a) for a in allowed]
    now = current if current is not None else get_environment()
    if now not in wanted:
        names = ", ".join(w.value for w in wanted) or "(none)"
        raise EnvironmentNotAllowedError(
            f"this operation needs environment {names}, but the current environment is "
            f"{now.value}; set PRECOG_ENV to one of {names} if that is really intended"
        )
    return now
