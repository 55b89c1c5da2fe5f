"""Migrations outside a transaction (``-- precog:no-transaction``) and down migrations (``migrate down``)."""

from __future__ import annotations

import pytest

from precog_db.migrations import sections
from tests._helpers.cli import SENTINEL, Workspace, tty_stdin

MARKETS = """CREATE TABLE markets (id serial PRIMARY KEY, symbol text NOT NULL);
-- precog:down
DROP TABLE markets;
"""
TRADES = """CREATE TABLE trades (id serial PRIMARY KEY, market int REFERENCES markets);
-- precog:down
DROP TABLE trades;
"""
CONCURRENT = """-- precog:no-transaction
CREATE INDEX CONCURRENTLY markets_symbol ON markets (symbol);
-- precog:down
DROP INDEX CONCURRENTLY markets_symbol;
"""


def index_valid(ws: Workspace, name: str) -> bool | None:
    rows = ws.query("test", f"SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass('{name}')")
    return bool(rows[0][0]) if rows else None


class TestNoTransaction:
    def test_create_index_concurrently_is_applied_and_recorded(self, ws: Workspace) -> None:
        """A no-transaction file runs CREATE INDEX CONCURRENTLY in autocommit and is then recorded."""
        ws.add("test")
        ws.write_migration("0001_markets.sql", MARKETS)
        ws.write_migration("0002_index.sql", CONCURRENT)
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 0, result.err
        assert index_valid(ws, "markets_symbol") is True
        assert [v for v, _ in ws.ledger("test")] == [1, 2]

    def test_part_way_failure_lists_what_ran_and_the_invalid_index(self, ws: Workspace) -> None:
        """A failed CONCURRENTLY build: the statements that ran, the one that failed, the INVALID index's DROP."""
        ws.add("test")
        ws.write_migration(
            "0001_dupes.sql",
            "-- precog:no-transaction\n"
            "CREATE TABLE dupes (x int);\n"
            "INSERT INTO dupes VALUES (1), (1);\n"
            "CREATE UNIQUE INDEX CONCURRENTLY dupes_x ON dupes (x);\n"
            "CREATE TABLE after_it (y int);\n",
        )
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 1
        err = " ".join(result.err.split())
        assert "statement 3 of 4 (line 4: CREATE UNIQUE INDEX CONCURRENTLY dupes_x ON dupes (x);) failed" in err
        assert "line 2: CREATE TABLE dupes (x int);; line 3: INSERT INTO dupes VALUES (1), (1);" in err
        assert "not run: 1 statement(s) from line 5: CREATE TABLE after_it" in err
        assert "DROP INDEX CONCURRENTLY IF EXISTS public.dupes_x;" in err
        assert "stays pending" in err
        assert index_valid(ws, "dupes_x") is False
        assert ws.has_table("test", "dupes") and not ws.has_table("test", "after_it")
        assert ws.ledger("test") == []
        entry = ws.audit_entries()[-1]
        assert (entry["operation"], entry["outcome"], entry["applied"]) == ("migrate up", "failed", [])

    def test_session_settings_do_not_leak_into_the_next_file(self, ws: Workspace) -> None:
        """A SET in a no-transaction file is undone before the next file runs."""
        ws.add("test")
        ws.write_migration("0001_set.sql", "-- precog:no-transaction\nSET search_path = nowhere;\nSELECT 1;\n")
        ws.write_migration("0002_table.sql", "CREATE TABLE leak_check (id int);\n")
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 0, result.err
        assert ws.has_table("test", "public.leak_check")

    def test_checksum_rules_apply_unchanged(self, ws: Workspace) -> None:
        """Editing an applied no-transaction file is reported as an edit, as for any other file."""
        ws.add("test")
        ws.write_migration("0001_markets.sql", MARKETS)
        ws.write_migration("0002_index.sql", CONCURRENT)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        ws.write_migration("0002_index.sql", CONCURRENT + "-- edited\n")
        result = ws.run("--env", "test", "migrate", "validate")
        assert result.code == 1
        assert "0002_index.sql was edited after it was applied" in result.out


class TestSections:
    def test_markers_split_the_file(self) -> None:
        """The down marker splits up from down; the first-line marker flags no-transaction."""
        parts = sections(CONCURRENT)
        assert parts.no_transaction
        assert "CREATE INDEX" in parts.up and "DROP INDEX" not in parts.up
        assert parts.down == "DROP INDEX CONCURRENTLY markets_symbol;\n"
        assert sections("SELECT 1;\n").down is None


class TestDown:
    def test_up_runs_only_the_up_section_and_down_reverts_newest_first(self, ws: Workspace) -> None:
        """up ignores the down sections; down reverts the newest file; --target 0 reverts the rest."""
        ws.add("test")
        ws.write_migration("0001_markets.sql", MARKETS)
        ws.write_migration("0002_trades.sql", TRADES)
        ws.write_migration("0003_index.sql", CONCURRENT)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        assert ws.has_table("test", "trades") and index_valid(ws, "markets_symbol") is True
        result = ws.run("--env", "test", "migrate", "down")
        assert result.code == 0, result.err
        assert "reverted 0003_index.sql" in result.out
        assert index_valid(ws, "markets_symbol") is None
        assert [v for v, _ in ws.ledger("test")] == [1, 2]
        result = ws.run("--env", "test", "migrate", "down", "--target", "0")
        assert result.code == 0, result.err
        assert result.out.index("0002_trades.sql") < result.out.index("0001_markets.sql")
        assert ws.ledger("test") == []
        assert not ws.has_table("test", "markets")
        assert ws.run("--env", "test", "migrate", "up").code == 0
        assert [v for v, _ in ws.ledger("test")] == [1, 2, 3]
        entry = ws.audit_entries()[-2]
        assert (entry["operation"], [r["version"] for r in entry["reverted"]]) == ("migrate down", [2, 1])

    def test_a_file_without_down_section_stops_before_anything_runs(self, ws: Workspace) -> None:
        """--target 0 over a file without a down section reverts nothing, not even the newest file."""
        ws.add("test")
        ws.write_migration("0001_markets.sql", "CREATE TABLE markets (id int PRIMARY KEY);\n")
        ws.write_migration("0002_trades.sql", TRADES)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        result = ws.run("--env", "test", "migrate", "down", "--target", "0")
        assert result.code == 1
        assert "cannot revert 0001_markets.sql: no '-- precog:down' section" in result.err
        assert ws.has_table("test", "trades")
        assert [v for v, _ in ws.ledger("test")] == [1, 2]

    def test_failing_down_section_is_rolled_back_and_stays_applied(self, ws: Workspace) -> None:
        """A down section that fails leaves its file applied and its changes rolled back."""
        ws.add("test")
        ws.write_migration(
            "0001_markets.sql",
            "CREATE TABLE markets (id int);\n-- precog:down\nDROP TABLE markets;\nSELECT * FROM no_such;\n",
        )
        assert ws.run("--env", "test", "migrate", "up").code == 0
        result = ws.run("--env", "test", "migrate", "down")
        assert result.code == 1
        assert "0001_markets.sql failed and was rolled back" in result.err
        assert "no_such" in result.err and "line 4" in result.err
        assert ws.has_table("test", "markets")
        assert [v for v, _ in ws.ledger("test")] == [1]

    def test_dry_run_lists_the_plan_and_changes_nothing(self, ws: Workspace) -> None:
        """down --dry-run --target 0 lists the files newest first and reverts none."""
        ws.add("test")
        ws.write_migration("0001_markets.sql", MARKETS)
        ws.write_migration("0002_trades.sql", TRADES)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        result = ws.run("--env", "test", "migrate", "down", "--target", "0", "--dry-run")
        assert result.code == 0, result.err
        assert "would revert 2 migration(s)" in result.out
        assert result.out.index("0002_trades.sql") < result.out.index("0001_markets.sql")
        assert [v for v, _ in ws.ledger("test")] == [1, 2] and ws.has_table("test", "trades")

    def test_target_must_be_an_applied_version(self, ws: Workspace) -> None:
        """--target naming no applied version is refused."""
        ws.add("test")
        ws.write_migration("0001_markets.sql", MARKETS)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        result = ws.run("--env", "test", "migrate", "down", "--target", "7")
        assert result.code == 1
        assert "--target 7 is not an applied version" in result.err
        assert ws.has_table("test", "markets")


class TestDownOnProd:
    @pytest.fixture
    def prod(self, ws: Workspace) -> Workspace:
        """test, staging and prod, with two migrations promoted all the way to prod."""
        for env in ("test", "staging", "prod"):
            ws.add(env)
        ws.write_migration("0001_markets.sql", MARKETS)
        ws.write_migration("0002_trades.sql", TRADES)
        ws.monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        assert ws.run("--env", "test", "migrate", "up").code == 0
        assert ws.run("--env", "staging", "--yes", "migrate", "up").code == 0
        name = ws.databases["prod"].dbname
        args = ("--no-backup", "--reason", "setup")
        assert ws.run("--env", "prod", "--confirm-database", name, "migrate", "up", *args).code == 0
        return ws

    def test_wrong_typed_name_reverts_nothing(self, prod: Workspace) -> None:
        """On prod a wrong name at the terminal aborts migrate down before any backup or revert."""
        with tty_stdin("precog_prod\n") as stdin:
            result = prod.run("--env", "prod", "migrate", "down", stdin=stdin)
        assert result.code == 1
        assert "does not match" in result.err
        assert prod.has_table("prod", "trades")
        assert not (prod.root / "backups").exists()

    def test_yes_is_not_enough_and_the_guard_holds(self, prod: Workspace) -> None:
        """--yes never confirms prod; without PRECOG_PROD_CONFIRMED even the right name is refused."""
        assert "--yes is not enough" in prod.run("--env", "prod", "--yes", "migrate", "down").err
        prod.monkeypatch.delenv("PRECOG_PROD_CONFIRMED")
        name = prod.databases["prod"].dbname
        result = prod.run("--env", "prod", "--confirm-database", name, "migrate", "down")
        assert result.code == 1 and "PRECOG_PROD_CONFIRMED=yes" in result.err
        assert [v for v, _ in prod.ledger("prod")] == [1, 2]

    def test_typed_name_reverts_after_a_verified_backup(self, prod: Workspace) -> None:
        """The right name: a verified dump first, then the newest file reverted, both audited in order."""
        name = prod.databases["prod"].dbname
        with tty_stdin(name + "\n") as stdin:
            result = prod.run("--env", "prod", "migrate", "down", stdin=stdin)
        assert result.code == 0, result.err
        assert "PRODUCTION" in result.err
        assert len(list((prod.root / "backups" / "prod").glob(f"{name}@*.dump"))) == 1
        assert not prod.has_table("prod", "trades")
        assert [v for v, _ in prod.ledger("prod")] == [1]
        ops = [(e["operation"], e["outcome"]) for e in prod.audit_entries()[-2:]]
        assert ops == [("backup", "ok"), ("migrate down", "ok")]
        assert SENTINEL not in result.out + result.err + prod.audit_log.read_text()


class TestMisplacedMarkers:
    @pytest.mark.parametrize(
        ("body", "needle"),
        [
            ("-- header\n-- precog:no-transaction\nSELECT 1;\n", "only counts as the first line"),
            ("SELECT 1;\n-- precog:down\nSELECT 2;\n-- precog:down\nSELECT 3;\n", "several '-- precog:down' lines"),
            ("CREATE TABLE m (id int)\n-- precog:down\nDROP TABLE m;\n", "inside the statement that starts on line 1"),
        ],
    )
    def test_pending_file_with_a_misplaced_marker_is_refused(self, ws: Workspace, body: str, needle: str) -> None:
        """A marker that would be ignored or is ambiguous stops up before anything runs, naming the line."""
        ws.add("test")
        ws.write_migration("0001_markets.sql", MARKETS)
        ws.write_migration("0002_bad.sql", body)
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 1
        assert needle in result.err
        assert ws.ledger("test") == [] and not ws.has_table("test", "markets")
        status = ws.run("--env", "test", "migrate", "status")
        assert "MISPLACED MARKER" in status.out


# --- issue 21.5: a comment that reads like a marker but is not exactly one is refused ------------------------

MISSPELLED_DOWN = [
    "--precog:down",
    "-- precog: down",
    "--  precog:down",
    "-- precog:down;",
    "-- precog:down please",
    "/* precog:down */",
    "-- PRECOG : DOWN",
    "-- precog down",
    "SELECT 1; -- precog:down",
    "-- precog:up",
    "--\tprecog:down",
    "/*\nprecog:down\n*/",
    "-- precog\uff1adown",
    "-- TODO precog:down later",
    # 21.5b: look-alike letters and marker words without the colon
    "-- prec\u043eg:down",  # a Cyrillic o
    "-- prec\u03bfg:down",  # a Greek omicron
    "-- \u0440r\u0435c\u043eg:d\u043ewn",  # Cyrillic r-look-alike, e and o
    "-- \uff50\uff52\uff45\uff43\uff4f\uff47:down",  # full-width letters (an IME left in full-width mode)
    "-- \uff50\uff52\uff45\uff43\uff4f\uff47\uff1a\uff44\uff4f\uff57\uff4e",
    "-- precog down section",
    "-- pre\u00adcog:down",  # a soft hyphen
    "-- pr\u00e9cog:down",
]
MISSPELLED_FIRST_LINE = [
    "--precog:no-transaction",
    "-- precog:no transaction",
    "/* precog:no-transaction */",
    "-- precog no transaction",
    "-- prec\u043eg:no-transaction",
]


def _misspelled_body(marker: str) -> tuple[str, int]:
    """A file whose marker line is ``marker``, and that line's number."""
    if marker in MISSPELLED_FIRST_LINE:
        return f"{marker}\nCREATE TABLE m (id int);\n", 1
    return f"-- the m table\nCREATE TABLE m (id int);\n{marker}\nDROP TABLE m;\n", 3


class TestMisspelledMarkers:
    @pytest.mark.parametrize("marker", MISSPELLED_DOWN + MISSPELLED_FIRST_LINE)
    def test_up_validate_and_status_refuse_it_naming_line_and_spelling(self, ws: Workspace, marker: str) -> None:
        """up applies nothing (the down section never runs), validate fails, status flags it; all name the line."""
        ws.add("test")
        body, line = _misspelled_body(marker)
        ws.write_migration("0001_m.sql", body)
        up = ws.run("--env", "test", "migrate", "up")
        assert up.code == 1, up.out
        for needle in (f"0001_m.sql, line {line}", "reads like a precog marker", "'-- precog:down'"):
            assert needle in up.err, up.err
        assert "'-- precog:no-transaction'" in up.err
        assert ws.ledger("test") == [] and not ws.has_table("test", "m")
        validate = ws.run("--env", "test", "migrate", "validate")
        assert validate.code == 1 and f"line {line}" in validate.out + validate.err
        status = ws.run("--env", "test", "migrate", "status")
        assert "MISPLACED MARKER" in status.out

    @pytest.mark.parametrize("marker", ["--precog:down", "-- precog: down", "/* precog:down */"])
    def test_down_refuses_an_applied_file_whose_marker_is_misspelled(self, ws: Workspace, marker: str) -> None:
        """A file baselined with a misspelled marker: migrate down says so rather than 'no down section'."""
        ws.add("test")
        ws.write_migration("0001_m.sql", f"CREATE TABLE m (id int);\n{marker}\nDROP TABLE m;\n")
        with ws.server.connect(ws.databases["test"].dbname) as conn:
            conn.execute("CREATE TABLE m (id int)")
        assert ws.run("--env", "test", "--yes", "migrate", "baseline", "1").code == 0
        down = ws.run("--env", "test", "--yes", "migrate", "down")
        assert down.code == 1
        assert "0001_m.sql, line 2" in down.err and "reads like a precog marker" in down.err, down.err
        assert ws.has_table("test", "m") and [v for v, _ in ws.ledger("test")] == [1]

    def test_apply_migration_from_python_refuses_it_too(self, ws: Workspace) -> None:
        """The building block (apply_migration on a connection) checks the same, before anything runs."""
        from precog_db.connection import connect
        from precog_db.errors import MigrationValidationError
        from precog_db.migrations import apply_migration, discover, ensure_ledger

        settings = ws.add("test")
        ws.write_migration("0001_m.sql", "CREATE TABLE m (id int);\n-- precog: down\nDROP TABLE m;\n")
        conn = connect(settings, operation="test")
        try:
            ensure_ledger(conn)
            with pytest.raises(MigrationValidationError, match="line 2: the comment '-- precog: down' reads like"):
                apply_migration(conn, discover(ws.root / "migrations")[0])
        finally:
            conn.close()
        assert not ws.has_table("test", "m")

    def test_comments_and_strings_that_only_mention_precog_still_run(self, ws: Workspace) -> None:
        """Prose about precog, a literal holding a marker, and the documented marker in capitals all pass."""
        ws.add("test")
        ws.write_migration(
            "0001_m.sql",
            "-- Precog schema for markets (see precog_db docs)\n"
            "/* precog handles the ledger */\n"
            "-- the down section below is what precog runs on migrate down\n"
            "-- \u0437\u0430\u043f\u0438\u0441\u044c: \u043f\u0440\u043e\u0434\u0430\u0436\u0438 (notes in Cyrillic)\n"
            "CREATE TABLE m (note text);\n"
            "INSERT INTO m VALUES ('-- precog: down'), ($$/* precog:down */$$);\n"
            "-- PRECOG:DOWN\n"
            "DROP TABLE m;\n",
        )
        up = ws.run("--env", "test", "migrate", "up")
        assert up.code == 0, up.err
        assert ws.query("test", "SELECT count(*) FROM m") == [(2,)]
        down = ws.run("--env", "test", "--yes", "migrate", "down")
        assert down.code == 0, down.err
        assert not ws.has_table("test", "m")


class TestLineEndings:
    """21.5c: line endings are made LF once, when the file is read; lines are split and counted on LF alone."""

    def test_bare_cr_line_endings_keep_both_markers(self, ws: Workspace) -> None:
        """Classic Mac OS endings: the no-transaction marker counts (CONCURRENTLY runs), down splits the file."""
        ws.add("test")
        first = ws.write_migration("0001_markets.sql", "")
        first.write_bytes(MARKETS.replace("\n", "\r").encode())
        second = ws.write_migration("0002_index.sql", "")
        second.write_bytes(CONCURRENT.replace("\n", "\r").encode())
        validate = ws.run("--env", "test", "migrate", "validate")
        assert validate.code == 0, validate.out + validate.err
        up = ws.run("--env", "test", "migrate", "up")
        assert up.code == 0, up.err
        assert index_valid(ws, "markets_symbol") is True and ws.has_table("test", "markets")
        down = ws.run("--env", "test", "--yes", "migrate", "down", "--target", "0")
        assert down.code == 0, down.err
        assert not ws.has_table("test", "markets")

    def test_a_form_feed_does_not_shift_the_marker_checks(self, ws: Workspace) -> None:
        """A page break (form feed, vertical tab) in a line: the down marker is where the line count says."""
        ws.add("test")
        ws.write_migration(
            "0001_m.sql", "CREATE TABLE m (id int); -- page\x0c break\x0b\n-- precog:down\nDROP TABLE m;\n"
        )
        up = ws.run("--env", "test", "migrate", "up")
        assert up.code == 0, up.err
        assert ws.has_table("test", "m")
        down = ws.run("--env", "test", "--yes", "migrate", "down")
        assert down.code == 0, down.err
        assert not ws.has_table("test", "m")

    def test_a_misspelled_marker_after_bare_crs_is_named_by_its_line(self, ws: Workspace) -> None:
        """The line number in the refusal counts bare-CR lines like an editor does."""
        ws.add("test")
        path = ws.write_migration("0001_m.sql", "")
        path.write_bytes(b"-- one\rCREATE TABLE m (id int);\r-- precog: down\rDROP TABLE m;\r")
        up = ws.run("--env", "test", "migrate", "up")
        assert up.code == 1 and "0001_m.sql, line 3" in up.err, up.err
        assert not ws.has_table("test", "m")


class TestByteOrderMark:
    """21.13: a UTF-8 BOM (editors add one) is not part of the SQL; the checksum stays that of the bytes."""

    def test_a_file_with_a_bom_applies_and_reverts(self, ws: Workspace) -> None:
        """A BOM before a plain file and before the no-transaction marker: both apply, the marker counts."""
        from precog_db.migrations import checksum_of

        ws.add("test")
        bom = b"\xef\xbb\xbf"
        first = ws.root / "migrations" / "0001_markets.sql"
        ws.write_migration("0001_markets.sql", "")
        first.write_bytes(bom + MARKETS.encode())
        second = ws.root / "migrations" / "0002_index.sql"
        second.write_bytes(bom + CONCURRENT.replace("\n", "\r\n").encode())
        up = ws.run("--env", "test", "migrate", "up")
        assert up.code == 0, up.err
        assert index_valid(ws, "markets_symbol") is True  # CONCURRENTLY ran: the marker on the BOM line counted
        assert ws.ledger("test") == [(1, checksum_of(first.read_bytes())), (2, checksum_of(second.read_bytes()))]
        assert checksum_of(first.read_bytes()) != checksum_of(MARKETS.encode())  # the bytes, BOM included
        down = ws.run("--env", "test", "--yes", "migrate", "down", "--target", "0")
        assert down.code == 0, down.err
        assert not ws.has_table("test", "markets")
