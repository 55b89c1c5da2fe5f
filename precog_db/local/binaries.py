"""PostgreSQL binaries: the one lookup and the one ``--version`` parser.

* `system_bindirs` lists the directories where PostgreSQL may be installed on
  this machine (``pg_config --bindir``, the usual Debian, RHEL, Homebrew and
  Postgres.app locations, ``PATH``), best first.
* `version_of` / `major_version` read ``X (PostgreSQL) 16.2`` from any
  PostgreSQL executable's ``--version``.
* `find_server_binaries` picks the server a local cluster starts:
  ``PRECOG_PG_BINDIR``, else PostgreSQL installed on the machine, else the
  embedded server of the ``local`` extra (`precog_db.local.embedded`);
  ``PRECOG_PG_SEARCH=system|embedded`` limits the search.
* `tool_dirs` is the same lookup for the client tools (``pg_dump``,
  ``pg_restore``) that `precog_db.backup` runs.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from precog_db.errors import ConfigurationError, EmbeddedPostgresError, LocalClusterError
from precog_db.local import embedded

__all__ = [
    "BINDIR_ENV",
    "SEARCH_ENV",
    "SEARCH_MODES",
    "ServerBinaries",
    "embedded_description",
    "find_postgres_bindir",
    "find_server_binaries",
    "has_server",
    "is_root",
    "major_version",
    "search_mode",
    "server_major",
    "system_bindirs",
    "tool_dirs",
    "version_of",
]

BINDIR_ENV = "PRECOG_PG_BINDIR"
SEARCH_ENV = "PRECOG_PG_SEARCH"
SEARCH_MODES = ("auto", "system", "embedded")
SERVER_EXECUTABLES = ("initdb", "pg_ctl", "postgres")

#: ``pg_ctl (PostgreSQL) 16.2``, ``pg_dump (PostgreSQL) 15.4 (Debian 15.4-1.pgdg120+1)``, ``... 17devel``.
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)([0-9A-Za-z.]*)")


@functools.lru_cache(maxsize=64)
def version_of(executable: Path) -> str | None:
    """The PostgreSQL version ``executable --version`` reports (``16.2``), None when it cannot be run or read."""
    try:
        out = subprocess.run([str(executable), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION.search(out.stdout)
    return match.group(1) + match.group(2) if out.returncode == 0 and match else None


def major_version(executable: Path) -> int | None:
    """The major version of a PostgreSQL executable (16 for ``16.2``), None if unknown."""
    version = version_of(executable)
    digits = re.match(r"\d+", version or "")
    return int(digits.group(0)) if digits else None


def server_major(bindir: Path) -> int | None:
    """The major version of the server binaries in ``bindir`` (``pg_ctl --version``), None if unknown."""
    return major_version(bindir / "pg_ctl")


def has_server(bindir: Path) -> bool:
    """True when ``bindir`` holds ``initdb``, ``pg_ctl`` and ``postgres``."""
    return all((bindir / name).is_file() for name in SERVER_EXECUTABLES)


def is_root() -> bool:
    """True when this process runs as root (PostgreSQL then runs as the ``postgres`` user)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _version_key(path: str) -> tuple[int, ...]:
    digits = [int(p) for p in Path(path).parent.name.replace("postgresql@", "").split(".") if p.isdigit()]
    return tuple(digits) or (0,)


def system_bindirs() -> list[tuple[Path, str]]:
    """Directories that may hold PostgreSQL binaries installed on the machine, best first, and how each was found."""
    found: list[tuple[Path, str]] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False)
            if out.returncode == 0 and out.stdout.strip():
                found.append((Path(out.stdout.strip()), "pg_config --bindir"))
        except (OSError, subprocess.SubprocessError):
            pass
    patterns = [
        "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
        "/usr/pgsql-*/bin",  # RHEL, Fedora (PGDG)
        "/opt/homebrew/opt/postgresql@*/bin",  # Homebrew, Apple silicon
        "/usr/local/opt/postgresql@*/bin",  # Homebrew, Intel
        "/Applications/Postgres.app/Contents/Versions/*/bin",
    ]
    for pattern in patterns:
        for path in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            found.append((Path(path), "standard location"))
    for path in ("/opt/homebrew/bin", "/usr/local/pgsql/bin", "/usr/local/bin"):
        found.append((Path(path), "standard location"))
    initdb = shutil.which("initdb")
    if initdb:
        found.append((Path(initdb).resolve().parent, "PATH"))
    return found


def tool_dirs() -> list[Path]:
    """Where to look for ``pg_dump``/``pg_restore``: ``PRECOG_PG_BINDIR``, the installed ones, then the embedded ones.

    The embedded tools run as this process (no shared copy for the ``postgres`` user).
    """
    dirs: list[Path] = []
    explicit = os.environ.get(BINDIR_ENV, "").strip()
    if explicit:
        dirs.append(Path(explicit))
    dirs.extend(path for path, _ in system_bindirs())
    with contextlib.suppress(EmbeddedPostgresError):
        bundled = embedded.embedded_bindir(shared=False)
        if bundled is not None:
            dirs.append(bundled)
    return list(dict.fromkeys(dirs))


def embedded_description(bindir: Path) -> str:
    """A one-line description of the embedded server, for messages."""
    return (
        f"PostgreSQL binaries in {bindir} (PostgreSQL {version_of(bindir / 'pg_ctl') or 'unknown'}, embedded: "
        f"the {embedded.PACKAGE} {embedded.package_version()} package of the {embedded.EXTRA} extra)"
    )


@dataclass(frozen=True)
class ServerBinaries:
    """The PostgreSQL binaries a local cluster runs, and how they were found."""

    bindir: Path
    kind: str  # "configured" (PRECOG_PG_BINDIR), "system" (installed on the machine) or "embedded" (the extra)
    found_by: str

    def describe(self) -> str:
        """One line for messages: which server, where, found how."""
        if self.kind == "embedded":
            return embedded_description(self.bindir)
        major = server_major(self.bindir)
        where = "set by" if self.kind == "configured" else "installed on this machine, found by"
        return f"PostgreSQL binaries in {self.bindir} (PostgreSQL {major or '?'}, {where} {self.found_by})"


def search_mode(value: str | None = None) -> str:
    """The lookup mode: ``value``, else ``PRECOG_PG_SEARCH``, else ``auto``; validated."""
    raw = os.environ.get(SEARCH_ENV, "") if value is None else value
    mode = raw.strip().lower() or "auto"
    if mode not in SEARCH_MODES:
        raise ConfigurationError(
            f"{SEARCH_ENV} must be one of {', '.join(SEARCH_MODES)} (auto: installed binaries, then the embedded "
            "server; system: installed binaries only; embedded: the embedded server only)"
        )
    return mode


def find_server_binaries(search: str | None = None, *, major: int | None = None) -> ServerBinaries:
    """The one place that decides which PostgreSQL a local cluster starts.

    Order: (1) ``PRECOG_PG_BINDIR``, when set, and nothing else; (2) binaries
    installed on the machine (``pg_config --bindir``, the usual Debian, RHEL and
    Homebrew locations, ``PATH``); (3) the embedded server of the ``local``
    extra. ``search`` (default ``PRECOG_PG_SEARCH``) limits steps 2 and 3 to
    ``system`` or ``embedded``. ``major`` keeps only binaries of that major
    version (an existing data directory needs the version that created it).
    Servers that need no starting (``PRECOG_TEST_DSN``, the settings) are the
    callers' first choice and never reach this function.
    """
    mode = search_mode(search)
    wanted = f"PostgreSQL {major} " if major else "PostgreSQL "
    explicit = os.environ.get(BINDIR_ENV, "").strip()
    if explicit:
        path = Path(explicit)
        if not has_server(path):
            raise LocalClusterError(
                f"{BINDIR_ENV}={explicit} does not hold initdb, pg_ctl and postgres; "
                "point it at PostgreSQL's bin directory or unset it"
            )
        if major and server_major(path) != major:
            raise LocalClusterError(
                f"{BINDIR_ENV}={explicit} holds PostgreSQL {server_major(path)}, but the data directory was "
                f"created by PostgreSQL {major}; point it at {wanted}binaries or unset it"
            )
        return ServerBinaries(path, "configured", BINDIR_ENV)
    looked: list[str] = []
    if mode in ("auto", "system"):
        for path, how in system_bindirs():
            if has_server(path) and (major is None or server_major(path) == major):
                return ServerBinaries(path, "system", how)
            looked.append(str(path))
    else:
        looked.append(f"no installed binaries ({SEARCH_ENV}=embedded)")
    if mode in ("auto", "embedded"):
        try:
            bindir = embedded.embedded_bindir(shared=is_root())
        except EmbeddedPostgresError as exc:
            raise LocalClusterError(str(exc)) from None
        if bindir is not None and (major is None or server_major(bindir) == major):
            return ServerBinaries(bindir, "embedded", f"the {embedded.EXTRA} extra")
        looked.append("the embedded server (not installed)" if bindir is None else f"the embedded server in {bindir}")
    else:
        looked.append(f"not the embedded server ({SEARCH_ENV}=system)")
    raise LocalClusterError(
        f"no {wanted}server binaries (initdb, pg_ctl, postgres) to start a local cluster; looked in: "
        + ", ".join(dict.fromkeys(looked))
        + ". Fix it one of three ways: (1) install PostgreSQL (`apt-get install postgresql`, "
        f"`brew install postgresql`) or set {BINDIR_ENV} to the directory holding initdb; (2) "
        + embedded.INSTALL_HINT
        + "; (3) point PRECOG_TEST_DSN (tests) or the settings (config/.env.dev) at a server you already have"
    )


def find_postgres_bindir() -> tuple[Path, str]:
    """Find a directory holding ``initdb`` and ``pg_ctl``; return it and how it was found.

    Same lookup as :func:`find_server_binaries`.
    """
    found = find_server_binaries()
    return found.bindir, found.found_by
