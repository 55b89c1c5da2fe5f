"""``precog-db migrate``: files, ledger, transactions, advisory lock, validation and the promotion ledger."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from precog_db import migrations
from precog_db.backup import find_tool
from precog_db.errors import ConfigurationError, MigrationError, MigrationLockError, PromotionError
from precog_db.migrations import LOCK_KEY, checksum_of, discover, new_migration
from tests._helpers.cli import SENTINEL, Workspace, console_script, tty_stdin

MARKETS = "CREATE TABLE markets (id serial PRIMARY KEY, symbol text NOT NULL);\n"
TRADES = "CREATE TABLE trades (id serial PRIMARY KEY, market int REFERENCES markets, note text DEFAULT '100%');\n"


def two_migrations(ws: Workspace) -> None:
    ws.write_migration("0001_create_markets.sql", MARKETS)
    ws.write_migration("0002_create_trades.sql", TRADES)


def signed(key: int) -> int:
    return key - (1 << 64) if key >= 1 << 63 else key


class TestFiles:
    def test_new_numbers_files_in_sequence(self, tmp_path: Path) -> None:
        """migrate new creates 0001_…, then 0002_…, with a slug of the name."""
        first = new_migration(tmp_path / "m", "Create markets!")
        second = new_migration(tmp_path / "m", "add trades")
        assert (first.name, second.name) == ("0001_create_markets.sql", "0002_add_trades.sql")
        assert [m.version for m in discover(tmp_path / "m")] == [1, 2]

    def test_badly_named_sql_file_is_an_error(self, tmp_path: Path) -> None:
        """A .sql file that is not <version>_<name>.sql is refused rather than silently skipped."""
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "create_markets.sql").write_text(MARKETS)
        with pytest.raises(ConfigurationError, match=r"is not named <version>_<name>\.sql"):
            discover(tmp_path / "m")

    def test_duplicate_versions_are_an_error(self, tmp_path: Path) -> None:
        """Two files with the same version are refused."""
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "0001_a.sql").write_text("")
        (tmp_path / "m" / "001_b.sql").write_text("")
        with pytest.raises(ConfigurationError, match="both have version 1"):
            discover(tmp_path / "m")

    def test_checksum_ignores_line_endings_only(self) -> None:
        """CRLF and LF give the same checksum; any other change does not."""
        assert checksum_of(b"SELECT 1;\r\n") == checksum_of(b"SELECT 1;\n")
        assert checksum_of(b"SELECT 1;\n") != checksum_of(b"SELECT 2;\n")

    def test_new_through_the_cli_and_a_custom_directory(self, ws: Workspace) -> None:
        """migrate new --migrations-dir writes there (the option works before or after the action)."""
        result = ws.run("migrate", "--migrations-dir", "db/sql", "new", "first")
        assert result.code == 0, result.err
        assert (ws.root / "db" / "sql" / "0001_first.sql").is_file()
        result = ws.run("migrate", "new", "second", "--migrations-dir", "db/sql")
        assert (ws.root / "db" / "sql" / "0002_second.sql").is_file()


class TestUp:
    def test_applies_in_order_and_records_the_ledger(self, ws: Workspace) -> None:
        """up applies each file once and records version, checksum, who, when and duration."""
        ws.add("test")
        two_migrations(ws)
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 0, result.err
        assert "2 migration(s) applied" in result.out
        rows = ws.query(
            "test",
            "SELECT version, name, checksum, kind, applied_by, applied_at IS NOT NULL, duration_ms >= 0 "
            "FROM precog_meta.schema_migrations ORDER BY version",
        )
        assert [(r[0], r[1], r[3], r[5], r[6]) for r in rows] == [
            (1, "create_markets", "applied", True, True),
            (2, "create_trades", "applied", True, True),
        ]
        assert rows[0][2] == checksum_of(MARKETS.encode())
        assert "@" in rows[0][4]
        again = ws.run("--env", "test", "migrate", "up")
        assert again.code == 0
        assert "up to date" in again.out
        assert len(ws.ledger("test")) == 2

    def test_each_file_is_its_own_transaction(self, ws: Workspace) -> None:
        """A failing file is rolled back completely; the files before it stay applied."""
        ws.add("test")
        ws.write_migration("0001_create_markets.sql", MARKETS)
        ws.write_migration("0002_broken.sql", "CREATE TABLE half (id int);\nSELECT * FROM no_such_table;\n")
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 1
        assert "0002_broken.sql failed and was rolled back" in result.err
        assert "no_such_table" in result.err
        assert [v for v, _ in ws.ledger("test")] == [1]
        assert ws.has_table("test", "markets")
        assert not ws.has_table("test", "half")
        failed = ws.audit_entries()[-1]
        assert (failed["operation"], failed["outcome"]) == ("migrate up", "failed")
        assert [a["version"] for a in failed["applied"]] == [1]

    def test_dry_run_changes_nothing(self, ws: Workspace) -> None:
        """--dry-run prints the plan and creates neither tables nor the ledger."""
        ws.add("test")
        two_migrations(ws)
        result = ws.run("--env", "test", "migrate", "up", "--dry-run")
        assert result.code == 0, result.err
        assert "would apply 2 migration(s)" in result.out
        assert "0002_create_trades.sql" in result.out
        assert not ws.has_table("test", "markets")
        assert not ws.has_table("test", "precog_meta.schema_migrations")

    def test_target_stops_at_a_version(self, ws: Workspace) -> None:
        """--target applies up to and including that version only."""
        ws.add("test")
        two_migrations(ws)
        assert ws.run("--env", "test", "migrate", "up", "--target", "1").code == 0
        assert [v for v, _ in ws.ledger("test")] == [1]

    def test_up_refuses_when_an_applied_file_was_edited(self, ws: Workspace) -> None:
        """up applies nothing while the files and the ledger disagree."""
        ws.add("test")
        ws.write_migration("0001_create_markets.sql", MARKETS)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        ws.write_migration("0001_create_markets.sql", MARKETS + "-- edited\n")
        ws.write_migration("0002_create_trades.sql", TRADES)
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 1
        assert "refused" in result.err and "edited" in result.err
        assert not ws.has_table("test", "trades")


class TestValidate:
    def test_edited_applied_migration_fails_validate(self, ws: Workspace) -> None:
        """validate exits 1 naming the file when an applied migration was edited."""
        ws.add("test")
        two_migrations(ws)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        assert ws.run("--env", "test", "migrate", "validate").code == 0
        ws.write_migration("0002_create_trades.sql", TRADES.replace("note", "memo"))
        result = ws.run("--env", "test", "migrate", "validate")
        assert result.code == 1
        assert "0002_create_trades.sql was edited after it was applied" in result.out
        status = ws.run("--env", "test", "--json", "migrate", "status").json()
        assert [m["state"] for m in status["migrations"]] == ["applied", "EDITED"]

    def test_missing_file_and_gaps_fail_validate(self, ws: Workspace) -> None:
        """A deleted applied file and a gap in the versions each fail validate."""
        ws.add("test")
        two_migrations(ws)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        (ws.root / "migrations" / "0002_create_trades.sql").unlink()
        ws.write_migration("0004_later.sql", "SELECT 1;")
        result = ws.run("--env", "test", "--json", "migrate", "validate")
        assert result.code == 1
        kinds = sorted(p["kind"] for p in result.json()["problems"])
        assert kinds == ["gap", "missing"]

    def test_out_of_order_file_fails_validate(self, ws: Workspace) -> None:
        """A new file numbered below an applied version is reported, not silently applied."""
        ws.add("test")
        ws.write_migration("0001_create_markets.sql", MARKETS)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        # Another branch's migration 3 was applied to this database ...
        third = ws.write_migration("0003_other_branch.sql", "SELECT 3;")
        with ws.server.connect(ws.databases["test"].dbname) as conn:
            conn.execute(
                "INSERT INTO precog_meta.schema_migrations (version, name, checksum, applied_by) "
                "VALUES (3, 'other_branch', %s, 'someone')",
                (checksum_of(third.read_bytes()),),
            )
        # ... and now this branch's migration 2 arrives.
        ws.write_migration("0002_late.sql", "SELECT 2;")
        refused = ws.run("--env", "test", "migrate", "up")
        assert refused.code == 1 and "0002_late.sql is not applied but version 3 already is" in refused.err
        result = ws.run("--env", "test", "--json", "migrate", "validate")
        assert result.code == 1
        assert [p["kind"] for p in result.json()["problems"]] == ["out_of_order"]


class TestBaseline:
    def test_marks_existing_database_at_a_version(self, ws: Workspace) -> None:
        """baseline records files up to VERSION as applied without running them; up then runs the rest."""
        ws.add("test")
        two_migrations(ws)
        result = ws.run("--env", "test", "migrate", "baseline", "1")
        assert result.code == 0, result.err
        assert ws.query("test", "SELECT version, kind FROM precog_meta.schema_migrations") == [(1, "baseline")]
        assert not ws.has_table("test", "markets")
        again = ws.run("--env", "test", "migrate", "baseline", "2")
        assert again.code == 1 and "only for a database that has none" in again.err

    def test_baseline_needs_a_file_of_that_version(self, ws: Workspace) -> None:
        """baseline at a version with no file is refused."""
        ws.add("test")
        two_migrations(ws)
        result = ws.run("--env", "test", "migrate", "baseline", "7")
        assert result.code == 1
        assert "no migration file with version 7" in result.err


class TestFromPython:
    def test_upgrade_is_the_cli_workflow_callable_from_python(self, ws: Workspace) -> None:
        """migrations.upgrade applies, audits and enforces the promotion check without the CLI."""
        ws.add("test")
        staging = ws.add("staging")
        two_migrations(ws)
        directory = ws.root / "migrations"
        with pytest.raises(PromotionError, match="not applied to test"):
            migrations.upgrade(staging, directory=directory, config_dir=ws.config, confirm_database=staging.dbname)
        assert not ws.has_table("staging", "markets")
        done = migrations.upgrade(ws.databases["test"], directory=directory, config_dir=ws.config)
        assert [a["file"] for a in done.applied] == ["0001_create_markets.sql", "0002_create_trades.sql"]
        seen: list[str] = []

        def confirm(action: str) -> str:
            seen.append(action)
            return "approved by the deploy job"

        promoted = migrations.upgrade(staging, directory=directory, config_dir=ws.config, confirm=confirm)
        assert seen == ["apply 2 migration(s)"] and promoted.promotion.startswith("passed: test has applied all 2")
        assert ws.has_table("staging", "trades")
        assert [e["outcome"] for e in ws.audit_entries() if e["operation"] == "migrate up"] == ["refused", "ok", "ok"]

    def test_options_object_and_keywords_are_one_call(self, ws: Workspace) -> None:
        """upgrade/revert take a MigrationOptions; keywords replace its fields; a keyword of no use is a TypeError."""
        settings = ws.add("test")
        ws.write_migration("0001_create_markets.sql", MARKETS + "-- precog:down\nDROP TABLE markets;\n")
        options = migrations.MigrationOptions(directory=ws.root / "migrations", dry_run=True)
        planned = migrations.upgrade(settings, options)
        assert planned.dry_run and [m.filename for m in planned.plan] == ["0001_create_markets.sql"]
        assert not ws.has_table("test", "markets")
        done = migrations.upgrade(settings, options, dry_run=False)
        assert [a["file"] for a in done.applied] == ["0001_create_markets.sql"] and ws.has_table("test", "markets")
        with pytest.raises(TypeError, match="skip_promotion_check"):
            migrations.revert(settings, options, skip_promotion_check=True)  # type: ignore[call-arg]
        with pytest.raises(ConfigurationError, match="needs a reason"):
            migrations.revert(settings, replace(options, take_backup=False))
        reverted = migrations.revert(settings, options=replace(options, dry_run=False))
        assert [r["file"] for r in reverted.reverted] == ["0001_create_markets.sql"]
        assert not ws.has_table("test", "markets")
        assert migrations.inspect(settings, options).ledger == {}


class TestLock:
    def test_second_run_waits_for_the_lock_then_applies_nothing_twice(self, ws: Workspace) -> None:
        """While another session holds the lock, up says so and waits; afterwards each file is applied once."""
        settings = ws.add("test")
        two_migrations(ws)
        holder = ws.server.connect(settings.dbname)
        holder.execute("SELECT pg_advisory_lock(%s)", (signed(LOCK_KEY),))
        results = []
        runner = threading.Thread(target=lambda: results.append(ws.run("--env", "test", "migrate", "up")))
        try:
            runner.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not ws.has_table("test", "precog_meta.schema_migrations"):
                waiting = ws.query(
                    "test",
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'precog-db migrate test'",
                )
                if waiting[0][0]:
                    break
                time.sleep(0.1)
            time.sleep(0.5)
            assert not ws.has_table("test", "markets"), "applied while the lock was held"
        finally:
            holder.close()
        runner.join(60)
        assert results and results[0].code == 0, results[0].err if results else "no result"
        assert "holds the migration lock on this database; waiting" in results[0].err
        assert [v for v, _ in ws.ledger("test")] == [1, 2]

    def test_waiting_is_one_blocking_lock_call_bounded_by_lock_timeout(self, ws: Workspace) -> None:
        """A waiting run sits in one pg_advisory_lock (an advisory-lock wait, no polling); 55P03 ends it."""
        settings = ws.add("test")
        with ws.server.connect(settings.dbname) as holder, ws.server.connect(settings.dbname) as waiter:
            holder.execute("SELECT pg_advisory_lock(%s)", (signed(LOCK_KEY),))
            waiter_pid = waiter.info.backend_pid
            outcome: list[BaseException | None] = []

            def wait() -> None:
                try:
                    with migrations.migration_lock(waiter, timeout=3):
                        outcome.append(None)
                except BaseException as exc:
                    outcome.append(exc)

            runner = threading.Thread(target=wait)
            runner.start()
            seen: list[tuple[str | None, str | None]] = []
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline and len(seen) < 10:
                # Only samples taken while a statement runs: between its statements (setting the lock
                # timeout, then after the timeout) the waiter is idle in ClientRead, which says nothing
                # about how it waits. A polling waiter never shows an advisory-lock wait while active.
                row = holder.execute(
                    "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = %s AND state = 'active'",
                    (waiter_pid,),
                ).fetchone()
                if row is not None and row[0] is not None:
                    seen.append((row[0], row[1]))
                time.sleep(0.1)
            runner.join(10)
        assert seen and set(seen) == {("Lock", "advisory")}, seen
        assert len(outcome) == 1 and isinstance(outcome[0], MigrationLockError), outcome
        assert "gave up after 3s waiting for the migration lock" in str(outcome[0])

    def test_lock_timeout_fails_clearly(self, ws: Workspace) -> None:
        """With the lock held past --lock-timeout, up fails naming the holder, and applies nothing."""
        settings = ws.add("test")
        two_migrations(ws)
        with ws.server.connect(settings.dbname) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (signed(LOCK_KEY),))
            result = ws.run("--env", "test", "migrate", "up", "--lock-timeout", "1")
        assert result.code == 1
        assert "gave up after 1s waiting for the migration lock held by another run (server pid" in result.err
        assert not ws.has_table("test", "markets")

    @pytest.mark.slow
    def test_two_concurrent_runs_apply_each_migration_exactly_once(self, ws: Workspace) -> None:
        """Two real precog-db processes racing: both succeed, each migration is in the ledger once."""
        ws.add("test")
        ws.write_migration("0001_slow.sql", "SELECT pg_sleep(1.5);\nCREATE TABLE slow (id int);\n")
        ws.write_migration("0002_counter.sql", "CREATE TABLE runs (id int);\nINSERT INTO runs VALUES (1);\n")
        env = {"PRECOG_ENV": "test"}
        import os
        import sys

        from tests._helpers.server import REPO

        script = Path(sys.executable).with_name("precog-db")
        procs = [
            subprocess.Popen(
                [str(script), "migrate", "up"],
                cwd=ws.root,
                env={**os.environ, "PYTHONPATH": str(REPO), **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        assert [v for v, _ in ws.ledger("test")] == [1, 2]
        assert ws.query("test", "SELECT count(*) FROM runs") == [(1,)]
        stderr = "".join(err for _, err in outputs)
        assert (
            "waiting up to" in stderr
            or "applied by another run meanwhile" in stderr
            or any("up to date" in out for out, _ in outputs)
        )


class TestPromotion:
    def test_staging_refuses_what_test_has_not_applied(self, ws: Workspace) -> None:
        """staging migrate up is refused until test has the migration, then allowed."""
        ws.add("test")
        ws.add("staging")
        two_migrations(ws)
        refused = ws.run("--env", "staging", "--yes", "migrate", "up")
        assert refused.code == 1
        assert "not applied to test: 0001_create_markets.sql, 0002_create_trades.sql" in refused.err
        assert not ws.has_table("staging", "markets")
        assert ws.run("--env", "test", "migrate", "up", "--target", "1").code == 0
        partial = ws.run("--env", "staging", "--yes", "migrate", "up")
        assert partial.code == 1 and "0002_create_trades.sql" in partial.err and "0001" not in partial.err
        assert ws.run("--env", "staging", "--yes", "migrate", "up", "--target", "1").code == 0
        assert ws.run("--env", "test", "migrate", "up").code == 0
        ok = ws.run("--env", "staging", "--yes", "migrate", "up")
        assert ok.code == 0, ok.err
        assert [v for v, _ in ws.ledger("staging")] == [1, 2]

    def test_prod_refuses_a_migration_that_skipped_staging(self, ws: Workspace) -> None:
        """A migration applied to test but not staging is refused on prod: promotion cannot skip staging."""
        ws.add("test")
        ws.add("staging")
        ws.add("prod")
        two_migrations(ws)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        ws.monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        settings = ws.databases["prod"]
        result = ws.run("--env", "prod", "--confirm-database", settings.dbname, "migrate", "up")
        assert result.code == 1
        assert "not applied to staging" in result.err
        assert ws.ledger("prod") == []
        assert not (ws.root / "backups").exists()
        entry = ws.audit_entries()[-1]
        assert (entry["operation"], entry["outcome"]) == ("migrate up", "refused")

    def test_different_checksum_in_the_predecessor_is_refused(self, ws: Workspace) -> None:
        """A file edited after test applied it cannot reach staging."""
        ws.add("test")
        ws.add("staging")
        ws.write_migration("0001_create_markets.sql", MARKETS)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        ws.write_migration("0001_create_markets.sql", MARKETS.replace("symbol", "ticker"))
        result = ws.run("--env", "staging", "--yes", "migrate", "up")
        assert result.code == 1
        assert "different checksum" in result.err

    def test_unavailable_predecessor_needs_skip_and_reason(self, ws: Workspace) -> None:
        """Unreadable test settings: staging is refused; --skip-promotion-check --reason proceeds, audited."""
        ws.add("staging")
        two_migrations(ws)
        (ws.config / ".env.test").write_text("DB_HOST=127.0.0.1\nDB_PORT=1\nDB_CONNECT_TIMEOUT=2\n")
        refused = ws.run("--env", "staging", "--yes", "migrate", "up")
        assert refused.code == 1
        assert "--skip-promotion-check" in refused.err
        assert not ws.has_table("staging", "markets")
        forced = ws.run(
            "--env", "staging", "--yes", "migrate", "up", "--skip-promotion-check", "--reason", "test env rebuilt"
        )
        assert forced.code == 0, forced.err
        entry = ws.audit_entries()[-1]
        assert entry["reason"] == "test env rebuilt"
        assert entry["promotion"].startswith("skipped (test unavailable")

    def test_predecessor_configured_to_the_same_database_is_refused(self, ws: Workspace) -> None:
        """.env.test pointing at the staging database cannot vouch for staging's migrations."""
        staging = ws.add("staging", dbname=f"ledger_{uuid.uuid4().hex[:8]}")
        two_migrations(ws)
        (ws.config / ".env.test").write_text((ws.config / ".env.staging").read_text())
        result = ws.run("--env", "staging", "--yes", "migrate", "up")
        assert result.code == 1
        assert "the test settings point at the same database as staging" in result.err
        assert staging.dbname in result.err
        assert not ws.has_table("staging", "markets")

    def test_skip_does_not_override_a_known_gap(self, ws: Workspace) -> None:
        """--skip-promotion-check cannot push a migration the reachable predecessor does not have."""
        ws.add("test")
        ws.add("staging")
        two_migrations(ws)
        result = ws.run("--env", "staging", "--yes", "migrate", "up", "--skip-promotion-check", "--reason", "hurry")
        assert result.code == 1
        assert "not applied to test" in result.err


class TestProduction:
    @pytest.fixture
    def prod(self, ws: Workspace) -> Workspace:
        """test, staging and prod databases, with both migrations already promoted to staging."""
        ws.add("test")
        ws.add("staging")
        ws.add("prod")
        two_migrations(ws)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        assert ws.run("--env", "staging", "--yes", "migrate", "up").code == 0
        ws.monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        return ws

    def test_wrong_typed_name_aborts_with_nothing_changed(self, prod: Workspace) -> None:
        """A wrong database name typed at a real terminal aborts: no ledger, no tables, no backup."""
        with tty_stdin("precog_prod\n") as stdin:
            result = prod.run("--env", "prod", "migrate", "up", stdin=stdin)
        assert result.code == 1
        assert "Type the database name" in result.err
        assert "does not match" in result.err
        assert not prod.has_table("prod", "precog_meta.schema_migrations")
        assert not prod.has_table("prod", "markets")
        assert not (prod.root / "backups").exists()

    def test_yes_never_confirms_prod(self, prod: Workspace) -> None:
        """--yes alone is refused on prod, naming --confirm-database."""
        result = prod.run("--env", "prod", "--yes", "migrate", "up")
        assert result.code == 1
        assert "--yes is not enough for production" in result.err
        assert not prod.has_table("prod", "markets")

    def test_prod_needs_precog_prod_confirmed(self, prod: Workspace) -> None:
        """Even the right --confirm-database is refused without PRECOG_PROD_CONFIRMED=yes."""
        prod.monkeypatch.delenv("PRECOG_PROD_CONFIRMED")
        result = prod.run("--env", "prod", "--confirm-database", prod.databases["prod"].dbname, "migrate", "up")
        assert result.code == 1
        assert "PRECOG_PROD_CONFIRMED=yes" in result.err
        assert not prod.has_table("prod", "markets")

    def test_typed_name_migrates_after_a_verified_backup(self, prod: Workspace) -> None:
        """The right name at the terminal: a verified dump is left behind first, then the migrations run."""
        name = prod.databases["prod"].dbname
        with tty_stdin(name + "\n") as stdin:
            result = prod.run("--env", "prod", "migrate", "up", stdin=stdin)
        assert result.code == 0, result.err
        assert "PRODUCTION" in result.err
        dumps = sorted((prod.root / "backups" / "prod").glob(f"{name}@*.dump"))
        assert len(dumps) == 1
        with prod.server.connect(name) as conn:
            server_major = conn.info.server_version // 10000
        listing = subprocess.run(
            [str(find_tool("pg_restore", server_major)), "--list", str(dumps[0])],
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"dbname: {name}" in listing.stdout
        assert "precog_meta" in listing.stdout  # the stamp was in the database when it was dumped
        assert "TABLE public markets" not in listing.stdout  # taken before the migrations ran
        assert [v for v, _ in prod.ledger("prod")] == [1, 2]
        ops = [(e["operation"], e["outcome"]) for e in prod.audit_entries()[-2:]]
        assert ops == [("backup", "ok"), ("migrate up", "ok")]
        assert prod.audit_entries()[-1]["backup"] == str(Path("backups") / "prod" / dumps[0].name)

    def test_no_backup_needs_a_reason_and_records_it(self, prod: Workspace) -> None:
        """--no-backup --reason skips the dump and the reason is in the audit entry."""
        name = prod.databases["prod"].dbname
        result = prod.run(
            "--env", "prod", "migrate", "up", "--confirm-database", name, "--no-backup", "--reason", "hotfix 42"
        )
        assert result.code == 0, result.err
        assert not (prod.root / "backups").exists()
        entry = prod.audit_entries()[-1]
        assert (entry["operation"], entry["reason"], entry["backup"]) == (
            "migrate up",
            "hotfix 42",
            "skipped (--no-backup)",
        )
        assert entry["confirmation"] == "PRECOG_PROD_CONFIRMED=yes + --confirm-database"

    def test_real_console_script_with_a_pty(self, prod: Workspace) -> None:
        """The installed script on a real pty: a wrong name aborts, and the password appears nowhere."""
        result = console_script(
            ["--env", "prod", "migrate", "up"],
            cwd=prod.root,
            env={"PRECOG_PROD_CONFIRMED": "yes"},
            stdin_tty="prod\n",
        )
        assert result.code == 1
        assert "does not match" in result.err
        assert not prod.has_table("prod", "markets")
        assert SENTINEL not in result.out + result.err + prod.audit_log.read_text()


def test_unwritable_audit_log_stops_the_operation_before_it_starts(ws: Workspace) -> None:
    """When the audit log cannot be written, migrate up refuses to run at all."""
    ws.add("test")
    two_migrations(ws)
    (ws.root / "blocker").write_text("")
    ws.monkeypatch.setenv("PRECOG_AUDIT_LOG", str(ws.root / "blocker" / "audit.log"))
    result = ws.run("--env", "test", "migrate", "up")
    assert result.code == 1
    assert "cannot write the audit log" in result.err
    assert not ws.has_table("test", "markets")


def test_psycopg_runs_a_multi_statement_file(ws: Workspace) -> None:
    """A file with several statements and a literal % runs as written (no parameter interpolation)."""
    ws.add("test")
    ws.write_migration(
        "0001_many.sql", "CREATE TABLE a (t text);\nINSERT INTO a VALUES ('50%');\nINSERT INTO a VALUES ('x');\n"
    )
    assert ws.run("--env", "test", "migrate", "up").code == 0
    assert ws.query("test", "SELECT t FROM a ORDER BY t") == [("50%",), ("x",)]
    with pytest.raises(psycopg.errors.UniqueViolation), ws.server.connect(ws.databases["test"].dbname) as conn:
        conn.execute(
            "INSERT INTO precog_meta.schema_migrations (version, name, checksum, applied_by) "
            "VALUES (1, 'again', 'x', 'me')"
        )


class TestLedgerTellsTheTruth:
    """A file is recorded as applied only when all of it ran inside the migration's own transaction."""

    def test_file_that_rolls_back_is_refused_before_anything_runs(self, ws: Workspace) -> None:
        """``CREATE TABLE r1 …; ROLLBACK;`` is refused naming the file and line; nothing runs, nothing is recorded."""
        ws.add("test")
        ws.write_migration("0001_create_markets.sql", MARKETS)
        ws.write_migration("0002_rolls_back.sql", "-- a comment\nCREATE TABLE r1 (id int);\nROLLBACK;\n")
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 1
        assert "0002_rolls_back.sql controls its own transaction (line 3: ROLLBACK)" in result.err
        assert ws.ledger("test") == []
        assert not ws.has_table("test", "r1") and not ws.has_table("test", "markets")
        status = ws.run("--env", "test", "--json", "migrate", "status")
        states = {row["version"]: row["state"] for row in status.json()["migrations"]}
        assert states == {1: "pending", 2: "ENDS ITS TRANSACTION"}

    @pytest.mark.parametrize(
        ("statement", "named"),
        [
            ("COMMIT", "COMMIT"),
            ("commit and chain", "COMMIT"),
            ("BEGIN", "BEGIN"),
            ("begin isolation level serializable", "BEGIN"),
            ("START TRANSACTION", "START TRANSACTION"),
            ("END", "END"),
            ("ABORT", "ABORT"),
            ("ROLLBACK WORK", "ROLLBACK"),
            ("PREPARE TRANSACTION 'p1'", "PREPARE TRANSACTION"),
            ("COMMIT PREPARED 'p1'", "COMMIT PREPARED"),
            ("ROLLBACK PREPARED 'p1'", "ROLLBACK PREPARED"),
        ],
    )
    def test_every_transaction_control_statement_is_refused(self, ws: Workspace, statement: str, named: str) -> None:
        """Each top-level statement that ends or starts a transaction is refused with its line; nothing runs."""
        ws.add("test")
        ws.write_migration("0001_ctl.sql", f"CREATE TABLE before_it (id int);\n\n  {statement};\nSELECT 1;\n")
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 1
        assert f"0001_ctl.sql controls its own transaction (line 3: {named})" in result.err
        assert ws.ledger("test") == []
        assert not ws.has_table("test", "before_it")

    def test_the_words_inside_bodies_literals_comments_and_identifiers_still_run(self, ws: Workspace) -> None:
        """plpgsql BEGIN…END, BEGIN ATOMIC bodies, "commit" identifiers, literals, comments and savepoints apply."""
        ws.add("test")
        body = (
            'CREATE TABLE "commit" ("rollback" text);\n'
            "INSERT INTO \"commit\" VALUES ('COMMIT; ROLLBACK;'), (E'it\\'s; END;'), ($q$BEGIN; ABORT;$q$);\n"
            "-- COMMIT;\n"
            "/* ROLLBACK; /* nested */ END; */\n"
            "CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$\n"
            "BEGIN\n  IF NEW.rollback IS NULL THEN NEW.rollback := 'x'; END IF;\n  RETURN NEW;\nEND;\n$$;\n"
            "CREATE FUNCTION sign_of(a int) RETURNS int LANGUAGE sql\n"
            "BEGIN ATOMIC\n  SELECT CASE WHEN a > 0 THEN 1 ELSE 0 END;\nEND;\n"
            "SAVEPOINT s1;\nINSERT INTO \"commit\" VALUES ('gone');\nROLLBACK TO SAVEPOINT s1;\nRELEASE s1;\n"
            "DO $$ BEGIN PERFORM 1; END $$;\n"
        )
        ws.write_migration("0001_tricky.sql", body)
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 0, result.err
        assert [v for v, _ in ws.ledger("test")] == [1]
        assert ws.query("test", 'SELECT count(*) FROM "commit"') == [(3,)]
        assert ws.query("test", "SELECT sign_of(5)") == [(1,)]

    @pytest.mark.parametrize(
        "body",
        [
            "CREATE TABLE r1 (id int);\nROLLBACK;\nCREATE TABLE r2 (id int);\n",
            "CREATE TABLE r1 (id int);\nCOMMIT AND CHAIN;\nCREATE TABLE r2 (id int);\n",
        ],
    )
    def test_a_file_that_slips_past_the_lexer_is_still_never_recorded(
        self, ws: Workspace, monkeypatch: pytest.MonkeyPatch, body: str
    ) -> None:
        """With the up-front check disabled, a file that ended its transaction is caught after it ran, not recorded."""
        settings = ws.add("test")
        ws.write_migration("0001_sneaky.sql", body)
        monkeypatch.setattr("precog_db.migrations._scanner.find_transaction_control", lambda sql: [])
        with ws.server.connect(settings.dbname) as conn:
            migrations.ensure_ledger(conn)
            (migration,) = discover(ws.root / "migrations")
            with pytest.raises(MigrationError, match=r"0001_sneaky\.sql ended the migration's transaction itself"):
                migrations.apply_migration(conn, migration)
        assert ws.ledger("test") == []

    def test_dangling_symlink_is_an_error(self, ws: Workspace) -> None:
        """A .sql symbolic link whose target is gone is an error naming it, for discover and for migrate up."""
        ws.add("test")
        ws.write_migration("0001_create_markets.sql", MARKETS)
        link = ws.root / "migrations" / "0002_gone.sql"
        link.symlink_to(ws.root / "elsewhere" / "0002_gone.sql")
        with pytest.raises(ConfigurationError, match=r"0002_gone\.sql is a symbolic link to .* which does not exist"):
            discover(ws.root / "migrations")
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 1 and "0002_gone.sql is a symbolic link" in result.err
        assert ws.ledger("test") == []

    def test_a_directory_named_like_a_migration_is_an_error(self, tmp_path: Path) -> None:
        """A directory called 0001_x.sql is reported rather than silently skipped."""
        (tmp_path / "m" / "0001_x.sql").mkdir(parents=True)
        with pytest.raises(ConfigurationError, match=r"0001_x\.sql is not a regular file"):
            discover(tmp_path / "m")

    def test_a_failing_statement_is_reported_by_line_and_column_of_the_file(self, ws: Workspace) -> None:
        """The server's error position becomes the line and column in the file, not a character offset."""
        ws.add("test")
        ws.write_migration(
            "0001_typo.sql", "-- ünïcode comment\nCREATE TABLE ok (id int);\n\nSELECT id,\n       nosuchcol FROM ok;\n"
        )
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 1
        assert 'column "nosuchcol" does not exist at line 5, column 8' in result.err
        assert "at character" not in result.err
