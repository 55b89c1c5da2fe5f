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
import inspect
from collections.abc import Callable, Iterable
from time import monotonic
from typing import Any, ParamSpec, TypeVar, cast

from psycopg import sql

from precog_db import apool, audit
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
    for pool in (active_pool(), apool.active_pool()):
        if pool is not None:
            envs.add(pool.env)
    for inherited in (inherited_settings(), apool.inherited_settings()):
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
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"dangerous_operation cannot guard the generator function {func.__name__}: its body runs "
                "after the call returns, outside the gate. Make it a plain function (return a list)"
            )
        name = func.__name__
        if inspect.iscoroutinefunction(func):
            # An ``async def``: the same check when the coroutine starts, before the
            # body runs; the gate covers the awaited body (the context variable is
            # set inside this coroutine, so it is the body's context too).
            @functools.wraps(func)
            async def agated(*args: Any, **kwargs: Any) -> Any:
                started, envs = _admit(name, permitted, args)
                try:
                    with gate_allows(name, permitted):
                        result = await func(*args, **kwargs)
                except Exception as exc:
                    _audit(name, args, envs, started, exc)
                    raise
                _audit(name, args, envs, started, None)
                return result

            agated.__precog_allowed__ = permitted  # type: ignore[attr-defined]
            return cast("Callable[P, R]", agated)

        @functools.wraps(func)
        def gated(*args: P.args, **kwargs: P.kwargs) -> R:
            started, envs = _admit(name, permitted, args)
            try:
                # Checked again wherever a connection is opened or lent while
                # the body runs: the database actually used must be allowed too.
                with gate_allows(name, permitted):
                    result = func(*args, **kwargs)
            except Exception as exc:
                _audit(name, args, envs, started, exc)
                raise
            _audit(name, args, envs, started, None)
            return result

        gated.__precog_allowed__ = permitted  # type: ignore[attr-defined]
        return gated

    return decorate


def _admit(
    operation: str, permitted: tuple[Environment, ...], args: tuple[object, ...]
) -> tuple[float, tuple[Environment, ...]]:
    """The check before a gated call of either kind runs: refuse (audited) or return (start time, environments)."""
    started = monotonic()
    envs = current_environments()
    refused = [e for e in envs if e not in permitted]
    if refused:
        names = ", ".join(e.value for e in permitted)
        log.warning("dangerous_operation_refused", operation=operation, env=refused[-1].value)
        error = EnvironmentNotAllowedError(
            f"{operation} is allowed only in {names}, but the current environment is "
            f"{refused[-1].value}; it did not run"
        )
        _audit(operation, args, envs, started, error)
        raise error
    return started, envs


def _audit(
    operation: str, args: tuple[object, ...], envs: tuple[Environment, ...], started: float, error: Exception | None
) -> None:
    """One audit entry per gated call: ran (ok/failed) or refused. Text arguments are the targets (tables)."""
    pool = active_pool() or apool.active_pool()
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


def truncate_statements(tables: tuple[str, ...], cascade: bool) -> tuple[list[sql.Composed], sql.Composed]:
    """The SQL of `truncate_tables` (both layers): one row count per table, then one ``TRUNCATE``."""
    if not tables:
        raise ConfigurationError("truncate_tables needs at least one table name")
    idents = [table_identifier(t) for t in tables]
    counts = [sql.SQL("SELECT count(*) AS n FROM {}").format(ident) for ident in idents]
    truncate = sql.SQL("TRUNCATE {}{}").format(
        sql.SQL(", ").join(idents), sql.SQL(" CASCADE") if cascade else sql.SQL("")
    )
    return counts, truncate


def log_truncated(counts: dict[str, int]) -> None:
    for name, rows in counts.items():
        log.info("table_truncated", table=name, rows=rows, env=current_environments()[-1].value)


def delete_statement(table: str) -> sql.Composed:
    """The SQL of `delete_all` (both layers)."""
    return sql.SQL("DELETE FROM {}").format(table_identifier(table))


def log_deleted(table: str, rows: int) -> None:
    log.info("table_rows_deleted", table=table, rows=rows, env=current_environments()[-1].value)


@dangerous_operation()
def truncate_tables(*tables: str, cascade: bool = False) -> dict[str, int]:
    """Empty ``tables`` in one transaction; return the row count each held.

    Only in dev and test. Identifiers are quoted with `psycopg.sql`.
    """
    count_queries, truncate = truncate_statements(tables, cascade)
    counts: dict[str, int] = {}
    with get_cursor(commit=True) as cur:
        for name, query in zip(tables, count_queries, strict=True):
            cur.execute(query)
            row = cur.fetchone()
            counts[name] = int(row["n"]) if row else 0
        cur.execute(truncate)
    log_truncated(counts)
    return counts


@dangerous_operation()
def delete_all(table: str) -> int:
    """Delete every row of ``table``; return how many were deleted. Only in dev and test."""
    statement = delete_statement(table)
    with get_cursor(commit=True) as cur:
        cur.execute(statement)
        rows = cur.rowcount
    log_deleted(table, rows)
    return rows
