"""Which environment this process runs in.

Resolution, first match wins: the explicit argument, ``PRECOG_ENV``, an
inference from ``DB_NAME``, then ``dev``. Inference errs toward the stricter
environment: a name containing ``prod`` is production.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum

from precog_db.errors import ConfigurationError, EnvironmentNotAllowedError

__all__ = [
    "Environment",
    "environment_named_by",
    "get_environment",
    "infer_environment",
    "parse_environment",
    "require_environment",
]


class Environment(StrEnum):
    """The four database environments, from the most to the least forgiving."""

    DEV = "dev"
    TEST = "test"
    STAGING = "staging"
    PROD = "prod"


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


def parse_environment(value: str | Environment, *, source: str = "environment name") -> Environment:
    """Turn a user-supplied name into an `Environment`, or raise `ConfigurationError`.

    Names are trimmed and case-insensitive; ``production``, ``development``
    and ``testing`` are accepted. ``source`` names where the value came from
    so that the error message can point at it.
    """
    if isinstance(value, Environment):
        return value
    key = str(value).strip().lower()
    try:
        return _ALIASES[key]
    except KeyError:
        shown = repr(value) if len(str(value)) <= 40 else "the given value"
        raise ConfigurationError(f"{source} {shown} is not a known environment; use one of: {_VALID}") from None


def infer_environment(dbname: str) -> Environment:
    """Infer the environment from a database name, erring toward the stricter one.

    A name that contains ``prod`` is production, then ``stag``, then ``test``;
    anything else is ``dev``.
    """
    name = dbname.lower()
    if "prod" in name:
        return Environment.PROD
    if "stag" in name:
        return Environment.STAGING
    if "test" in name:
        return Environment.TEST
    return Environment.DEV


_WORD = re.compile(r"[a-z]+")


def environment_named_by(dbname: str) -> Environment | None:
    """Return the environment a database name clearly names, or None.

    Unlike `infer_environment`, this looks at whole words only (``precog_dev``
    names dev, ``products`` names nothing), so that it can be used to refuse a
    database that belongs to another environment without false alarms. When a
    name mentions several environments, the strictest wins.
    """
    named = {_ALIASES[w] for w in _WORD.findall(dbname.lower()) if w in _ALIASES and w != "local"}
    for env in (Environment.PROD, Environment.STAGING, Environment.TEST, Environment.DEV):
        if env in named:
            return env
    return None


def get_environment(
    explicit: str | Environment | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Environment:
    """Resolve the current environment.

    First match wins: ``explicit``; ``PRECOG_ENV``; inferred from ``DB_NAME``;
    ``dev``. ``environ`` defaults to `os.environ` and exists for tests.
    """
    env = os.environ if environ is None else environ
    if explicit is not None and str(explicit).strip():
        return parse_environment(explicit, source="the environment argument")
    declared = env.get("PRECOG_ENV", "").strip()
    if declared:
        return parse_environment(declared, source="PRECOG_ENV")
    dbname = env.get("DB_NAME", "").strip()
    if dbname:
        return infer_environment(dbname)
    return Environment.DEV


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
