"""The one settings object: every variable the project knows, the README's table generated from
it, derived defaults, and no other module reading project settings from the environment."""

import re
from pathlib import Path

from rec_pipelines.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def test_readme_configuration_table_is_the_settings_table():
    assert Settings.markdown_table() in (REPO / "README.md").read_text()


def test_defaults_derive_from_home_and_explicit_values_win(tmp_path):
    settings = Settings.from_env({"RECSYS_HOME": str(tmp_path), "RECSYS_SENSOR_INTERVAL_S": "3", "RECSYS_LAKE": ""})
    assert settings.lake == tmp_path / "var" / "lake"  # an empty variable counts as unset
    assert settings.landing_zone == tmp_path / "var" / "landing"
    assert settings.pseudonym_key_file == tmp_path / "var" / "lake" / "secrets" / "pseudonym.key"
    assert settings.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert settings.sensor_interval_s == 3 and settings.full_retrain_cron == "0 2 * * *"
    remote = Settings.from_env({"RECSYS_HOME": str(tmp_path), "RECSYS_LANDING_ZONE": "s3://bucket/zone"})
    assert remote.landing_zone_url == "s3://bucket/zone" and remote.landing_zone == tmp_path / "var/lake/landing-mirror"
    exported = Settings.from_env(remote.export())
    assert exported.export() == remote.export()


def test_no_module_reads_a_project_variable_from_the_environment_itself():
    variables = {name for name, _, _ in Settings.table()}
    readers = []
    for path in [*REPO.glob("rec_pipelines/**/*.py"), *REPO.glob("rec_models/**/*.py")]:
        for line in path.read_text().splitlines():
            if re.search(r"(os\.environ(\.get)?[\[(]|os\.getenv\()", line) and any(v in line for v in variables):
                readers.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert readers == []
