"""The audit log: one JSON line per operation on a database, and never a password.

Entries are appended to ``PRECOG_AUDIT_LOG`` (default ``logs/audit.log``,
relative to the current directory). Each entry records who (OS user), the
machine, the pid, the command line, the environment, the database (host,
port, name, role), the operation, the confirmation given, the outcome
(``ok``, ``refused`` or ``failed``) and the duration, plus
operation-specific details.

Who writes entries: the pool (every staging or prod pool open, and every
refusal to open one), the gates (every gated destructive call and refusal)
and the ``precog-db`` command line (every migration, backup, restore, stamp
and refusal). Callers pass what they know explicitly; this module reads only
``PRECOG_AUDIT_LOG``, ``PRECOG_AUDIT_MAX_BYTES`` and ``PRECOG_AUDIT_BACKUPS``,
so the pool and the gates can call it without an import loop.

Many processes may append at once (services, job runners, the CLI). Each
entry is written under an exclusive `fcntl.flock` on the sidecar file
``<log>.lock``: check the size, rotate if the entry would pass
``PRECOG_AUDIT_MAX_BYTES`` (``audit.log`` → ``audit.log.1`` → … →
``audit.log.<PRECOG_AUDIT_BACKUPS>``, the oldest dropped), then open the live
file with ``O_APPEND`` and write the whole line with one ``write()``. No
writer ever appends to a file another is renaming, so no entry is lost and
no writer fails mid-rotation. The directory must be writable (rotation and
the lock file need it).

Secrets (`precog_db._secrets`): the command line is scrubbed by *parsing*
each argument that is a connection string or URL and re-emitting it with the
password masked (one that does not parse is masked whole); every other
string has the settings' password replaced and passwords in connection
strings masked; keys that look secret are masked whatever they hold.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from precog_db._secrets import current_os_user, scrub_argv, scrub_text, scrub_value
from precog_db.environment import Environment
from precog_db.errors import AuditLogError, AuditSettingError, RefusalError
from precog_db.log import get_logger
from precog_db.settings import DatabaseSettings

__all__ = [
    "AUDIT_LOG_VAR",
    "BACKUPS_VAR",
    "MAX_BYTES_VAR",
    "audit_log_path",
    "command_line",
    "ensure_writable",
    "operation",
    "outcome_of",
    "record",
    "record_safely",
    "rotation",
    "tail",
]

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

AUDIT_LOG_VAR = "PRECOG_AUDIT_LOG"
MAX_BYTES_VAR = "PRECOG_AUDIT_MAX_BYTES"
BACKUPS_VAR = "PRECOG_AUDIT_BACKUPS"
DEFAULT_PATH = Path("logs") / "audit.log"
#: Defaults: rotate at 10 MiB, keep five old files (audit.log.1 … audit.log.5).
MAX_BYTES = 10 * 1024 * 1024
BACKUP_COUNT = 5
#: How long a writer waits for another process's lock before giving up (it is held for one append).
LOCK_WAIT_S = 15.0

OK = "ok"
REFUSED = "refused"
FAILED = "failed"

_ARGV: ContextVar[tuple[str, ...] | None] = ContextVar("precog_audit_argv", default=None)
#: The exceptions that already have their entry, within the current `command_line` block.
_RECORDED: ContextVar[list[BaseException] | None] = ContextVar("precog_audit_recorded", default=None)


def audit_log_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where entries go: ``PRECOG_AUDIT_LOG``, else ``logs/audit.log`` under the current directory."""
    env = os.environ if environ is None else environ
    configured = env.get(AUDIT_LOG_VAR, "").strip()
    return Path(configured) if configured else DEFAULT_PATH


def _whole_number(environ: Mapping[str, str], var: str, default: int, minimum: int, meaning: str) -> int:
    raw = environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        # The value itself is not echoed: a misplaced secret must not reach a message.
        raise AuditSettingError(f"{var} is not a whole number >= {minimum}; set it to {meaning}, or unset it")
    return value


def rotation(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(max_bytes, backups)``: from ``PRECOG_AUDIT_MAX_BYTES`` / ``PRECOG_AUDIT_BACKUPS``, else the defaults.

    ``max_bytes`` 0 turns rotation off. ``backups`` is at least 1: rotation
    never simply truncates the audit log. Raises `AuditSettingError` for a
    value that is not such a whole number.
    """
    env = os.environ if environ is None else environ
    max_bytes = _whole_number(
        env, MAX_BYTES_VAR, MAX_BYTES, 0, f"the size in bytes at which the log rotates (default {MAX_BYTES}; 0: never)"
    )
    backups = _whole_number(
        env, BACKUPS_VAR, BACKUP_COUNT, 1, f"how many rotated files to keep (default {BACKUP_COUNT}; at least 1)"
    )
    return max_bytes, backups


@contextlib.contextmanager
def command_line(argv: Sequence[str]) -> Iterator[None]:
    """Within the block, entries record ``argv`` as the command line (the CLI sets this).

    The block also scopes `mark_recorded`/`was_recorded`: the CLI asks, for the
    error that ended a command, whether an entry was already written for it.
    """
    token = _ARGV.set(tuple(argv))
    recorded = _RECORDED.set([])
    try:
        yield
    finally:
        _RECORDED.reset(recorded)
        _ARGV.reset(token)


def outcome_of(exc: BaseException) -> str:
    """``refused`` for a safety refusal (a `RefusalError`), ``failed`` for anything else."""
    return REFUSED if isinstance(exc, RefusalError) else FAILED


def mark_recorded(exc: BaseException) -> None:
    """Note that ``exc`` already has its audit entry, so callers higher up do not write another.

    Remembered for the current `command_line` block only (outside one, nobody asks).
    """
    recorded = _RECORDED.get()
    if recorded is not None and not was_recorded(exc):
        recorded.append(exc)


def was_recorded(exc: BaseException) -> bool:
    """True when an audit entry was already written for ``exc`` in the current `command_line` block."""
    return any(seen is exc for seen in _RECORDED.get() or ())


@contextlib.contextmanager
def operation(name: str, settings: DatabaseSettings, **details: Any) -> Iterator[dict[str, Any]]:
    """Audit one operation on ``settings``' database: one entry when the block ends, whatever its outcome.

    Checks first that the log is writable (nothing is done when it is not).
    Yields a dict the block fills with details; its ``confirmation`` key goes
    to the entry's own field. An error ending the block is recorded (``refused``
    for a `RefusalError`, else ``failed``; its message without the password),
    marked as recorded, and re-raised.
    """
    ensure_writable()
    info: dict[str, Any] = {"confirmation": None, **details}
    started = time.monotonic()
    try:
        yield info
    except BaseException as exc:
        confirmation = info.pop("confirmation")
        message = "interrupted" if isinstance(exc, KeyboardInterrupt) else scrub_text(str(exc), [settings.password])
        record(
            name,
            outcome=outcome_of(exc),
            settings=settings,
            confirmation=confirmation,
            duration_s=time.monotonic() - started,
            error=f"{type(exc).__name__}: {message}",
            **info,
        )
        mark_recorded(exc)
        raise
    confirmation = info.pop("confirmation")
    record(
        name,
        outcome=OK,
        settings=settings,
        confirmation=confirmation,
        duration_s=time.monotonic() - started,
        **info,
    )


def _database(settings: DatabaseSettings | None) -> dict[str, Any] | None:
    if settings is None:
        return None
    return {"name": settings.dbname, "host": settings.host, "port": settings.port, "user": settings.user}


def _entry(
    operation: str,
    *,
    outcome: str,
    settings: DatabaseSettings | None,
    environment: Environment | str | None,
    confirmation: str | None,
    duration_s: float | None,
    argv: Sequence[str] | None,
    error: BaseException | str | None,
    details: Mapping[str, Any],
) -> dict[str, Any]:
    env = environment if environment is not None else (settings.env if settings is not None else None)
    command = argv if argv is not None else (_ARGV.get() or tuple(sys.argv))
    entry: dict[str, Any] = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "who": current_os_user(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        # Parsed, not pattern-matched: connection strings and URLs lose their password.
        "argv": scrub_argv(command),
        "environment": str(env.value if isinstance(env, Environment) else env) if env is not None else None,
        "database": _database(settings),
        "operation": operation,
        "confirmation": confirmation,
        "outcome": outcome,
        "duration_ms": None if duration_s is None else round(duration_s * 1000, 1),
    }
    if error is not None:
        entry["error"] = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    entry.update(details)
    secrets = [s for s in ((settings.password if settings is not None else ""),) if s]
    # Every string scrubbed; keys that look secret (password, token …) masked whatever they hold.
    scrubbed: dict[str, Any] = scrub_value(entry, secrets)
    return scrubbed


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _backup_path(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number}")


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock on ``<path>.lock`` (bounded wait: a stopped holder cannot hang every writer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        pause = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AuditLogError(
                        f"another process has held the audit log lock {_lock_path(path)} for over {LOCK_WAIT_S:g}s "
                        "(it is held for one append); find the stuck process with `fuser` and end it"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
        yield
    finally:
        os.close(fd)  # releases the lock


def _rotate(path: Path, backups: int) -> None:
    """``path`` → ``path.1`` → … → ``path.<backups>`` (the oldest is replaced). Called under the lock."""
    for number in range(backups - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(_backup_path(path, number), _backup_path(path, number + 1))
    os.replace(path, _backup_path(path, 1))


def _append(path: Path, data: bytes, max_bytes: int, backups: int) -> None:
    """Rotate if ``data`` would take the file past ``max_bytes``, then append it with one write, under the lock."""
    with _locked(path):
        fd = _open_append(path)
        try:
            size = os.fstat(fd).st_size
            if max_bytes > 0 and size > 0 and size + len(data) > max_bytes:
                os.close(fd)
                fd = -1
                _rotate(path, backups)
                fd = _open_append(path)
            view = memoryview(data)
            while view:  # a regular file takes it in one write; a short write is finished, still locked
                view = view[os.write(fd, view) :]
        finally:
            if fd >= 0:
                os.close(fd)


def ensure_writable(path: Path | None = None) -> Path:
    """Raise `AuditLogError` unless the audit log (and its lock file) can be appended to; return its path.

    Also checks ``PRECOG_AUDIT_MAX_BYTES`` and ``PRECOG_AUDIT_BACKUPS``
    (`AuditSettingError`).
    """
    target = audit_log_path() if path is None else path
    rotation()
    try:
        with _locked(target):
            os.close(_open_append(target))
    except AuditLogError:
        raise
    except OSError as exc:
        raise _unwritable(target, exc) from None
    return target


def _unwritable(path: Path, exc: OSError) -> AuditLogError:
    reason = exc.strerror or type(exc).__name__
    if exc.filename is not None and str(exc.filename) != str(path):
        reason = f"{exc.filename}: {reason}"  # e.g. the lock file or a backup
    return AuditLogError(
        f"cannot write the audit log {path} ({reason}); make its directory and files "
        f"writable or set {AUDIT_LOG_VAR} to a file this user may append to"
    )


def record(
    operation: str,
    *,
    outcome: str,
    settings: DatabaseSettings | None = None,
    environment: Environment | str | None = None,
    confirmation: str | None = None,
    duration_s: float | None = None,
    argv: Sequence[str] | None = None,
    error: BaseException | str | None = None,
    log_file: Path | None = None,
    **details: Any,
) -> dict[str, Any]:
    """Append one entry; return it as written. Raises `AuditLogError` when the file cannot be written.

    ``settings`` gives the environment and database (its password is scrubbed
    from every value); ``environment`` overrides the environment when there
    are no settings. ``argv`` defaults to the command line set by
    `command_line`, else ``sys.argv``. ``details`` are added as extra keys.
    ``log_file`` overrides ``PRECOG_AUDIT_LOG``.
    """
    entry = _entry(
        operation,
        outcome=outcome,
        settings=settings,
        environment=environment,
        confirmation=confirmation,
        duration_s=duration_s,
        argv=argv,
        error=error,
        details=details,
    )
    target = audit_log_path() if log_file is None else log_file
    max_bytes, backups = rotation()
    data = (json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    try:
        _append(target, data, max_bytes, backups)
    except AuditLogError:
        raise
    except OSError as exc:
        raise _unwritable(target, exc) from None
    return entry


def record_safely(operation: str, **kwargs: Any) -> dict[str, Any] | None:
    """`record`, but an unwritable audit log (or a bad audit setting) is logged as ``audit_log_unwritable``.

    For the library's own hooks (pool open, gates): a service on a read-only
    filesystem keeps working, and says loudly that it could not audit.
    """
    try:
        return record(operation, **kwargs)
    except AuditLogError as exc:
        log.warning("audit_log_unwritable", operation=operation, reason=str(exc))
        return None


def tail(count: int = 20, path: Path | None = None) -> list[dict[str, Any]]:
    """The last ``count`` entries, oldest first, reading rotated files too when needed.

    A line that is not valid JSON (a partial write) is returned as
    ``{"unreadable": <line>}`` rather than dropped.
    """
    target = audit_log_path() if path is None else path
    lines: list[str] = []
    try:
        backups = rotation()[1]
    except AuditSettingError:
        backups = BACKUP_COUNT
    for candidate in (target, *(_backup_path(target, n) for n in range(1, backups + 1))):
        try:
            text = candidate.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        lines = text.splitlines() + lines  # the rotated file holds the older entries
        if len(lines) >= count:
            break
    entries: list[dict[str, Any]] = []
    for line in lines[-count:] if count > 0 else []:
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except ValueError:
            entries.append({"unreadable": line})
            continue
        entries.append(parsed if isinstance(parsed, dict) else {"unreadable": line})
    return entries
