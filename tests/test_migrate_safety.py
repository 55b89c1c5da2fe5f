"""Safe migrations: ``migrate lint`` (squawk), enforcement per environment, lock timeouts."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from precog_db.errors import ConfigurationError
from precog_db.migrations import OFF_BY_DEFAULT, discover, lint_files
from tests._helpers.cli import Workspace

ORDERS = "CREATE TABLE orders (id bigint PRIMARY KEY, amount numeric NOT NULL);\n"
UNSAFE_INDEX = "-- an index built the blocking way\n\nCREATE INDEX orders_amount ON orders (amount);\n"
CONCURRENT = "-- precog:no-transaction\nCREATE INDEX CONCURRENTLY orders_amount ON orders (amount);\n"


class TestLint:
    def test_finding_names_file_line_rule_and_what_to_do(self, tmp_path: Path) -> None:
        """A blocking CREATE INDEX is reported at its line of the file, with squawk's rule and advice."""
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "0001_orders.sql").write_text(ORDERS)
        (tmp_path / "m" / "0002_index.sql").write_text(UNSAFE_INDEX)
        findings = lint_files(discover(tmp_path / "m"))
        assert [(f.path.name, f.line, f.rule) for f in findings] == [
            ("0002_index.sql", 3, "require-concurrent-index-creation")
        ]
        assert "concurrently" in findings[0].advice.lower()

    def test_new_table_and_concurrent_index_in_no_transaction_file_pass(self, tmp_path: Path) -> None:
        """CREATE TABLE and CREATE INDEX CONCURRENTLY in a -- precog:no-transaction file have no finding."""
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "0001_orders.sql").write_text(ORDERS)
        (tmp_path / "m" / "0002_index.sql").write_text(CONCURRENT)
        assert lint_files(discover(tmp_path / "m")) == []

    def test_only_the_up_section_is_linted_and_lines_are_the_files(self, tmp_path: Path) -> None:
        """The down section is not linted; a finding after header lines keeps the file's own line number."""
        (tmp_path / "m").mkdir()
        body = (
            "-- header\n-- more header\n\nALTER TABLE orders ADD COLUMN note text;\n"
            "ALTER TABLE orders RENAME COLUMN amount TO total;\n"
            "-- precog:down\nALTER TABLE orders DROP COLUMN note;\n"
        )
        (tmp_path / "m" / "0001_rename.sql").write_text(body)
        findings = lint_files(discover(tmp_path / "m"))
        assert [(f.line, f.rule) for f in findings] == [(5, "renaming-column")]

    def test_style_rules_are_off(self, tmp_path: Path) -> None:
        """prefer-robust-stmts, prefer-bigint-over-int and the other style rules are not reported."""
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "0001_t.sql").write_text("CREATE TABLE t (id serial PRIMARY KEY, n int, v varchar(3));\n")
        assert lint_files(discover(tmp_path / "m")) == []
        assert {"prefer-robust-stmts", "prefer-bigint-over-int", "prefer-identity", "prefer-text-field"} <= set(
            OFF_BY_DEFAULT
        )

    def test_missing_squawk_is_one_sentence(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without squawk beside Python or on PATH, lint says what to install."""
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "0001_index.sql").write_text(UNSAFE_INDEX)
        monkeypatch.setattr(sys, "executable", str(tmp_path / "nowhere" / "python"))
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        with pytest.raises(ConfigurationError, match=r"pip install 'precog-db\[lint\]'"):
            lint_files(discover(tmp_path / "m"))

    def test_cli_lints_pending_files_and_exits_1(self, ws: Workspace) -> None:
        """migrate lint: applied files are not linted; a pending unsafe one gives exit 1 with file:line: rule."""
        ws.add("test")
        ws.write_migration("0001_orders.sql", ORDERS)
        ws.write_migration("0002_index.sql", UNSAFE_INDEX)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        clean = ws.run("--env", "test", "migrate", "lint")
        assert clean.code == 0, clean.err
        assert "no findings in 0 pending file(s)" in clean.out
        ws.write_migration("0003_rename.sql", "-- rename\nALTER TABLE orders RENAME COLUMN amount TO total;\n")
        result = ws.run("--env", "test", "migrate", "lint")
        assert result.code == 1, result.err
        assert "0003_rename.sql:2: renaming-column" in result.out
        assert "instead:" in result.out
        assert "0002_index.sql" not in result.out
        every = ws.run("migrate", "lint", "--all", "--json")
        assert every.code == 1
        assert [(f["file"].rsplit("/", 1)[1], f["line"], f["rule"]) for f in every.json()["findings"]] == [
            ("0002_index.sql", 3, "require-concurrent-index-creation"),
            ("0003_rename.sql", 2, "renaming-column"),
        ]

    def test_cli_without_squawk_exits_1_with_a_sentence(self, ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        """No traceback: exit 1 and the install hint on stderr."""
        ws.write_migration("0001_index.sql", UNSAFE_INDEX)
        monkeypatch.setattr(sys, "executable", str(ws.root / "nowhere" / "python"))
        monkeypatch.setenv("PATH", str(ws.root / "empty"))
        result = ws.run("migrate", "lint", "--all")
        assert result.code == 1
        assert "squawk" in result.err and "Traceback" not in result.err


class TestEnforcement:
    def test_test_applies_an_unsafe_migration_with_a_warning(self, ws: Workspace) -> None:
        """On test the blocking index is applied, and stderr names the rule."""
        ws.add("test")
        ws.write_migration("0001_orders.sql", ORDERS)
        ws.write_migration("0002_index.sql", UNSAFE_INDEX)
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 0, result.err
        assert "warning: 0002_index.sql, line 3: require-concurrent-index-creation" in result.err
        assert [v for v, _ in ws.ledger("test")] == [1, 2]

    def test_staging_refuses_until_the_file_acknowledges_the_rule(self, ws: Workspace) -> None:
        """staging: refused before anything runs (rule named, nothing applied); the acknowledgement is audited."""
        ws.add("test")
        ws.add("staging")
        ws.write_migration("0001_orders.sql", ORDERS)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        assert ws.run("--env", "staging", "--yes", "migrate", "up").code == 0
        ws.write_migration("0002_index.sql", UNSAFE_INDEX)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        refused = ws.run("--env", "staging", "--yes", "migrate", "up")
        assert refused.code == 1
        assert "0002_index.sql, line 3: require-concurrent-index-creation" in refused.err
        assert "-- precog:allow <rule>: <reason>" in refused.err
        assert [v for v, _ in ws.ledger("staging")] == [1]
        assert ws.query("staging", "SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_amount'") == [(0,)]
        entry = ws.audit_entries()[-1]
        assert (entry["operation"], entry["outcome"]) == ("migrate up", "refused")

        # The acknowledgement changes the checksum: test re-applies nothing, so start from a fresh file.
        acknowledged = "-- precog:allow require-concurrent-index-creation: orders has 200 rows\n" + UNSAFE_INDEX
        ws.write_migration("0002_index.sql", acknowledged)
        with ws.server.connect(ws.databases["test"].dbname) as conn:
            conn.execute("DELETE FROM precog_meta.schema_migrations WHERE version = 2")
            conn.execute("DROP INDEX orders_amount")
        assert ws.run("--env", "test", "migrate", "up").code == 0
        ok = ws.run("--env", "staging", "--yes", "migrate", "up")
        assert ok.code == 0, ok.err
        assert [v for v, _ in ws.ledger("staging")] == [1, 2]
        entry = ws.audit_entries()[-1]
        assert entry["operation"] == "migrate up" and entry["outcome"] == "ok"
        assert entry["acknowledged"] == [
            {
                "file": "0002_index.sql",
                "rule": "require-concurrent-index-creation",
                "reason": "orders has 200 rows",
                "line": 1,
            }
        ]

    @pytest.mark.parametrize(
        ("line", "says"),
        [
            ("-- precog:allow require-concurrent-index-creation", "the reason is missing"),
            ("-- precog:allow require-concurrent-index-creation:   ", "the reason is missing"),
            ("-- precog:allow no-such-rule: because", "squawk does not know"),
        ],
    )
    def test_bad_acknowledgement_is_refused(self, ws: Workspace, line: str, says: str) -> None:
        """A missing reason or a rule squawk does not know is refused with a sentence; nothing applied."""
        ws.add("test")
        ws.write_migration("0001_orders.sql", ORDERS + line + "\n")
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 1
        assert says in result.err and "Traceback" not in result.err
        assert ws.ledger("test") == []


class TestLockTimeout:
    def test_blocked_migration_gives_up_and_readers_get_through(self, ws: Workspace) -> None:
        """A session holding a transaction on orders: the ALTER gives up after DB_MIGRATION_LOCK_TIMEOUT, names
        the blocker's pid and application_name, records nothing; a reader queued behind it completes."""
        ws.add("test")
        ws.write_migration("0001_orders.sql", ORDERS)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        ws.write_migration("0002_note.sql", "ALTER TABLE orders ADD COLUMN note text;\n")
        ws.monkeypatch.setenv("DB_MIGRATION_LOCK_TIMEOUT", "1000")
        dbname = ws.databases["test"].dbname
        reader_rows: list[int] = []
        reader_errors: list[BaseException] = []
        with ws.server.connect(dbname) as blocker:
            blocker.execute("SET application_name = 'slow-report'")
            blocker.execute("BEGIN")
            blocker.execute("SELECT count(*) FROM orders").fetchall()
            blocker_pid = blocker.info.backend_pid

            def reader() -> None:
                try:
                    with ws.server.connect(dbname) as watch:
                        watch.autocommit = True
                        for _ in range(400):  # until the migration is queued for its lock (bounded)
                            waiting = watch.execute(
                                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'orders'::regclass"
                            ).fetchone()
                            if waiting and waiting[0]:
                                break
                            time.sleep(0.01)
                        watch.execute("SET statement_timeout = '60s'")
                        row = watch.execute("SELECT count(*) FROM orders").fetchone()
                        reader_rows.append(int(row[0]) if row else -1)
                except BaseException as exc:  # reported by the assertions below
                    reader_errors.append(exc)

            thread = threading.Thread(target=reader)
            thread.start()
            result = ws.run("--env", "test", "migrate", "up")
            thread.join(timeout=60)
            assert not thread.is_alive()
            blocker.execute("ROLLBACK")
        assert result.code == 1
        assert "0002_note.sql could not get its lock within lock_timeout 1000 ms" in result.err
        # Observed from a second connection while it waited: the exact lock, and who blocked it.
        assert (
            f"it waited for AccessExclusiveLock on orders, blocked by pid {blocker_pid} "
            "(application_name 'slow-report', idle in transaction)"
        ) in result.err
        assert reader_errors == [] and reader_rows == [0]
        assert [v for v, _ in ws.ledger("test")] == [1]
        assert ws.query("test", "SELECT count(*) FROM information_schema.columns WHERE column_name = 'note'") == [(0,)]
        # The blocker is gone: the same migration applies.
        assert ws.run("--env", "test", "migrate", "up").code == 0
        assert [v for v, _ in ws.ledger("test")] == [1, 2]

    def test_lock_retries_are_bounded(self, ws: Workspace) -> None:
        """--lock-retries 1 with the blocker staying: two attempts, then the failure says it gave up."""
        ws.add("test")
        ws.write_migration("0001_orders.sql", ORDERS)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        ws.write_migration("0002_note.sql", "ALTER TABLE orders ADD COLUMN note text;\n")
        ws.monkeypatch.setenv("DB_MIGRATION_LOCK_TIMEOUT", "200")
        with ws.server.connect(ws.databases["test"].dbname) as blocker:
            blocker.execute("BEGIN")
            blocker.execute("SELECT count(*) FROM orders").fetchall()
            result = ws.run("--env", "test", "migrate", "up", "--lock-retries", "1")
            blocker.execute("ROLLBACK")
        assert result.code == 1
        assert result.err.count("retry 1 of 1") == 1
        assert "gave up after 1 retries" in result.err
        assert [v for v, _ in ws.ledger("test")] == [1]

    def test_staging_and_prod_default_to_five_seconds(self) -> None:
        """DB_MIGRATION_LOCK_TIMEOUT: 5000 ms on staging and prod, none on dev and test."""
        from precog_db.environment import Environment
        from precog_db.settings import DatabaseSettings

        assert [DatabaseSettings(env=e).migration_lock_timeout_ms for e in Environment] == [0, 0, 5000, 5000]


def test_down_section_runs_under_the_lock_timeout(ws: Workspace) -> None:
    """migrate down: a blocked down section gives up after DB_MIGRATION_LOCK_TIMEOUT and stays applied."""
    ws.add("test")
    ws.write_migration("0001_orders.sql", ORDERS + "-- precog:down\nDROP TABLE orders;\n")
    assert ws.run("--env", "test", "migrate", "up").code == 0
    ws.monkeypatch.setenv("DB_MIGRATION_LOCK_TIMEOUT", "300")
    with ws.server.connect(ws.databases["test"].dbname) as blocker:
        blocker.execute("BEGIN")
        blocker.execute("SELECT count(*) FROM orders").fetchall()
        result = ws.run("--env", "test", "migrate", "down")
        blocker.execute("ROLLBACK")
    assert result.code == 1
    assert "0001_orders.sql could not get its lock within lock_timeout 300 ms" in result.err
    assert [v for v, _ in ws.ledger("test")] == [1]
    assert ws.has_table("test", "orders")


def test_blocked_down_section_names_the_lock_and_the_blocker(ws: Workspace) -> None:
    """migrate down: the lock timeout message says which lock the down section waited for and whose session
    blocked it (pid, application_name), as observed from a second connection while it waited."""
    ws.add("test")
    ws.write_migration("0001_orders.sql", ORDERS + "-- precog:down\nDROP TABLE orders;\n")
    assert ws.run("--env", "test", "migrate", "up").code == 0
    ws.monkeypatch.setenv("DB_MIGRATION_LOCK_TIMEOUT", "2000")
    with ws.server.connect(ws.databases["test"].dbname) as blocker:
        blocker.execute("SET application_name = 'o''dd report'")
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE orders IN ROW EXCLUSIVE MODE")
        pid = blocker.info.backend_pid
        result = ws.run("--env", "test", "migrate", "down")
        blocker.execute("ROLLBACK")
    assert result.code == 1
    assert (
        f'it waited for AccessExclusiveLock on orders, blocked by pid {pid} (application_name "o\'dd report", '
        "idle in transaction)"
    ) in result.err
    assert [v for v, _ in ws.ledger("test")] == [1]
    # The watch's own session is gone once the command is over.
    watches = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE '%watch)'"
    )
    assert ws.query("test", watches) == [(0,)]


def test_the_documented_worked_example_lints_clean_and_applies(ws: Workspace) -> None:
    """docs/CLI.md's index and NOT NULL steps: no finding, and they apply on a table with rows."""
    ws.add("test")
    ws.write_migration("0001_orders.sql", ORDERS + "INSERT INTO orders VALUES (1, 10);\n")
    ws.write_migration("0002_index.sql", CONCURRENT.replace("INDEX CONCURRENTLY", "INDEX CONCURRENTLY IF NOT EXISTS"))
    ws.write_migration("0003_note.sql", "ALTER TABLE orders ADD COLUMN note text;\n")
    ws.write_migration(
        "0004_check.sql",
        "ALTER TABLE orders ADD CONSTRAINT orders_note_not_null CHECK (note IS NOT NULL) NOT VALID;\n"
        "UPDATE orders SET note = '' WHERE note IS NULL;\n",
    )
    ws.write_migration("0005_validate.sql", "ALTER TABLE orders VALIDATE CONSTRAINT orders_note_not_null;\n")
    ws.write_migration(
        "0006_not_null.sql",
        "-- precog:allow adding-not-nullable-field: orders_note_not_null was validated by 0005, no scan\n"
        "-- precog:allow ban-drop-constraint: the CHECK is replaced by the NOT NULL it proved\n"
        "ALTER TABLE orders ALTER COLUMN note SET NOT NULL;\n"
        "ALTER TABLE orders DROP CONSTRAINT orders_note_not_null;\n",
    )
    lint = ws.run("migrate", "lint", "--all")
    assert lint.code == 0, lint.out
    assert "no findings in 6 file(s)" in lint.out
    up = ws.run("--env", "test", "migrate", "up")
    assert up.code == 0, up.err
    assert "warning" not in up.err
    assert [v for v, _ in ws.ledger("test")] == [1, 2, 3, 4, 5, 6]


def test_down_sections_are_linted_at_their_file_lines(ws: Workspace) -> None:
    """migrate down on test warns about its down section's finding, at the file's line; up ignores it."""
    ws.add("test")
    ws.write_migration("0001_orders.sql", ORDERS + "-- precog:down\n-- drop it\nDROP TABLE orders;\n")
    up = ws.run("--env", "test", "migrate", "up")
    assert up.code == 0 and "warning" not in up.err
    down = ws.run("--env", "test", "migrate", "down")
    assert down.code == 0, down.err
    assert "warning: 0001_orders.sql, line 4: ban-drop-table" in down.err
