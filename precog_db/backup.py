"""Backups with the real ``pg_dump`` / ``pg_restore``: verified, pruned, and restorable into dev or test only.

* `backup` runs ``pg_dump --format=custom`` into
  ``<backup dir>/<env>/<db>@<host>-<port>-<key>-<UTC timestamp>.dump``
  (`archive_name`: names reduced to safe characters, ``<key>`` a hash of
  host, port and database; written as ``.partial`` first), checks the
  archive with ``pg_restore --list`` (it must read, and name the database
  that was dumped), and only then gives it its final name. Older dumps of
  the same database on the same server (host, port, name) are then pruned
  down to the retention count.
* `restore` refuses any environment but dev and test, checks the archive
  the same way, and restores it with ``--clean --if-exists --no-owner
  --no-privileges --single-transaction --exit-on-error``: it applies
  completely or not at all.
* Before any tool runs, and before any directory or file is made, the
  target is checked exactly like a connection (`tool_connection_args`: one
  connection through the chokepoint, the naming rule, the gate, the
  production guard and the identity stamp), inside `backup` and `restore`
  themselves, so no caller can skip it. Behind a transaction-mode pooler the
  work goes to ``DB_DIRECT_HOST`` / ``DB_DIRECT_PORT``, and that is the
  server archive names, messages and retention name.
* The tools connect through `tool_connection_args`: one ``--dbname``
  conninfo string in which every value, the database name included, is
  quoted (so a name like ``dbname=x`` is never expanded into connection
  parameters). The password reaches them through ``PGPASSWORD`` in their
  environment, never their command line, and they run with
  ``--no-password`` so they never wait for a prompt.
* Tools are looked up in ``PRECOG_PG_BINDIR``, ``pg_config --bindir``, the
  usual install locations and ``PATH``; the first whose major version is at
  least the server's wins (an older ``pg_dump`` cannot dump a newer server).

* `backup_database` and `restore_database` are the audited workflows that
  ``precog-db backup`` / ``restore`` run (and a Python caller can): one
  audit entry each; the restore asks for its confirmation, connects through
  the chokepoint for the server version (the target's own stamp verified),
  and re-stamps the restored copy with the target environment, which it only
  does after the target's stamp was verified: the stamp it replaces is the
  one the archive brought into a dev or test database.
* `precog_db.local.binaries.tool_dirs` is where the tools are looked up.

Settings come in explicitly; the backup directory and retention are
resolved by `backup_dir` / `retention` from arguments or ``PRECOG_BACKUP_DIR``
/ ``PRECOG_BACKUP_KEEP``. The driver (the chokepoint, the stamp) is imported
only when a tool or a workflow runs, so ``precog-db env`` (which shows
`backup_dir`) never imports it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from precog_db import audit
from precog_db._progress import NoProgress, ProgressDisplay
from precog_db._secrets import scrub_text
from precog_db.confirm import confirmation
from precog_db.environment import Environment
from precog_db.errors import (
    BackupError,
    ConfigurationError,
    EnvironmentMismatchError,
    EnvironmentNotAllowedError,
)
from precog_db.guard import production_confirmed
from precog_db.local.binaries import major_version, tool_dirs
from precog_db.settings import DatabaseSettings

if TYPE_CHECKING:
    from precog_db.connection import Pin
    from precog_db.stamp import Stamp

__all__ = [
    "BACKUP_DIR_VAR",
    "KEEP_VAR",
    "Backup",
    "Restored",
    "archive_name",
    "archive_prefix",
    "archive_stamp",
    "backup",
    "backup_database",
    "backup_dir",
    "dumps_of",
    "find_tool",
    "newest_verified",
    "prune",
    "restore",
    "restore_copy",
    "restore_database",
    "retention",
    "same_stamp",
    "verify",
]

BACKUP_DIR_VAR = "PRECOG_BACKUP_DIR"
KEEP_VAR = "PRECOG_BACKUP_KEEP"
DEFAULT_KEEP = 7
RESTORABLE = (Environment.DEV, Environment.TEST)

_TIMESTAMP = "%Y%m%dT%H%M%S"


@dataclass(frozen=True)
class Backup:
    """A verified dump."""

    path: Path
    size: int
    entries: int
    duration_s: float
    tool: Path
    pruned: tuple[Path, ...] = ()

    def summary(self) -> str:
        """One line for people: the file, its entries, size and duration, and what was pruned."""
        pruned = f"; pruned {len(self.pruned)} old dump(s)" if self.pruned else ""
        return (
            f"verified backup {self.path} ({self.entries} archive entries, {self.size / 1_048_576:.1f} MiB, "
            f"{self.duration_s:.1f}s){pruned}"
        )


@dataclass(frozen=True)
class Restored:
    """The outcome of `restore_database`."""

    path: Path
    entries: int
    #: ``"<stamp's env> -> <target env>"`` when the restored copy was re-stamped, else None.
    restamped: str | None


# --- configuration ------------------------------------------------------------------------


def backup_dir(explicit: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The backup root: the argument, else ``PRECOG_BACKUP_DIR``, else ``backups`` under the current directory."""
    env = os.environ if environ is None else environ
    if explicit is not None and str(explicit).strip():
        return Path(explicit)
    configured = env.get(BACKUP_DIR_VAR, "").strip()
    return Path(configured) if configured else Path("backups")


def retention(explicit: int | None = None, environ: Mapping[str, str] | None = None) -> int:
    """How many dumps per database to keep: the argument, else ``PRECOG_BACKUP_KEEP``, else 7 (at least 1)."""
    env = os.environ if environ is None else environ
    if explicit is None:
        raw = env.get(KEEP_VAR, "").strip()
        if not raw:
            return DEFAULT_KEEP
        try:
            explicit = int(raw)
        except ValueError:
            raise ConfigurationError(f"{KEEP_VAR} must be a whole number of dumps to keep, at least 1") from None
    if explicit < 1:
        raise ConfigurationError(
            "the retention must keep at least 1 dump (the one just taken); fix --keep or PRECOG_BACKUP_KEEP"
        )
    return explicit


# --- tools ---------------------------------------------------------------------------------


def find_tool(name: str, server_major: int) -> Path:
    """The first ``name`` (``pg_dump``/``pg_restore``) whose major version is at least ``server_major``."""
    seen: list[str] = []
    candidates = [d / name for d in tool_dirs()]
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    for path in dict.fromkeys(candidates):
        if not path.is_file():
            continue
        major = major_version(path)
        seen.append(f"{path} ({major if major is not None else 'unknown version'})")
        if major is not None and major >= server_major:
            return path
    found = "; found " + ", ".join(seen) if seen else "; none was found"
    raise BackupError(
        f"no {name} of PostgreSQL {server_major} or newer (the server's version){found}. Install the "
        f"PostgreSQL {server_major} client tools (e.g. `apt-get install postgresql-client-{server_major}`) "
        "or `pip install 'precog-db[local]'` for the embedded ones, or set PRECOG_PG_BINDIR to the "
        "directory that holds them"
    )


def _scrub(text: str, settings: DatabaseSettings) -> str:
    return scrub_text(text, [settings.password])


@dataclass(frozen=True)
class _Target:
    """A database a tool may connect to, checked like a connection (`_checked_target`)."""

    #: The settings the work goes to: ``DB_DIRECT_HOST`` / ``DB_DIRECT_PORT`` behind a transaction pooler.
    settings: DatabaseSettings
    args: list[str]
    environ: dict[str, str]
    #: The server whose stamp was checked: the tool, and anything after it (the re-stamp), go there only.
    pin: Pin


def _checked_target(settings: DatabaseSettings, operation: str, *, pin: Pin | None = None) -> _Target:
    """Check ``settings``' database as every connection is checked, stamp included; nothing runs before this.

    `precog_db.connection.pin_target` does the checking (one connection
    through the chokepoint, the identity stamp verified) and pins the tool to
    the server it checked (with ``pin``: to that server again, checked again).
    """
    from precog_db.connection import pin_target, tool_args  # the driver, only when a tool runs

    settings, pinned = pin_target(settings, operation=operation, pin=pin)
    args, environ = tool_args(settings, pinned)
    return _Target(settings, args, environ, pinned)


def _run(
    argv: list[str],
    settings: DatabaseSettings,
    *,
    what: str,
    target: _Target | None,
    progress: Callable[[float], None] | None = None,
    timeout: float | None = None,
) -> str:
    """Run a tool; return its stdout. Raises `BackupError` with the tail of its stderr on failure.

    With a ``target`` (`_checked_target`) the tool gets its connection
    arguments (right after its name) and environment; without, it gets no
    connection parameters at all (``pg_restore --list`` reads only the file).
    """
    if target is not None:
        argv = [argv[0], *target.args, *argv[1:]]
        environ = target.environ
    else:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=environ)
        except OSError as exc:
            raise BackupError(f"cannot run {argv[0]} ({exc.strerror}); check PRECOG_PG_BINDIR") from None
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - started
                if timeout is not None and elapsed > timeout:
                    proc.kill()
                    proc.wait()
                    raise BackupError(f"{what} did not finish within {timeout:g}s and was stopped") from None
                if progress is not None:
                    progress(elapsed)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", errors="replace")
        stderr = err.read().decode("utf-8", errors="replace")
    if code != 0:
        tail = " | ".join(line.strip() for line in stderr.strip().splitlines()[-4:]) or "no message"
        raise BackupError(f"{what} failed (exit {code}): {_scrub(tail, settings)}")
    return stdout


# --- backup ---------------------------------------------------------------------------------


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_STAMP_PATTERN = r"\d{8}T\d{6}\.\d{3}Z\.dump"


def _label(text: str, limit: int) -> str:
    """``text`` reduced to letters, digits, ``_ . -`` (runs of anything else become ``_``), no leading dot."""
    cleaned = _UNSAFE.sub("_", text)[:limit].lstrip(".")
    return cleaned or "_"


def _check_dumpable_name(settings: DatabaseSettings) -> None:
    """Refuse a database name pg_dump's archive cannot carry faithfully, before anything runs.

    pg_dump writes the name into the archive's header on one line, with a
    line break turned into a space, and the header is read back trimmed: a
    name with a line break, or with a blank at either end, could never be
    verified as the database that was dumped.
    """
    name = settings.dbname
    if "\n" in name or "\r" in name or name != name.strip():
        raise ConfigurationError(
            f"cannot back up database {name!r}: its name has a line break or a blank at the start or end, which "
            "pg_dump's archive cannot record faithfully, so the dump could not be verified. Nothing was run. "
            "Rename the database (ALTER DATABASE ... RENAME TO ...) to a name without them, then back it up"
        )


def archive_prefix(settings: DatabaseSettings) -> str:
    """The start of every dump file name of ``settings``' database: ``<db>@<host>-<port>-<key>-``.

    ``<db>`` and ``<host>`` are the names reduced to safe characters (so no
    name can leave the backup directory), and ``<key>`` is the first 10 hex
    digits of the SHA-256 of host, port and database name as given, so two
    databases whose reduced names coincide, or same-named databases on other
    servers, never share a prefix (and never prune each other's dumps).
    """
    key = hashlib.sha256(f"{settings.host}\n{settings.port}\n{settings.dbname}".encode()).hexdigest()[:10]
    return f"{_label(settings.dbname, 63)}@{_label(settings.host, 63)}-{settings.port}-{key}-"


def archive_name(settings: DatabaseSettings, now: datetime) -> str:
    """``<db>@<host>-<port>-<key>-<UTC timestamp>.dump`` (see `archive_prefix`)."""
    return f"{archive_prefix(settings)}{now.strftime(_TIMESTAMP)}.{now.microsecond // 1000:03d}Z.dump"


def _archive_pattern(settings: DatabaseSettings) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(archive_prefix(settings))}{_STAMP_PATTERN}$")


def _inside(directory: Path, name: str) -> Path:
    """``directory / name``, after checking that it resolves to a file directly inside ``directory``."""
    path = directory / name
    if path.resolve().parent != directory.resolve():
        raise BackupError(f"the dump file name {name!r} would leave {directory}; nothing was written")
    return path


def verify(path: Path, settings: DatabaseSettings, *, tool: Path, expect_dbname: str | None = None) -> int:
    """Check an archive with ``pg_restore --list``; return its number of entries.

    Raises `BackupError` when it does not read, or names another database
    than ``expect_dbname``.
    """
    listing = _run([str(tool), "--list", str(path)], settings, what=f"pg_restore --list {path.name}", target=None)
    header = [line for line in listing.splitlines() if line.startswith(";")]
    entries = [line for line in listing.splitlines() if line.strip() and not line.startswith(";")]
    if not any("Archive created at" in line for line in header):
        raise BackupError(f"{path} is not a pg_dump custom-format archive (pg_restore --list shows no header)")
    if expect_dbname is not None:
        named = [line.split(":", 1)[1].strip() for line in header if line.strip(";").strip().startswith("dbname:")]
        if named != [expect_dbname]:
            raise BackupError(
                f"{path} names database {named[0] if named else '(none)'!r}, not {expect_dbname!r}; "
                "the archive does not belong to this backup"
            )
    return len(entries)


def prune(directory: Path, settings: DatabaseSettings, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` dumps of ``settings``' database in ``directory``; return them.

    Only files named by `archive_name` for the same host, port and database
    count; dumps of same-named databases on other servers, other files, and
    dumps in the earlier naming (``<db>-<timestamp>.dump``, which does not say
    which server they came from) are never touched.
    """
    pattern = _archive_pattern(settings)
    dumps = sorted(p for p in directory.iterdir() if p.is_file() and pattern.match(p.name))
    doomed = dumps[:-keep] if keep < len(dumps) else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def dumps_of(settings: DatabaseSettings, root: Path | None = None) -> list[Path]:
    """The dumps `backup` wrote of ``settings``' database (same host, port and name), newest first.

    ``settings`` are those the dump was named after (``DB_DIRECT_HOST`` behind
    a transaction pooler, `precog_db.connection.direct_settings`).
    """
    directory = backup_dir(root) / settings.env.value
    if not directory.is_dir():
        return []
    pattern = _archive_pattern(settings)
    return sorted((p for p in directory.iterdir() if p.is_file() and pattern.match(p.name)), reverse=True)


def newest_verified(
    settings: DatabaseSettings, *, server_major: int, root: Path | None = None
) -> tuple[Path, int] | None:
    """The newest dump of ``settings``' database that `verify` accepts, with its entry count; None when none does.

    A dump that does not verify (truncated, another database's) is passed over for the next older one.
    """
    dumps = dumps_of(settings, root)
    if not dumps:
        return None
    pg_restore = find_tool("pg_restore", server_major)
    for path in dumps:
        try:
            return path, verify(path, settings, tool=pg_restore, expect_dbname=settings.dbname)
        except BackupError:
            continue
    return None


def backup(
    settings: DatabaseSettings,
    *,
    server_major: int,
    root: Path | None = None,
    keep: int | None = None,
    progress: Callable[[float, int], None] | None = None,
) -> Backup:
    """Dump ``settings``' database, verify it, prune old dumps; return the verified `Backup`.

    ``server_major`` picks a compatible ``pg_dump``; ``progress(seconds,
    bytes_so_far)`` is called about twice a second while pg_dump runs.
    """
    keep = retention(keep)
    _check_dumpable_name(settings)
    # The target first: a database that is not what the settings say gets no directory, no file, no pg_dump.
    target = _checked_target(settings, "back up")
    settings = target.settings  # names the server the dump comes from (DB_DIRECT_HOST behind a pooler)
    directory = backup_dir(root) / settings.env.value
    pg_dump = find_tool("pg_dump", server_major)
    pg_restore = find_tool("pg_restore", server_major)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = _inside(directory, archive_name(settings, datetime.now(UTC)))
    partial = final.with_name(final.name + ".partial")
    started = time.monotonic()

    def tick(elapsed: float) -> None:
        if progress is not None:
            try:
                size = partial.stat().st_size
            except OSError:
                size = 0
            progress(elapsed, size)

    try:
        _run(
            [str(pg_dump), "--format=custom", f"--file={partial}"],
            settings,
            what=f"pg_dump of {settings.describe()}",
            target=target,
            progress=tick,
        )
        os.chmod(partial, 0o600)
        entries = verify(partial, settings, tool=pg_restore, expect_dbname=settings.dbname)
        partial.replace(final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    size = final.stat().st_size
    pruned = prune(directory, settings, keep)
    return Backup(final, size, entries, time.monotonic() - started, pg_dump, tuple(pruned))


# --- restore --------------------------------------------------------------------------------


def check_restore_target(settings: DatabaseSettings, path: str | os.PathLike[str]) -> Path:
    """Refuse a restore into staging or prod, or from a path that is not a file; nothing runs before this.

    Returns ``path`` as a `Path`.
    """
    if settings.env not in RESTORABLE:
        raise EnvironmentNotAllowedError(
            f"restore is allowed only into dev or test, and the target is the {settings.describe()}; "
            "nothing was changed. Restore into a dev or test database (--env dev / --env test) instead"
        )
    if not isinstance(path, str | os.PathLike):
        raise ConfigurationError(
            f"the archive to restore must be a path (str or os.PathLike), not {type(path).__name__}; nothing was run"
        )
    checked = Path(path)
    if not checked.is_file():
        raise ConfigurationError(f"{checked} does not exist or is not a file; pass the path of a .dump file")
    return checked


def restore(settings: DatabaseSettings, path: str | os.PathLike[str], *, server_major: int) -> int:
    """Restore the archive at ``path`` into ``settings``' database (dev or test only); return its entry count.

    Raises `EnvironmentNotAllowedError` for staging and prod before anything
    runs. The restore is one transaction: on any error nothing is changed.
    """
    return _restore(settings, path, server_major=server_major).entries


@dataclass(frozen=True)
class _Restore:
    entries: int
    target: _Target
    #: The stamp row the archive carries (column -> COPY text value, None for NULL), or None.
    brought: dict[str, str | None] | None


def _restore(
    settings: DatabaseSettings, path: str | os.PathLike[str], *, server_major: int, pin: Pin | None = None
) -> _Restore:
    path = check_restore_target(settings, path)
    # The target's own stamp must agree before pg_restore --clean touches it.
    target = _checked_target(settings, "restore", pin=pin)
    settings = target.settings
    pg_restore = find_tool("pg_restore", server_major)
    entries = verify(path, settings, tool=pg_restore)
    brought = archive_stamp(path, settings, tool=pg_restore)
    _pg_restore(pg_restore, path, target)
    return _Restore(entries, target, brought)


def _pg_restore(pg_restore: Path, path: Path, target: _Target) -> None:
    """The one pg_restore that changes a database: all or nothing (one transaction, stop at the first error)."""
    _run(
        [
            str(pg_restore),
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--exit-on-error",
            str(path),
        ],
        target.settings,
        what=f"pg_restore of {path.name} into {target.settings.describe()}",
        target=target,
    )


def restore_copy(copy: DatabaseSettings, path: Path, *, server_major: int, pin: Pin) -> None:
    """Restore ``path`` into ``copy``, an empty database the caller just created on the server ``pin`` names.

    For `precog_db.migrations.rehearse`: the copy may belong to any
    environment (it is not the environment's database, and has no stamp of
    its own yet), so the dev/test rule of `restore` does not apply; the
    naming rule, the gate and the production guard do (`check_target`). The
    same pg_restore as `restore`, pinned to ``pin``.
    """
    from precog_db.connection import check_target, tool_args

    check_target(copy, operation="restore a rehearsal copy")
    args, environ = tool_args(copy, pin)
    _pg_restore(find_tool("pg_restore", server_major), path, _Target(copy, args, environ, pin))


_STAMP_COPY = re.compile(r"^COPY precog_meta\.stamp \(([^)]*)\) FROM stdin;$")
_COPY_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _copy_field(text: str) -> str | None:
    """One field of COPY's text format: ``\\N`` is NULL; backslash escapes undone."""
    if text == "\\N":
        return None
    return re.sub(
        r"\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|.)",
        lambda m: (
            chr(int(m[1][1:], 16))
            if m[1][0] == "x" and len(m[1]) > 1
            else chr(int(m[1], 8))
            if m[1][0] in "01234567"
            else _COPY_ESCAPES.get(m[1], m[1])
        ),
        text,
    )


def archive_stamp(path: Path, settings: DatabaseSettings, *, tool: Path) -> dict[str, str | None] | None:
    """The identity stamp row an archive carries (column name -> text, None for NULL), or None when it has none.

    Read with ``pg_restore --data-only`` from the file alone (no connection).
    An archive that carries the table in another form than one COPY row counts
    as carrying no stamp.
    """
    listing = _run(
        [str(tool), "--data-only", "--schema=precog_meta", "--table=stamp", "--file=-", str(path)],
        settings,
        what=f"pg_restore of the identity stamp in {path.name}",
        target=None,
    )
    lines = listing.split("\n")
    for number, line in enumerate(lines):
        header = _STAMP_COPY.match(line)
        if header is None:
            continue
        columns = [c.strip().strip('"') for c in header[1].split(",")]
        rows = []
        for row in lines[number + 1 :]:
            if row == "\\.":
                break
            rows.append(row)
        if len(rows) != 1:
            return None
        values = rows[0].split("\t")
        if len(values) != len(columns):
            return None
        return {c: _copy_field(v) for c, v in zip(columns, values, strict=True)}
    return None


def same_stamp(brought: Mapping[str, str | None] | None, stamp: Stamp) -> bool:
    """True when ``stamp`` is exactly the row ``brought`` (`archive_stamp`): every recorded field equal."""
    if brought is None:
        return False

    def text(value: object) -> str | None:
        return None if value is None else str(value)

    try:
        when = brought.get("stamped_at")
        stamped_at = None if when is None else datetime.fromisoformat(when)
    except ValueError:
        return False
    return (
        brought.get("env") == stamp.env.value
        and brought.get("dbname") == stamp.dbname
        and brought.get("system_identifier") == text(stamp.system_identifier)
        and brought.get("stamped_by") == stamp.stamped_by
        and brought.get("stamped_role") == stamp.stamped_role
        and brought.get("library_version") == stamp.library_version
        and brought.get("database_oid") == text(stamp.database_oid)
        and stamped_at == stamp.stamped_at
    )


# --- the workflows -----------------------------------------------------------------------------


def backup_database(
    settings: DatabaseSettings,
    *,
    server_major: int,
    purpose: str,
    root: Path | None = None,
    keep: int | None = None,
    progress: ProgressDisplay | None = None,
) -> Backup:
    """`backup`, audited as one ``backup`` entry (with ``purpose``, the file, its size, entries and what was pruned).

    ``progress`` shows pg_dump's elapsed time and size while it runs.
    """
    display = NoProgress() if progress is None else progress

    def show(elapsed: float, size: int) -> None:
        display.update(f"pg_dump {settings.dbname}: {elapsed:.0f}s, {size / 1_048_576:.1f} MiB")

    with audit.operation("backup", settings, purpose=purpose) as info:
        # What was actually given: a prod backup without PRECOG_PROD_CONFIRMED=yes is refused, and audited as such.
        if settings.env is not Environment.PROD:
            info["confirmation"] = "not required"
        else:
            info["confirmation"] = "PRECOG_PROD_CONFIRMED=yes" if production_confirmed() else "none"
        try:
            made = backup(settings, server_major=server_major, root=root, keep=keep, progress=show)
        finally:
            display.done()
        info.update(dump=str(made.path), size=made.size, entries=made.entries, pruned=[str(p) for p in made.pruned])
    return made


def restore_database(
    settings: DatabaseSettings,
    path: str | os.PathLike[str],
    *,
    confirm: Callable[[str], str] | None = None,
    confirm_database: str | None = None,
    yes: bool = False,
) -> Restored:
    """Restore ``path`` into ``settings``' database (dev or test only) and re-stamp it; audited as ``restore``.

    Order: the target check (staging and prod refused before anything runs),
    one connection through the chokepoint (the server's version picks
    ``pg_restore``, and that server is pinned), the confirmation, the restore
    (the pinned server's stamp checked again), and a re-stamp when the dump
    carried another environment's stamp or a restored-copy mark. Every
    connection after the first goes to the pinned server only (its host, port
    and address), so a multi-host ``DB_HOST``, a failover or a DNS change
    cannot re-stamp another server's database. A staging or prod stamp is
    replaced only when it is exactly the one the archive brought in.
    ``confirm(action)`` returns how the action was confirmed (for the audit
    log); by default the typed confirmation of `precog_db.confirm`, given
    here as ``confirm_database`` (or ``yes``), or typed at a terminal.
    """
    from precog_db.connection import connect, direct_settings, pin_of
    from precog_db.stamp import read_stamp_on, restamp_on

    def ask(action: str) -> str:
        if confirm is not None:
            return confirm(action)
        return confirmation(settings, action, always=True, yes=yes, confirm_database=confirm_database)

    with audit.operation("restore", settings, file=str(path)) as info:
        settings = direct_settings(settings, operation="restore")  # the server the work goes to, and messages name
        archive = check_restore_target(settings, path)
        # The target's own stamp is verified here (and again by `_restore` on the same server, right before
        # pg_restore runs), so the re-stamp below only ever replaces the stamp a restore brought into a verified
        # dev/test database.
        conn = connect(settings, operation="restore")
        try:
            major = conn.info.server_version // 10000
            pin = pin_of(conn)
        finally:
            conn.close()
        info["confirmation"] = ask(f"restore {archive.name} (replacing the objects it contains)")
        done = _restore(settings, archive, server_major=major, pin=pin)
        info["entries"] = done.entries

        def accept(previous: Stamp) -> None:
            if previous.env in RESTORABLE or same_stamp(done.brought, previous):
                return
            raise EnvironmentMismatchError(
                f"the restore of {archive.name} into the {settings.describe()} finished, but that database is now "
                f"{previous.describe()}, which is not the stamp the archive brought in; it was not re-stamped. "
                "Check which server and database the restore went to before doing anything else on it"
            )

        conn = connect(settings, operation="re-stamp the restored database", verify=False, pin=done.target.pin)
        try:
            stamp = read_stamp_on(conn, settings)
            if stamp is not None and (stamp.env is not settings.env or stamp.is_copy):
                restamp_on(conn, settings, accept=accept)
                info["restamped"] = f"{stamp.env.value} -> {settings.env.value}"
        finally:
            conn.close()
    return Restored(archive, done.entries, info.get("restamped"))
