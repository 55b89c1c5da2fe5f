"""The real components of a deployment for the topology tests (test helper, not shipped).

* `pgbouncer` runs Debian's PgBouncer (as the ``postgres`` user, with a generated
  ini in a temporary directory, on a free loopback port) in front of a server;
* `standby_of` builds a streaming standby of a throwaway cluster with
  ``pg_basebackup -R`` on another port, optionally as its synchronous standby;
* `promote` / `crash` are the two halves of a failover.

Every wait is bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from precog_db.local.cluster import SUPERUSER, LocalCluster, free_port
from tests._helpers.server import Server


def _server_ids() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    import pwd

    entry = pwd.getpwnam(SUPERUSER)
    return entry.pw_uid, entry.pw_gid


def _owned_dir(prefix: str) -> Path:
    """A fresh temporary directory the server user owns."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    ids = _server_ids()
    if ids is not None:
        os.chown(path, *ids)
    path.chmod(0o700)
    return path


def _as_server_user(argv: list[str]) -> list[str]:
    if _server_ids() is None:
        return argv
    return ["runuser", "-u", SUPERUSER, "--", *argv]


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    """Until something accepts connections on 127.0.0.1:``port`` (bounded)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


@contextlib.contextmanager
def pgbouncer(server: Server, *, pool_mode: str = "transaction", pool_size: int = 1) -> Iterator[int]:
    """Debian's PgBouncer in front of ``server`` on a free loopback port; yields the port.

    ``pool_size`` server connections per database and user: with 1, every
    client shares the same server session, so anything that leaks shows.
    Startup ``options`` are not ignored, so a client sending them is refused.
    """
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).is_file():
        raise RuntimeError("pgbouncer is not installed: apt-get install pgbouncer (.ci/run installs it)")
    home = _owned_dir("precog-pgbouncer-")
    port = free_port()
    (home / "userlist.txt").write_text(f'"{SUPERUSER}" ""\n')
    ini = home / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = host=127.0.0.1 port={server.port}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {home / 'userlist.txt'}\n"
        f"pool_mode = {pool_mode}\n"
        f"default_pool_size = {pool_size}\n"
        "max_client_conn = 100\n"
        "server_reset_query = DISCARD ALL\n"
        "ignore_startup_parameters = extra_float_digits\n"
        f"logfile = {home / 'pgbouncer.log'}\n"
        f"pidfile = {home / 'pgbouncer.pid'}\n"
    )
    ids = _server_ids()
    if ids is not None:
        for name in ("userlist.txt", "pgbouncer.ini"):
            os.chown(home / name, *ids)
    subprocess.run(_as_server_user([binary, "-d", str(ini)]), check=True, timeout=30, capture_output=True)
    pid = 0
    try:
        deadline = time.monotonic() + 15
        while not pid and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                pid = int((home / "pgbouncer.pid").read_text().strip())
            if not pid:
                time.sleep(0.05)
        wait_for_port(port)
        yield port
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)  # PgBouncer's immediate shutdown
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)
        shutil.rmtree(home, ignore_errors=True)


def standby_of(primary: LocalCluster, *, synchronous: bool = False) -> LocalCluster:
    """A streaming standby of ``primary`` built with ``pg_basebackup -R``, started on another port (caller destroys it).

    ``synchronous``: the primary waits for it at every commit
    (``synchronous_standby_names = '*'``), so an acknowledged commit is on the standby.
    """
    root = Path(tempfile.mkdtemp(prefix="precog-standby-"))
    home = _owned_dir("precog-standby-home-")
    standby = LocalCluster(root, server_options=dict(primary.server_options))
    standby._state.update(
        home=str(home), port=free_port(), bindir=str(primary.bindir), kind=primary.kind, server=primary.source
    )
    standby._save()
    primary._run(
        [
            str(primary.bindir / "pg_basebackup"),
            "-h",
            primary.host,
            "-p",
            str(primary.port),
            "-U",
            SUPERUSER,
            "-D",
            str(standby.data_dir),
            "-R",
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-sync",
        ],
        timeout=120,
    )
    standby.start()
    if synchronous:
        with psycopg.connect(primary.conninfo(), autocommit=True, connect_timeout=10) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
    wait_streaming(primary)
    return standby


def wait_streaming(primary: LocalCluster, timeout: float = 30.0) -> None:
    """Until the primary has a standby streaming from it (bounded)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(primary.conninfo(), autocommit=True, connect_timeout=10) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'").fetchone()
            if row and row[0]:
                return
            time.sleep(0.05)
    raise TimeoutError(f"no standby streaming from the primary after {timeout:.0f}s")


def crash(cluster: LocalCluster) -> None:
    """``pg_ctl stop -m immediate``: the primary dies without a checkpoint, as in a crash."""
    cluster._run([str(cluster.bindir / "pg_ctl"), "stop", "-D", str(cluster.data_dir), "-m", "immediate", "-w"])


def promote(standby: LocalCluster) -> float:
    """``pg_ctl promote`` and wait until it accepts writes; returns the monotonic time it did."""
    standby._run([str(standby.bindir / "pg_ctl"), "promote", "-D", str(standby.data_dir), "-w", "-t", "60"])
    return time.monotonic()
