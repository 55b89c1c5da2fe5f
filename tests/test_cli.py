"""The ``precog-db`` command line: options, env, check, stamp, local, audit tail, errors and exit codes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from precog_db.cli import Progress, build_parser, main
from precog_db.stamp import read_stamp
from tests._helpers.cli import SENTINEL, Workspace, console_script, tty_stdin
from tests._helpers.server import REPO


class TestOptions:
    def test_global_options_before_and_after_the_command(self, ws: Workspace) -> None:
        """--env/--json/--config-dir mean the same before the command, after it, and mixed."""
        ws.add("test", stamp=False)
        before = ws.run("--env", "test", "--json", "env")
        after = ws.run("env", "--env", "test", "--json")
        mixed = ws.run("--json", "env", "--env", "test")
        assert before.code == after.code == mixed.code == 0
        assert before.json()["settings"] == after.json()["settings"] == mixed.json()["settings"]
        assert after.json()["environment"] == "test"

    def test_value_given_before_is_not_clobbered_by_the_subcommand(self, ws: Workspace) -> None:
        """A global option before a nested command survives the nested parsers' defaults."""
        args = build_parser().parse_args(["--env", "staging", "--yes", "migrate", "up", "--dry-run"])
        assert args.env == "staging"
        assert args.yes is True
        args = build_parser().parse_args(["migrate", "up", "--env", "prod", "--confirm-database", "x"])
        assert (args.env, args.confirm_database, args.yes) == ("prod", "x", False)

    def test_usage_errors_exit_2(self, ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
        """Unknown commands, missing actions and bad option values are usage errors (exit 2)."""
        assert main(["frobnicate"]) == 2
        assert main(["migrate"]) == 2
        assert main(["migrate", "up", "--target", "x"]) == 2
        assert main(["--env", "production-eu", "env"]) == 2
        assert "usage:" in capsys.readouterr().err

    def test_help_exits_0_and_documents_exit_codes(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--help prints the commands, the safety rules and the exit codes."""
        assert main(["--help"]) == 0
        text = capsys.readouterr().out
        for word in ("migrate", "backup", "restore", "audit", "--confirm-database", "exit codes"):
            assert word in text

    def test_help_lists_each_command_once(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Each command appears once in --help's list (the epilog used to repeat the whole list)."""
        assert main(["--help"]) == 0
        lines = capsys.readouterr().out.splitlines()
        for command in ("env", "check", "stamp", "local", "migrate", "backup", "restore", "sql", "shell", "audit"):
            assert sum(1 for line in lines if line.split()[:1] == [command]) == 1, command

    @pytest.mark.parametrize(
        ("group", "actions"),
        [
            ("migrate", "new, up, down, status, validate, baseline, lint, rehearse"),
            ("local", "up, down"),
            ("audit", "tail"),
        ],
    )
    def test_a_group_without_an_action_lists_its_actions(
        self, group: str, actions: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`precog-db migrate` alone is a usage error that names the actions, not argparse's bare ACTION line."""
        assert main([group]) == 2
        err = capsys.readouterr().err
        assert f"which action? one of: {actions}" in err
        assert "the following arguments are required" not in err

    @pytest.mark.parametrize("command", [["migrate", "up"], ["migrate", "status"], ["local", "up"], ["restore"]])
    def test_each_subcommand_has_help(self, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        """Every subcommand answers --help with its options, including the global ones."""
        assert main([*command, "--help"]) == 0
        assert "--env" in capsys.readouterr().out

    def test_reason_is_required_to_skip_a_check(self, ws: Workspace) -> None:
        """--skip-promotion-check and --no-backup without --reason are usage errors, before anything runs."""
        ws.add("staging")
        result = ws.run("--env", "staging", "migrate", "up", "--skip-promotion-check")
        assert result.code == 2
        assert "--reason" in result.err
        assert ws.run("--env", "prod", "migrate", "up", "--no-backup").code == 2


class TestEnv:
    def test_shows_sources_precedence_and_masks_the_password(self, ws: Workspace) -> None:
        """env names each value's source, the files and the precedence, and never prints the password."""
        ws.add("test", stamp=False)
        (ws.config / ".env").write_text("DB_CONNECT_TIMEOUT=7\n")
        ws.monkeypatch.setenv("DB_POOL_TIMEOUT", "12")
        result = ws.run("--env", "test", "env")
        assert result.code == 0
        assert SENTINEL not in result.out + result.err
        lines = {line.split()[0]: line for line in result.out.splitlines() if line.startswith("DB_")}
        assert "***" in lines["DB_PASSWORD"]
        assert lines["DB_CONNECT_TIMEOUT"].endswith("config/.env")
        assert lines["DB_POOL_TIMEOUT"].endswith("process environment")
        assert lines["DB_NAME"].endswith("config/.env.test")
        assert "precedence" in result.out

    def test_database_connection_string_overrides_and_is_masked(self, ws: Workspace) -> None:
        """--database with a full URL overrides host/port/name/user and its password is masked."""
        result = ws.run("--json", "--database", f"postgresql://alice:{SENTINEL}@db.example:6543/orders_test", "env")
        assert result.code == 0
        data = result.json()
        values = {r["variable"]: (r["value"], r["source"]) for r in data["settings"]}
        assert values["DB_HOST"] == ("db.example", "--database")
        assert values["DB_PORT"] == (6543, "--database")
        assert values["DB_NAME"] == ("orders_test", "--database")
        assert values["DB_PASSWORD"][0] == "***"
        assert data["environment"] == "test"
        assert data["environment_source"] == "inferred from --database"
        assert SENTINEL not in result.out + result.err

    def test_database_name_of_another_environment_is_refused(self, ws: Workspace) -> None:
        """--env test with a prod database name is refused in one line, and the refusal is audited."""
        result = ws.run("--env", "test", "--database", "precog_prod", "env")
        assert result.code == 1
        assert result.err.startswith("precog-db: refused:")
        assert result.err.count("\n") == 1
        entries = ws.audit_entries()
        assert [(e["operation"], e["outcome"]) for e in entries] == [("env", "refused")]

    def test_unsupported_connection_parameter_is_one_clear_line(self, ws: Workspace) -> None:
        """A connection-string parameter precog-db does not take is a one-line error, not a traceback."""
        result = ws.run("--database", "dbname=x_test target_session_attrs=any", "env")
        assert result.code == 1
        assert "target_session_attrs" in result.err
        assert "Traceback" not in result.err


class TestCheck:
    def test_reports_version_latency_stamp_pool_and_match(self, ws: Workspace) -> None:
        """check connects and prints server version, latency, stamp, pool settings and the environment match."""
        ws.add("test")
        result = ws.run("--env", "test", "check")
        assert result.code == 0, result.err
        assert "PostgreSQL 1" in result.out
        assert "latency" in result.out
        assert "stamped test" in result.out
        assert "min 1, max 4" in result.out
        assert "test: matches" in result.out
        data = ws.run("--env", "test", "--json", "check").json()
        assert data["environment_matches"] is True
        assert data["stamp"]["env"] == "test"

    def test_staging_shows_a_banner_and_audits_the_pool_open(self, ws: Workspace) -> None:
        """On staging the banner comes first on stderr, and the pool open gets an audit entry."""
        settings = ws.add("staging")
        result = ws.run("--env", "staging", "check")
        assert result.code == 0, result.err
        assert "STAGING" in result.err
        assert settings.dbname in result.err
        assert "\033[" not in result.err  # not a terminal: no colour
        ops = [(e["operation"], e["outcome"], e["environment"]) for e in ws.audit_entries()]
        assert ops == [("pool open", "ok", "staging")]

    def test_unreachable_server_is_one_line(self, ws: Workspace) -> None:
        """A server that is not there is one line on stderr and exit 1."""
        result = ws.run("--database", "host=127.0.0.1 port=1 dbname=nowhere_test connect_timeout=2", "check")
        assert result.code == 1
        assert result.err.startswith("precog-db: error: cannot connect")
        assert result.err.count("\n") == 1


class TestStamp:
    def test_stamps_dev_and_audits_it(self, ws: Workspace) -> None:
        """stamp writes the identity stamp and an audit entry."""
        settings = ws.add("dev", stamp=False)
        result = ws.run("--env", "dev", "stamp")
        assert result.code == 0, result.err
        stamp = read_stamp(settings)
        assert stamp is not None and stamp.env.value == "dev"
        assert [(e["operation"], e["outcome"]) for e in ws.audit_entries()] == [("stamp", "ok")]

    def test_staging_without_confirmation_is_refused(self, ws: Workspace) -> None:
        """Stamping staging without a terminal needs --yes; without it nothing is written."""
        settings = ws.add("staging", stamp=False)
        result = ws.run("--env", "staging", "stamp")
        assert result.code == 1
        assert "--yes" in result.err
        assert read_stamp(settings) is None
        assert ws.run("--env", "staging", "stamp", "--yes").code == 0
        stamp = read_stamp(settings)
        assert stamp is not None and stamp.env.value == "staging"

    def test_prod_needs_the_typed_name_at_the_terminal(self, ws: Workspace) -> None:
        """On prod a wrong name typed at a real pty aborts; the right one stamps."""
        settings = ws.add("prod", stamp=False)
        ws.monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        with tty_stdin("yes\n") as stdin:
            wrong = ws.run("--env", "prod", "stamp", stdin=stdin)
        assert wrong.code == 1
        assert "does not match" in wrong.err
        assert read_stamp(settings) is None
        with tty_stdin(settings.dbname + "\n") as stdin:
            right = ws.run("--env", "prod", "stamp", stdin=stdin)
        assert right.code == 0, right.err
        assert "Type the database name" in right.err
        outcomes = [(e["operation"], e["outcome"], e["confirmation"]) for e in ws.audit_entries()]
        assert outcomes[-1] == ("stamp", "ok", "PRECOG_PROD_CONFIRMED=yes + typed database name")
        assert ("stamp", "refused", None) in outcomes


class TestProgress:
    def test_progress_only_on_a_terminal(self) -> None:
        """Progress lines are drawn on a terminal and nothing is written when output is not one."""
        quiet = io.StringIO()
        progress = Progress(quiet)
        progress.update("[1/2] applying 0001_x.sql ...")
        progress.done()
        assert quiet.getvalue() == ""

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        loud = Terminal()
        progress = Progress(loud)
        progress.update("[1/2] applying 0001_x.sql ...")
        progress.done()
        assert "\r[1/2] applying 0001_x.sql ..." in loud.getvalue()

    def test_migrate_up_off_a_terminal_draws_no_progress(self, ws: Workspace) -> None:
        """A multi-file migrate up with stderr captured writes no carriage-return progress."""
        ws.add("test")
        ws.write_migration("0001_a.sql", "SELECT 1;")
        ws.write_migration("0002_b.sql", "SELECT 2;")
        result = ws.run("--env", "test", "migrate", "up")
        assert result.code == 0, result.err
        assert "\r" not in result.err


class TestAuditTail:
    def test_prints_the_latest_entries(self, ws: Workspace) -> None:
        """audit tail prints the last N entries, as text or JSON."""
        ws.add("dev", stamp=False)
        ws.run("--env", "dev", "stamp")
        ws.run("--env", "dev", "stamp")
        text = ws.run("audit", "tail", "-n", "1")
        assert text.code == 0
        assert len(text.out.strip().splitlines()) == 1
        assert "stamp" in text.out and "OK" in text.out
        data = ws.run("--json", "audit", "tail")
        assert [e["operation"] for e in data.json()] == ["stamp", "stamp"]

    def test_empty_log_says_so(self, ws: Workspace) -> None:
        """With no audit log yet, tail says where it looked."""
        result = ws.run("audit", "tail")
        assert result.code == 0
        assert "no audit entries in logs/audit.log" in result.out


@pytest.mark.slow
class TestLocalAndMakefile:
    def test_make_targets_drive_a_local_cluster(self, tmp_path: Path) -> None:
        """make local-up/check/migrate/migrate-status/backup/local-down work; local up is idempotent."""
        # A sandbox with the real Makefile and a .venv/bin holding the real precog-db, already "installed".
        shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
        (tmp_path / "pyproject.toml").write_text("")
        bin_dir = tmp_path / ".venv" / "bin"
        bin_dir.mkdir(parents=True)
        for tool in ("precog-db", "python"):
            (bin_dir / tool).symlink_to(Path(sys.executable).with_name(tool))
        installed = bin_dir / ".installed"
        installed.write_text("")
        os.utime(installed, (time.time() + 60, time.time() + 60))
        (tmp_path / "migrations").mkdir()
        (tmp_path / "migrations" / "0001_markets.sql").write_text("CREATE TABLE markets (id int);\n")
        root = tmp_path / ".precog"

        def make(*targets: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["make", "--no-print-directory", *targets],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )

        try:
            up = make("local-up")
            assert up.returncode == 0, up.stderr
            assert "--env dev local up" in up.stdout
            assert "created database precog_dev" in up.stdout
            assert "stamped database precog_test as test" in up.stdout
            assert "DB_NAME=precog_test" in (tmp_path / "config" / ".env.test").read_text()
            again = make("local-up")
            assert "kept database precog_dev" in again.stdout and "stamped" not in again.stdout
            check = make("check")
            assert check.returncode == 0, check.stderr
            assert "dev: matches (stamp: dev" in check.stdout
            migrate = make("migrate", "ENV=test")
            assert migrate.returncode == 0, migrate.stderr
            assert "--env test migrate up" in migrate.stdout
            status = make("migrate-status", "ENV=test")
            assert "1 applied, 0 pending" in status.stdout
            backup = make("backup")
            assert backup.returncode == 0, backup.stderr
            assert len(list((tmp_path / "backups" / "dev").glob("precog_dev@*.dump"))) == 1
            url = console_script(["--env", "test", "local", "url"], cwd=tmp_path)
            assert url.code == 0 and url.out.strip().endswith("/precog_test")
            refused = console_script(["local", "url", "--env", "prod"], cwd=tmp_path)
            assert refused.code == 1 and "dev, test" in refused.err
            down = make("local-down")
            assert down.returncode == 0 and "stopped" in down.stdout
            status_json = console_script(["--json", "local", "status"], cwd=tmp_path)
            assert json.loads(status_json.out)["running"] is False
        finally:
            from precog_db.local.cluster import LocalCluster

            LocalCluster(root).destroy()


class TestConsoleScript:
    def test_env_runs_as_console_script_and_module(self, tmp_path: Path) -> None:
        """The installed console script and python -m precog_db both work and agree."""
        script = console_script(["--json", "env", "--env", "test"], cwd=tmp_path)
        assert script.code == 0, script.err
        module = subprocess.run(
            [sys.executable, "-m", "precog_db", "--json", "env", "--env", "test"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert module.returncode == 0, module.stderr
        assert json.loads(script.out)["settings"] == json.loads(module.stdout)["settings"]

    def test_usage_error_exit_code_from_the_real_script(self, tmp_path: Path) -> None:
        """The real console script exits 2 on a usage error and 1 on a refusal."""
        assert console_script(["nope"], cwd=tmp_path).code == 2
        refused = console_script(["--env", "test", "--database", "precog_prod", "env"], cwd=tmp_path)
        assert refused.code == 1
        assert "Traceback" not in refused.err
