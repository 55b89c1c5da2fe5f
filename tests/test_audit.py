"""The audit log: format, rotation, secrets, and who writes entries (pool, gates, CLI)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from precog_db import audit
from precog_db.environment import Environment
from precog_db.errors import AuditLogError, AuditSettingError, EnvironmentNotAllowedError, ProductionAccessError
from precog_db.gates import delete_all, truncate_tables
from precog_db.pool import create_pool, initialize_pool
from tests._helpers.cli import SENTINEL, Workspace, tty_stdin
from tests._helpers.server import Server


class TestRecord:
    def test_entry_has_every_field(self, pg_server: Server, tmp_path: Path) -> None:
        """An entry records who, host, pid, argv, environment, database, operation, confirmation, outcome, duration."""
        settings = pg_server.settings("cli_x_prod", env=Environment.PROD, password=SENTINEL)
        entry = audit.record(
            "backup", outcome="ok", settings=settings, confirmation="typed", duration_s=0.25, argv=["x", "y"]
        )
        line = json.loads((tmp_path / "logs" / "audit.log").read_text().splitlines()[0])
        assert line == entry
        for key in (
            "ts",
            "who",
            "host",
            "pid",
            "argv",
            "environment",
            "database",
            "operation",
            "confirmation",
            "outcome",
            "duration_ms",
        ):
            assert key in line
        assert line["pid"] == os.getpid()
        assert line["environment"] == "prod"
        assert line["database"] == {
            "name": "cli_x_prod",
            "host": pg_server.host,
            "port": pg_server.port,
            "user": pg_server.user,
        }
        assert (line["operation"], line["outcome"], line["duration_ms"], line["argv"]) == (
            "backup",
            "ok",
            250.0,
            ["x", "y"],
        )

    def test_password_never_reaches_the_file(self, pg_server: Server, tmp_path: Path) -> None:
        """The settings' password, URL and key=value secrets and secret-looking keys are all masked."""
        settings = pg_server.settings("cli_x_test", password=SENTINEL)
        audit.record(
            "stamp",
            outcome="failed",
            settings=settings,
            argv=["precog-db", "--database", f"postgresql://u:{SENTINEL}@h/db"],
            error=RuntimeError(f"could not use password={SENTINEL} here, nor {SENTINEL}"),
            detail={"dsn": f"host=h password='{SENTINEL}'", "password": SENTINEL, "token": "abc"},
        )
        text = (tmp_path / "logs" / "audit.log").read_text()
        assert SENTINEL not in text
        entry = json.loads(text)
        assert entry["detail"]["password"] == "***" and entry["detail"]["token"] == "***"
        assert entry["argv"][-1] == "postgresql://u:***@h/db"

    def test_path_from_precog_audit_log_and_private_mode(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """PRECOG_AUDIT_LOG chooses the file; a new file is not readable by others."""
        target = tmp_path / "var" / "audit.jsonl"
        monkeypatch.setenv("PRECOG_AUDIT_LOG", str(target))
        audit.record("x", outcome="ok")
        assert target.is_file()
        assert not stat.S_IMODE(target.stat().st_mode) & stat.S_IROTH
        assert audit.tail(5)[0]["operation"] == "x"

    def test_rotates_and_tail_reads_across_files(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Past MAX_BYTES the file rotates to audit.log.1 and tail still returns the latest entries in order."""
        monkeypatch.setattr(audit, "MAX_BYTES", 1500)
        for i in range(12):
            audit.record(f"op{i}", outcome="ok", argv=["precog-db"])
        assert (tmp_path / "logs" / "audit.log.1").is_file()
        names = [e["operation"] for e in audit.tail(6)]
        assert names == [f"op{i}" for i in range(6, 12)]

    def test_unwritable_log_raises_for_the_cli_and_warns_for_the_library(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """record raises AuditLogError (an OSError); record_safely logs audit_log_unwritable instead."""
        blocker = tmp_path / "file"
        blocker.write_text("")
        monkeypatch.setenv("PRECOG_AUDIT_LOG", str(blocker / "audit.log"))
        with pytest.raises(AuditLogError, match="cannot write the audit log"):
            audit.record("x", outcome="ok")
        with pytest.raises(OSError):
            audit.ensure_writable()
        with capture_logs() as logs:
            assert audit.record_safely("x", outcome="ok") is None
        assert logs[0]["event"] == "audit_log_unwritable"

    def test_partial_line_is_reported_not_dropped(self, tmp_path: Path) -> None:
        """A torn line in the log shows up in tail as unreadable."""
        audit.record("a", outcome="ok")
        with open(tmp_path / "logs" / "audit.log", "a") as fh:
            fh.write('{"ts": "2024\n')
        entries = audit.tail(5)
        assert entries[0]["operation"] == "a"
        assert "unreadable" in entries[1]


class TestLibraryHooks:
    def test_staging_pool_open_is_audited_and_dev_is_not(self, ws: Workspace) -> None:
        """Opening a staging pool writes one entry; a dev pool writes none."""
        staging = ws.add("staging")
        dev = ws.add("dev")
        create_pool(dev, prod_confirmed=False).close()
        assert ws.audit_entries() == []
        create_pool(staging, prod_confirmed=False).close()
        entries = ws.audit_entries()
        assert [(e["operation"], e["outcome"], e["environment"]) for e in entries] == [("pool open", "ok", "staging")]
        assert SENTINEL not in ws.audit_log.read_text()

    def test_refused_prod_pool_open_is_audited(self, ws: Workspace) -> None:
        """A prod pool refused for lack of confirmation leaves a refused entry."""
        prod = ws.add("prod")
        with pytest.raises(ProductionAccessError):
            create_pool(prod, prod_confirmed=False)
        entry = ws.audit_entries()[-1]
        assert (entry["operation"], entry["outcome"]) == ("pool open", "refused")
        assert "ProductionAccessError" in entry["error"]

    def test_gated_helpers_are_audited_with_their_tables(self, ws: Workspace) -> None:
        """truncate_tables and delete_all each write an entry naming the tables; a refusal writes one too."""
        test = ws.add("test")
        ws.monkeypatch.setenv("PRECOG_ENV", "test")
        with ws.server.connect(test.dbname) as conn:
            conn.execute("CREATE TABLE victims (id int)")
            conn.execute("INSERT INTO victims VALUES (1), (2)")
        initialize_pool(settings=test)
        truncate_tables("victims")
        delete_all("victims")
        ws.monkeypatch.setenv("PRECOG_ENV", "prod")
        with pytest.raises(EnvironmentNotAllowedError):
            delete_all("victims")
        got = [(e["operation"], e["outcome"], e["targets"], e["environment"]) for e in ws.audit_entries()]
        assert got == [
            ("truncate_tables", "ok", ["victims"], "test"),
            ("delete_all", "ok", ["victims"], "test"),
            ("delete_all", "refused", ["victims"], "prod"),
        ]


def test_one_entry_per_operation_and_never_the_password(ws: Workspace, capfd: pytest.CaptureFixture[str]) -> None:
    """A day of CLI work on test, staging and prod: one entry per operation, and the password nowhere."""
    ws.add("test")
    ws.add("staging")
    prod = ws.add("prod")
    ws.write_migration("0001_markets.sql", "CREATE TABLE markets (id int);")
    outputs = []

    def run(*argv: str, stdin: object = None) -> int:
        result = ws.run(*argv, stdin=stdin)
        outputs.append(result.out + result.err)
        return result.code

    assert run("--env", "test", "migrate", "up") == 0
    assert run("--env", "staging", "--yes", "migrate", "up") == 0
    assert run("--env", "staging", "check") == 0
    assert run("--env", "prod", "--confirm-database", prod.dbname, "migrate", "up") == 1  # no PRECOG_PROD_CONFIRMED
    ws.monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
    with tty_stdin("wrong\n") as stdin:
        assert run("--env", "prod", "migrate", "up", stdin=stdin) == 1
    assert run("--env", "prod", "--confirm-database", prod.dbname, "migrate", "up") == 0
    assert run("--env", "prod", "backup") == 0
    assert run("--env", "test", "--database", f"postgresql://u:{SENTINEL}@127.0.0.1:1/x_prod", "env") == 1
    got = [(e["operation"], e["environment"], e["outcome"]) for e in ws.audit_entries()]
    assert got == [
        ("migrate up", "test", "ok"),
        ("migrate up", "staging", "ok"),
        ("pool open", "staging", "ok"),
        ("migrate up", "prod", "refused"),
        ("migrate up", "prod", "refused"),
        ("backup", "prod", "ok"),
        ("migrate up", "prod", "ok"),
        ("backup", "prod", "ok"),
        ("env", "test", "refused"),
    ]
    captured = capfd.readouterr()
    everything = ws.audit_log.read_text() + "".join(outputs) + captured.out + captured.err
    assert SENTINEL not in everything
    assert "postgresql://u:***@127.0.0.1:1/x_prod" in ws.audit_log.read_text()


#: A writer process: waits for the start file (bounded), appends its records, exits 0; any error exits 1.
_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from precog_db import audit

    worker, count, start = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    deadline = time.monotonic() + 60
    while not start.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    for i in range(count):
        audit.record(f"w{worker}-{i}", outcome="ok", argv=["writer", str(worker)], padding="x" * (i % 97))
    """
)


def _all_lines(log: Path, backups: int) -> list[str]:
    """Every line of the live file and its rotated backups."""
    lines: list[str] = []
    for candidate in (log, *(log.with_name(f"{log.name}.{n}") for n in range(1, backups + 1))):
        if candidate.exists():
            lines += candidate.read_text(encoding="utf-8").splitlines()
    return lines


class TestConcurrentWriters:
    @pytest.mark.slow
    def test_processes_appending_through_rotation_lose_nothing_and_never_fail(self, tmp_path: Path) -> None:
        """8 processes x 300 records while the file rotates dozens of times: all 2,400 present once, no writer fails."""
        writers, per_writer, max_bytes, backups = 8, 300, 16_384, 1_000
        log = tmp_path / "shared" / "audit.log"
        start = tmp_path / "go"
        env = {
            **os.environ,
            "PRECOG_AUDIT_LOG": str(log),
            "PRECOG_AUDIT_MAX_BYTES": str(max_bytes),
            "PRECOG_AUDIT_BACKUPS": str(backups),
        }
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _WRITER, str(n), str(per_writer), str(start)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in range(writers)
        ]
        start.touch()
        failures = []
        for proc in procs:
            _out, err = proc.communicate(timeout=240)
            if proc.returncode != 0 or err.strip():
                failures.append((proc.returncode, err[-2000:]))
        assert failures == []
        lines = _all_lines(log, backups)
        parsed = [json.loads(line) for line in lines]  # a torn or interleaved line would not parse
        counts = Counter(entry["operation"] for entry in parsed)
        expected = {f"w{n}-{i}" for n in range(writers) for i in range(per_writer)}
        assert set(counts) == expected
        assert [op for op, seen in counts.items() if seen != 1] == []
        assert len(lines) == writers * per_writer
        rotated = sorted(log.parent.glob("audit.log.[0-9]*"))
        assert len(rotated) >= 20  # the file really rotated many times under the writers
        assert all(path.stat().st_size <= max_bytes for path in [log, *rotated])

    def test_a_held_lock_is_waited_for_boundedly_then_reported(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A process stuck holding <log>.lock makes record raise AuditLogError naming the lock, not hang."""
        log = tmp_path / "logs" / "audit.log"
        log.parent.mkdir()
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys, time\n"
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('held', flush=True)\n"
                "sys.stdin.read()\n",
                str(log) + ".lock",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            monkeypatch.setattr(audit, "LOCK_WAIT_S", 0.3)
            with pytest.raises(AuditLogError, match=r"audit\.log\.lock"):
                audit.record("x", outcome="ok")
        finally:
            holder.communicate(input="", timeout=30)
        audit.record("y", outcome="ok")  # released: writing works again
        assert [e["operation"] for e in audit.tail(5)] == ["y"]

    def test_an_unusable_lock_file_is_named_in_the_error(self, tmp_path: Path) -> None:
        """When <log>.lock cannot be opened, AuditLogError names the lock file rather than only the log."""
        (tmp_path / "logs" / "audit.log.lock").mkdir(parents=True)
        with pytest.raises(AuditLogError, match=r"audit\.log\.lock: Is a directory"):
            audit.record("x", outcome="ok")
        with pytest.raises(AuditLogError, match=r"audit\.log\.lock"):
            audit.ensure_writable()


class TestRotationSettings:
    def test_max_bytes_and_backups_come_from_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """PRECOG_AUDIT_MAX_BYTES sets the rotation size and PRECOG_AUDIT_BACKUPS how many old files are kept."""
        monkeypatch.setenv("PRECOG_AUDIT_MAX_BYTES", "600")
        monkeypatch.setenv("PRECOG_AUDIT_BACKUPS", "3")
        for i in range(30):
            audit.record(f"op{i}", outcome="ok", argv=["precog-db"])
        logs = tmp_path / "logs"
        assert sorted(p.name for p in logs.glob("audit.log*")) == [
            "audit.log",
            "audit.log.1",
            "audit.log.2",
            "audit.log.3",
            "audit.log.lock",
        ]
        assert all((logs / name).stat().st_size <= 600 for name in ("audit.log", "audit.log.1", "audit.log.3"))
        kept = [json.loads(line)["operation"] for line in _all_lines(logs / "audit.log", 3)]
        assert "op29" in kept and "op0" not in kept  # the oldest file was dropped
        names = [e["operation"] for e in audit.tail(len(kept))]
        assert names == sorted(kept, key=lambda op: int(op[2:]))  # tail reads every backup, oldest first

    def test_zero_max_bytes_never_rotates(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """PRECOG_AUDIT_MAX_BYTES=0 turns rotation off."""
        monkeypatch.setenv("PRECOG_AUDIT_MAX_BYTES", "0")
        for i in range(20):
            audit.record(f"op{i}", outcome="ok")
        assert not (tmp_path / "logs" / "audit.log.1").exists()
        assert len((tmp_path / "logs" / "audit.log").read_text().splitlines()) == 20

    @pytest.mark.parametrize(
        ("var", "value"),
        [
            ("PRECOG_AUDIT_MAX_BYTES", "ten-megs"),
            ("PRECOG_AUDIT_MAX_BYTES", "-1"),
            ("PRECOG_AUDIT_MAX_BYTES", "1.5"),
            ("PRECOG_AUDIT_BACKUPS", "0"),
            ("PRECOG_AUDIT_BACKUPS", "lots"),
        ],
    )
    def test_bad_values_are_clear_errors_that_do_not_echo_them(
        self, monkeypatch: pytest.MonkeyPatch, var: str, value: str
    ) -> None:
        """A bad value names the variable and the fix, never the value; the library only warns about it."""
        monkeypatch.setenv(var, value)
        with pytest.raises(AuditSettingError, match=var) as caught:
            audit.record("x", outcome="ok")
        assert value not in str(caught.value) and "unset it" in str(caught.value)
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, AuditLogError)
        with pytest.raises(AuditSettingError, match=var):
            audit.ensure_writable()
        with capture_logs() as logs:
            assert audit.record_safely("x", outcome="ok") is None
        assert logs[0]["event"] == "audit_log_unwritable" and var in logs[0]["reason"]

    def test_cli_reports_a_bad_setting_before_acting(self, ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        """A CLI command with an invalid PRECOG_AUDIT_BACKUPS fails with a message naming it."""
        ws.add("test")
        monkeypatch.setenv("PRECOG_AUDIT_BACKUPS", "none")
        ws.write_migration("0001_x.sql", "CREATE TABLE x (id int);")
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 1
        assert "PRECOG_AUDIT_BACKUPS" in result.err
        assert not ws.has_table("test", "x")


def test_cli_audits_a_url_with_empty_user_without_its_password(ws: Workspace) -> None:
    """The reported leak end to end: ``--env staging --database postgresql://:PW@host/db_prod stamp``."""
    result = ws.run("--env", "staging", "--database", f"postgresql://:{SENTINEL}@127.0.0.1:1/cli_db_prod", "stamp")
    assert result.code == 1
    text = ws.audit_log.read_text()
    assert SENTINEL not in text + result.out + result.err
    entry = ws.audit_entries()[-1]
    assert entry["outcome"] == "refused"
    assert "postgresql://:***@127.0.0.1:1/cli_db_prod" in entry["argv"]


class TestRefusals:
    def test_every_refusal_class_derives_from_refusal_error(self) -> None:
        """The refusals are exactly the RefusalError subclasses, each audited as refused; other errors as failed."""
        from precog_db import errors

        refusals = {
            errors.ConfirmationError,
            errors.EnvironmentMismatchError,
            errors.EnvironmentNotAllowedError,
            errors.MigrationValidationError,
            errors.ProductionAccessError,
            errors.PromotionError,
            errors.RestoredCopyError,
            errors.UnstampedDatabaseError,
        }
        for name in errors.__all__:
            cls = getattr(errors, name)
            assert issubclass(cls, errors.PrecogDBError), name
            assert issubclass(cls, errors.RefusalError) == (cls in refusals or cls is errors.RefusalError), name
            expected = audit.REFUSED if issubclass(cls, errors.RefusalError) else audit.FAILED
            assert audit.outcome_of(cls.__new__(cls)) == expected, name
        for cls in refusals:
            assert issubclass(cls, RuntimeError) and not hasattr(cls, "refusal"), cls

    def test_recorded_errors_are_remembered_per_command_without_touching_them(self) -> None:
        """mark_recorded remembers an error within one command_line block and sets no attribute on it."""
        error = errors_for_test()
        with audit.command_line(["precog-db", "env"]):
            assert not audit.was_recorded(error)
            audit.mark_recorded(error)
            assert audit.was_recorded(error)
            assert vars(error) == {}
        with audit.command_line(["precog-db", "env"]):
            assert not audit.was_recorded(error)


def errors_for_test() -> Exception:
    """A refusal as the CLI would see it."""
    from precog_db.errors import ProductionAccessError

    return ProductionAccessError("refused for the test")
