"""``python -m precog_db``: the same as the ``precog-db`` console script."""

from __future__ import annotations

from precog_db.cli import main

raise SystemExit(main())
