"""Backups and restores with the real pg_dump / pg_restore."""

from __future__ import annotations

import os
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from precog_db.backup import (
    archive_name,
    archive_prefix,
    backup,
    backup_database,
    find_tool,
    prune,
    restore,
    restore_database,
    retention,
    verify,
)
from precog_db.connection import tool_connection_args
from precog_db.environment import Environment
from precog_db.errors import (
    BackupError,
    ConfigurationError,
    DatabaseUnavailableError,
    EnvironmentMismatchError,
    EnvironmentNotAllowedError,
    StampError,
)
from precog_db.settings import DatabaseSettings
from precog_db.stamp import read_stamp
from tests._helpers.cli import SENTINEL, Workspace, tty_stdin
from tests._helpers.server import Server, start_throwaway_cluster


def server_major(ws: Workspace) -> int:
    with ws.server.connect() as conn:
        return conn.info.server_version // 10000


def fill(ws: Workspace, env: str, rows: int = 3) -> None:
    with ws.server.connect(ws.databases[env].dbname) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS markets (id int PRIMARY KEY, symbol text)")
        conn.execute("TRUNCATE markets")
        conn.execute("INSERT INTO markets SELECT g, 'M' || g FROM generate_series(1, %s) g", (rows,))


class TestBackup:
    def test_dump_is_verified_private_and_named_by_env(self, ws: Workspace) -> None:
        """backup writes backups/<env>/<db>-<timestamp>.dump, mode 600, that pg_restore can list."""
        settings = ws.add("dev")
        fill(ws, "dev")
        result = ws.run("--env", "dev", "--json", "backup")
        assert result.code == 0, result.err
        data = result.json()
        path = Path(data["path"])
        assert path.parent == Path("backups") / "dev"
        assert path.name.startswith(f"{settings.dbname}@{settings.host}-{settings.port}-")
        assert path.name.endswith("Z.dump")
        assert data["verified"] is True and data["entries"] > 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not list(path.parent.glob("*.partial"))
        listing = subprocess.run(
            [data["tool"].replace("pg_dump", "pg_restore"), "--list", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "TABLE DATA public markets" in listing.stdout
        assert [e["operation"] for e in ws.audit_entries()] == ["backup"]

    def test_retention_prunes_old_dumps_of_that_database_only(self, ws: Workspace) -> None:
        """After a backup only the newest --keep dumps of that database remain; other files are untouched."""
        ws.add("dev")
        folder = ws.root / "backups" / "dev"
        folder.mkdir(parents=True)
        settings = ws.databases["dev"]
        old = [folder / archive_name(settings, datetime(2020, 1, i, tzinfo=UTC)) for i in range(1, 5)]
        for path in old:
            path.write_bytes(b"old")
        other = folder / archive_name(settings.replace(dbname="other_db"), datetime(2020, 1, 1, tzinfo=UTC))
        other.write_bytes(b"keep me")
        legacy = folder / f"{settings.dbname}-20200101T000000.000Z.dump"  # the earlier naming: server unknown
        legacy.write_bytes(b"keep me")
        notes = folder / "README.txt"
        notes.write_text("keep me")
        result = ws.run("--env", "dev", "backup", "--keep", "2")
        assert result.code == 0, result.err
        remaining = sorted(p.name for p in folder.iterdir())
        assert old[-1].name in remaining and all(p.name not in remaining for p in old[:-1])
        assert other.name in remaining and notes.name in remaining and legacy.name in remaining
        assert len([n for n in remaining if n.startswith(archive_prefix(settings))]) == 2
        assert "pruned 3 old dump(s)" in result.out

    def test_failed_dump_leaves_no_file_and_one_line(self, ws: Workspace, tmp_path: Path) -> None:
        """pg_dump failing is one line and no partial file; a database that is not there fails before pg_dump."""
        ws.add("dev")
        missing = ws.databases["dev"].replace(dbname="missing_dev_db")
        with pytest.raises(DatabaseUnavailableError, match='database "missing_dev_db" does not exist'):
            backup(missing, server_major=server_major(ws), root=ws.root / "b")
        assert not (ws.root / "b").exists()
        fake = tmp_path / "failbin"
        fake.mkdir()
        real = find_tool("pg_dump", server_major(ws))
        (fake / "pg_dump").write_text(f'#!/bin/sh\nexec {real} "$@" --strict-names --table=no_such_table_21\n')
        (fake / "pg_dump").chmod(0o755)
        (fake / "pg_restore").symlink_to(real.with_name("pg_restore"))
        ws.monkeypatch.setenv("PRECOG_PG_BINDIR", str(fake))
        with pytest.raises(BackupError, match=r"pg_dump of .* failed .*no matching tables"):
            backup(ws.databases["dev"], server_major=server_major(ws), root=ws.root / "b")
        assert not list((ws.root / "b" / "dev").iterdir())

    def test_corrupt_archive_does_not_verify(self, ws: Workspace) -> None:
        """A truncated dump fails pg_restore --list verification."""
        ws.add("dev")
        made = backup(ws.databases["dev"], server_major=server_major(ws), root=ws.root / "b")
        data = made.path.read_bytes()
        made.path.write_bytes(data[:20])
        tool = find_tool("pg_restore", server_major(ws))
        with pytest.raises(BackupError):
            verify(made.path, ws.databases["dev"], tool=tool)
        junk = ws.root / "junk.dump"
        junk.write_text("not a dump")
        with pytest.raises(BackupError):
            verify(junk, ws.databases["dev"], tool=tool)

    def test_archive_of_another_database_does_not_verify_as_this_one(self, ws: Workspace) -> None:
        """Verification checks the archive names the database that was dumped."""
        ws.add("dev")
        made = backup(ws.databases["dev"], server_major=server_major(ws), root=ws.root / "b")
        with pytest.raises(BackupError, match="names database"):
            verify(made.path, ws.databases["dev"], tool=made.tool.with_name("pg_restore"), expect_dbname="other")

    def test_tool_too_old_for_the_server_is_refused(self) -> None:
        """find_tool refuses when no pg_dump is at least the server's major version, listing what it saw."""
        with pytest.raises(BackupError, match="no pg_dump of PostgreSQL 99 or newer"):
            find_tool("pg_dump", 99)

    def test_retention_must_keep_at_least_one(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """--keep 0 and a non-numeric PRECOG_BACKUP_KEEP are configuration errors; the default is 7."""
        assert retention() == 7
        with pytest.raises(ConfigurationError):
            retention(0)
        monkeypatch.setenv("PRECOG_BACKUP_KEEP", "lots")
        with pytest.raises(ConfigurationError):
            retention()
        monkeypatch.setenv("PRECOG_BACKUP_KEEP", "3")
        assert retention() == 3

    def test_prune_keeps_newest(self, tmp_path: Path, pg_server: Server) -> None:
        """prune sorts by the timestamp in the name and deletes the oldest."""
        settings = pg_server.settings("db")
        names = [archive_name(settings, datetime(2024, 1, day, tzinfo=UTC)) for day in (3, 1, 2)]
        for n in names:
            (tmp_path / n).write_text("x")
        gone = prune(tmp_path, settings, 1)
        assert sorted(p.name for p in gone) == sorted(names[1:])

    def test_password_goes_through_the_environment_not_argv(self, ws: Workspace, tmp_path: Path) -> None:
        """pg_dump gets the password as PGPASSWORD, never on its command line."""
        ws.add("dev")
        fake = tmp_path / "fakebin"
        fake.mkdir()
        real = find_tool("pg_dump", server_major(ws))
        for name in ("pg_dump", "pg_restore"):
            script = fake / name
            script.write_text(
                "#!/bin/sh\n"
                f'echo "$@" >> {tmp_path}/argv.log\n'
                f'[ "$PGPASSWORD" = "{SENTINEL}" ] && echo has-password >> {tmp_path}/argv.log\n'
                f'exec {real.with_name(name)} "$@"\n'
            )
            script.chmod(0o755)
        ws.monkeypatch.setenv("PRECOG_PG_BINDIR", str(fake))
        made = backup(ws.databases["dev"], server_major=server_major(ws), root=tmp_path / "b")
        log = (tmp_path / "argv.log").read_text()
        assert made.tool == fake / "pg_dump"
        assert "has-password" in log
        assert SENTINEL not in log.replace("has-password", "")


class TestRestore:
    def test_restore_a_prod_dump_into_dev_and_restamp(self, ws: Workspace) -> None:
        """A prod dump restored into dev brings the data, replaces dev's objects, and re-stamps it dev."""
        ws.add("prod")
        dev = ws.add("dev")
        fill(ws, "prod", rows=5)
        fill(ws, "dev", rows=1)
        ws.monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        dumped = ws.run("--env", "prod", "--json", "backup")
        assert dumped.code == 0, dumped.err
        ws.monkeypatch.delenv("PRECOG_PROD_CONFIRMED")
        result = ws.run("--env", "dev", "--yes", "restore", dumped.json()["path"])
        assert result.code == 0, result.err
        assert ws.query("dev", "SELECT count(*) FROM markets") == [(5,)]
        stamp = read_stamp(dev)
        assert stamp is not None and stamp.env is Environment.DEV and not stamp.is_copy
        assert "re-stamped it as dev (the dump carried the prod stamp)" in result.out
        entry = ws.audit_entries()[-1]
        assert (entry["operation"], entry["outcome"], entry["restamped"]) == ("restore", "ok", "prod -> dev")

    def test_restore_database_restamps_from_python(self, ws: Workspace) -> None:
        """backup.restore_database restores and re-stamps a prod dump into dev without the CLI, audited."""
        ws.add("prod")
        dev = ws.add("dev")
        fill(ws, "prod", rows=3)
        ws.monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        made = backup(ws.databases["prod"], server_major=server_major(ws), root=ws.root / "b")
        ws.monkeypatch.delenv("PRECOG_PROD_CONFIRMED")
        done = restore_database(dev, made.path, yes=True)
        assert (done.entries > 0, done.restamped) == (True, "prod -> dev")
        assert ws.query("dev", "SELECT count(*) FROM markets") == [(3,)]
        stamp = read_stamp(dev)
        assert stamp is not None and stamp.env is Environment.DEV and not stamp.is_copy
        entry = ws.audit_entries()[-1]
        assert (entry["operation"], entry["outcome"], entry["restamped"]) == ("restore", "ok", "prod -> dev")

    @pytest.mark.parametrize("env", ["staging", "prod"])
    def test_restore_into_staging_or_prod_is_refused(self, ws: Workspace, env: str) -> None:
        """restore refuses staging and prod whatever the confirmation, and changes nothing."""
        ws.add("dev")
        fill(ws, "dev")
        made = backup(ws.databases["dev"], server_major=server_major(ws), root=ws.root / "b")
        ws.add(env)
        ws.monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        name = ws.databases[env].dbname
        result = ws.run("--env", env, "--yes", "--confirm-database", name, "restore", str(made.path))
        assert result.code == 1
        assert "restore is allowed only into dev or test" in result.err
        assert not ws.has_table(env, "markets")
        assert ws.audit_entries()[-1]["outcome"] == "refused"
        with pytest.raises(EnvironmentNotAllowedError):
            restore(ws.databases[env], made.path, server_major=server_major(ws))

    def test_restore_needs_confirmation_and_wrong_name_changes_nothing(self, ws: Workspace) -> None:
        """Without a terminal restore needs --yes; a wrong name typed at a pty aborts with dev untouched."""
        ws.add("dev")
        fill(ws, "dev", rows=2)
        made = backup(ws.databases["dev"], server_major=server_major(ws), root=ws.root / "b")
        fill(ws, "dev", rows=9)
        plain = ws.run("--env", "dev", "restore", str(made.path))
        assert plain.code == 1 and "--yes" in plain.err
        with tty_stdin("precog_dev\n") as stdin:
            wrong = ws.run("--env", "dev", "restore", str(made.path), stdin=stdin)
        assert wrong.code == 1 and "does not match" in wrong.err
        assert ws.query("dev", "SELECT count(*) FROM markets") == [(9,)]
        with tty_stdin(ws.databases["dev"].dbname + "\n") as stdin:
            right = ws.run("--env", "dev", "restore", str(made.path), stdin=stdin)
        assert right.code == 0, right.err
        assert ws.query("dev", "SELECT count(*) FROM markets") == [(2,)]

    def test_restore_refuses_a_target_stamped_as_another_environment(self, ws: Workspace) -> None:
        """A 'dev' target that is really stamped prod is refused before anything is restored."""
        ws.add("dev")
        made = backup(ws.databases["dev"], server_major=server_major(ws), root=ws.root / "b")
        neutral = ws.add("prod", dbname=f"ledger_{os.getpid()}")
        fill(ws, "prod", rows=4)
        result = ws.run("--env", "dev", "--database", neutral.dbname, "--yes", "restore", str(made.path))
        assert result.code == 1
        assert "refused" in result.err
        assert ws.query("prod", "SELECT count(*) FROM markets") == [(4,)]

    def test_missing_file_is_a_clear_error(self, ws: Workspace) -> None:
        """restore of a file that does not exist is one line naming it."""
        ws.add("dev")
        result = ws.run("--env", "dev", "--yes", "restore", "nope.dump")
        assert result.code == 1
        assert "nope.dump does not exist" in result.err


class TestDatabaseNames:
    """Database names are names: never a connection string to the tools, never a path out of the directory."""

    def test_restore_into_a_database_named_dbname_x_never_touches_database_x(self, ws: Workspace) -> None:
        """Restoring into a dev database literally named ``dbname=x`` restores there, not into prod-stamped x."""
        x = f"x_{uuid.uuid4().hex[:8]}"
        ws.add("prod", dbname=x)
        fill(ws, "prod", rows=4)
        ws.add("test")
        fill(ws, "test", rows=0)
        empty = backup(ws.databases["test"], server_major=server_major(ws), root=ws.root / "b")
        odd = ws.add("dev", dbname=f"dbname={x}")
        result = ws.run("--env", "dev", "--yes", "restore", str(empty.path))
        assert result.code == 0, result.err
        assert ws.query("prod", "SELECT count(*) FROM markets") == [(4,)]
        with ws.monkeypatch.context() as m:
            m.setenv("PRECOG_PROD_CONFIRMED", "yes")
            stamp = read_stamp(ws.databases["prod"])
        assert stamp is not None and stamp.env is Environment.PROD and stamp.dbname == x and not stamp.is_copy
        assert ws.query("dev", "SELECT count(*) FROM markets") == [(0,)]
        restamped = read_stamp(odd)
        assert restamped is not None and restamped.env is Environment.DEV and not restamped.is_copy

    def test_backup_of_a_database_named_dbname_x_dumps_that_database(self, ws: Workspace) -> None:
        """pg_dump of a database literally named ``dbname=x`` dumps that database, not prod-stamped x."""
        x = f"x_{uuid.uuid4().hex[:8]}"
        ws.add("prod", dbname=x)
        fill(ws, "prod", rows=4)
        named = ws.add("dev", dbname=f"dbname={x}")
        with ws.server.connect(named.dbname) as conn:
            conn.execute("CREATE TABLE only_in_the_odd_one (id int)")
        made = backup(named, server_major=server_major(ws), root=ws.root / "b")
        listing = subprocess.run(
            [str(made.tool.with_name("pg_restore")), "--list", str(made.path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "only_in_the_odd_one" in listing and "markets" not in listing

    @pytest.mark.parametrize("shape", ["../../esc_{}", "/tmp/esc_{}", "a/b/{}", ".{}"])
    def test_dump_file_stays_in_the_backup_directory(self, ws: Workspace, shape: str) -> None:
        """Whatever the database name (``../..``, absolute, slashes, a leading dot) the dump lands in <dir>/<env>/."""
        name = shape.format(uuid.uuid4().hex[:8])
        settings = ws.add("dev", dbname=name)
        made = backup(settings, server_major=server_major(ws), root=ws.root / "b")
        try:
            folder = (ws.root / "b" / "dev").resolve()
            assert made.path.resolve().parent == folder
            assert not made.path.name.startswith(".")
            assert [p.resolve() for p in ws.root.rglob("*.dump")] == [made.path.resolve()]
            assert verify(made.path, settings, tool=made.tool.with_name("pg_restore"), expect_dbname=name) > 0
        finally:
            if made.path.resolve().parent != (ws.root / "b" / "dev").resolve():
                made.path.unlink(missing_ok=True)  # the unfixed code wrote it elsewhere: do not leave it there

    def test_tool_connection_args_quote_every_value_and_keep_the_password_out(
        self, pg_server: Server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The tools get one --dbname conninfo whose dbname is the literal name; the password only as PGPASSWORD."""
        monkeypatch.setenv("PGHOST", "elsewhere.invalid")
        monkeypatch.setenv("PGDATABASE", "other")
        name = "dbname=x host=elsewhere.invalid user=mallory"
        pg_server.fresh_database(name)  # the target is checked by connecting to it (21.1)
        try:
            args, env = tool_connection_args(pg_server.settings(name, password=SENTINEL))
        finally:
            with pg_server.connect() as conn:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        assert args[0].startswith("--dbname=") and "--no-password" in args
        params = conninfo_to_dict(args[0].removeprefix("--dbname="))
        assert (params["dbname"], params["host"], params["port"]) == (name, pg_server.host, str(pg_server.port))
        assert "password" not in params and SENTINEL not in " ".join(args)
        assert env["PGPASSWORD"] == SENTINEL
        assert sorted(k for k in env if k.startswith("PG")) == ["PGPASSWORD"]

    def test_different_names_that_reduce_alike_get_different_prefixes(self, pg_server: Server) -> None:
        """Two names that reduce to the same safe characters (``a/b``, ``a_b``) never share a dump prefix."""
        assert archive_prefix(pg_server.settings("a/b")) != archive_prefix(pg_server.settings("a_b"))


@pytest.fixture(scope="module")
def second_server() -> Iterator[Server]:
    """A second throwaway cluster on its own port (a shard or DR server of the same database names)."""
    cluster = start_throwaway_cluster()
    try:
        yield Server(host=cluster.host, port=cluster.port, user="postgres", password="", admin_db="postgres")
    finally:
        cluster.destroy()


class TestRetentionPerServer:
    def test_same_named_databases_on_two_servers_do_not_prune_each_other(
        self, pg_server: Server, second_server: Server, tmp_path: Path
    ) -> None:
        """Retention keys on host, port and name: a dump of db on server B survives keep=1 backups of db on A."""
        assert (pg_server.host, pg_server.port) != (second_server.host, second_server.port)
        name = f"shard_{uuid.uuid4().hex[:8]}"
        first, second = pg_server.settings(name, env=Environment.DEV), second_server.settings(name, env=Environment.DEV)
        for server in (pg_server, second_server):
            server.fresh_database(name)
        try:
            with pg_server.connect() as conn:
                major = conn.info.server_version // 10000
            root = tmp_path / "b"
            b1 = backup(second, server_major=major, root=root, keep=1)
            a1 = backup(first, server_major=major, root=root, keep=1)
            a2 = backup(first, server_major=major, root=root, keep=1)
            b2 = backup(second, server_major=major, root=root, keep=1)
            assert a2.pruned == (a1.path,) and b2.pruned == (b1.path,)
            assert sorted(p.name for p in (root / "dev").iterdir()) == sorted([a2.path.name, b2.path.name])
        finally:
            for server in (pg_server, second_server):
                with server.connect() as conn:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# --- issue 21.1 / 21.13: every tool target is checked like a connection, inside the function -----------------


def _tool_spy(ws: Workspace, tmp_path: Path) -> Path:
    """PRECOG_PG_BINDIR with pg_dump / pg_restore wrappers that log each run; returns the log's path."""
    fake = tmp_path / "spybin"
    fake.mkdir(exist_ok=True)
    log = tmp_path / "tools-ran.log"
    real = find_tool("pg_dump", server_major(ws))
    for name in ("pg_dump", "pg_restore"):
        script = fake / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexec {real.with_name(name)} "$@"\n')
        script.chmod(0o755)
    ws.monkeypatch.setenv("PRECOG_PG_BINDIR", str(fake))
    return log


def _dead_port() -> int:
    """A loopback port nothing listens on (the "PgBouncer" of settings whose work must go to DB_DIRECT_HOST)."""
    from precog_db.local.cluster import free_port

    return free_port()


def _as_dev(ws: Workspace, settings: DatabaseSettings, *, pooler: bool) -> DatabaseSettings:
    """``settings``' database seen through dev settings; with ``pooler``, behind a transaction pooler that is down."""
    dev = settings.replace(env="dev")
    if pooler:
        dev = dev.replace(
            host="127.0.0.1",
            port=_dead_port(),
            pooler="transaction",
            direct_host=ws.server.host,
            direct_port=ws.server.port,
        )
    return dev


ENTRY_POINTS = ["backup", "backup_database", "restore", "restore_database", "tool_connection_args"]


class TestToolTargetsCheckTheStamp:
    """21.1: a dev-settings object pointing at a prod-stamped database never reaches pg_dump / pg_restore."""

    @pytest.mark.parametrize("pooler", [False, True], ids=["direct", "behind-pooler"])
    @pytest.mark.parametrize("entry", ENTRY_POINTS)
    def test_dev_settings_on_a_prod_stamped_database_are_refused_before_any_tool_runs(
        self, ws: Workspace, tmp_path: Path, entry: str, pooler: bool
    ) -> None:
        """Each public primitive and workflow refuses with the stamp error; no tool ran, no file, prod untouched."""
        ws.add("dev")
        fill(ws, "dev", rows=1)
        archive = backup(ws.databases["dev"], server_major=server_major(ws), root=tmp_path / "archives")
        prod = ws.add("prod", dbname=f"ledger_{uuid.uuid4().hex[:8]}")  # a neutral name: the naming rule passes
        fill(ws, "prod", rows=4)
        dev = _as_dev(ws, prod, pooler=pooler)
        spy = _tool_spy(ws, tmp_path)
        root = tmp_path / "backups"
        major = server_major(ws)
        calls: dict[str, Callable[[], object]] = {
            "backup": lambda: backup(dev, server_major=major, root=root),
            "backup_database": lambda: backup_database(dev, server_major=major, purpose="test", root=root),
            "restore": lambda: restore(dev, archive.path, server_major=major),
            "restore_database": lambda: restore_database(dev, archive.path, yes=True),
            "tool_connection_args": lambda: tool_connection_args(dev),
        }
        with pytest.raises(EnvironmentMismatchError, match="is stamped prod") as refused:
            calls[entry]()
        if pooler:  # 21.13: the error names the server the work went to, not the PgBouncer
            assert f"{ws.server.host}:{ws.server.port}" in str(refused.value)
            assert "PgBouncer" not in str(refused.value) and str(dev.port) not in str(refused.value)
        assert not spy.exists(), spy.read_text()
        assert not root.exists()
        assert ws.query("prod", "SELECT count(*) FROM markets") == [(4,)]
        with ws.monkeypatch.context() as m:
            m.setenv("PRECOG_PROD_CONFIRMED", "yes")
            stamp = read_stamp(prod)
        assert stamp is not None and stamp.env is Environment.PROD and not stamp.is_copy

    def test_restore_into_a_staging_stamped_database_keeps_its_stamp(self, ws: Workspace, tmp_path: Path) -> None:
        """A prod archive restored through dev settings onto a staging-stamped database: refused, stamp kept."""
        ws.add("prod")
        fill(ws, "prod", rows=2)
        ws.monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        archive = backup(ws.databases["prod"], server_major=server_major(ws), root=tmp_path / "archives")
        ws.monkeypatch.delenv("PRECOG_PROD_CONFIRMED")
        staging = ws.add("staging", dbname=f"orders_{uuid.uuid4().hex[:8]}")
        dev = staging.replace(env="dev")
        spy = _tool_spy(ws, tmp_path)
        for attempt in (
            lambda: restore(dev, archive.path, server_major=server_major(ws)),
            lambda: restore_database(dev, archive.path, yes=True),
        ):
            with pytest.raises(EnvironmentMismatchError, match="is stamped staging"):
                attempt()
        assert not spy.exists()
        assert not ws.has_table("staging", "markets")
        stamp = read_stamp(staging)
        assert stamp is not None and stamp.env is Environment.STAGING and not stamp.is_copy

    def test_the_tools_go_to_the_server_whose_stamp_was_checked(self, ws: Workspace, pg_server: Server) -> None:
        """The conninfo pins the checked server: its host, port and (for TCP) the address it resolved to."""
        dev = ws.add("dev")
        args, _ = tool_connection_args(
            dev.replace(host=f"localhost,{pg_server.host}", port=f"{_dead_port()},{pg_server.port}")
        )
        params = conninfo_to_dict(args[0].removeprefix("--dbname="))
        assert (params["host"], params["port"]) == (pg_server.host, str(pg_server.port))
        assert params.get("hostaddr") == "127.0.0.1"


class TestDirectAddressIsNamed:
    """21.13: behind a transaction pooler the work goes to DB_DIRECT_HOST, and that is what names it."""

    def test_archive_name_and_pruning_use_the_direct_address(self, ws: Workspace, tmp_path: Path) -> None:
        """The dump of a database behind a pooler is named by the server it was taken from."""
        dev = ws.add("dev")
        behind = _as_dev(ws, dev, pooler=True)
        made = backup(behind, server_major=server_major(ws), root=tmp_path / "b", keep=1)
        direct = dev.replace(host=ws.server.host, port=ws.server.port)
        assert made.path.name.startswith(archive_prefix(direct)), made.path.name
        assert f"@{_label_host(ws.server.host)}-{ws.server.port}-" in made.path.name
        again = backup(behind, server_major=server_major(ws), root=tmp_path / "b", keep=1)
        assert again.pruned == (made.path,)

    def test_behind_a_real_pgbouncer(self, ws: Workspace, tmp_path: Path) -> None:
        """Through Debian's PgBouncer: a prod-stamped target is refused naming the server; a dump is named by it."""
        from tests._helpers.topology import pgbouncer

        dev = ws.add("dev")
        prod = ws.add("prod", dbname=f"ledger_{uuid.uuid4().hex[:8]}")
        with pgbouncer(ws.server, pool_mode="transaction") as port:
            where = {"host": "127.0.0.1", "port": port, "pooler": "transaction"}
            direct = {"direct_host": ws.server.host, "direct_port": ws.server.port}
            with pytest.raises(EnvironmentMismatchError, match="is stamped prod") as refused:
                backup(prod.replace(env="dev", **where, **direct), server_major=server_major(ws), root=tmp_path / "b")
            assert f"{ws.server.host}:{ws.server.port}" in str(refused.value)
            assert "PgBouncer" not in str(refused.value) and not (tmp_path / "b").exists()
            made = backup(dev.replace(**where, **direct), server_major=server_major(ws), root=tmp_path / "b")
        assert made.path.name.startswith(archive_prefix(dev)) and f"-{port}-" not in made.path.name

    def test_stamp_errors_name_the_direct_address(self, ws: Workspace) -> None:
        """stamp_database / read_stamp behind a pooler describe the server they wrote to or read."""
        from precog_db.stamp import stamp_database

        prod = ws.add("prod", dbname=f"ledger_{uuid.uuid4().hex[:8]}")
        dev = _as_dev(ws, prod, pooler=True)
        with pytest.raises(EnvironmentMismatchError) as refused:
            stamp_database("dev", settings=dev)
        text = str(refused.value)
        assert f"{ws.server.host}:{ws.server.port}" in text and "PgBouncer" not in text, text
        with ws.server.connect(prod.dbname) as conn:
            conn.execute("REVOKE ALL ON SCHEMA precog_meta FROM PUBLIC")
            conn.execute("DROP ROLE IF EXISTS stamp_reader_21")
            conn.execute("CREATE ROLE stamp_reader_21 LOGIN")
        try:
            with pytest.raises(StampError) as unreadable:
                read_stamp(dev.replace(user="stamp_reader_21", password=""))
        finally:
            ws.drop_all()
            with ws.server.connect() as conn:
                conn.execute("DROP ROLE IF EXISTS stamp_reader_21")
        text = str(unreadable.value)
        assert f"{ws.server.host}:{ws.server.port}" in text and "PgBouncer" not in text, text


def _label_host(host: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", host)


# --- issue 21 follow-ups (the adversarial pass on the fixes) -----------------------------------------------


def _restore_hook(ws: Workspace, tmp_path: Path, after_clean: str) -> None:
    """PRECOG_PG_BINDIR whose pg_restore runs the real one, then (after a successful --clean) ``after_clean``."""
    fake = tmp_path / "hookbin"
    fake.mkdir(exist_ok=True)
    real = find_tool("pg_restore", server_major(ws))
    script = fake / "pg_restore"
    script.write_text(
        f'#!/bin/sh\n"{real}" "$@"; rc=$?\n'
        f'case "$*" in *--clean*) if [ $rc = 0 ]; then {after_clean}; fi;; esac\nexit $rc\n'
    )
    script.chmod(0o755)
    ws.monkeypatch.setenv("PRECOG_PG_BINDIR", str(fake))


class TestRestampStaysOnThePinnedServer:
    """21.1b: the re-stamp after pg_restore goes to the server the restore was pinned to, and nowhere else."""

    def test_a_failover_after_pg_restore_never_restamps_the_next_hosts_staging_database(
        self, ws: Workspace, second_server: Server, tmp_path: Path
    ) -> None:
        """DB_HOST lists A (through a proxy) then B; A goes away right after pg_restore: B's staging stamp stays."""
        import threading
        import time

        from precog_db.stamp import stamp_database
        from tests._helpers.fault_proxy import fault_proxy

        name = f"shop_{uuid.uuid4().hex[:8]}"
        on_a = ws.server.settings(name, env=Environment.DEV)
        on_b = second_server.settings(name, env=Environment.STAGING)
        for server, settings in ((ws.server, on_a), (second_server, on_b)):
            server.fresh_database(name)
            stamp_database(settings.env, settings=settings)
        archive = backup(on_a, server_major=server_major(ws), root=tmp_path / "archives")
        flag, ack = tmp_path / "restored", tmp_path / "failed-over"
        wait_for_ack = f'i=0; while [ ! -e "{ack}" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done'
        _restore_hook(ws, tmp_path, f'touch "{flag}"; {wait_for_ack}')
        try:
            with fault_proxy(ws.server.host, ws.server.port) as proxy:

                def fail_over() -> None:  # bounded: 20 s at most
                    deadline = time.monotonic() + 20
                    while not flag.exists() and time.monotonic() < deadline:
                        time.sleep(0.02)
                    proxy.stop_accepting()
                    ack.touch()

                watcher = threading.Thread(target=fail_over, daemon=True)
                watcher.start()
                multi = on_a.replace(host="127.0.0.1,127.0.0.1", port=f"{proxy.port},{second_server.port}")
                with pytest.raises(DatabaseUnavailableError, match=f"127.0.0.1:{proxy.port}"):
                    restore_database(multi, archive.path, yes=True)
                watcher.join(timeout=30)
                assert flag.exists() and ack.exists()
            stamp = read_stamp(on_b)
            assert stamp is not None and stamp.env is Environment.STAGING and not stamp.is_copy
            entry = ws.audit_entries()[-1]
            assert (entry["operation"], entry["outcome"], entry.get("restamped")) == ("restore", "failed", None)
        finally:
            for server in (ws.server, second_server):
                with server.connect() as conn:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def test_a_staging_stamp_the_archive_did_not_bring_is_never_overwritten(
        self, ws: Workspace, tmp_path: Path
    ) -> None:
        """A stamp that says staging after pg_restore, but is not the archive's own, is refused and kept."""
        dev = ws.add("dev")
        fill(ws, "dev", rows=2)
        archive = backup(dev, server_major=server_major(ws), root=tmp_path / "archives")
        psql = find_tool("pg_restore", server_major(ws)).with_name("psql")
        update = "UPDATE precog_meta.stamp SET env = 'staging'"
        password = f"PGPASSWORD='{ws.server.password}' " if ws.server.password else ""
        _restore_hook(ws, tmp_path, f'{password}"{psql}" -X -q -d "{ws.server.conninfo(dev.dbname)}" -c "{update}"')
        with pytest.raises(EnvironmentMismatchError, match="not the stamp the archive brought in"):
            restore_database(dev, archive.path, yes=True)
        assert ws.query("dev", "SELECT env FROM precog_meta.stamp") == [("staging",)]
        entry = ws.audit_entries()[-1]
        assert (entry["operation"], entry["outcome"], entry.get("restamped")) == ("restore", "refused", None)

    def test_the_restamp_connection_uses_the_pinned_address(self, ws: Workspace, pg_server: Server) -> None:
        """A prod archive restored through a list whose first host is dead: restored and re-stamped on the live one."""
        ws.add("prod")
        dev = ws.add("dev")
        fill(ws, "prod", rows=3)
        ws.monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        made = backup(ws.databases["prod"], server_major=server_major(ws), root=ws.root / "b")
        ws.monkeypatch.delenv("PRECOG_PROD_CONFIRMED")
        multi = dev.replace(host=f"127.0.0.1,{pg_server.host}", port=f"{_dead_port()},{pg_server.port}")
        done = restore_database(multi, made.path, yes=True)
        assert done.restamped == "prod -> dev"
        stamp = read_stamp(dev)
        assert stamp is not None and stamp.env is Environment.DEV and not stamp.is_copy


class TestFollowUps:
    def test_refused_prod_backup_is_audited_without_a_confirmation(self, ws: Workspace, tmp_path: Path) -> None:
        """21.1c: a prod backup refused for lack of PRECOG_PROD_CONFIRMED records no confirmation."""
        from precog_db.errors import ProductionAccessError

        prod = ws.add("prod", dbname=f"ledger_{uuid.uuid4().hex[:8]}")
        ws.monkeypatch.delenv("PRECOG_PROD_CONFIRMED", raising=False)
        with pytest.raises(ProductionAccessError):
            backup_database(prod, server_major=server_major(ws), purpose="test", root=tmp_path / "b")
        entry = ws.audit_entries()[-1]
        assert (entry["operation"], entry["outcome"], entry["confirmation"]) == ("backup", "refused", "none")
        ws.monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        backup_database(prod, server_major=server_major(ws), purpose="test", root=tmp_path / "b")
        entry = ws.audit_entries()[-1]
        assert (entry["outcome"], entry["confirmation"]) == ("ok", "PRECOG_PROD_CONFIRMED=yes")

    def test_restore_takes_the_archive_path_as_text(self, ws: Workspace, tmp_path: Path) -> None:
        """21.1d: restore / restore_database accept a str path (and os.PathLike), like backup(root=...)."""
        dev = ws.add("dev")
        fill(ws, "dev", rows=2)
        made = backup(dev, server_major=server_major(ws), root=str(tmp_path / "b"))  # type: ignore[arg-type]
        fill(ws, "dev", rows=5)
        assert restore(dev, str(made.path), server_major=server_major(ws)) > 0
        assert ws.query("dev", "SELECT count(*) FROM markets") == [(2,)]
        fill(ws, "dev", rows=5)
        done = restore_database(dev, str(made.path), yes=True)
        assert done.path == made.path and ws.query("dev", "SELECT count(*) FROM markets") == [(2,)]
        with pytest.raises(ConfigurationError, match="does not exist or is not a file"):
            restore_database(dev, str(tmp_path / "missing.dump"), yes=True)
        assert "AttributeError" not in ws.audit_entries()[-1]["error"]

    @pytest.mark.parametrize("name", ["new\nline", " lead", "trail ", "cr\rname"])
    def test_names_an_archive_cannot_carry_are_refused_before_pg_dump(
        self, ws: Workspace, tmp_path: Path, name: str
    ) -> None:
        """21.1e: a name with a line break or an outer blank is refused up front with a sentence; no tool ran."""
        settings = ws.server.settings(name, env=Environment.DEV)
        ws.server.fresh_database(name)
        try:
            spy = _tool_spy(ws, tmp_path)
            with pytest.raises(ConfigurationError, match="line break or a blank at the start or end"):
                backup(settings, server_major=server_major(ws), root=tmp_path / "b")
            assert not spy.exists() and not (tmp_path / "b").exists()
        finally:
            with ws.server.connect() as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
