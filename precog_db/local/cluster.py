"""A throwaway local PostgreSQL cluster, started with ``initdb`` and ``pg_ctl``.

Used by ``precog-db local up``, the README's demo and the test harness.
:func:`precog_db.local.binaries.find_server_binaries` picks the binaries
(``PRECOG_PG_BINDIR``, else PostgreSQL installed on the machine, else the
embedded server of the ``local`` extra).
PostgreSQL refuses to run as root, so when this process is root the server
runs as the unprivileged ``postgres`` user (via ``runuser``), in a directory
that user owns: ``<root>/pg`` when that user can reach it, else a directory
in the system's temporary directory (`LocalCluster.where` says which, and
why). State lives in ``<root>/cluster.json``; the data survives
``down``/``up``. Nothing here reads precog settings: callers pass paths
(`local_up` stamps the databases it creates through `precog_db.stamp`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from precog_db.errors import LocalClusterError
from precog_db.local.binaries import ServerBinaries, find_server_binaries, has_server, is_root

__all__ = [
    "LocalCluster",
    "free_port",
    "local_up",
]

SUPERUSER = "postgres"
_MARKER = "# written by precog-db local up"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


def _first_unreachable(path: Path, uid: int, gid: int) -> Path | None:
    """The outermost ancestor of ``path`` that (uid, gid) cannot traverse, None if every one is reachable."""
    for parent in reversed([path, *path.parents]):
        if not _reachable_by(parent, uid, gid):
            return parent
    return None


@dataclass
class LocalCluster:
    """One throwaway cluster whose state lives under ``root`` (e.g. ``.precog/``)."""

    root: Path
    server_options: dict[str, str] = field(default_factory=dict)
    #: The binaries a new cluster is created with (None: `find_server_binaries` decides); ignored once it exists.
    binaries: ServerBinaries | None = None
    _state: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    recovered: str | None = field(default=None, init=False, repr=False)

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
        if self.binaries is not None and "bindir" not in self._state:
            found = self.binaries
            self._state.update(
                bindir=str(found.bindir), kind=found.kind, found_by=found.found_by, server=found.describe()
            )

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
        """The binaries this cluster runs: those that created it, else the lookup's choice.

        A data directory can only be run by the major version that created it, so
        when the saved binaries are gone (an emptied temporary cache, an
        uninstalled package) the lookup is limited to that version.
        """
        saved = self._state.get("bindir")
        if saved and has_server(Path(saved)):
            return Path(saved)
        found = find_server_binaries(major=self._data_major())
        self._state.update(bindir=str(found.bindir), kind=found.kind, found_by=found.found_by, server=found.describe())
        if self.initialized():
            self._save()
        return found.bindir

    @property
    def kind(self) -> str:
        """``configured``, ``system`` or ``embedded``: see :func:`find_server_binaries`."""
        self.bindir  # noqa: B018 - runs the lookup when nothing is saved yet
        return str(self._state.get("kind", "system"))

    @property
    def source(self) -> str:
        """Which server this cluster runs, for messages: binaries and how they were found."""
        bindir = self.bindir
        saved = self._state.get("server")
        if saved:
            return str(saved)
        return f"PostgreSQL binaries in {bindir} (found by {self._state.get('found_by', 'saved state')})"

    def _data_major(self) -> int | None:
        try:
            text = (self.data_dir / "PG_VERSION").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def where(self) -> str:
        """One sentence for people: where the data is, why there, and what keeps it."""
        data = self.data_dir
        if not is_root():
            return f"its data is in {data}"
        why = "PostgreSQL refuses to run as root, so the server runs as the postgres user"
        if self.home == self.root / "pg":
            return f"its data is in {data}, owned by the postgres user ({why})"
        blocked = _first_unreachable(self.root, *(self._server_ids() or (0, 0)))
        reason = f"cannot enter {blocked}" if blocked else f"could not enter {self.root} when it was created"
        return (
            f"its data is in {data}, not under {self.root}: {why}, which {reason}; "
            f"{self.root / 'cluster.json'} records the location (a reboot may empty {self.home.parent})"
        )

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname={dbname}"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    # -- running commands ------------------------------------------------------

    def _as_server_user(self, argv: Sequence[str]) -> list[str]:
        if not is_root():
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
        self, argv: Sequence[str], *, timeout: float = 120, check: bool = True, log_tail: bool = False
    ) -> subprocess.CompletedProcess[str]:
        cmd = self._as_server_user(argv)
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd="/")
        except subprocess.TimeoutExpired:
            raise LocalClusterError(f"{Path(argv[0]).name} did not finish within {timeout:.0f}s") from None
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            if log_tail:
                with contextlib.suppress(OSError):
                    detail += [f"log: {line}" for line in self.log_file.read_text(errors="replace").splitlines()[-5:]]
            raise LocalClusterError(
                f"{Path(argv[0]).name} failed (exit {result.returncode}): "
                + " | ".join(detail)
                + f". The server log is {self.log_file}"
            )
        return result

    def _server_ids(self) -> tuple[int, int] | None:
        if not is_root():
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
        """Is this cluster's own server running? A pid file naming another process does not count."""
        if not self.initialized():
            return False
        pid = self._postmaster_pid()
        if pid is None or not _alive(pid) or self._is_our_postmaster(pid) is False:
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
        """Start the server if it is not running, recovering from a stale pid file.

        After a start, ``recovered`` says what was found when the previous server
        had not shut down cleanly (None when it had).
        """
        self.init()
        self.recovered = None
        if self.running():
            return
        self.recovered = self._clear_stale_pid()
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
            log_tail=True,
        )

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _is_our_postmaster(self, pid: int) -> bool | None:
        """Is ``pid`` a server running in this data directory? None when this platform cannot tell.

        A postmaster's working directory is its data directory; when that is
        unreadable (another user's process, no root) its program name decides.
        """
        proc = Path(f"/proc/{pid}")
        try:
            return os.path.realpath(os.readlink(proc / "cwd")) == os.path.realpath(self.data_dir)
        except PermissionError:
            with contextlib.suppress(OSError):
                return "postgres" in (proc / "comm").read_text()
            return None
        except OSError:
            return False if Path("/proc/self").is_dir() else None

    def _clear_stale_pid(self, leftovers_wait: float = 15) -> str | None:
        """Deal with a ``postmaster.pid`` whose server is gone; return what was found, None if nothing.

        A dead pid: the file stays, because PostgreSQL replaces a stale file
        itself, after checking that no process of the old server still uses its
        shared memory. A pid that now belongs to another program: PostgreSQL
        would refuse to start ("lock file already exists"), so the file is
        removed once no process is left in the data directory.
        """
        pid = self._postmaster_pid()
        if pid is None or (_alive(pid) and self._is_our_postmaster(pid) is not False):
            return None
        leftovers = _processes_in(self.data_dir)
        deadline = time.monotonic() + leftovers_wait
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.2)
            leftovers = _processes_in(self.data_dir)
        if leftovers:
            pids = " ".join(str(p) for p in leftovers)
            raise LocalClusterError(
                f"the server of {self.data_dir} stopped without a clean shutdown, but processes {pids} still "
                f"run in its data directory; stop them (kill {pids}) and start again"
            )
        what = f"the server that wrote {self.data_dir / 'postmaster.pid'} (pid {pid}) "
        if _alive(pid):
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
            what += "is gone and its pid now belongs to another program, so the stale file was removed"
        else:
            what += "is gone"
        if self._control_state() == "shut down":
            return f"found a stale pid file: {what}; the data had been shut down cleanly"
        return (
            f"recovered from an unclean stop: {what}; the previous server crashed, was killed or the machine "
            "restarted, and PostgreSQL replays its write-ahead log on this start"
        )

    def _control_state(self) -> str | None:
        """``Database cluster state`` from pg_controldata (``shut down``, ``in production``, ...)."""
        tool = self.bindir / "pg_controldata"
        if not tool.is_file():
            return None
        result = self._run([str(tool), "-D", str(self.data_dir)], check=False)
        for line in result.stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Database cluster state":
                return value.strip()
        return None

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is inside ``directory`` (Linux /proc; empty elsewhere)."""
    target = os.path.realpath(directory)
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == target or cwd.startswith(target + os.sep):
            found.append(int(entry.name))
    return sorted(found)


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


def local_up(
    root: Path, config_dir: Path, envs: Sequence[str] = ("dev", "test"), *, stamp: bool = True
) -> tuple[LocalCluster, list[str]]:
    """Start (or reuse) the cluster, create and stamp ``precog_<env>`` databases, write their `.env` files.

    Idempotent. Returns the cluster and one line per thing done, the second
    saying where the data is. A database that is unstamped is stamped with its
    environment (``stamp=False`` skips that); one stamped already is left alone.
    """
    cluster = LocalCluster(root)
    was_running = cluster.running()
    cluster.start()
    done = [
        f"{'reused running' if was_running else 'started'} local PostgreSQL on {cluster.host}:{cluster.port} "
        f"using {cluster.source}",
        cluster.where(),
    ]
    if cluster.recovered:
        done.append(cluster.recovered)
    for env in envs:
        name = f"precog_{env}"
        created = cluster.create_database(name)
        done.append(f"{'created' if created else 'kept'} database {name}")
        if stamp:
            stamped = _stamp_if_unstamped(cluster, env, name)
            if stamped:
                done.append(stamped)
        done.append(
            _write_env_file(
                config_dir / f".env.{env}",
                {"DB_HOST": cluster.host, "DB_PORT": str(cluster.port), "DB_NAME": name, "DB_USER": SUPERUSER},
            )
        )
    return cluster, done


def _stamp_if_unstamped(cluster: LocalCluster, env: str, dbname: str) -> str | None:
    """Stamp ``dbname`` on the cluster as ``env`` when it has no stamp, so opening it does not warn."""
    from precog_db.environment import parse_environment
    from precog_db.settings import DatabaseSettings
    from precog_db.stamp import read_stamp, stamp_database

    environment = parse_environment(env)
    own = DatabaseSettings(env=environment, host=cluster.host, port=cluster.port, dbname=dbname, user=SUPERUSER)
    if read_stamp(own) is not None:
        return None
    stamp_database(environment, settings=own)
    return f"stamped database {dbname} as {environment.value}"
