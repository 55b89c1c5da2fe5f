"""The guarded console: ``precog-db sql`` through the library, ``precog-db shell`` with the real psql.

Against the real server; psql is the real one. Each test uses databases of its own
(`tests._helpers.cli.Workspace`) and counts only its own database's sessions.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from precog_db.console import ShellPlan, check_psql_args, passfile_line, prepare_shell, run_shell
from precog_db.environment import Environment
from precog_db.errors import ConfigurationError, ProductionAccessError, UsageError
from precog_db.stamp import stamp_database
from tests._helpers.cli import SENTINEL, Workspace, console_script, tty_stdin
from tests._helpers.faults import own_server
from tests._helpers.server import REPO, Server

#: The real psql (.ci/run installs the PostgreSQL client where it is missing).
PSQL = shutil.which("psql") or "psql"


def sessions_on(server: Server, dbname: str) -> int:
    with server.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def execute(ws: Workspace, env: str, statement: str) -> None:
    with ws.server.connect(ws.databases[env].dbname) as conn:
        conn.execute(statement)


def ops(ws: Workspace) -> list[tuple[str, str]]:
    return [(e["operation"], e["outcome"]) for e in ws.audit_entries()]


# --- sql -------------------------------------------------------------------------------------------------------


class TestSql:
    def test_reads_as_a_table_and_as_json(self, ws: Workspace) -> None:
        """Rows print as a table; with --json as a JSON list of row objects on stdout."""
        ws.add("dev")
        table = ws.run("--env", "dev", "sql", "select 1 as a, 'x y' as b union all select 22, null")
        assert table.code == 0, table.err
        lines = table.out.splitlines()
        assert lines[0].split("|")[0].strip() == "a" and lines[0].split("|")[1].strip() == "b"
        assert lines[2].split("|")[1].strip() == "x y"
        assert lines[-1] == "(2 rows)"
        data = ws.run("--env", "dev", "--json", "sql", "select 1 as a, 'x y' as b").json()
        assert data == [{"a": 1, "b": "x y"}]
        assert ops(ws) == [("sql", "ok"), ("sql", "ok")]
        assert ws.audit_entries()[0]["mode"] == "read-only"

    def test_a_write_without_write_is_refused_and_writes_nothing(self, ws: Workspace) -> None:
        """A write needs --write: refused with a message saying so, exit 1, nothing written, audited as refused."""
        ws.add("dev")
        execute(ws, "dev", "CREATE TABLE t (x int)")
        refused = ws.run("--env", "dev", "sql", "insert into t values (1)")
        assert refused.code == 1
        assert "--write" in refused.err and "nothing was written" in refused.err
        assert refused.err.count("\n") == 1
        assert ws.query("dev", "select count(*) from t") == [(0,)]
        # The read-only session cannot be talked out of it from inside one statement.
        sneaky = ws.run("--env", "dev", "sql", "set default_transaction_read_only = off; insert into t values (2)")
        assert sneaky.code == 1
        assert ws.query("dev", "select count(*) from t") == [(0,)]
        done = ws.run("--env", "dev", "sql", "--write", "insert into t values (3)")
        assert done.code == 0, done.err
        assert done.out.strip() == "INSERT 0 1"
        assert ws.query("dev", "select x from t") == [(3,)]
        assert ops(ws)[0] == ("sql", "refused")
        assert ops(ws)[-1] == ("sql", "ok")
        assert ws.audit_entries()[-1]["mode"] == "write"

    def test_staging_write_needs_the_typed_name(self, ws: Workspace) -> None:
        """On staging --write needs the confirmation; a read does not. Nothing is written when it is missing."""
        settings = ws.add("staging")
        execute(ws, "staging", "CREATE TABLE t (x int)")
        assert ws.run("--env", "staging", "sql", "select count(*) as n from t").code == 0
        missing = ws.run("--env", "staging", "sql", "--write", "insert into t values (1)")
        assert missing.code == 1 and "--confirm-database" in missing.err
        assert ws.query("staging", "select count(*) from t") == [(0,)]
        # --yes is not the typed confirmation: refused on staging too, nothing written
        yes = ws.run("--env", "staging", "--yes", "sql", "--write", "insert into t values (1)")
        assert yes.code == 1 and "--yes is not enough here" in yes.err, yes.err
        assert ws.query("staging", "select count(*) from t") == [(0,)]
        named = ws.run(
            "--env", "staging", "--confirm-database", settings.dbname, "sql", "--write", "insert into t values (2)"
        )
        assert named.code == 0, named.err
        execute(ws, "staging", "DELETE FROM t")
        with tty_stdin(settings.dbname + "\n") as stdin:
            typed = ws.run("--env", "staging", "sql", "--write", "insert into t values (1)", stdin=stdin)
        assert typed.code == 0, typed.err
        assert "STAGING" in typed.err
        assert ws.query("staging", "select count(*) from t") == [(1,)]
        assert ws.audit_entries()[-1]["confirmation"] == "typed database name"

    def test_prod_without_the_guard_is_refused(self, ws: Workspace) -> None:
        """prod without PRECOG_PROD_CONFIRMED=yes: refused before the statement runs, even read-only."""
        ws.add("prod")
        result = ws.run("--env", "prod", "sql", "select 1")
        assert result.code == 1
        assert "PRECOG_PROD_CONFIRMED" in result.err
        assert ops(ws)[-1] == ("sql", "refused")

    def test_a_server_error_is_one_line(self, ws: Workspace) -> None:
        ws.add("dev")
        result = ws.run("--env", "dev", "sql", "select * from no_such_table")
        assert result.code == 1
        assert "no_such_table" in result.err and result.err.count("\n") == 1
        assert ops(ws) == [("sql", "failed")]


# --- shell -----------------------------------------------------------------------------------------------------


def shell(ws: Workspace, *argv: str, env: dict[str, str] | None = None, stdin_tty: str | None = None) -> Any:
    return console_script(["shell", *argv], cwd=ws.root, env=env, stdin_tty=stdin_tty, timeout=60)


class TestShell:
    def test_read_only_by_default_and_write_turns_it_off(self, ws: Workspace) -> None:
        ws.add("dev")
        ro = shell(ws, "--env", "dev", "--", "-At", "-c", "show default_transaction_read_only")
        assert ro.code == 0, ro.err
        assert ro.out.strip() == "on"
        rw = shell(ws, "--env", "dev", "--write", "--", "-At", "-c", "show default_transaction_read_only")
        assert rw.code == 0, rw.err
        assert rw.out.strip() == "off"

    def test_psql_arguments_pass_through_and_the_session_is_named(self, ws: Workspace) -> None:
        """-At -c reach psql unchanged; application_name says precog-db shell and whose; dev has no timeout."""
        settings = ws.add("dev")
        out = shell(
            ws,
            "--env",
            "dev",
            "--",
            "-At",
            "-F",
            "|",
            "-c",
            "select current_database(), current_setting('application_name'), current_setting('statement_timeout')",
        )
        assert out.code == 0, out.err
        db, app, timeout = out.out.strip().split("|")
        assert db == settings.dbname
        assert app == f"precog-db shell ({ws.audit_entries()[0]['who']}@{socket.gethostname()})"
        assert timeout == "0"

    def test_staging_has_a_statement_timeout_banner_and_needs_confirmation_to_write(self, ws: Workspace) -> None:
        settings = ws.add("staging")
        ro = shell(ws, "--env", "staging", "--", "-At", "-c", "show statement_timeout")
        assert ro.code == 0, ro.err
        assert ro.out.strip() == "1min"
        assert "STAGING" in ro.err
        refused = shell(ws, "--env", "staging", "--write", "--", "-At", "-c", "select 1")
        assert refused.code == 1 and "--confirm-database" in refused.err
        ok = shell(
            ws,
            "--env",
            "staging",
            "--write",
            "--confirm-database",
            settings.dbname,
            "--",
            "-At",
            "-c",
            "show default_transaction_read_only",
        )
        assert ok.code == 0, ok.err
        assert ok.out.strip() == "off"
        entries = [(e["operation"], e["outcome"], e.get("mode")) for e in ws.audit_entries()]
        assert ("shell start", "refused", "write") in entries
        assert entries[-2:] == [("shell start", "ok", "write"), ("shell end", "ok", "write")]
        assert ws.audit_entries()[-2]["confirmation"] == "--confirm-database"

    def test_audit_start_and_end_with_exit_code(self, ws: Workspace) -> None:
        ws.add("dev")
        failed = shell(ws, "--env", "dev", "--", "-v", "ON_ERROR_STOP=1", "-c", "select * from no_such_table")
        assert failed.code != 0
        entries = ws.audit_entries()
        assert [(e["operation"], e["outcome"]) for e in entries] == [("shell start", "ok"), ("shell end", "failed")]
        assert entries[0]["mode"] == "read-only"
        assert entries[0]["confirmation"] == "not required (read-only)"
        assert entries[1]["exit_code"] == failed.code
        assert entries[1]["duration_ms"] is not None

    def test_prod_without_the_guard_never_starts_psql_nor_a_session(self, ws: Workspace, tmp_path: Path) -> None:
        """No PRECOG_PROD_CONFIRMED=yes: refused, no session appears on the prod database, psql never ran."""
        settings = ws.add("prod")
        marker = tmp_path / "psql-ran"
        fake_bin = tmp_path / "bin"
        fake_bin.mkdir()
        # A psql that leaves a marker: if it ran at all, the marker is there.
        wrapper = fake_bin / "psql"
        wrapper.write_text(f'#!/bin/sh\ntouch {marker}\nexec {PSQL} "$@"\n')
        wrapper.chmod(0o755)
        before = sessions_on(ws.server, settings.dbname)
        proc = subprocess.Popen(
            [sys.executable, "-m", "precog_db", "--env", "prod", "shell", "--", "-c", "select pg_sleep(3)"],
            cwd=ws.root,
            env={**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{fake_bin}:{os.environ['PATH']}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen = 0
        for _ in range(200):  # bounded: sample the server while the command runs
            seen = max(seen, sessions_on(ws.server, settings.dbname) - before)
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert "PRECOG_PROD_CONFIRMED" in err
        assert seen == 0
        assert not marker.exists()
        assert ops(ws) == [("shell start", "refused")]

    def test_prod_with_the_guard_runs(self, ws: Workspace) -> None:
        ws.add("prod")
        out = shell(
            ws,
            "--env",
            "prod",
            "--",
            "-At",
            "-c",
            "show default_transaction_read_only",
            env={"PRECOG_PROD_CONFIRMED": "yes"},
        )
        assert out.code == 0, out.err
        assert out.out.strip() == "on"
        assert "PRODUCTION" in out.err

    def test_psql_missing_is_a_clear_message(self, ws: Workspace, tmp_path: Path) -> None:
        ws.add("dev")
        empty = tmp_path / "empty-bin"
        empty.mkdir()
        ws.monkeypatch.setenv("PRECOG_PG_SEARCH", "system")  # not the embedded server's psql either
        result = _run_module(ws, ["--env", "dev", "shell"], path=str(empty))
        assert result.returncode == 1
        assert "psql" in result.stderr and "apt-get install postgresql-client" in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1

    def test_psql_from_precog_pg_bindir_when_not_on_path(self, ws: Workspace, tmp_path: Path) -> None:
        ws.add("dev")
        bindir = tmp_path / "pgbin"
        bindir.mkdir()
        wrapper = bindir / "psql"
        wrapper.write_text(f'#!/bin/sh\nPATH="{os.environ["PATH"]}" exec {PSQL} "$@"\n')
        wrapper.chmod(0o755)
        empty = tmp_path / "empty-bin"
        empty.mkdir()
        ws.monkeypatch.setenv("PRECOG_PG_BINDIR", str(bindir))
        result = _run_module(ws, ["--env", "dev", "shell", "--", "-At", "-c", "select 42"], path=str(empty))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "42"

    def test_the_embedded_servers_psql_when_there_is_no_other(self, ws: Workspace, tmp_path: Path) -> None:
        """With the local extra's embedded PostgreSQL (pgserver) installed, its psql is used when PATH has none."""
        from precog_db.local.embedded import embedded_bindir

        bindir = embedded_bindir(shared=False)
        assert bindir is not None and (bindir / "psql").is_file(), "the dev extra installs the embedded server"
        ws.add("dev")
        empty = tmp_path / "empty-bin"
        empty.mkdir()
        result = _run_module(ws, ["--env", "dev", "shell", "--", "-At", "-c", "select 42"], path=str(empty))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "42"
        assert ws.audit_entries()[0]["operation"] == "shell start"

    def test_the_prompt_shows_environment_and_mode(self, ws: Workspace) -> None:
        settings = ws.add("staging")
        out = shell(ws, "--env", "staging", "--", "-At", "-c", "\\echo :PROMPT1")
        assert out.code == 0, out.err
        assert out.out.startswith("[staging read-only] ")
        plan = prepare_shell(settings, write=True, colour=True, psql="/bin/false")
        prompt = next(a for a in plan.argv if a.startswith("--set=PROMPT1="))
        assert "%[%033[1;30;43m%]staging WRITE%[%033[0m%]" in prompt

    def test_unstamped_database_is_refused_before_psql(self, ws: Workspace) -> None:
        ws.add("staging", stamp=False)
        result = shell(ws, "--env", "staging", "--", "-c", "select 1")
        assert result.code == 1
        assert "stamp" in result.err.lower()


def _run_module(ws: Workspace, argv: list[str], *, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "precog_db", *argv],
        cwd=ws.root,
        env={**os.environ, "PYTHONPATH": str(REPO), "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _processes() -> Iterator[tuple[int, bytes, int]]:
    """(pid, cmdline, ppid) of every process we can read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        yield int(entry), cmdline, ppid


def _psql_child(parent: int) -> int | None:
    for pid, cmdline, ppid in _processes():
        if ppid == parent and cmdline.split(b"\0", 1)[0].endswith(b"psql"):
            return pid
    return None


def _start_sleeping_shell(ws: Workspace, *extra: str, seconds: int = 2) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "precog_db",
            "--env",
            "dev",
            "shell",
            *extra,
            "--",
            "-At",
            "-c",
            f"select pg_sleep({seconds})",
        ],
        cwd=ws.root,
        env={**os.environ, "PYTHONPATH": str(REPO), "PGPASSWORD": "inherited-" + SENTINEL},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_psql(proc: subprocess.Popen[str]) -> int:
    for _ in range(3000):  # bounded: 30 s for precog-db to check the target and start psql
        child = _psql_child(proc.pid)
        if child is not None:
            return child
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("psql did not start")


class TestPassword:
    def test_never_on_a_command_line_nor_in_psqls_environment(self, ws: Workspace) -> None:
        """While psql runs: no /proc/*/cmdline holds the password, psql's environ neither (nor an inherited
        PGPASSWORD); its passfile is 0600 and gone afterwards."""
        ws.add("dev")
        proc = _start_sleeping_shell(ws)
        psql_pid = _wait_for_psql(proc)
        with open(f"/proc/{psql_pid}/environ", "rb") as fh:
            environ = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
        assert SENTINEL.encode() not in b"".join(environ.values())
        assert b"PGPASSWORD" not in environ
        passfile = Path(environ[b"PGPASSFILE"].decode())
        assert passfile.stat().st_mode & 0o777 == 0o600
        assert SENTINEL in passfile.read_text()
        leaks = [pid for pid, cmdline, _ in _processes() if SENTINEL.encode() in cmdline]
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert leaks == []
        assert not passfile.exists() and not passfile.parent.exists()

    def test_odd_characters_in_role_database_and_password(
        self, tmp_path: Path, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """On a scram server: a role and database named with ':', '\\', spaces and quotes, a password with ':' and
        '\\'; psql logs in through the passfile (so its escaping is what libpq reads)."""
        role = "odd:ro\\le 'x\""
        password = "pa:ss\\wo:rd\\"
        dbname = "odd db:\\ 'q\"_test"
        with own_server(password_encryption="scram-sha-256") as server:
            assert server.cluster is not None
            (server.cluster.data_dir / "pg_hba.conf").write_text(
                "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n", encoding="utf-8"
            )
            with server.connect() as admin:
                admin.execute("SELECT pg_reload_conf()")
                admin.execute(
                    sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(password)
                    )
                )
            server.fresh_database(dbname)
            settings = server.settings(dbname, env=Environment.TEST, user=role, password=password)
            stamp_database("test", settings=settings)
            plan = prepare_shell(
                settings, psql_args=["-At", "-F", "|", "-c", "select current_user, current_database()"]
            )
            capfd.readouterr()
            code = run_shell(plan)
            out = capfd.readouterr().out
            # The same from DB_PASSWORD_FILE (resolved in Python, written to the passfile) and from a provider.
            secret = tmp_path / "secret"
            secret.write_text(password + "\n", encoding="utf-8")
            secret.chmod(0o600)
            outs = []
            for source in ({"password_file": str(secret)}, {"password_provider": lambda: password}):
                other = server.settings(dbname, env=Environment.TEST, user=role, password="", **source)
                capfd.readouterr()
                outs.append(
                    (
                        run_shell(prepare_shell(other, psql_args=["-At", "-c", "select current_user"])),
                        capfd.readouterr().out.strip(),
                    )
                )
            # A wrong password is refused by the server, not silently accepted (the passfile is really read).
            wrong = server.settings(dbname, env=Environment.TEST, user=role, password="not-it")
            with pytest.raises(Exception, match="password authentication failed"):
                prepare_shell(wrong)
        assert code == 0
        assert out.strip() == f"{role}|{dbname}"
        assert outs == [(0, role), (0, role)]

    def test_passfile_line_escapes(self) -> None:
        assert passfile_line("h:1", 5432, "d\\b", "u:", "p:w\\") == "h\\:1:5432:d\\\\b:u\\::p\\:w\\\\\n"
        with pytest.raises(ConfigurationError):
            passfile_line("h", 5432, "d", "u", "two\nlines")


class TestAttacks:
    def test_two_shells_at_once_have_their_own_passfiles(self, ws: Workspace) -> None:
        ws.add("dev")
        first = _start_sleeping_shell(ws)
        second = _start_sleeping_shell(ws)
        files = []
        for proc in (first, second):
            pid = _wait_for_psql(proc)
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
            files.append(Path(env[b"PGPASSFILE"].decode()))
        assert files[0] != files[1]
        for proc in (first, second):
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
        assert not any(f.exists() for f in files)
        assert sorted(ops(ws)) == sorted([("shell start", "ok")] * 2 + [("shell end", "ok")] * 2)

    def test_sigterm_while_psql_runs_cleans_up_and_audits_the_end(self, ws: Workspace) -> None:
        ws.add("dev")
        proc = _start_sleeping_shell(ws, seconds=30)
        psql_pid = _wait_for_psql(proc)
        with open(f"/proc/{psql_pid}/environ", "rb") as fh:
            env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
        passfile = Path(env[b"PGPASSFILE"].decode())
        assert passfile.exists()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert not passfile.exists()
        entries = ws.audit_entries()
        assert [(e["operation"], e["outcome"]) for e in entries] == [("shell start", "ok"), ("shell end", "failed")]
        assert entries[1]["exit_code"] == proc.returncode == 128 + signal.SIGTERM
        assert entries[1]["signals"] == ["SIGTERM"]
        assert not os.path.exists(f"/proc/{psql_pid}") or _psql_child(proc.pid) is None

    def test_odd_database_name_through_the_cli(self, ws: Workspace) -> None:
        """A database name libpq would read as a connection string is a name (PGDATABASE is never expanded)."""
        name = f"dbname=postgres x_{uuid.uuid4().hex[:6]}_dev"
        settings = ws.add("dev", dbname=name)
        out = shell(ws, "--env", "dev", "--", "-At", "-c", "select current_database()")
        assert out.code == 0, out.err
        assert out.out.strip() == settings.dbname

    def test_hand_built_plan_cannot_carry_an_inherited_password(
        self, ws: Workspace, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """A ShellPlan built by hand with PGPASSWORD in its env: run_shell removes it before psql starts."""
        settings = ws.add("dev")
        plan = prepare_shell(settings, psql_args=["-At", "-c", "select 1"])
        hand = ShellPlan(**{**plan.__dict__, "env": {**plan.env, "PGPASSWORD": SENTINEL}})
        capfd.readouterr()
        assert run_shell(hand) == 0
        assert capfd.readouterr().out.strip() == "1"


def test_prod_python_api_refuses_without_the_guard(ws: Workspace) -> None:
    """The library entry point refuses prod too (not only the CLI)."""
    settings = ws.add("prod")
    before = sessions_on(ws.server, settings.dbname)
    with pytest.raises(ProductionAccessError):
        prepare_shell(settings, psql="/bin/false")
    assert sessions_on(ws.server, settings.dbname) == before


def _edit_env(ws: Workspace, env: str, **values: str) -> None:
    path = ws.config / f".env.{env}"
    lines = [line for line in path.read_text().splitlines() if line.split("=", 1)[0] not in values]
    path.write_text("\n".join([*lines, *(f"{k}={v}" for k, v in values.items())]) + "\n")


class TestTargets:
    def test_psql_arguments_that_choose_the_target_are_refused(self, ws: Workspace) -> None:
        """-h/-p/-U/-d, their long forms and positional names would bypass the checks: usage error, no psql."""
        ws.add("dev")
        for args in (
            ["-d", "postgres"],
            ["-At", "-h", "elsewhere"],
            ["--port=1"],
            ["-Upostgres"],
            ["postgres"],
            ["-c", "select 1", "otherdb"],
            ["--", "otherdb"],
            ["--dbname", "x"],
        ):
            with pytest.raises(UsageError):
                check_psql_args(args)
            result = ws.run("--env", "dev", "shell", "--", *args)
            assert result.code == 2, (args, result.err)
            assert "--env or --database" in result.err
        for fine in (
            ["-At", "-c", "select 1"],
            ["-v", "ON_ERROR_STOP=1", "-f", "x.sql"],
            ["-F|", "-Xc", "-d"],
            ["--set=X=1", "--command", "-h"],
        ):
            check_psql_args(fine)

    def test_multi_host_is_pinned_to_the_checked_server(self, ws: Workspace) -> None:
        """DB_HOST lists a dead host first: psql goes to the server whose stamp was checked."""
        settings = ws.add("dev")
        _edit_env(ws, "dev", DB_HOST=f"127.0.0.1,{settings.host}", DB_PORT=f"1,{settings.port}")
        out = shell(ws, "--env", "dev", "--", "-At", "-c", "select inet_server_port()")
        assert out.code == 0, out.err
        assert out.out.strip() == str(settings.port)

    @pytest.mark.parametrize("mode", ["transaction", "session"])
    def test_behind_a_pooler_goes_direct_or_is_refused(self, ws: Workspace, mode: str) -> None:
        """DB_POOLER set: to DB_DIRECT_HOST/PORT (PgBouncer drops startup options); without them refused."""
        settings = ws.add("dev")
        _edit_env(ws, "dev", DB_POOLER=mode, DB_HOST="127.0.0.1", DB_PORT="1")
        refused = shell(ws, "--env", "dev", "--", "-At", "-c", "select 1")
        assert refused.code == 1
        assert "DB_DIRECT_HOST" in refused.err
        assert "psql was not started" in refused.err
        _edit_env(ws, "dev", DB_DIRECT_HOST=settings.host, DB_DIRECT_PORT=str(settings.port))
        out = shell(ws, "--env", "dev", "--", "-At", "-c", "select current_database(), inet_server_port()")
        assert out.code == 0, out.err
        assert out.out.strip() == f"{settings.dbname}|{settings.port}"


def test_run_statement_uses_an_open_pool_and_refuses_another_target(ws: Workspace) -> None:
    """The Python entry point: an open pool for the same target is used and left open; another target is refused."""
    from precog_db import initialize_pool
    from precog_db.console import run_statement
    from precog_db.errors import PoolStateError
    from precog_db.pool import active_pool

    dev = ws.add("dev")
    other = ws.add("test")
    initialize_pool(settings=dev)
    result = run_statement(dev, "select 7 as n")
    assert (result.columns, result.rows) == (("n",), ({"n": 7},))
    assert active_pool() is not None
    with pytest.raises(PoolStateError):
        run_statement(other, "select 1")
    assert active_pool() is not None and active_pool().settings.dbname == dev.dbname  # type: ignore[union-attr]


@pytest.mark.parametrize("command", ["sql", "shell"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from precog_db.cli import main

    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--write" in out and "read-only" in out
