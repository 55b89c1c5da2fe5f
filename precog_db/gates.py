"""Environment gates around dangerous operations.

`dangerous_operation` checks the environment on every call, before the
wrapped function runs: the one resolved from the process (``PRECOG_ENV`` …),
the one the open pool serves, and in a forked child the one of the parent's
pool. Then, while the function runs, every connection opened or lent through
precog_db must be to an allowed environment (`precog_db.connection.gate_allows`):
the database the operation actually runs on is checked, not a guess.
Every gated call, refused or run, gets an entry in the audit log (see
`precog_db.audit`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from time import monotonic
from typing import ParamSpec, TypeVar

from psycopg import sql

from precog_db import audit
from precog_db.connection import gate_allows
from precog_db.cursors import get_cursor
from precog_db.environment import STRICTNESS, Environment, get_environment, parse_environment
from precog_db.errors import ConfigurationError, EnvironmentNotAllowedError
from precog_db.log import get_logger
from precog_db.pool import active_pool, inherited_settings

__all__ = ["current_environments", "dangerous_operation", "delete_all", "table_identifier", "truncate_tables"]

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

P = ParamSpec("P")
R = TypeVar("R")


def current_environments() -> tuple[Environment, ...]:
    """The environments in play, least strict first: the resolved one, the open pool's, and in a
    forked child the parent pool's (which `get_cursor` would reopen), if different."""
    envs = {get_environment()}
    pool = active_pool()
    if pool is not None:
        envs.add(pool.env)
    inherited = inherited_settings()
    if inherited is not None:
        envs.add(inherited.env)
    return tuple(sorted(envs, key=STRICTNESS.index))


def dangerous_operation(
    allowed: Iterable[str | Environment] = (Environment.DEV, Environment.TEST),
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function so that it refuses to run outside ``allowed`` environments."""
    permitted = tuple(parse_environment(a) for a in allowed)
    if not permitted:
        raise ConfigurationError("dangerous_operation needs at least one allowed environment")

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def gated(*args: P.args, **kwargs: P.kwargs) -> R:
            started = monotonic()
            envs = current_environments()
            refused = [e for e in envs if e not in permitted]
            if refused:
                names = ", ".join(e.value for e in permitted)
                log.warning("dangerous_operation_refused", operation=func.__name__, env=refused[-1].value)
                error = EnvironmentNotAllowedError(
                    f"{func.__name__} is allowed only in {names}, but the current environment is "
                    f"{refused[-1].value}; it did not run"
                )
                _audit(func.__name__, args, envs, started, error)
                raise error
            try:
                # Checked again wherever a connection is opened or lent while
                # the body runs: the database actually used must be allowed too.
                with gate_allows(func.__name__, permitted):
                    result = func(*args, **kwargs)
            except Exception as exc:
                _audit(func.__name__, args, envs, started, exc)
                raise
            _audit(func.__name__, args, envs, started, None)
            return result

        gated.__precog_allowed__ = permitted  # type: ignore[attr-defined]
        return gated

    return decorate


def _audit(
    operation: str, args: tuple[object, ...], envs: tuple[Environment, ...], started: float, error: Exception | None
) -> None:
    """One audit entry per gated call: ran (ok/failed) or refused. Text arguments are the targets (tables)."""
    pool = active_pool()
    audit.record_safely(
        operation,
        outcome=audit.OK if error is None else audit.outcome_of(error),
        settings=pool.settings if pool is not None else None,
        environment=envs[-1],
        duration_s=monotonic() - started,
        error=error,
        targets=[a[:200] for a in args if isinstance(a, str)],
    )
    if error is not None:
        audit.mark_recorded(error)


def table_identifier(name: str) -> sql.Identifier:
    """Quote ``table`` or ``schema.table`` safely; never string-formatted into SQL."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError("a table name must be a non-empty string")
    if "\x00" in name:
        # libpq's identifier escaping stops at a NUL byte: "victims\0; junk"
        # would be quoted as "victims" and hit that table.
        raise ConfigurationError("a table name must not contain a NUL character; nothing was run")
    parts = name.split(".")
    if len(parts) > 2 or any(not p for p in parts):
        # Not schema.table: treat the whole thing as one (quoted) name.
        return sql.Identifier(name)
    return sql.Identifier(*parts)


@dangerous_operation()
def truncate_tables(*tables: str, cascade: bool = False) -> dict[str, int]:
    """Empty ``tables`` in one transaction; return the row count each held.

    Only in dev and test. Identifiers are quoted with `psycopg.sql`.
    """
    if not tables:
        raise ConfigurationError("truncate_tables needs at least one table name")
    idents = [table_identifier(t) for t in tables]
    counts: dict[str, int] = {}
    with get_cursor(commit=True) as cur:
        for name, ident in zip(tables, idents, strict=True):
            cur.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(ident))
            row = cur.fetchone()
            counts[name] = int(row["n"]) if row else 0
        cur.execute(
            sql.SQL("TRUNCATE {}{}").format(sql.SQL(", ").join(idents), sql.SQL(" CASCADE") if cascade else sql.SQL(""))
        )
    for name, rows in counts.items():
        log.info("table_truncated", table=name, rows=rows, env=current_environments()[-1].value)
    return counts


@dangerous_operation()
def delete_all(table: str) -> int:
    """Delete every row of ``table``; return how many were deleted. Only in dev and test."""
    ident = table_identifier(table)
    with get_cursor(commit=True) as cur:
        cur.execute(sql.SQL("DELETE FROM {}").format(ident))
        rows = cur.rowcount
    log.info("table_rows_deleted", table=table, rows=rows, env=current_environments()[-1].value)
    return rows
