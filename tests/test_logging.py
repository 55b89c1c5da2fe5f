"""Logging: secrets are masked, and the library never configures structlog on import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import structlog

from precog_db import configure_logging
from precog_db.log import mask_secrets, redact

SECRET = "Sentinel-pw-31337"


class TestMasking:
    @pytest.mark.parametrize(
        "text",
        [
            f"host=db port=5432 password={SECRET} dbname=x",
            f"host=db password='{SECRET}' dbname=x",
            f"postgresql://precog:{SECRET}@db:5432/precog_prod",
            f"PASSWORD = {SECRET}",
        ],
    )
    def test_redact_connection_strings(self, text: str) -> None:
        """Passwords inside conninfo strings and URLs are masked."""
        assert SECRET not in redact(text)

    def test_processor_masks_keys_and_nested_values(self) -> None:
        """Secret-looking keys are masked, nested dicts and lists too; other values stay."""
        event = {
            "event": "x",
            "password": SECRET,
            "api_token": SECRET,
            "db_secret": SECRET,
            "nested": {"Password": SECRET, "dsn": f"password={SECRET}"},
            "items": [f"postgres://user:{SECRET}@h/db", "plain"],
            "host": "db1",
        }
        out = mask_secrets(None, "info", event)
        assert SECRET not in repr(out)
        assert out["host"] == "db1" and out["items"][1] == "plain"


class TestConfigureLogging:
    def test_json_output_is_masked(self, capsys: pytest.CaptureFixture[str]) -> None:
        """configure_logging(json=True) writes JSON lines with secrets masked."""
        try:
            configure_logging(json=True)
            structlog.get_logger("precog_db").warning("connecting", dsn=f"host=x password={SECRET}", password=SECRET)
            err = capsys.readouterr().err.strip().splitlines()[-1]
            record = json.loads(err)
            assert record["event"] == "connecting" and record["level"] == "warning"
            assert SECRET not in err
        finally:
            structlog.reset_defaults()

    def test_bad_level_is_a_clear_error(self) -> None:
        """An unknown level name raises ValueError naming the valid ones."""
        with pytest.raises(ValueError, match="debug, info"):
            configure_logging(level="loud")

    def test_import_does_not_configure_structlog(self) -> None:
        """Importing precog_db leaves structlog unconfigured: the application owns logging."""
        code = "import structlog, precog_db; print(structlog.is_configured())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "False"
