"""A throwaway local PostgreSQL cluster built from the binaries on the machine.

Used by ``precog-db local up``, the README's demo and the test harness.
PostgreSQL refuses to run as root, so when this process is root the server
runs as the unprivileged ``postgres`` user (via ``runuser``), in a directory
that user owns. State lives in ``<root>/cluster.json``; the data survives
``down``/``up``. Nothing here reads precog settings: callers pass paths.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from precog_db.errors import PrecogDBError

__all__ = ["LocalCluster", "LocalClusterError", "find_postgres_bindir", "free_port", "local_up"]

SUPERUSER = "postgres"
_MARKER = "# written by precog-db local up"


class LocalClusterError(PrecogDBError, RuntimeError):
    """The local throwaway cluster could not be found, created, started or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _version_key(path: str) -> tuple[int, ...]:
    digits = [int(p) for p in Path(path).parent.name.split(".") if p.isdigit()]
    return tuple(digits) or (0,)


def _candidate_bindirs() -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    explicit = os.environ.get("PRECOG_PG_BINDIR", "").strip()
    if explicit:
        found.append((Path(explicit), "PRECOG_PG_BINDIR"))
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


def find_postgres_bindir() -> tuple[Path, str]:
    """Find a directory holding ``initdb`` and ``pg_ctl``; return it and how it was found.

    Order: ``PRECOG_PG_BINDIR``, ``pg_config --bindir``, the usual Debian,
    RHEL and Homebrew locations, then ``PATH``.
    """
    looked: list[str] = []
    for path, how in _candidate_bindirs():
        looked.append(str(path))
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file() and (path / "postgres").is_file():
            return path, how
    raise LocalClusterError(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) were found; looked in: "
        + ", ".join(dict.fromkeys(looked))
        + ". Fix it one of three ways: install PostgreSQL (e.g. `apt-get install postgresql`), "
        "set PRECOG_PG_BINDIR to the directory holding initdb, or point the settings "
        "(config/.env.dev, PRECOG_TEST_DSN) at a server you already have"
    )


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _reachable_by(path: Path, uid: int, gid: int) -> bool:
    """Can (uid, gid) traverse every ancestor of ``path``?"""
    for parent in [path, *path.parents]:
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return False
    return True


@dataclass
class LocalCluster:
    """One throwaway cluster whose state lives under ``root`` (e.g. ``.precog/``)."""

    root: Path
    server_options: dict[str, str] = field(default_factory=dict)
    _state: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()
        state_file = self.root / "cluster.json"
        if state_file.is_file():
            try:
                self._state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                raise LocalClusterError(
                    f"{state_file} is damaged; delete {self.root} to start over (this deletes local data)"
                ) from None

    # -- paths and identity ----------------------------------------------------

    @property
    def home(self) -> Path:
        """Directory owned by the server user: holds ``data/`` and ``postgres.log``."""
        return Path(self._state.get("home", self.root / "pg"))

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log_file(self) -> Path:
        return self.home / "postgres.log"

    @property
    def port(self) -> int:
        return int(self._state.get("port", 0))

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def bindir(self) -> Path:
        if "bindir" not in self._state or not (Path(self._state["bindir"]) / "pg_ctl").is_file():
            path, how = find_postgres_bindir()
            self._state["bindir"], self._state["found_by"] = str(path), how
        return Path(self._state["bindir"])

    @property
    def source(self) -> str:
        """Which server this cluster runs, for messages: binaries and how they were found."""
        bindir = self.bindir
        return f"PostgreSQL binaries in {bindir} (found by {self._state.get('found_by', 'saved state')})"

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname={dbname}"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    # -- running commands ------------------------------------------------------

    def _as_server_user(self, argv: Sequence[str]) -> list[str]:
        if not _is_root():
            return list(argv)
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", SUPERUSER, "--", *argv]
        su = shutil.which("su")
        if su:
            import shlex

            return [su, SUPERUSER, "-s", "/bin/sh", "-c", shlex.join(argv)]
        raise LocalClusterError("running as root but neither runuser nor su exists to drop to the postgres user")

    def _run(
        self, argv: Sequence[str], *, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = self._as_server_user(argv)
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd="/")
        except subprocess.TimeoutExpired:
            raise LocalClusterError(f"{Path(argv[0]).name} did not finish within {timeout:.0f}s") from None
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise LocalClusterError(
                f"{Path(argv[0]).name} failed (exit {result.returncode}): "
                + " | ".join(detail)
                + f". The server log is {self.log_file}"
            )
        return result

    def _server_ids(self) -> tuple[int, int] | None:
        if not _is_root():
            return None
        import pwd

        try:
            entry = pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise LocalClusterError(
                "running as root, and PostgreSQL refuses to run as root, but there is no "
                f"'{SUPERUSER}' user to run it as; create one (useradd --system {SUPERUSER}) "
                "or run as an ordinary user"
            ) from None
        return entry.pw_uid, entry.pw_gid

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "cluster.json.tmp"
        tmp.write_text(json.dumps(self._state, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.root / "cluster.json")

    # -- lifecycle ---------------------------------------------------------------

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def running(self) -> bool:
        if not self.initialized():
            return False
        result = self._run([str(self.bindir / "pg_ctl"), "status", "-D", str(self.data_dir)], check=False)
        return result.returncode == 0

    def init(self) -> None:
        """Create the data directory with initdb (idempotent)."""
        if self.initialized():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        ids = self._server_ids()
        home = self.root / "pg"
        if ids is not None and not _reachable_by(self.root, *ids):
            digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
            home = Path(tempfile.gettempdir()) / f"precog-cluster-{digest}"
        home.mkdir(parents=True, exist_ok=True)
        if ids is not None:
            os.chown(home, *ids)
        os.chmod(home, 0o700)
        self._state["home"] = str(home)
        bindir = self.bindir
        self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(home / "data"),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=300,
        )
        if not self.port:
            self._state["port"] = free_port()
        self._save()

    def start(self, *, wait: float = 60) -> None:
        """Start the server if it is not running, recovering from a stale pid file."""
        self.init()
        if self.running():
            return
        self._clear_stale_pid()
        try:
            self._pg_ctl_start(wait)
        except LocalClusterError:
            if _port_in_use(self.port):
                self._state["port"] = free_port()
                self._save()
                self._pg_ctl_start(wait)
            else:
                raise

    def _pg_ctl_start(self, wait: float) -> None:
        options = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "''",
            **self.server_options,
        }
        opts = " ".join(f"-c {k}={v}" for k, v in options.items())
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                str(int(wait)),
                "-o",
                opts,
            ],
            timeout=wait + 30,
        )

    def _clear_stale_pid(self) -> None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if alive:
            with contextlib.suppress(OSError):
                alive = "postgres" in Path(f"/proc/{pid}/comm").read_text()
        if not alive:
            pid_file.unlink(missing_ok=True)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``, ``smart`` or ``immediate``); a no-op when it is not running."""
        if not self.running():
            return
        self._run([str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60"])

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        """Stop the server and delete every file of the cluster."""
        with contextlib.suppress(LocalClusterError):
            self.stop("immediate")
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- databases ---------------------------------------------------------------

    def create_database(self, name: str, *, template: str | None = None) -> bool:
        """Create ``name`` if it does not exist; return True when it was created."""
        with psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if exists:
                return False
            query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
            conn.execute(query)
            return True

    def status(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "data_dir": str(self.data_dir),
            "initialized": self.initialized(),
            "running": self.running(),
            "host": self.host,
            "port": self.port,
            "server": self.source if self.initialized() else None,
        }


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _write_env_file(path: Path, values: dict[str, str]) -> str:
    """Write a generated `.env` file; never overwrite one a person wrote. Returns what happened."""
    body = _MARKER + "\n" + "".join(f"{k}={v}\n" for k, v in values.items())
    if path.exists():
        current = path.read_text(errors="replace")
        if not current.startswith(_MARKER):
            return f"kept {path} (not written by precog-db; edit it yourself to use the local cluster)"
        if current == body:
            return f"unchanged {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode otherwise
    with os.fdopen(fd, "w") as fh:
        fh.write(body)
    return f"wrote {path}"


def local_up(root: Path, config_dir: Path, envs: Sequence[str] = ("dev", "test")) -> tuple[LocalCluster, list[str]]:
    """Start (or reuse) the cluster, create ``precog_<env>`` databases, write their `.env` files.

    Idempotent. Returns the cluster and one line per thing done.
    """
    cluster = LocalCluster(root)
    was_running = cluster.running()
    cluster.start()
    done = [
        f"{'reused running' if was_running else 'started'} local PostgreSQL on {cluster.host}:{cluster.port} "
        f"using {cluster.source}"
    ]
    for env in envs:
        name = f"precog_{env}"
        created = cluster.create_database(name)
        done.append(f"{'created' if created else 'kept'} database {name}")
        done.append(
            _write_env_file(
                config_dir / f".env.{env}",
                {"DB_HOST": cluster.host, "DB_PORT": str(cluster.port), "DB_NAME": name, "DB_USER": SUPERUSER},
            )
        )
    return cluster, done
