"""Secrets never reach the audit log or a rendered traceback: argv is parsed, not pattern-matched.

The audit-log tests write real entries through `audit.record` and read the
file back; the traceback tests render exceptions the way loggers do (the
standard library with ``capture_locals`` and structlog's dict tracebacks).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import structlog

from precog_db import audit
from precog_db.errors import ConfigurationError, EnvironmentMismatchError
from precog_db.settings import load_settings

#: Module constants, so no test frame holds a secret as a local of its own.
PW = "Zq9-audit-SENTINEL"
PW_PCT = "p%40ss%2Fw0rd"  # "p@ss/w0rd" percent-encoded
PW_DECODED = "p@ss/w0rd"


def _logged_argv(tmp_path: Path, *argv: str) -> tuple[str, list[str]]:
    """Write one audit entry with ``argv``; return the file's text and the argv it recorded."""
    audit.record("stamp", outcome="refused", argv=["precog-db", *argv])
    text = (tmp_path / "logs" / "audit.log").read_text(encoding="utf-8")
    return text, json.loads(text.splitlines()[-1])["argv"]


class TestArgvInTheAuditLog:
    def test_url_with_empty_user_name_is_masked(self, tmp_path: Path) -> None:
        """The reported leak: ``--database postgresql://:PW@host/db_prod`` (no user name) keeps no password."""
        text, argv = _logged_argv(
            tmp_path, "--env", "staging", "--database", f"postgresql://:{PW}@host/db_prod", "stamp"
        )
        assert PW not in text
        assert argv == ["precog-db", "--env", "staging", "--database", "postgresql://:***@host/db_prod", "stamp"]

    def test_backslash_escaped_space_in_conninfo_is_masked_whole(self, tmp_path: Path) -> None:
        """The reported leak: ``password=ab\\ cd`` is one value to libpq, so no part of it is logged."""
        text, argv = _logged_argv(tmp_path, "--database", f"host=h password=ab\\ {PW} dbname=x")
        assert PW not in text
        assert argv[-1] == "host=h password=*** dbname=x"

    @pytest.mark.parametrize(
        ("given", "logged"),
        [
            (f"postgresql://u:{PW}@h:5432/db", "postgresql://u:***@h:5432/db"),
            (f"postgres://u:{PW}@h/db", "postgres://u:***@h/db"),
            (f"postgresql://u:{PW_PCT}@h/db", "postgresql://u:***@h/db"),
            (f"postgresql://u:{PW}@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
            (f"postgresql://u:{PW}@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
            (f"postgresql://h/db?sslmode=require&password={PW}", "postgresql://h/db?sslmode=require&password=***"),
            (f"postgresql://h/db?pass%77ord={PW}", "postgresql://h/db?pass%77ord=***"),
            (f"postgresql://u@h/db?sslpassword={PW}", "postgresql://u@h/db?sslpassword=***"),
            ("postgresql://u@h/db", "postgresql://u@h/db"),
            (f"host=h port=5432 password='{PW} x' dbname=db", "host=h port=5432 password=*** dbname=db"),
            (f"password={PW}", "password=***"),
            (f"PGPASSWORD={PW}", "PGPASSWORD=***"),
            (f"DB_PASSWORD={PW}", "DB_PASSWORD=***"),
        ],
    )
    def test_connection_strings_are_parsed_and_re_emitted_masked(self, tmp_path: Path, given: str, logged: str) -> None:
        """URLs (either scheme, with or without user, percent-encoded, IPv6, query password), key=value, PGPASSWORD=."""
        text, argv = _logged_argv(tmp_path, "--database", given)
        assert PW not in text and PW_PCT not in text and PW_DECODED not in text
        assert argv[-1] == logged

    def test_joined_option_form_is_masked(self, tmp_path: Path) -> None:
        """``--database=<url>`` and ``--database=<conninfo>`` are scrubbed as their value."""
        text, argv = _logged_argv(
            tmp_path, f"--database=postgresql://:{PW}@h/db", f"--database=host=h password={PW}", f"--data=password={PW}"
        )
        assert PW not in text
        assert argv[1:] == [
            "--database=postgresql://:***@h/db",
            "--database=host=h password=***",
            "--data=password=***",
        ]

    @pytest.mark.parametrize(
        "given",
        [
            f"postgresql://u:{PW}?x@h/db",  # libpq's password runs to the '@'; urllib's stops at '?'
            f"postgresql://u:{PW}#x@h/db",
            f"postgresql://u:{PW}/x@h/db",
            f"postgresql://u:{PW} x@h/db",  # libpq rejects the space
            f"postgresql://u:{PW}@[::1/db",  # unbalanced IPv6 bracket
            f"POSTGRESQL://u:{PW}@h/db",  # libpq's prefix is case-sensitive: not a URL to it
            f"postgresql://h/db?PASSWORD={PW}",  # an unknown parameter: libpq refuses the string
            f"host=h password='{PW} x",  # unterminated quote
            f"host=h bogus=1 password={PW}",  # unknown keyword
        ],
    )
    def test_what_does_not_parse_is_masked_wholesale(self, tmp_path: Path, given: str) -> None:
        """A connection string libpq or urllib cannot read (or reads differently) is replaced whole."""
        text, argv = _logged_argv(tmp_path, "--database", given)
        assert PW not in text
        # What libpq refuses depends on its version (psycopg-binary bundles its own): an older libpq
        # reads the space case as a password ending at '@', and it is then masked as parsed.
        assert argv[-1] in ("***", "postgresql://***", "POSTGRESQL://***", "postgresql://u:***@h/db")

    def test_other_arguments_are_kept_and_masking_is_stable(self, tmp_path: Path) -> None:
        """Plain arguments are untouched, and an already-masked argv is logged unchanged."""
        from precog_db._secrets import scrub_argv

        plain = ["--env", "prod", "migrate", "up", "--confirm-database", "precog_prod", "-o", "addopts=-x"]
        assert scrub_argv(plain) == plain
        once = scrub_argv([f"postgresql://u:{PW}@h/db", f"host=h password={PW}", f"postgresql://u:{PW}?x@h/db"])
        assert scrub_argv(once) == once
        _, argv = _logged_argv(tmp_path, *once)
        assert argv[1:] == once

    def test_argv_from_sys_argv_is_scrubbed_for_library_callers(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An entry written by the library (no argv given) records a scrubbed sys.argv."""
        monkeypatch.setattr("sys.argv", ["service.py", f"--dsn=postgresql://:{PW}@h/db"])
        audit.record("pool open", outcome="ok")
        text = (tmp_path / "logs" / "audit.log").read_text(encoding="utf-8")
        assert PW not in text
        assert json.loads(text)["argv"] == ["service.py", "--dsn=postgresql://:***@h/db"]


class TestFreeText:
    def test_known_secret_urls_and_pairs_are_masked(self) -> None:
        """Error text loses the settings' password, URL passwords (empty user too) and escaped key=value values."""
        from precog_db._secrets import scrub_text

        text = f"failed for postgresql://:{PW}@h/db with password=ab\\ {PW} and {PW}"
        scrubbed = scrub_text(text, [PW])
        assert PW not in scrubbed
        assert scrub_text(f"postgresql://:{PW}@h/db failed") == "postgresql://:***@h/db failed"
        assert scrub_text(f"bad password=ab\\ {PW} here") == "bad password=*** here"

    def test_every_libpq_secret_parameter_is_masked(self) -> None:
        """sslpassword, oauth_client_secret and the SCRAM keys are masked in free text and in parsed strings."""
        from precog_db._secrets import scrub_argv, scrub_text

        text = f"x sslpassword='{PW} y' oauth_client_secret={PW} scram_client_key={PW} pwd=a\\ {PW}"
        assert PW not in scrub_text(text)
        # oauth_client_secret is a keyword from libpq 18 on: an older libpq refuses the string, which is
        # then masked whole; either way no secret remains.
        assert scrub_argv([f"host=h oauth_client_secret={PW} sslpassword={PW}"]) in (
            ["host=h oauth_client_secret=*** sslpassword=***"],
            ["***"],
        )
        assert scrub_argv([f"host=h sslpassword={PW}"]) == ["host=h sslpassword=***"]

    def test_current_os_user_is_still_importable_from_guard(self) -> None:
        """`current_os_user` moved to _secrets; `precog_db.guard` re-exports the same function."""
        from precog_db._secrets import current_os_user
        from precog_db.guard import current_os_user as from_guard

        assert from_guard is current_os_user
        assert current_os_user()


def _rendered(exc: BaseException) -> str:
    """The exception as loggers render it with frame locals: stdlib capture_locals and structlog dict tracebacks."""
    stdlib = "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())
    transformer = structlog.tracebacks.ExceptionDictTransformer(show_locals=True)
    as_dict = json.dumps(transformer((type(exc), exc, exc.__traceback__)), default=repr)
    return stdlib + as_dict


class TestReplaceKeepsRawValuesOutOfTracebacks:
    def test_secret_given_as_a_bad_port(self) -> None:
        """``replace(port=<a password pasted into the wrong field>)`` fails without the value in any frame's locals."""
        base = load_settings("dev", environ={})
        with pytest.raises(ConfigurationError, match="DB_PORT") as caught:
            base.replace(port=PW)
        assert PW not in _rendered(caught.value)

    def test_password_with_a_bad_other_field(self) -> None:
        """``replace(password=..., port=<bad>)`` fails without the password in the rendering."""
        base = load_settings("dev", environ={})
        with pytest.raises(ConfigurationError, match="DB_PORT") as caught:
            base.replace(password=PW, port="not-a-port")
        assert PW not in _rendered(caught.value)

    def test_password_with_values_that_fail_together(self) -> None:
        """``replace(password=..., pool_min=<above pool_max>)`` fails in validation without the password shown."""
        base = load_settings("dev", environ={})
        with pytest.raises(ConfigurationError, match="DB_POOL_MIN_CONN") as caught:
            base.replace(password=PW, pool_min=999)
        assert PW not in _rendered(caught.value)

    def test_valid_replace_still_works(self) -> None:
        """A valid replace returns the new settings with the password kept and masked in repr."""
        changed = load_settings("dev", environ={}).replace(password=PW, port="6543")
        assert (changed.port, changed.password) == (6543, PW)
        assert PW not in repr(changed)

    def test_load_settings_secret_given_as_a_bad_port(self) -> None:
        """``load_settings(port=<a password pasted into the wrong field>)`` fails without the value in the rendering."""
        with pytest.raises(ConfigurationError, match="DB_PORT") as caught:
            load_settings("dev", environ={}, port=PW)
        assert PW not in _rendered(caught.value)

    def test_replace_to_another_environments_name_keeps_the_password_out(self) -> None:
        """A naming-rule refusal raised from ``replace`` does not carry the password given with it."""
        base = load_settings("dev", environ={})
        with pytest.raises(EnvironmentMismatchError) as caught:
            base.replace(password=PW, dbname="x_prod_y")
        assert PW not in _rendered(caught.value)
