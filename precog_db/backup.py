"""Backups with the real ``pg_dump`` / ``pg_restore``: verified, pruned, and restorable into dev or test only.

* `backup` runs ``pg_dump --format=custom`` into
  ``<backup dir>/<env>/<db>-<UTC timestamp>.dump`` (written as ``.partial``
  first), checks the archive with ``pg_restore --list`` (it must read, and
  name the database that was dumped), and only then gives it its final
  name. Older dumps of the same database are then pruned down to the
  retention count.
* `restore` refuses any environment but dev and test, checks the archive
  the same way, and restores it with ``--clean --if-exists --no-owner
  --no-privileges --single-transaction --exit-on-error``: it applies
  completely or not at all.
* The password reaches the tools through ``PGPASSWORD`` in their
  environment, never their command line, and the tools run with
  ``--no-password`` so they never wait for a prompt.
* Tools are looked up in ``PRECOG_PG_BINDIR``, ``pg_config --bindir``, the
  usual install locations and ``PATH``; the first whose major version is at
  least the server's wins (an older ``pg_dump`` cannot dump a newer server).

Settings come in explicitly; the backup directory and retention are
resolved by `backup_dir` / `retention` from arguments or ``PRECOG_BACKUP_DIR``
/ ``PRECOG_BACKUP_KEEP``.
"""

from __future__ import annotations

import contextlib
import functools
import glob
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

from precog_db.embedded import EmbeddedPostgresError, embedded_bindir
from precog_db.environment import Environment
from precog_db.errors import ConfigurationError, EnvironmentNotAllowedError, PrecogDBError
from precog_db.log import redact
from precog_db.settings import DatabaseSettings

__all__ = [
    "BACKUP_DIR_VAR",
    "KEEP_VAR",
    "Backup",
    "BackupError",
    "backup",
    "backup_dir",
    "find_tool",
    "prune",
    "restore",
    "retention",
    "verify",
]

BACKUP_DIR_VAR = "PRECOG_BACKUP_DIR"
KEEP_VAR = "PRECOG_BACKUP_KEEP"
DEFAULT_KEEP = 7
RESTORABLE = (Environment.DEV, Environment.TEST)

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)")
_TIMESTAMP = "%Y%m%dT%H%M%S"


class BackupError(PrecogDBError, RuntimeError):
    """pg_dump or pg_restore failed, could not be found, or produced an archive that does not verify."""


@dataclass(frozen=True)
class Backup:
    """A verified dump."""

    path: Path
    size: int
    entries: int
    duration_s: float
    tool: Path
    pruned: tuple[Path, ...] = ()


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


def _candidate_dirs() -> list[Path]:
    dirs: list[Path] = []
    explicit = os.environ.get("PRECOG_PG_BINDIR", "").strip()
    if explicit:
        dirs.append(Path(explicit))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False)
            if out.returncode == 0 and out.stdout.strip():
                dirs.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    for pattern in (
        "/usr/lib/postgresql/*/bin",
        "/usr/pgsql-*/bin",
        "/opt/homebrew/opt/postgresql@*/bin",
        "/usr/local/opt/postgresql@*/bin",
        "/Applications/Postgres.app/Contents/Versions/*/bin",
    ):
        dirs.extend(sorted((Path(p) for p in glob.glob(pattern)), key=_dir_version, reverse=True))
    # Last: the embedded PostgreSQL of the `local` extra (pg_dump/pg_restore run as us, so no shared copy).
    with contextlib.suppress(EmbeddedPostgresError):
        bundled = embedded_bindir(shared=False)
        if bundled is not None:
            dirs.append(bundled)
    return dirs


def _dir_version(path: Path) -> tuple[int, ...]:
    digits = [int(p) for p in path.parent.name.replace("postgresql@", "").split(".") if p.isdigit()]
    return tuple(digits) or (0,)


@functools.lru_cache(maxsize=32)
def _tool_major(path: Path) -> int | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION.search(out.stdout)
    return int(match.group(1)) if out.returncode == 0 and match else None


def find_tool(name: str, server_major: int) -> Path:
    """The first ``name`` (``pg_dump``/``pg_restore``) whose major version is at least ``server_major``."""
    seen: list[str] = []
    candidates = [d / name for d in _candidate_dirs()]
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    for path in dict.fromkeys(candidates):
        if not path.is_file():
            continue
        major = _tool_major(path)
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


def _tool_env(settings: DatabaseSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        {
            "PGHOST": settings.host,
            "PGPORT": str(settings.port),
            "PGUSER": settings.user,
            "PGDATABASE": settings.dbname,
            "PGSSLMODE": settings.sslmode,
            "PGCONNECT_TIMEOUT": str(settings.connect_timeout),
            "PGAPPNAME": f"{settings.application_name} backup",
        }
    )
    if settings.password:
        env["PGPASSWORD"] = settings.password
    return env


def _scrub(text: str, settings: DatabaseSettings) -> str:
    if settings.password:
        text = text.replace(settings.password, "***")
    return redact(text)


def _run(
    argv: list[str],
    settings: DatabaseSettings,
    *,
    what: str,
    progress: Callable[[float], None] | None = None,
    timeout: float | None = None,
) -> str:
    """Run a tool; return its stdout. Raises `BackupError` with the tail of its stderr on failure."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=_tool_env(settings))
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


def _archive_name(dbname: str, now: datetime) -> str:
    return f"{dbname}-{now.strftime(_TIMESTAMP)}.{now.microsecond // 1000:03d}Z.dump"


def _archive_pattern(dbname: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(dbname)}-\d{{8}}T\d{{6}}\.\d{{3}}Z\.dump$")


def verify(path: Path, settings: DatabaseSettings, *, tool: Path, expect_dbname: str | None = None) -> int:
    """Check an archive with ``pg_restore --list``; return its number of entries.

    Raises `BackupError` when it does not read, or names another database
    than ``expect_dbname``.
    """
    listing = _run([str(tool), "--list", str(path)], settings, what=f"pg_restore --list {path.name}")
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


def prune(directory: Path, dbname: str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` dumps of ``dbname`` in ``directory``; return what was deleted."""
    pattern = _archive_pattern(dbname)
    dumps = sorted(p for p in directory.iterdir() if p.is_file() and pattern.match(p.name))
    doomed = dumps[:-keep] if keep < len(dumps) else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


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
    directory = backup_dir(root) / settings.env.value
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    pg_dump = find_tool("pg_dump", server_major)
    pg_restore = find_tool("pg_restore", server_major)
    final = directory / _archive_name(settings.dbname, datetime.now(UTC))
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
            [str(pg_dump), "--format=custom", "--no-password", f"--file={partial}"],
            settings,
            what=f"pg_dump of {settings.describe()}",
            progress=tick,
        )
        os.chmod(partial, 0o600)
        entries = verify(partial, settings, tool=pg_restore, expect_dbname=settings.dbname)
        partial.replace(final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    size = final.stat().st_size
    pruned = prune(directory, settings.dbname, keep)
    return Backup(final, size, entries, time.monotonic() - started, pg_dump, tuple(pruned))


# --- restore --------------------------------------------------------------------------------


def check_restore_target(settings: DatabaseSettings, path: Path) -> None:
    """Refuse a restore into staging or prod, or from a path that is not a file; nothing runs before this."""
    if settings.env not in RESTORABLE:
        raise EnvironmentNotAllowedError(
            f"restore is allowed only into dev or test, and the target is the {settings.describe()}; "
            "nothing was changed. Restore into a dev or test database (--env dev / --env test) instead"
        )
    if not path.is_file():
        raise ConfigurationError(f"{path} does not exist or is not a file; pass the path of a .dump file")


def restore(settings: DatabaseSettings, path: Path, *, server_major: int) -> int:
    """Restore the archive at ``path`` into ``settings``' database (dev or test only); return its entry count.

    Raises `EnvironmentNotAllowedError` for staging and prod before anything
    runs. The restore is one transaction: on any error nothing is changed.
    """
    check_restore_target(settings, path)
    pg_restore = find_tool("pg_restore", server_major)
    entries = verify(path, settings, tool=pg_restore)
    _run(
        [
            str(pg_restore),
            "--no-password",
            f"--dbname={settings.dbname}",
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--exit-on-error",
            str(path),
        ],
        settings,
        what=f"pg_restore of {path.name} into {settings.describe()}",
    )
    return entries
