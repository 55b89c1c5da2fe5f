"""``python -m bench``: run the benchmark (see ``--help``)."""

from bench.run import main

raise SystemExit(main())
