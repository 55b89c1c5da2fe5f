"""Environment resolution, inference and require_environment."""

from __future__ import annotations

import pytest

from precog_db import ConfigurationError, Environment, EnvironmentNotAllowedError, get_environment, require_environment
from precog_db.environment import environment_named_by, infer_environment


class TestGetEnvironment:
    def test_explicit_wins_over_everything(self) -> None:
        """An explicit argument beats PRECOG_ENV and DB_NAME."""
        env = {"PRECOG_ENV": "prod", "DB_NAME": "precog_staging"}
        assert get_environment("test", environ=env) is Environment.TEST

    def test_precog_env_wins_over_db_name(self) -> None:
        """PRECOG_ENV beats inference from DB_NAME."""
        assert get_environment(environ={"PRECOG_ENV": "staging", "DB_NAME": "x_prod"}) is Environment.STAGING

    def test_inferred_from_db_name(self) -> None:
        """Without PRECOG_ENV the environment is inferred from DB_NAME."""
        assert get_environment(environ={"DB_NAME": "precog_test"}) is Environment.TEST

    def test_default_is_dev(self) -> None:
        """With nothing set the environment is dev."""
        assert get_environment(environ={}) is Environment.DEV

    def test_blank_values_are_ignored(self) -> None:
        """Blank PRECOG_ENV and explicit values fall through to the next rule."""
        assert get_environment("  ", environ={"PRECOG_ENV": " ", "DB_NAME": "precog_prod"}) is Environment.PROD

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            (" PROD ", Environment.PROD),
            ("production", Environment.PROD),
            ("Development", Environment.DEV),
            ("testing", Environment.TEST),
            ("Staging\n", Environment.STAGING),
        ],
    )
    def test_spellings(self, raw: str, expected: Environment) -> None:
        """Names are trimmed, case-insensitive, and long spellings are accepted."""
        assert get_environment(environ={"PRECOG_ENV": raw}) is expected

    def test_unknown_name_lists_valid_ones(self) -> None:
        """An unknown name raises a ValueError naming the source and the valid names."""
        with pytest.raises(ConfigurationError) as info:
            get_environment(environ={"PRECOG_ENV": "qa"})
        assert isinstance(info.value, ValueError)
        message = str(info.value)
        assert "PRECOG_ENV" in message
        for name in ("dev", "test", "staging", "prod"):
            assert name in message

    def test_environment_is_a_str_enum(self) -> None:
        """Environment members compare equal to their string values."""
        assert Environment.PROD == "prod"
        assert str(Environment.STAGING) == "staging"


class TestInference:
    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("precog_prod", Environment.PROD),
            ("prod_copy_for_test", Environment.PROD),
            ("staging_test", Environment.STAGING),
            ("PRECOG_STAGING", Environment.STAGING),
            ("integration_test", Environment.TEST),
            ("precog", Environment.DEV),
            ("precog_dev", Environment.DEV),
        ],
    )
    def test_errs_toward_the_stricter_environment(self, name: str, expected: Environment) -> None:
        """prod beats staging beats test; anything else is dev."""
        assert infer_environment(name) is expected

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("precog_dev", Environment.DEV),
            ("precog_test_gw0", Environment.TEST),
            ("precog-prod2", Environment.PROD),
            ("products", None),
            ("contest", None),
            ("precog", None),
        ],
    )
    def test_named_by_whole_words(self, name: str, expected: Environment | None) -> None:
        """Only whole words name an environment for the consistency check."""
        assert environment_named_by(name) is expected


class TestRequireEnvironment:
    def test_allowed_returns_current(self) -> None:
        """An allowed environment passes and is returned."""
        assert require_environment("dev", Environment.TEST, current=Environment.TEST) is Environment.TEST

    def test_refusal_names_current_and_required(self) -> None:
        """A refused environment raises a RuntimeError naming both sides."""
        with pytest.raises(EnvironmentNotAllowedError) as info:
            require_environment("dev", "test", current=Environment.PROD)
        assert isinstance(info.value, RuntimeError)
        assert "prod" in str(info.value) and "dev, test" in str(info.value)

    def test_reads_process_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without `current`, PRECOG_ENV decides."""
        monkeypatch.setenv("PRECOG_ENV", "staging")
        with pytest.raises(EnvironmentNotAllowedError):
            require_environment("dev")
