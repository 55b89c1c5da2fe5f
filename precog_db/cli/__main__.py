"""``python -m precog_db.cli``: the same as ``precog-db``."""

from __future__ import annotations

from precog_db.cli import main

raise SystemExit(main())
