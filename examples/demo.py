"""`make demo`: run the example trading service against dev, whatever this machine has.

1. If the dev settings (``config/.env.dev``, ``DB_*`` variables) reach a database, use it.
2. Otherwise start (or reuse) a throwaway local PostgreSQL whose state is kept in
   ``.precog/`` (its data directory is ``.precog/pg/data``, or, when run as root and
   the ``postgres`` user cannot enter this directory, one under the system's
   temporary directory: the output says which, and why), create and stamp
   ``precog_dev`` and ``precog_test``, write ``config/.env.dev`` / ``config/.env.test``.
3. Run ``examples/trading_service.py`` through ``get_cursor``.

It says which server it used and, when that is the local cluster, that the
server keeps running after the demo and how to stop it. Nothing here is needed
by services in production.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from precog_db import (
    DatabaseUnavailableError,
    Environment,
    PrecogDBError,
    close_pool,
    initialize_pool,
    load_settings,
)
from precog_db.local.cluster import LocalCluster, local_up

ROOT = Path(".precog")


def cli_command() -> tuple[str, str]:
    """How to run ``precog-db`` from here, and how to put it on PATH.

    The script next to this Python (``.venv/bin/precog-db`` under ``make``),
    else ``python -m precog_db``.
    """
    script = Path(sys.executable).parent / "precog-db"
    if not (script.is_file() and os.access(script, os.X_OK)):
        return f"{shlex.quote(sys.executable)} -m precog_db", "`pip install -e .` puts `precog-db` on PATH"
    try:
        shown = script.absolute().relative_to(Path.cwd())
    except ValueError:
        shown = script.absolute()
    return str(shown), f"`source {shown.parent / 'activate'}` puts `precog-db` on PATH"


def local_cluster_serving(host: str, port: int) -> LocalCluster | None:
    """The cluster under .precog/ when it is running and is the server at host:port, else None."""
    if not (ROOT / "cluster.json").is_file():
        return None
    try:
        cluster = LocalCluster(ROOT)
        if cluster.port == port and host in (cluster.host, "localhost") and cluster.running():
            return cluster
    except PrecogDBError:
        return None
    return None


def open_dev_pool() -> tuple[str, LocalCluster | None]:
    """Open the dev pool, starting a local cluster when no dev database is reachable.

    Returns what was used, and the local cluster when that is what serves dev.
    """
    os.environ.setdefault("PRECOG_ENV", "dev")
    settings = load_settings(Environment.DEV)
    try:
        initialize_pool(settings=settings)
    except DatabaseUnavailableError as exc:
        print(f"the configured dev database is not usable here ({exc}); using a local one instead")
    else:
        cluster = local_cluster_serving(settings.host, settings.port)
        if cluster is None:
            return f"the configured dev database ({settings.describe()})", None
        used = f"the configured dev database ({settings.describe()}): the local PostgreSQL that an earlier run started"
        return f"{used}; {cluster.where()}", cluster
    print(f"starting (or reusing) a throwaway local PostgreSQL; its state is kept in {ROOT}/ ...")
    cluster, done = local_up(ROOT, Path(os.environ.get("PRECOG_CONFIG_DIR", "config")))
    for line in done:
        print(f"  {line}")
    settings = load_settings(Environment.DEV)
    initialize_pool(settings=settings)
    return f"the local cluster at {cluster.host}:{cluster.port} ({cluster.source})", cluster


def still_running_notice(cluster: LocalCluster) -> str:
    """Say that the local server outlives the demo, and how to stop it."""
    cli, on_path = cli_command()
    return (
        f"the local PostgreSQL server on {cluster.host}:{cluster.port} is still running, so the next `make demo` "
        f"reuses it and its data. Stop it with `make local-down` (or `{cli} local down`); its data stays for the "
        f"next start. More commands: `{cli} --help` ({on_path})."
    )


def main() -> int:
    cluster: LocalCluster | None = None
    try:
        used, cluster = open_dev_pool()
        print(f"using {used}")
        import trading_service

        trading_service.main()
    except PrecogDBError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        close_pool()
        if cluster is not None and cluster.running():
            print(still_running_notice(cluster))
    return 0


if __name__ == "__main__":
    sys.exit(main())
