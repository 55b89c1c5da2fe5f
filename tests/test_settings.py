"""Settings loading: defaults, precedence, files, validation and refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from precog_db import ConfigurationError, DatabaseSettings, Environment, EnvironmentMismatchError, load_settings

SECRET = "s3cr3t-Sentinel-9f2"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


class TestDefaults:
    @pytest.mark.parametrize(
        ("env", "pool"),
        [("dev", (2, 10)), ("test", (2, 25)), ("staging", (5, 25)), ("prod", (10, 50))],
    )
    def test_per_environment(self, env: str, pool: tuple[int, int], tmp_path: Path) -> None:
        """Each environment has its database name, host, port and pool sizes."""
        s = load_settings(env, config_dir=tmp_path, environ={})
        assert s.env == env
        assert (s.dbname, s.host, s.port) == (f"precog_{env}", "localhost", 5432)
        assert (s.pool_min, s.pool_max) == pool
        assert s.application_name == f"precog-{env}"

    def test_prod_requires_ssl_by_default(self, tmp_path: Path) -> None:
        """Production defaults to sslmode=require; others to prefer."""
        assert load_settings("prod", config_dir=tmp_path, environ={}).sslmode == "require"
        assert load_settings("dev", config_dir=tmp_path, environ={}).sslmode == "prefer"

    def test_settings_are_frozen(self, tmp_path: Path) -> None:
        """DatabaseSettings cannot be modified in place."""
        s = load_settings("dev", config_dir=tmp_path, environ={})
        with pytest.raises(AttributeError):
            s.port = 1  # type: ignore[misc]


class TestPrecedence:
    def test_full_chain(self, tmp_path: Path) -> None:
        """override > process env > .env.<env> > .env > defaults, field by field."""
        write(tmp_path / ".env", "DB_HOST=from-dotenv\nDB_PORT=1111\nDB_USER=u_dotenv\nDB_SSLMODE=disable\n")
        write(tmp_path / ".env.dev", "DB_PORT=2222\nDB_USER=u_envfile\nDB_POOL_MAX_CONN=7\n")
        environ = {"DB_USER": "u_process", "DB_POOL_MAX_CONN": "8"}
        s = load_settings("dev", config_dir=tmp_path, environ=environ, pool_max=9)
        assert s.host == "from-dotenv"
        assert s.sslmode == "disable"
        assert s.port == 2222
        assert s.user == "u_process"
        assert s.pool_max == 9
        assert s.dbname == "precog_dev"
        assert s.files == (tmp_path / ".env", tmp_path / ".env.dev")
        assert s.origins["host"] == str(tmp_path / ".env")
        assert s.origins["port"] == str(tmp_path / ".env.dev")
        assert s.origins["user"] == "environment"
        assert s.origins["pool_max"] == "argument"
        assert s.origins["dbname"] == "default"

    def test_only_the_resolved_environments_file_is_read(self, tmp_path: Path) -> None:
        """`.env.test` is ignored when the environment is dev."""
        write(tmp_path / ".env.test", "DB_PORT=3333\n")
        assert load_settings("dev", config_dir=tmp_path, environ={}).port == 5432

    def test_config_dir_from_variable_then_cwd(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """config_dir argument, else PRECOG_CONFIG_DIR, else ./config."""
        write(tmp_path / "config" / ".env", "DB_PORT=4001\n")
        write(tmp_path / "other" / ".env", "DB_PORT=4002\n")
        write(tmp_path / "third" / ".env", "DB_PORT=4003\n")
        monkeypatch.chdir(tmp_path)
        assert load_settings("dev", environ={}).port == 4001
        assert load_settings("dev", environ={"PRECOG_CONFIG_DIR": str(tmp_path / "other")}).port == 4002
        assert load_settings("dev", config_dir=tmp_path / "third", environ={"PRECOG_CONFIG_DIR": "x"}).port == 4003

    def test_os_environ_is_not_mutated(self, tmp_path: Path) -> None:
        """Loading files never writes to os.environ."""
        write(tmp_path / ".env", "DB_HOST=h\nSOMETHING_ELSE=1\n")
        before = dict(os.environ)
        load_settings("dev", config_dir=tmp_path)
        assert dict(os.environ) == before

    def test_environment_resolved_from_process(self, tmp_path: Path) -> None:
        """With no argument, PRECOG_ENV picks the environment and its file."""
        write(tmp_path / ".env.staging", "DB_PORT=5555\n")
        s = load_settings(config_dir=tmp_path, environ={"PRECOG_ENV": "staging"})
        assert (s.env, s.port) == (Environment.STAGING, 5555)


class TestSecrets:
    def test_repr_and_str_hide_password(self, tmp_path: Path) -> None:
        """The password is in neither repr nor str."""
        s = load_settings("dev", config_dir=tmp_path, environ={}, password=SECRET)
        assert s.password == SECRET
        assert SECRET not in repr(s) and SECRET not in str(s)

    def test_errors_never_echo_values(self, tmp_path: Path) -> None:
        """A bad value is not repeated in the error message."""
        write(tmp_path / ".env", f"DB_PORT={SECRET}\n")
        with pytest.raises(ConfigurationError) as info:
            load_settings("dev", config_dir=tmp_path, environ={})
        assert SECRET not in str(info.value)
        assert "DB_PORT" in str(info.value) and str(tmp_path / ".env") in str(info.value)


class TestValidation:
    @pytest.mark.parametrize("port", ["0", "65536", "-1", "http", "54.3", "9" * 5000])
    def test_bad_port(self, port: str, tmp_path: Path) -> None:
        """A port outside 1..65535 or not a number names DB_PORT."""
        with pytest.raises(ConfigurationError, match="DB_PORT"):
            load_settings("dev", config_dir=tmp_path, environ={"DB_PORT": port})

    @pytest.mark.parametrize("port", ["1", "65535"])
    def test_port_limits_accepted(self, port: str, tmp_path: Path) -> None:
        """Ports 1 and 65535 are valid."""
        assert load_settings("dev", config_dir=tmp_path, environ={"DB_PORT": port}).port == int(port)

    @pytest.mark.parametrize("host", ["db1 db2", "host=db1", "db1,,db2", "db1,db2", "db1\tdb2", "db\x00"])
    def test_bad_direct_host_is_refused_when_settings_load(self, host: str, tmp_path: Path) -> None:
        """21.13b: DB_DIRECT_HOST is one host by the DB_HOST rules, checked at load and named (from env, file, args)."""
        behind = {"DB_POOLER": "transaction", "DB_HOST": "pgbouncer"}
        with pytest.raises(ConfigurationError, match="DB_DIRECT_HOST in the process environment"):
            load_settings("dev", config_dir=tmp_path, environ={**behind, "DB_DIRECT_HOST": host})
        if "\x00" not in host:
            write(tmp_path / ".env.dev", f"DB_DIRECT_HOST={host}\n")
            with pytest.raises(ConfigurationError, match=r"DB_DIRECT_HOST in .*\.env\.dev"):
                load_settings("dev", config_dir=tmp_path, environ=behind)
        with pytest.raises(ConfigurationError, match=r"setting direct_host \(DB_DIRECT_HOST\)"):
            DatabaseSettings(env=Environment.DEV, host="pgbouncer", pooler="transaction", direct_host=host)
        with pytest.raises(ConfigurationError, match="DB_DIRECT_HOST in argument"):
            DatabaseSettings(env=Environment.DEV, host="pgbouncer", pooler="transaction").replace(direct_host=host)

    @pytest.mark.parametrize("port", ["5432,5433", "0", "x"])
    def test_bad_direct_port_is_refused_when_settings_load(self, port: str, tmp_path: Path) -> None:
        """21.13b: DB_DIRECT_PORT is one port, checked at load."""
        with pytest.raises(ConfigurationError, match="DB_DIRECT_PORT"):
            load_settings("dev", config_dir=tmp_path, environ={"DB_DIRECT_HOST": "db1", "DB_DIRECT_PORT": port})

    def test_a_good_direct_host_loads(self, tmp_path: Path) -> None:
        """One host name, an address or a socket directory is accepted; unset stays unset."""
        for host in ("db1.internal", "10.0.0.5", "::1", "/var/run/postgresql"):
            assert load_settings("dev", config_dir=tmp_path, environ={"DB_DIRECT_HOST": host}).direct_host == host
        assert load_settings("dev", config_dir=tmp_path, environ={}).direct_host == ""

    def test_pool_min_above_max(self, tmp_path: Path) -> None:
        """pool_min > pool_max is refused, naming both variables and where they came from."""
        write(tmp_path / ".env.dev", "DB_POOL_MIN_CONN=20\n")
        with pytest.raises(ConfigurationError) as info:
            load_settings("dev", config_dir=tmp_path, environ={"DB_POOL_MAX_CONN": "5"})
        assert "DB_POOL_MIN_CONN" in str(info.value) and "DB_POOL_MAX_CONN" in str(info.value)
        assert ".env.dev" in str(info.value)

    @pytest.mark.parametrize("value", ["0", "-3"])
    def test_pool_max_below_one(self, value: str, tmp_path: Path) -> None:
        """pool_max < 1 is refused."""
        with pytest.raises(ConfigurationError, match="DB_POOL_MAX_CONN"):
            load_settings("dev", config_dir=tmp_path, environ={"DB_POOL_MAX_CONN": value, "DB_POOL_MIN_CONN": "0"})

    def test_malformed_line_names_file_and_line(self, tmp_path: Path) -> None:
        """A line python-dotenv would skip with a warning is an error here."""
        write(tmp_path / ".env", "DB_HOST=ok\nthis is not a setting'\nDB_PORT=5432\n")
        with pytest.raises(ConfigurationError, match=r"\.env line 2"):
            load_settings("dev", config_dir=tmp_path, environ={})

    def test_bom_and_crlf_are_fine(self, tmp_path: Path) -> None:
        """A UTF-8 BOM and CRLF line endings parse normally."""
        (tmp_path / ".env").write_bytes(b"\xef\xbb\xbfDB_HOST=bom-host\r\nDB_PORT=6000\r\n")
        s = load_settings("dev", config_dir=tmp_path, environ={})
        assert (s.host, s.port) == ("bom-host", 6000)

    def test_invalid_utf8(self, tmp_path: Path) -> None:
        """Bytes that are not UTF-8 give an error naming the file and line."""
        (tmp_path / ".env").write_bytes(b"DB_HOST=a\nDB_USER=\xff\xfe\n")
        with pytest.raises(ConfigurationError, match=r"line 2 is not valid UTF-8"):
            load_settings("dev", config_dir=tmp_path, environ={})

    def test_directory_instead_of_file(self, tmp_path: Path) -> None:
        """A directory named .env.dev is reported, not a traceback."""
        (tmp_path / ".env.dev").mkdir()
        with pytest.raises(ConfigurationError, match="is a directory"):
            load_settings("dev", config_dir=tmp_path, environ={})

    def test_missing_explicit_config_dir(self, tmp_path: Path) -> None:
        """An explicitly named config directory must exist."""
        with pytest.raises(ConfigurationError, match="does not exist"):
            load_settings("dev", config_dir=tmp_path / "nope", environ={})

    def test_unknown_override(self, tmp_path: Path) -> None:
        """An unknown keyword override lists the valid names."""
        with pytest.raises(ConfigurationError, match="pool_max"):
            load_settings("dev", config_dir=tmp_path, environ={}, pool_size=3)

    def test_bad_sslmode(self, tmp_path: Path) -> None:
        """sslmode must be one libpq knows."""
        with pytest.raises(ConfigurationError, match="DB_SSLMODE"):
            load_settings("dev", config_dir=tmp_path, environ={"DB_SSLMODE": "maybe"})

    def test_unknown_key_warns_with_suggestion(self, tmp_path: Path) -> None:
        """A misspelt DB_ key in a file is logged with a suggestion."""
        write(tmp_path / ".env", "DB_PASWORD=x\n")
        with capture_logs() as logs:
            load_settings("dev", config_dir=tmp_path, environ={})
        assert [e["did_you_mean"] for e in logs if e["event"] == "unknown_setting"] == ["DB_PASSWORD"]

    def test_direct_construction_is_validated(self) -> None:
        """DatabaseSettings itself refuses invalid values."""
        with pytest.raises(ConfigurationError, match="port"):
            DatabaseSettings(env=Environment.DEV, port=70000)


class TestConsistency:
    def test_stale_db_name_for_another_environment(self, tmp_path: Path) -> None:
        """env test with DB_NAME=precog_dev is refused naming both."""
        with pytest.raises(EnvironmentMismatchError) as info:
            load_settings("test", config_dir=tmp_path, environ={"DB_NAME": "precog_dev"})
        assert isinstance(info.value, RuntimeError)
        assert "test" in str(info.value) and "precog_dev" in str(info.value)

    def test_dev_pointing_at_prod_is_refused(self, tmp_path: Path) -> None:
        """A dev run with a production database name from a file is refused."""
        write(tmp_path / ".env.dev", "DB_NAME=precog_prod\n")
        with pytest.raises(EnvironmentMismatchError, match="precog_prod"):
            load_settings("dev", config_dir=tmp_path, environ={})

    def test_neutral_name_is_accepted(self, tmp_path: Path) -> None:
        """A name that names no environment is allowed anywhere."""
        assert load_settings("staging", config_dir=tmp_path, environ={"DB_NAME": "trading"}).dbname == "trading"


class TestFilePermissions:
    @pytest.mark.parametrize("env", ["staging", "prod"])
    def test_readable_password_file_refused(self, env: str, tmp_path: Path) -> None:
        """A group/other-readable `.env.<env>` holding a password is refused with the chmod fix."""
        path = write(tmp_path / f".env.{env}", f"DB_PASSWORD={SECRET}\nDB_SSLMODE=require\n", mode=0o644)
        with pytest.raises(ConfigurationError) as info:
            load_settings(env, config_dir=tmp_path, environ={})
        assert f"chmod 600 {path}" in str(info.value)
        assert SECRET not in str(info.value)

    def test_private_password_file_accepted(self, tmp_path: Path) -> None:
        """The same file with mode 600 loads."""
        write(tmp_path / ".env.prod", f"DB_PASSWORD={SECRET}\n", mode=0o600)
        assert load_settings("prod", config_dir=tmp_path, environ={}).password == SECRET

    def test_readable_file_without_password_accepted(self, tmp_path: Path) -> None:
        """Without a password, a readable staging file is fine."""
        write(tmp_path / ".env.staging", "DB_HOST=stage-db\n", mode=0o644)
        assert load_settings("staging", config_dir=tmp_path, environ={}).host == "stage-db"


class TestProductionSsl:
    def test_weak_sslmode_in_prod_is_logged(self, tmp_path: Path) -> None:
        """An explicit weaker sslmode in prod is allowed but logged as a warning."""
        with capture_logs() as logs:
            s = load_settings("prod", config_dir=tmp_path, environ={"DB_SSLMODE": "disable"})
        assert s.sslmode == "disable"
        warnings = [e for e in logs if e["event"] == "weak_sslmode_in_production"]
        assert warnings and warnings[0]["log_level"] == "warning" and warnings[0]["source"] == "environment"
