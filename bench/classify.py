"""What PostgreSQL's parser costs on the hot path: a cached verdict against a first parse.

    .venv/bin/python -m bench.classify

`precog_db._sqlclass.classify` parses a statement text once (pglast) and caches
the verdict per text, so a service that repeats its statements pays one
dictionary look-up per statement. This prints both costs, per call, as the
median of several rounds; the end-to-end effect on a read is measured by
``python -m bench.ab --before <commit>``.
"""

from __future__ import annotations

import statistics
from time import perf_counter

from precog_db import _sqlclass

STATEMENTS = [
    b"SELECT id, symbol, price FROM items WHERE id = $1",
    b"INSERT INTO orders (market_id, qty) VALUES ($1, $2) RETURNING id",
    b"WITH recent AS (SELECT * FROM trades WHERE ts > now() - interval '1 hour') "
    b"SELECT market_id, sum(qty) FROM recent GROUP BY market_id ORDER BY 2 DESC LIMIT 10",
]
ROUNDS = 7


def _per_call(fn: object, calls: int) -> float:
    assert callable(fn)
    start = perf_counter()
    for _ in range(calls):
        fn()
    return (perf_counter() - start) / calls


def main() -> None:
    print(f"{'statement':<60} {'cached':>10} {'first parse':>12}")
    for text in STATEMENTS:
        _sqlclass.classify(text)  # warm the cache

        def cached(t: bytes = text) -> object:
            return _sqlclass.classify(t)

        def first(t: bytes = text) -> object:
            _sqlclass._VERDICTS.pop(t, None)
            return _sqlclass.classify(t)

        hot = statistics.median(_per_call(cached, 200_000) for _ in range(ROUNDS))
        cold = statistics.median(_per_call(first, 2_000) for _ in range(ROUNDS))
        label = text.decode()[:57] + ("..." if len(text) > 57 else "")
        print(f"{label:<60} {hot * 1e9:>8.0f}ns {cold * 1e6:>10.1f}µs")


if __name__ == "__main__":
    main()
