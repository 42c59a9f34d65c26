"""What every flow shares: turning its ``config`` parameter into a validated config."""

from __future__ import annotations

from tasks.config import ConfigError, PipelineConfig, load_config, validate_config


def resolve_config(config: str | dict | PipelineConfig, overrides: list[str] | None = None) -> PipelineConfig:
    """A config file path, ``preset:<name>``, a dict or a config object -> a validated config.

    Raises ``ConfigError`` before any work starts when anything is wrong.
    """
    if isinstance(config, PipelineConfig):
        if overrides:
            raise ConfigError("overrides apply to a config file or preset, not to a config object")
        return config
    if isinstance(config, dict):
        return validate_config(config, "config mapping")
    if config.startswith("preset:"):
        return load_config(preset=config.removeprefix("preset:"), overrides=overrides)
    return load_config(config, overrides=overrides)
