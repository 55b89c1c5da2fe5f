"""`make demo`: run the example trading service against dev, whatever this machine has.

1. If the dev settings (``config/.env.dev``, ``DB_*`` variables) reach a database, use it.
2. Otherwise start (or reuse) a throwaway local PostgreSQL under ``.precog/``, create
   ``precog_dev`` and ``precog_test``, write ``config/.env.dev`` / ``config/.env.test``.
3. Run ``examples/trading_service.py`` through ``get_cursor``.

It says which server it used. Nothing here is needed by services in production.
"""

from __future__ import annotations

import os
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
from precog_db.local_cluster import local_up


def open_dev_pool() -> str:
    """Open the dev pool, starting a local cluster when no dev database is reachable; return what was used."""
    os.environ.setdefault("PRECOG_ENV", "dev")
    settings = load_settings(Environment.DEV)
    try:
        initialize_pool(settings=settings)
        return f"the configured dev database ({settings.describe()})"
    except DatabaseUnavailableError as exc:
        print(f"no dev database reachable: {exc}")
    print("starting a throwaway local PostgreSQL under .precog/ ...")
    cluster, done = local_up(Path(".precog"), Path(os.environ.get("PRECOG_CONFIG_DIR", "config")))
    for line in done:
        print(f"  {line}")
    settings = load_settings(Environment.DEV)
    initialize_pool(settings=settings)
    return f"the local cluster at {cluster.host}:{cluster.port} ({cluster.source}); stop it with `precog-db local down`"


def main() -> int:
    try:
        used = open_dev_pool()
        print(f"using {used}")
        import trading_service

        trading_service.main()
    except PrecogDBError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        close_pool()
    return 0


if __name__ == "__main__":
    sys.exit(main())
