"""Environment resolution, inference and require_environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from precog_db import ConfigurationError, Environment, EnvironmentNotAllowedError, get_environment, require_environment
from precog_db.environment import ambiguous_environment, environment_named_by, infer_environment, resolve_environment
from precog_db.errors import EnvironmentMismatchError
from precog_db.settings import load_settings


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
        assert Environment.PROD == "prod"  # type: ignore[comparison-overlap]
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
            ("precog_prod2", Environment.PROD),
            ("prod_x", Environment.PROD),
            ("x-staging", Environment.STAGING),
            ("precog_production", Environment.PROD),
            ("x_precogprod", None),  # prod only inside a word: ambiguous, the stamp decides
            ("products", None),
            ("precogstaging", None),
            ("contest", None),
            ("devices", None),
            ("precog", None),
        ],
    )
    def test_one_naming_rule(self, name: str, expected: Environment | None) -> None:
        """Whole words decide: prod/production, staging/stag, test/testing/ci, dev/development."""
        assert environment_named_by(name) is expected

    @pytest.mark.parametrize("name", ["precog_prod", "precog-prod2", "x_staging", "precog_test_gw0", "precog_dev"])
    def test_inference_and_mismatch_use_the_same_rule(self, name: str, tmp_path: Path) -> None:
        """A DB_NAME inferred as one environment is refused under every other one (x_precogprod under dev was not)."""
        inferred = load_settings(config_dir=tmp_path, environ={"DB_NAME": name}).env
        assert inferred is infer_environment(name)
        for env in Environment:
            if env is inferred:
                assert load_settings(env, config_dir=tmp_path, environ={"DB_NAME": name}).dbname == name
            else:
                with pytest.raises(EnvironmentMismatchError, match=f"belongs to {inferred.value}"):
                    load_settings(env, config_dir=tmp_path, environ={"DB_NAME": name})

    @pytest.mark.parametrize(
        ("name", "hinted"),
        [
            ("products_dev", Environment.PROD),
            ("reproduction", Environment.PROD),
            ("productivity", Environment.PROD),
            ("x_precogprod", Environment.PROD),
            ("stagger", Environment.STAGING),
            ("backstage", Environment.STAGING),
            ("precog_prod", None),
            ("backstage_prod", None),  # a whole word decides
            ("precog_dev", None),
        ],
    )
    def test_prod_or_stag_inside_a_word_is_ambiguous(self, name: str, hinted: Environment | None) -> None:
        """The names the old substring rule refused in dev are ambiguous now: the stamp decides, not the name."""
        assert ambiguous_environment(name) is hinted

    @pytest.mark.parametrize("name", ["products_dev", "reproduction", "stagger", "backstage", "x_precogprod"])
    def test_an_ambiguous_name_loads_under_dev_and_is_never_inferred_dev(self, name: str, tmp_path: Path) -> None:
        """PRECOG_ENV=dev accepts the name (its stamp is checked at connect); alone it infers the stricter one."""
        assert load_settings("dev", config_dir=tmp_path, environ={"DB_NAME": name}).dbname == name
        inferred = load_settings(config_dir=tmp_path, environ={"DB_NAME": name}).env
        assert inferred is (environment_named_by(name) or ambiguous_environment(name))
        assert inferred is not Environment.DEV or environment_named_by(name) is Environment.DEV


class TestResolution:
    def test_precog_env_in_shared_file_counts(self) -> None:
        """PRECOG_ENV in config/.env decides the environment when the process says nothing."""
        found = resolve_environment(environ={}, file_values={"PRECOG_ENV": "staging"}, file_name="config/.env")
        assert found.env is Environment.STAGING
        assert found.source == "PRECOG_ENV in config/.env"

    def test_db_name_in_shared_file_is_inferred(self) -> None:
        """DB_NAME in config/.env is inferred like DB_NAME in the process environment."""
        found = resolve_environment(environ={}, file_values={"DB_NAME": "x_precogprod"}, file_name="config/.env")
        assert found.env is Environment.PROD
        assert found.source == "inferred from DB_NAME in config/.env"

    def test_process_beats_file(self) -> None:
        """PRECOG_ENV in the process beats the file's."""
        found = resolve_environment(environ={"PRECOG_ENV": "dev"}, file_values={"PRECOG_ENV": "prod"})
        assert (found.env, found.source) == (Environment.DEV, "PRECOG_ENV")

    def test_dbname_argument_is_inferred_before_db_name(self) -> None:
        """A dbname argument is what the caller will connect to, so it is inferred before DB_NAME."""
        found = resolve_environment(dbname="precog_prod", environ={"DB_NAME": "precog_dev"})
        assert found.env is Environment.PROD


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
