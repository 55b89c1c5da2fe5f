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
8. **The audit log** gets one entry per run (``alembic upgrade``,
   ``alembic downgrade`` …, with the revision, ``--sql``, the confirmation and
   the outcome), written even when the run is refused or fails.

Needs SQLAlchemy 2 (its ``postgresql+psycopg`` dialect, psycopg 3) and Alembic.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Mapping
from typing import Any

from precog_db import audit
from precog_db.confirm import banner, require_confirmation, use_colour
from precog_db.connection import check_target, connect
from precog_db.environment import Environment
from precog_db.errors import ConfigurationError, PrecogDBError
from precog_db.log import get_logger
from precog_db.settings import DatabaseSettings, load_settings

__all__ = ["READ_ONLY_COMMANDS", "run_migrations", "settings_from_context"]

log = get_logger()

#: Alembic commands that run env.py without changing the schema: no typed confirmation.
READ_ONLY_COMMANDS = frozenset({"current", "history", "heads", "branches", "show", "check"})


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


def run_migrations(context: Any, *, target_metadata: Any = None, **configure: Any) -> None:
    """Run the Alembic migrations of ``context`` (``from alembic import context``) against the resolved environment.

    ``target_metadata`` and ``configure`` go to ``context.configure``. See
    the module docstring for the order of the checks.
    """
    command, revision = _command(context)
    offline = bool(context.is_offline_mode())
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
            context.configure(
                dialect_name="postgresql",
                target_metadata=target_metadata,
                literal_binds=True,
                dialect_opts={"paramstyle": "named"},
                **configure,
            )
            with context.begin_transaction():
                context.run_migrations()
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
            _run_online(context, settings, operation, target_metadata, configure)
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
    )


def _run_online(
    context: Any, settings: DatabaseSettings, operation: str, target_metadata: Any, configure: Mapping[str, Any]
) -> None:
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
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata, **configure)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
