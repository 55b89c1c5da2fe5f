"""``migrate rehearse``: pending migrations applied to a restored copy of the newest verified backup."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from precog_db.errors import BackupError
from precog_db.migrations import RehearsalResult, rehearse
from precog_db.migrations._rehearse import REHEARSAL_INFIX, _dump_major, strongest_lock
from tests._helpers.cli import Workspace
from tests._helpers.server import REPO

ORDERS = "CREATE TABLE orders (id bigint PRIMARY KEY, email text);\n"
ROWS = "INSERT INTO orders VALUES (1, 'a@example.com'), (2, 'a@example.com'), (3, NULL)"


def copies(ws: Workspace, env: str) -> list[str]:
    """Rehearsal databases of ``env``'s database still on the server."""
    prefix = ws.databases[env].dbname + REHEARSAL_INFIX
    with ws.server.connect() as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,)).fetchall()
    return [str(r[0]) for r in rows]


@contextlib.contextmanager
def rehearsal_process(ws: Workspace, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """``precog-db --env test migrate rehearse`` in a subprocess; killed if the test leaves it running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "precog_db", "--env", "test", "migrate", "rehearse", *extra],
        cwd=ws.root,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def signal_when_running(
    proc: subprocess.Popen[str], running: Callable[[], bool], sig: signal.Signals, *, timeout: float
) -> str:
    """Send ``sig`` once ``running()`` says the slow file runs (polled, bounded: 60 s); return the process's stderr."""
    seen = False
    for _ in range(600):
        seen = running()
        if seen or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert seen, proc.communicate(timeout=30)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=timeout)
    return err


def assert_interrupted(ws: Workspace, proc: subprocess.Popen[str], err: str, before: object) -> None:
    """The interrupted rehearsal failed without a traceback, left the target as it was, and audited the interrupt."""
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    assert schema(ws, "test") == before
    entries = [e for e in ws.audit_entries() if e["operation"] == "migrate rehearse"]
    assert [e["outcome"] for e in entries] == ["started", "failed"]
    assert "interrupted" in entries[1]["error"]


def schema(ws: Workspace, env: str) -> list[tuple[object, ...]]:
    """Every column and constraint of the public schema, and the ledger: what a rehearsal must not change."""
    columns = ws.query(
        env,
        "SELECT table_name, column_name, is_nullable FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY 1, 2",
    )
    constraints = ws.query(env, "SELECT conname FROM pg_constraint WHERE connamespace = 'public'::regnamespace")
    return [*columns, *sorted(constraints), *ws.ledger(env)]


def prepared(ws: Workspace) -> None:
    """A test database with orders applied, rows that break UNIQUE and NOT NULL, and a verified backup of it."""
    ws.add("test")
    ws.write_migration("0001_orders.sql", ORDERS)
    assert ws.run("--env", "test", "migrate", "up").code == 0
    with ws.server.connect(ws.databases["test"].dbname) as conn:
        conn.execute(ROWS)
    made = ws.run("--env", "test", "backup")
    assert made.code == 0, made.err


class TestRehearse:
    def test_unique_over_duplicates_fails_on_the_copy_and_the_target_is_unchanged(self, ws: Workspace) -> None:
        """The backup has duplicate emails: the UNIQUE file fails on the copy (named, exit 1), the next is not
        run, the target keeps its schema and ledger, no copy is left, and start and result are audited."""
        prepared(ws)
        ws.write_migration("0002_note.sql", "ALTER TABLE orders ADD COLUMN note text;\n")
        ws.write_migration("0003_unique.sql", "ALTER TABLE orders ADD CONSTRAINT orders_email UNIQUE (email);\n")
        ws.write_migration("0004_more.sql", "ALTER TABLE orders ADD COLUMN more text;\n")
        before = schema(ws, "test")
        result = ws.run("--env", "test", "--json", "migrate", "rehearse")
        assert result.code == 1, result.err
        data = result.json()
        assert [(f["file"], f["status"]) for f in data["files"]] == [
            ("0002_note.sql", "applied"),
            ("0003_unique.sql", "failed"),
            ("0004_more.sql", "not run"),
        ]
        assert data["failed"] == ["0003_unique.sql"]
        assert "could not create unique index" in data["files"][1]["error"]
        assert data["files"][0]["lock"] == "AccessExclusiveLock" and data["files"][0]["table"] == "public.orders"
        assert data["database"].startswith(ws.databases["test"].dbname + REHEARSAL_INFIX)
        assert schema(ws, "test") == before
        assert copies(ws, "test") == []
        entries = [e for e in ws.audit_entries() if e["operation"] == "migrate rehearse"]
        assert [e["outcome"] for e in entries] == ["started", "ok"]
        assert entries[1]["result"] == "failed: 0003_unique.sql"
        assert entries[0]["backup"] == entries[1]["backup"] == data["backup"]

    def test_text_output_names_the_failed_file(self, ws: Workspace) -> None:
        """Without --json: the failed file, its error, and the closing FAILED line."""
        prepared(ws)
        ws.write_migration("0002_not_null.sql", "ALTER TABLE orders ALTER COLUMN email SET NOT NULL;\n")
        result = ws.run("--env", "test", "migrate", "rehearse")
        assert result.code == 1
        assert "failed   0002_not_null.sql" in result.out
        assert 'column "email" of relation "orders" contains null values' in result.out
        assert "FAILED: 0002_not_null.sql" in result.out
        assert copies(ws, "test") == []

    def test_safe_migrations_pass_with_their_locks(self, ws: Workspace) -> None:
        """Files that work on the data pass (exit 0) with the strongest lock each took; the target is unchanged."""
        prepared(ws)
        ws.write_migration("0002_note.sql", "ALTER TABLE orders ADD COLUMN note text;\n")
        ws.write_migration(
            "0003_index.sql",
            "-- precog:allow require-concurrent-index-creation: rehearsal test\n"
            "CREATE INDEX orders_email ON orders (email);\n",
        )
        ws.write_migration("0004_new.sql", "CREATE TABLE notes (id bigint PRIMARY KEY);\n")
        before = schema(ws, "test")
        result = ws.run("--env", "test", "--json", "migrate", "rehearse")
        assert result.code == 0, result.err
        files = result.json()["files"]
        assert [(f["file"], f["status"], f["lock"], f["table"]) for f in files] == [
            ("0002_note.sql", "applied", "AccessExclusiveLock", "public.orders"),
            ("0003_index.sql", "applied", "ShareLock", "public.orders"),
            ("0004_new.sql", "applied", "AccessExclusiveLock", "public.notes"),
        ]
        assert files[2]["locks"] == {
            "public.notes (new)": "AccessExclusiveLock",
            "public.notes_pkey (new)": ("AccessExclusiveLock"),
        }
        assert all(f["duration_ms"] >= 0 for f in files)
        assert schema(ws, "test") == before
        assert copies(ws, "test") == []

    def test_refused_without_a_backup(self, ws: Workspace) -> None:
        """No dump of the target: exit 1, the message says `precog-db ... backup`; nothing created; audited."""
        ws.add("test")
        ws.write_migration("0001_orders.sql", ORDERS)
        result = ws.run("--env", "test", "migrate", "rehearse", "--backup-dir", str(ws.root / "empty"))
        assert result.code == 1
        assert "precog-db --env test backup" in result.err and "Traceback" not in result.err
        assert copies(ws, "test") == []
        assert ws.ledger("test") == []
        entry = ws.audit_entries()[-1]
        assert entry["operation"] == "migrate rehearse" and entry["outcome"] == "failed"

    def test_a_corrupt_newest_dump_is_passed_over(self, ws: Workspace) -> None:
        """A newer dump that does not verify is skipped for the older verified one."""
        prepared(ws)
        (dump,) = (ws.root / "backups" / "test").iterdir()
        newer = dump.with_name(dump.name[: -len("20260101T000000.000Z.dump")] + "29991231T235959.999Z.dump")
        newer.write_bytes(b"not a dump")
        ws.write_migration("0002_note.sql", "ALTER TABLE orders ADD COLUMN note text;\n")
        result = ws.run("--env", "test", "--json", "migrate", "rehearse")
        assert result.code == 0, result.err
        assert result.json()["backup"] == str(Path("backups") / "test" / dump.name)

    def test_python_entry_point(self, ws: Workspace) -> None:
        """`rehearse` is the function the CLI calls: same result, the copy gone, and it raises without a backup."""
        prepared(ws)
        ws.write_migration("0002_not_null.sql", "ALTER TABLE orders ALTER COLUMN email SET NOT NULL;\n")
        settings = ws.databases["test"]
        handler = signal.getsignal(signal.SIGTERM)
        done = rehearse(settings, ws.root / "migrations", backup_root=ws.root / "backups")
        assert [(f.file, f.status) for f in done.failed] == [("0002_not_null.sql", "failed")]
        assert signal.getsignal(signal.SIGTERM) is handler  # the caller's SIGTERM handler is put back
        assert copies(ws, "test") == []
        with pytest.raises(BackupError, match="precog-db --env test backup"):
            rehearse(settings, ws.root / "migrations", backup_root=ws.root / "nothing-here")

    def test_odd_database_name(self, ws: Workspace) -> None:
        """A long database name with a quote and a space: the copy's name stays within 63 bytes, and is dropped."""
        ws.add("test", dbname=("test o'dd " + "x" * 60)[:63])
        ws.write_migration("0001_orders.sql", ORDERS)
        assert ws.run("--env", "test", "migrate", "up").code == 0
        assert ws.run("--env", "test", "backup").code == 0
        ws.write_migration("0002_note.sql", "ALTER TABLE orders ADD COLUMN note text;\n")
        result = ws.run("--env", "test", "--json", "migrate", "rehearse")
        assert result.code == 0, result.err
        name = result.json()["database"]
        assert len(name.encode()) <= 63 and REHEARSAL_INFIX in name
        with ws.server.connect() as conn:
            assert name not in [r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()]
        assert copies(ws, "test") == []
        local = ws.run("--env", "test", "--json", "migrate", "rehearse", "--local")  # the same name, in a cluster
        assert local.code == 0, local.err
        assert [f["status"] for f in local.json()["files"]] == ["applied"]
        assert not Path(local.json()["cluster"]).exists()

    def test_staging_needs_no_typed_confirmation_but_refuses_unacknowledged_findings(self, ws: Workspace) -> None:
        """staging: no --yes needed (the target is not changed); an unacknowledged finding is refused as by
        migrate up, the rule named, and the copy is dropped anyway."""
        ws.add("staging")
        ws.write_migration("0001_orders.sql", ORDERS)
        assert ws.run("--env", "staging", "--yes", "migrate", "up", "--skip-promotion-check", "--reason", "t").code == 0
        assert ws.run("--env", "staging", "backup").code == 0
        ws.write_migration("0002_index.sql", "CREATE INDEX orders_email ON orders (email);\n")
        refused = ws.run("--env", "staging", "migrate", "rehearse")
        assert refused.code == 1
        assert "require-concurrent-index-creation" in refused.err
        assert copies(ws, "staging") == []
        ws.write_migration(
            "0002_index.sql",
            "-- precog:allow require-concurrent-index-creation: 3 rows\n" + "CREATE INDEX i ON orders (email);\n",
        )
        passed = ws.run("--env", "staging", "--json", "migrate", "rehearse")
        assert passed.code == 0, passed.err
        assert [(f["file"], f["lock"]) for f in passed.json()["files"]] == [("0002_index.sql", "ShareLock")]
        assert ws.ledger("staging")[-1][0] == 1
        assert copies(ws, "staging") == []

    def test_two_rehearsals_at_once(self, ws: Workspace) -> None:
        """Two rehearsals of one database at the same time: two different copies, both report, both dropped."""
        prepared(ws)
        ws.write_migration("0002_note.sql", "ALTER TABLE orders ADD COLUMN note text;\n")
        settings = ws.databases["test"]
        results: list[RehearsalResult] = []
        errors: list[BaseException] = []

        def one() -> None:
            try:
                results.append(rehearse(settings, ws.root / "migrations", backup_root=ws.root / "backups"))
            except BaseException as exc:  # reported by the assertions below
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == [] and len(results) == 2
        assert results[0].database != results[1].database
        assert all([(f.file, f.status) for f in r.files] == [("0002_note.sql", "applied")] for r in results)
        assert copies(ws, "test") == []
        assert ws.ledger("test")[-1][0] == 1

    def test_prod_without_the_confirmation_is_refused_before_anything(self, ws: Workspace) -> None:
        """prod: the usual PRECOG_PROD_CONFIRMED=yes is needed (refused at the first connection, nothing made)."""
        ws.add("prod")
        ws.write_migration("0001_orders.sql", ORDERS)
        ws.monkeypatch.delenv("PRECOG_PROD_CONFIRMED", raising=False)
        result = ws.run("--env", "prod", "migrate", "rehearse")
        assert result.code == 1
        assert "PRECOG_PROD_CONFIRMED" in result.err and "Traceback" not in result.err
        assert copies(ws, "prod") == []
        assert ws.audit_entries()[-1]["outcome"] == "refused"

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
    def test_interrupted_rehearsal_drops_its_copy(self, ws: Workspace, sig: signal.Signals) -> None:
        """A real signal while a file runs on the copy: the process ends and no copy is left; the target unchanged."""
        prepared(ws)
        ws.write_migration("0002_slow.sql", "SELECT pg_sleep(60);\nALTER TABLE orders ADD COLUMN note text;\n")
        before = schema(ws, "test")
        prefix = ws.databases["test"].dbname + REHEARSAL_INFIX

        def running() -> bool:
            with ws.server.connect() as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE starts_with(datname, %s) "
                    "AND query LIKE 'SELECT pg_sleep(60)%%'",
                    (prefix,),
                ).fetchone()
            return row is not None and row[0] > 0

        with rehearsal_process(ws) as proc:
            err = signal_when_running(proc, running, sig, timeout=60)
        assert_interrupted(ws, proc, err, before)
        assert copies(ws, "test") == []


def test_strongest_lock_prefers_tables_that_existed() -> None:
    """AccessExclusive on a new table does not hide a ShareLock on an existing one."""
    locks = [("public.t_new", "AccessExclusiveLock", True), ("public.orders", "ShareLock", False)]
    assert strongest_lock(locks) == ("ShareLock", "public.orders")
    assert strongest_lock([("public.t", "AccessShareLock", False), ("public.t", "RowExclusiveLock", False)]) == (
        "RowExclusiveLock",
        "public.t",
    )
    assert strongest_lock([]) == (None, None)


def cluster_gone(data_dir: Path, port: int) -> bool:
    """The local cluster's files are deleted, nothing listens on its port and no process runs in its directory."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        listening = s.connect_ex(("127.0.0.1", port)) == 0
    inside = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(data_dir)):
                inside.append(entry.name)
    return not data_dir.exists() and not data_dir.parent.exists() and not listening and inside == []


@pytest.mark.slow
class TestRehearseLocal:
    def test_local_rehearsal_passes_target_unchanged_cluster_gone(self, ws: Workspace) -> None:
        """--local (Python entry point): the files apply in a throwaway cluster, the target keeps its schema,
        no copy is made on the target's server, the cluster is stopped and deleted, and the audit says local."""
        prepared(ws)
        ws.write_migration("0002_note.sql", "ALTER TABLE orders ADD COLUMN note text;\n")
        before = schema(ws, "test")
        told: list[str] = []
        done = rehearse(
            ws.databases["test"],
            ws.root / "migrations",
            backup_root=ws.root / "backups",
            local=True,
            notify=told.append,
        )
        assert [(f.file, f.status, f.lock, f.table) for f in done.files] == [
            ("0002_note.sql", "applied", "AccessExclusiveLock", "public.orders")
        ]
        assert done.cluster is not None
        entries = [e for e in ws.audit_entries() if e["operation"] == "migrate rehearse"]
        assert [(e["outcome"], e["local"]) for e in entries] == [("started", True), ("ok", True)]
        assert entries[1]["cluster"] == str(done.cluster)
        assert cluster_gone(done.cluster, int(entries[1]["cluster_port"]))
        assert any("throwaway local cluster" in line for line in told)
        with ws.server.connect() as conn:
            major = conn.info.server_version // 10000
        assert _dump_major(done.backup) == major  # the archive header picks the cluster's version
        assert f"PostgreSQL {major}" in entries[1]["cluster_server"]
        assert schema(ws, "test") == before
        assert copies(ws, "test") == []

    def test_local_rehearsal_fails_on_real_data_naming_the_file(self, ws: Workspace) -> None:
        """--local via the CLI: NOT NULL over NULLs fails in the local copy, exit 1, the file named; cluster gone."""
        prepared(ws)
        ws.write_migration("0002_not_null.sql", "ALTER TABLE orders ALTER COLUMN email SET NOT NULL;\n")
        before = schema(ws, "test")
        result = ws.run("--env", "test", "--json", "migrate", "rehearse", "--local")
        assert result.code == 1, result.err
        data = result.json()
        assert data["failed"] == ["0002_not_null.sql"]
        assert "contains null values" in data["files"][0]["error"]
        entry = [e for e in ws.audit_entries() if e["operation"] == "migrate rehearse"][-1]
        assert entry["result"] == "failed: 0002_not_null.sql" and entry["local"] is True
        assert cluster_gone(Path(data["cluster"]), int(entry["cluster_port"]))
        assert schema(ws, "test") == before
        assert copies(ws, "test") == []

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
    def test_interrupted_local_rehearsal_removes_its_cluster(self, ws: Workspace, sig: signal.Signals) -> None:
        """SIGTERM while a file runs in the local cluster: the process ends, the cluster is stopped and deleted."""
        import re

        import psycopg

        prepared(ws)
        ws.write_migration("0002_slow.sql", "SELECT pg_sleep(60);\nALTER TABLE orders ADD COLUMN note text;\n")
        before = schema(ws, "test")
        with rehearsal_process(ws, "--local") as proc:
            assert proc.stderr is not None
            found = None
            for _ in range(200):  # the notice naming the cluster's port and data directory (bounded)
                line = proc.stderr.readline()
                found = re.search(r"local cluster on 127\.0\.0\.1:(\d+) \(.*; data in (.+)\), restored", line)
                if found or not line:
                    break
            assert found, proc.communicate(timeout=30)
            port, data_dir = int(found[1]), Path(found[2])

            def running() -> bool:
                try:
                    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres") as conn:
                        row = conn.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(60)%%'"
                        ).fetchone()
                    return row is not None and row[0] > 0
                except psycopg.OperationalError:
                    return False

            err = signal_when_running(proc, running, sig, timeout=90)
        assert_interrupted(ws, proc, err, before)
        assert cluster_gone(data_dir, port)


def test_local_refused_without_binaries_of_the_dumps_version() -> None:
    """A dump from a server newer than every installed one: a sentence naming the version, before anything."""
    from precog_db.errors import MigrationError
    from precog_db.migrations._rehearse import _local_binaries

    with pytest.raises(
        MigrationError, match=r"needs PostgreSQL 99 server binaries .* cannot load a dump into an older"
    ):
        _local_binaries(99)
