"""The layered loader: `load_settings` reads every source and builds one `DatabaseSettings`.

Precedence, highest first (the full rules are in `precog_db.settings`):
keyword overrides, the process environment (``DB_*``, then ``DATABASE_URL``),
``<config_dir>/.env.<env>``, ``<config_dir>/.env`` (each file: its ``DB_*``,
then its ``DATABASE_URL``), the environment's defaults. The environment is
resolved first (`precog_db.environment.resolve_with_files`), because it picks
the second file. Reading is `precog_db._dotenv`'s job, parsing each value the
field table's (`precog_db._fields`), validating the result the settings
object's (`precog_db._database_settings`). Import the public names from
`precog_db.settings`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from precog_db._database_settings import SOURCE_NAMES, DatabaseSettings, env_defaults
from precog_db._dotenv import (
    DATABASE_URL,
    PROCESS_ONLY,
    check_file_permissions,
    read_env_file,
    resolve_config_dir,
    url_values,
)
from precog_db._fields import BY_VAR, FIELD_NAMES, SPECS, Secret, parse_field
from precog_db.environment import Environment, parse_environment, resolve_with_files
from precog_db.errors import ConfigurationError, EnvironmentMismatchError
from precog_db.log import get_logger

__all__ = ["load_settings", "secret_file_rule_applies", "settings_for"]

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

_STRONG_SSL = ("require", "verify-ca", "verify-full")


def secret_file_rule_applies(env: Environment) -> bool:
    """Whether files holding a password must be private to their owner (staging and production)."""
    return env in (Environment.STAGING, Environment.PROD)


def load_settings(
    env: str | Environment | None = None,
    *,
    config_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> DatabaseSettings:
    """Resolve the environment and load its settings.

    ``overrides`` use field names (``host``, ``port``, ``dbname``, ``pool_max``
    …). ``environ`` defaults to `os.environ`; it is read, never written.
    Raises `ConfigurationError` for invalid input and `EnvironmentMismatchError`
    when the database name belongs to another environment.
    """
    if isinstance(overrides.get("password"), str):
        overrides["password"] = Secret(overrides["password"])
    try:
        return _load_settings(env, config_dir, environ, overrides)
    except (ConfigurationError, EnvironmentMismatchError) as exc:
        error = exc
    # Re-raised from here with a fresh traceback: the frames below hold every
    # raw value read (file contents, a password pasted on the wrong line) as
    # locals, and tracebacks that render locals would log them. The message
    # already names the file, line or variable. This frame's own overrides go too.
    overrides.clear()
    error.__traceback__ = None
    raise error


def _load_settings(
    env: str | Environment | None,
    config_dir: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None,
    overrides: dict[str, Any],
) -> DatabaseSettings:
    process_env = os.environ if environ is None else environ
    provider = overrides.pop("password_provider", None)
    directory = resolve_config_dir(config_dir, process_env)
    explicit_dir = config_dir is not None or bool(process_env.get("PRECOG_CONFIG_DIR", "").strip())
    if directory.exists() and not directory.is_dir():
        raise ConfigurationError(f"config directory {directory} is a file; point PRECOG_CONFIG_DIR at a directory")
    if explicit_dir and not directory.exists():
        raise ConfigurationError(
            f"config directory {directory} does not exist; create it or fix PRECOG_CONFIG_DIR / --config-dir"
        )
    unknown = sorted(set(overrides) - FIELD_NAMES)
    if unknown:
        raise ConfigurationError(
            f"unknown setting(s) {', '.join(unknown)}; valid names are {', '.join(sorted(FIELD_NAMES))}"
        )

    # The shared file is read first: its PRECOG_ENV and DB_NAME take part in
    # resolving the environment (resolve_environment), which picks the second file.
    shared_path = directory / ".env"
    shared = read_env_file(shared_path)
    dbname_override = overrides.get("dbname")
    resolution = resolve_with_files(env, dbname_override, process_env, shared_path, shared)
    process_url = url_values(process_env.get(DATABASE_URL), "the process environment")
    resolved = resolution.env

    values: dict[str, Any] = env_defaults(resolved)
    origins = dict.fromkeys(values, "default")
    files: list[Path] = []
    #: Per password source, the precedence of the layer that set it (see `_one_password_source`): from
    #: lowest, each file's DATABASE_URL then its DB_* lines, the process DATABASE_URL then its DB_*, the arguments.
    source_rank: dict[str, int] = {}

    own_path = directory / f".env.{resolved.value}"
    for layer, (path, content) in enumerate(((shared_path, shared), (own_path, read_env_file(own_path)))):
        url_rank, rank = 2 * layer + 1, 2 * layer + 2
        if content is None:
            continue
        if secret_file_rule_applies(resolved) or path.name in (".env.staging", ".env.prod"):
            check_file_permissions(path, content)
        _check_process_only_keys(path, content, resolved, shared=path is shared_path)
        files.append(path)
        for name, value in url_values(content.get(DATABASE_URL), str(path)).items():
            values[name] = value
            origins[name] = f"DATABASE_URL in {path}"
            source_rank[name] = url_rank
        for var, raw in content.items():
            spec = BY_VAR.get(var)
            if spec is None or raw is None or raw == "":
                continue
            values[spec.field] = parse_field(spec.field, raw, str(path))
            origins[spec.field] = str(path)
            source_rank[spec.field] = rank

    for name, value in process_url.items():
        values[name] = value
        origins[name] = "DATABASE_URL in the process environment"
        source_rank[name] = 5
    for spec in SPECS:
        raw = process_env.get(spec.var)
        if raw is None or raw == "":
            continue
        values[spec.field] = parse_field(spec.field, raw, "the process environment")
        origins[spec.field] = "environment"
        source_rank[spec.field] = 6

    for name, raw in overrides.items():
        if raw is None:
            continue
        values[name] = parse_field(name, raw, "the arguments")
        origins[name] = "argument"
        source_rank[name] = 7
    if provider is not None:
        values["password_provider"] = provider
        origins["password_provider"] = "argument"  # noqa: S105  # an origin, not a password
        source_rank["password_provider"] = 7
    _one_password_source(values, origins, source_rank)

    if resolved is Environment.PROD and values["sslmode"] not in _STRONG_SSL:
        log.warning(
            "weak_sslmode_in_production",
            sslmode=values["sslmode"],
            source=origins["sslmode"],
            env=resolved.value,
        )
    origins["env"] = resolution.source
    # DatabaseSettings checks the rest: pool_min <= pool_max, and that the
    # database name does not name another environment (check_name_matches).
    return DatabaseSettings(env=resolved, files=tuple(files), origins=origins, **values)


def _one_password_source(values: dict[str, Any], origins: dict[str, str], rank: Mapping[str, int]) -> None:
    """Keep only the password source(s) set by the highest-precedence layer.

    ``DB_PASSWORD_FILE`` exported in the process environment replaces a
    ``DB_PASSWORD`` from a ``.env`` file, and the password of a process
    ``DATABASE_URL`` replaces a ``.env`` file's ``DB_PASSWORD_FILE`` or
    ``DB_PASSFILE``, as any higher layer replaces a lower one (a source's
    ``DATABASE_URL`` sits just below its ``DB_*``). Two sources set in the same
    layer stay, and `DatabaseSettings` refuses them as ambiguous.
    """
    present = {name: rank.get(name, 0) for name in SOURCE_NAMES if values.get(name)}
    if not present:
        return
    top = max(present.values())
    for name, level in present.items():
        if level < top:
            values[name] = None if name == "password_provider" else ""
            origins[name] = "default"


def _check_process_only_keys(
    path: Path, content: Mapping[str, str | None], resolved: Environment, *, shared: bool
) -> None:
    """PRECOG_ENV in an environment's own file must agree; process-only variables in a file are reported as ignored."""
    declared = (content.get("PRECOG_ENV") or "").strip()
    own = declared and not shared and parse_environment(declared, source=f"PRECOG_ENV in {path}", show_value=False)
    if own and own is not resolved:
        raise ConfigurationError(
            f"{path} sets PRECOG_ENV to another environment than {resolved.value}, the one that chose this file; "
            f"an environment's own file cannot change the environment. Remove PRECOG_ENV from {path} "
            f"(set it in the process environment or in {path.parent / '.env'})"
        )
    for key in content:
        if key == "PRECOG_PROD_CONFIRMED":
            log.warning(
                "prod_confirmation_in_file_ignored",
                file=str(path),
                reason="PRECOG_PROD_CONFIRMED is deliberately never read from a .env file: a file copied from a "
                "server must not confirm production on another machine",
                fix="remove the line; confirm in the process itself, e.g. PRECOG_PROD_CONFIRMED=yes precog-db ...",
            )
        elif key in PROCESS_ONLY:
            log.warning(
                "setting_ignored",
                file=str(path),
                key=key,
                reason=f"{key} is read only from the process environment",
                fix=f"remove it from {path} and export it in the process environment instead",
            )


def settings_for(env: str | Environment | None, settings: DatabaseSettings | None, *, caller: str) -> DatabaseSettings:
    """The settings an API call acts on: ``settings`` if given, else `load_settings(env)`.

    Passing both with different environments is a `ConfigurationError`
    naming ``caller``, because it is ambiguous which one was meant.
    """
    if settings is None:
        return load_settings(env)
    if env is not None and parse_environment(env) is not settings.env:
        raise ConfigurationError(
            f"{caller} got env={parse_environment(env).value} but settings for "
            f"{settings.env.value}; pass one or the other"
        )
    return settings
