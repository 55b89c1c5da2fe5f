"""The precog_db benchmark: get_cursor against the bare driver, its peers and the server's ceiling.

Run it with ``make bench`` (or ``.venv/bin/python -m bench``; ``--quick`` for a
smoke run). See docs/PERFORMANCE.md for what it measures and the latest table.
"""
