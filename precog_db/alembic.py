"""Alembic with precog_db's environments and safety: the whole body of a project's ``env.py``.

Install the extra, ``pip install 'precog-db[alembic]'``, and write
``migrations/env.py`` as::

    from alembic import context
    from precog_db.alembic import run_migrations

    run_migrations(context)                      # or run_migrations(context, target_metadata=Base.metadata)

What `run_migrations` does, for every ``alembic`` command that runs env.py:

1. **The environment**, first match wins: ``-x env=NAME``, ``PRECOG_ENV``,
   then the usual inference (`precog_db.settings.load_settings`: ``DB_NAME``,
   ``DATABASE_URL``, ``config/.env``). ``-x config_dir=DIR`` points at
   another config directory.
2. **The URL** comes from that environment's settings; ``sqlalchemy.url``
   in ``alembic.ini`` is ignored (a warning says so when it is set).
3. **A banner** on stderr on staging and prod, before anything happens.
4. **The production guard**: on prod, ``PRECOG_PROD_CONFIRMED=yes`` and the
   database name, typed at a terminal or given as ``-x confirm_database=NAME``
   (there is no ``--yes`` for prod). Read-only commands (``current``,
   ``history``, ``heads``, ``show``, ``check`` …) need only
   ``PRECOG_PROD_CONFIRMED=yes``, like every connection to prod.
5. **Online**, the SQLAlchemy engine's only connections are opened by
   `precog_db.connection.connect` (a ``creator``; a NullPool): the naming
   rule, the gate, the production guard, the identity stamp and the reply
   bound apply exactly as for any precog_db connection.
6. **Offline** (``--sql``), no connection is opened: the SQL is written for
   the PostgreSQL dialect; the naming rule, the banner and the audit entry
   still apply.
7. **Lock timeouts**: online, the session runs under ``lock_timeout`` =
   ``DB_MIGRATION_LOCK_TIMEOUT`` ms (5000 on staging and prod by default); a
   revision that cannot get its lock in time fails with PostgreSQL's
   ``canceling statement due to lock timeout`` and Alembic's transaction rolls back.
8. **The lint** (``upgrade`` online only): the SQL of the revisions between
   the database's current revision and the destination is rendered the way
   ``alembic upgrade --sql`` renders it (a second ``alembic`` process, offline) and given
   to squawk like a migration file (`precog_db.migrations.lint_sql`): on dev
   and test a warning per finding, on staging and prod refused before any
   revision runs unless the revision file acknowledges the rule with a line
   ``# precog:allow <rule>: <reason>`` (audited as ``acknowledged``). What
   offline rendering cannot show is not linted (docs/CLI.md, "Alembic").
9. **The audit log** gets one entry per run (``alembic upgrade``,
   ``alembic downgrade`` …, with the revision, ``--sql``, the confirmation and
   the outcome), written even when the run is refused or fails.

Needs SQLAlchemy 2 (its ``postgresql+psycopg`` dialect, psycopg 3) and Alembic.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from precog_db import audit
from precog_db.confirm import banner, require_confirmation, use_colour
from precog_db.connection import check_target, connect
from precog_db.environment import Environment
from precog_db.errors import ConfigurationError, MigrationValidationError, PrecogDBError
from precog_db.log import get_logger
from precog_db.settings import DatabaseSettings, load_settings

__all__ = ["READ_ONLY_COMMANDS", "run_migrations", "settings_from_context"]

log = get_logger()

#: Alembic commands that run env.py without changing the schema: no typed confirmation.
READ_ONLY_COMMANDS = frozenset({"current", "history", "heads", "branches", "show", "check"})

#: Set in the environment of the ``alembic upgrade --sql`` process `_lint_revisions` runs: env.py only renders.
_RENDER_VAR = "PRECOG_ALEMBIC_LINT_RENDER"
_RENDER_TIMEOUT = 120.0
_RUNNING = re.compile(r"^-- Running upgrade (?P<start>\S*) -> (?P<rev>\S+)\s*$", re.MULTILINE)


def _x_arguments(context: Any) -> dict[str, str]:
    values = context.get_x_argument(as_dictionary=True)
    return {str(k): str(v) for k, v in dict(values).items()}


def _command(context: Any) -> tuple[str, str | None]:
    """The alembic command name (``upgrade`` …) and its revision argument, when the CLI ran it."""
    opts = getattr(context.config, "cmd_opts", None)
    cmd = getattr(opts, "cmd", None)
    name = "run"
    if isinstance(cmd, tuple) and cmd and callable(cmd[0]):
        name = str(getattr(cmd[0], "__name__", "run"))
    revision = getattr(opts, "revision", None)
    return name, (str(revision) if revision is not None else None)


def settings_from_context(context: Any, environ: Mapping[str, str] | None = None) -> DatabaseSettings:
    """The settings of the database the run acts on: ``-x env``, else PRECOG_ENV, else the inference."""
    x = _x_arguments(context)
    env = x.get("env", "").strip() or None
    config_dir = x.get("config_dir", "").strip() or None
    try:
        return load_settings(env, config_dir=config_dir, environ=environ)
    except ConfigurationError as exc:
        if env is not None and "the environment argument" in str(exc):
            raise ConfigurationError(str(exc).replace("the environment argument", "-x env")) from None
        raise


def _alembic_wording(exc: PrecogDBError) -> PrecogDBError:
    """A confirmation refusal, with the CLI's ``--confirm-database NAME`` said the Alembic way."""
    text = re.sub(r"--confirm-database(?: |=)?", "-x confirm_database=", str(exc))
    text = text.replace("pass --yes or -x confirm_database=", "pass -x confirm_database=")
    if text == str(exc):
        return exc
    return type(exc)(text)


def _render_offline(context: Any, target_metadata: Any, configure: dict[str, Any]) -> None:
    """``--sql``: render the pending revisions as PostgreSQL SQL on stdout; nothing connects."""
    context.configure(
        dialect_name="postgresql",
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **configure,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations(context: Any, *, target_metadata: Any = None, **configure: Any) -> None:
    """Run the Alembic migrations of ``context`` (``from alembic import context``) against the resolved environment.

    ``target_metadata`` and ``configure`` go to ``context.configure``. See
    the module docstring for the order of the checks.
    """
    if os.environ.get(_RENDER_VAR) == "1" and context.is_offline_mode():
        # The lint's own `--sql` process (`_lint_revisions`): only the SQL on stdout; offline, nothing connects.
        _render_offline(context, target_metadata, configure)
        return
    command, revision = _command(context)
    offline = bool(context.is_offline_mode())
    details: dict[str, Any] = {}
    operation = f"alembic {command}"
    x = _x_arguments(context)
    started = time.monotonic()
    settings: DatabaseSettings | None = None
    confirmation: str | None = None
    try:
        settings = settings_from_context(context)
        audit.ensure_writable()
        ini_url = context.config.get_main_option("sqlalchemy.url")
        if ini_url:
            log.warning(
                "alembic_url_ignored",
                reason="precog_db takes the URL from the environment's settings, not alembic.ini",
                fix="remove sqlalchemy.url from alembic.ini",
            )
        if settings.env in (Environment.STAGING, Environment.PROD):
            sys.stderr.write(
                banner(settings, operation + (" --sql" if offline else ""), colour=use_colour(sys.stderr)) + "\n"
            )
            sys.stderr.flush()
        if offline:
            confirmation = "not required (--sql: nothing is run)"
            _render_offline(context, target_metadata, configure)
        else:
            # Every check that needs no connection, before the prompt: PRECOG_PROD_CONFIRMED first.
            check_target(settings, operation=operation)
            if settings.env is Environment.PROD and command not in READ_ONLY_COMMANDS:
                try:
                    confirmation = require_confirmation(
                        settings,
                        f"run {operation}" + (f" {revision}" if revision else ""),
                        confirm_database=x.get("confirm_database"),
                        stdin=sys.stdin,
                        prompt_to=sys.stderr,
                    )
                except PrecogDBError as exc:  # re-worded for Alembic: same class, so the same audit outcome
                    reworded = _alembic_wording(exc)
                    if reworded is exc:
                        raise
                    raise reworded from None
            else:
                confirmation = "PRECOG_PROD_CONFIRMED=yes" if settings.env is Environment.PROD else "not required"
            details = _run_online(context, settings, operation, target_metadata, configure, command, revision)
    except BaseException as exc:
        if not audit.was_recorded(exc) and settings is not None:
            message = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
            audit.record_safely(
                operation,
                outcome=audit.outcome_of(exc),
                settings=settings,
                confirmation=confirmation,
                duration_s=time.monotonic() - started,
                argv=sys.argv,
                error=f"{type(exc).__name__}: {message}",
                revision=revision,
                sql=offline,
            )
            audit.mark_recorded(exc)
        raise
    audit.record(
        operation,
        outcome=audit.OK,
        settings=settings,
        confirmation=confirmation,
        duration_s=time.monotonic() - started,
        argv=sys.argv,
        revision=revision,
        sql=offline,
        **details,
    )


def _run_online(
    context: Any,
    settings: DatabaseSettings,
    operation: str,
    target_metadata: Any,
    configure: Mapping[str, Any],
    command: str,
    revision: str | None,
) -> dict[str, Any]:
    """Run the revisions online (after `_lint_revisions` for ``upgrade``); what the lint found, for the audit entry."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    def creator() -> Any:
        # The chokepoint: naming rule, gate, production guard, identity stamp, reply bound.
        conn = connect(
            settings.replace(application_name=f"precog-db alembic {settings.env.value}"),
            operation=operation,
            autocommit=False,
            direct=True,  # migrations need a session of their own, never a transaction-mode pooler
        )
        if settings.migration_lock_timeout_ms:
            # Session-level, so every revision's statements wait at most this long for a lock.
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{settings.migration_lock_timeout_ms}ms",))
            conn.commit()
        return conn

    engine = create_engine("postgresql+psycopg://", creator=creator, poolclass=NullPool)
    details: dict[str, Any] = {}
    try:
        if command == "upgrade":
            from alembic.runtime.migration import MigrationContext

            with engine.connect() as probe:
                heads = tuple(MigrationContext.configure(probe).get_current_heads())
            details = _lint_revisions(context, settings, heads, revision or "head")
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata, **configure)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
    return details


def _warn(text: str) -> None:
    sys.stderr.write(f"warning: {text}\n")
    sys.stderr.flush()


def _lint_revisions(
    context: Any, settings: DatabaseSettings, heads: tuple[str, ...], destination: str
) -> dict[str, Any]:
    """Lint the SQL Alembic renders offline for ``heads`` to ``destination``; refuse on staging and prod.

    Returns the audit details: ``acknowledged`` and ``lint_warnings``, or ``not_linted`` with the reason.
    """
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from precog_db.migrations._lint import _unknown_rules, lint_sql, squawk_path
    from precog_db.migrations._sections import acknowledgements

    enforce = settings.env in (Environment.STAGING, Environment.PROD)
    try:
        binary = squawk_path()
    except ConfigurationError as exc:
        if enforce:
            raise ConfigurationError(f"{exc}; staging and prod lint every revision before it runs") from None
        _warn(f"the revisions were not linted: {exc}")
        return {"not_linted": str(exc)}
    if len(heads) > 1:
        reason = f"the database is at {len(heads)} heads ({', '.join(heads)}); the lint renders from one"
        _warn(f"the revisions were not linted: {reason}")
        return {"not_linted": reason}
    source = context.config
    if source.config_file_name is None:
        reason = "the Alembic configuration has no file, so its revisions cannot be rendered in a second process"
        if enforce:
            raise MigrationValidationError(f"refused before anything ran: {reason}; run alembic with -c alembic.ini")
        _warn(f"the revisions were not linted: {reason}")
        return {"not_linted": reason}
    # Rendered by a second `alembic ... --sql` process: the offline run of env.py needs an EnvironmentContext
    # of its own, which cannot share this process's module-level `alembic.context` with the running one.
    argv = [sys.executable, "-m", "alembic", "-c", str(source.config_file_name), "-n", source.config_ini_section]
    for key, value in _x_arguments(context).items():
        argv += ["-x", f"{key}={value}"]
    argv += ["upgrade", f"{heads[0]}:{destination}" if heads else destination, "--sql"]
    try:
        done = subprocess.run(
            argv,
            env={**os.environ, _RENDER_VAR: "1"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_RENDER_TIMEOUT,
            check=False,
        )
        problem = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["no message"])[-1]
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    if problem is not None:
        reason = f"alembic could not render the SQL of the revisions offline ({problem})"
        if enforce:
            raise MigrationValidationError(
                f"refused before anything ran: {reason}, so they could not be linted; render them with "
                "`alembic upgrade <from>:<to> --sql` to see why"
            ) from None
        _warn(f"the revisions were not linted: {reason}")
        return {"not_linted": reason}
    config = Config(source.config_file_name, ini_section=source.config_ini_section)
    script = ScriptDirectory.from_config(config)
    text = done.stdout
    marks = list(_RUNNING.finditer(text))
    open_findings: list[tuple[str, Any]] = []
    acknowledged: list[dict[str, object]] = []
    for index, mark in enumerate(marks):
        end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
        blocks = [b for b in text[mark.end() : end].split("\n\n") if b.strip()]
        sql = "\n\n".join(
            b for b in blocks if "alembic_version" not in b and b.strip().upper() not in ("BEGIN;", "COMMIT;")
        )
        found = script.get_revision(mark["rev"])
        path = Path(found.path) if found is not None else Path(mark["rev"])
        body = path.read_text(encoding="utf-8") if path.is_file() else ""
        acks = {
            a.rule: (a.line, a.reason)
            for a in acknowledgements(re.sub(r"(?m)^(\s*)#\s*precog:allow", r"\1-- precog:allow", body))
        }
        unknown = _unknown_rules(binary, acks)
        if unknown:
            raise MigrationValidationError(
                f"{path} acknowledges {', '.join(repr(r) for r in unknown)}, which squawk does not know; use "
                "squawk's rule name (nothing was run)"
            )
        if not sql.strip():
            continue
        for finding in lint_sql(sql, path, squawk=binary):
            if finding.rule in acks:
                line, reason = acks[finding.rule]
                entry = {"file": path.name, "rule": finding.rule, "reason": reason, "line": line}
                if entry not in acknowledged:
                    acknowledged.append(entry)
            else:
                open_findings.append((mark["rev"], finding))
    details: dict[str, Any] = {}
    if acknowledged:
        details["acknowledged"] = acknowledged
    listed = [
        f"{f.path.name} (revision {rev}, line {f.line} of its rendered SQL): {f.rule} ({f.message} Instead: {f.advice})"
        for rev, f in open_findings
    ]
    if enforce and listed:
        raise MigrationValidationError(
            "refused before any revision ran, unsafe on a live database: " + "; ".join(listed) + ". Make it safe, "
            "or, if it is safe here, acknowledge it in the revision file with a line "
            "'# precog:allow <rule>: <reason>' (the reason goes to the audit log)"
        )
    for sentence in listed:
        _warn(sentence)
    if listed:
        details["lint_warnings"] = [f"{f.path.name}: {f.rule}" for _rev, f in open_findings]
    return details
