"""The whole file: `PipelineConfig`, loading it from YAML or a preset, dotted overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from tasks.config.annotate import BoxesConfig, VqaConfig
from tasks.config.base import ConfigError, Section
from tasks.config.data import (
    CaptionsConfig,
    DatasetConfig,
    DownloadConfig,
    PhrasesConfig,
    ShardsConfig,
    SourceConfig,
)
from tasks.config.ray import RayConfig
from tasks.config.train import EvaluateConfig, TrainConfig

PRESET_DIR = Path(__file__).resolve().parents[2] / "pipelines" / "configs"


class PipelineConfig(Section):
    """The whole configuration file."""

    dataset: DatasetConfig
    sources: list[SourceConfig] = Field(default_factory=list)
    download: DownloadConfig = DownloadConfig()
    captions: CaptionsConfig = CaptionsConfig()
    boxes: BoxesConfig = BoxesConfig()
    vqa: VqaConfig = VqaConfig()
    phrases: PhrasesConfig = PhrasesConfig()
    shards: ShardsConfig = ShardsConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ray: RayConfig = RayConfig()

    @field_validator("sources")
    @classmethod
    def _unique_source_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {dupes}")
        return sources


def _format_errors(err: ValidationError, origin: str) -> str:
    """Every problem on one line: ``invalid configuration (c.yaml): download.shard_size: ... (got 0)``."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = " ".join(e["msg"].split())
        if e["type"] == "extra_forbidden":
            msg = "unknown key (you probably got a typo; see the configuration reference in README.md)"
        elif e["type"] != "missing":
            given = repr(e.get("input"))
            msg += f" (got {given if len(given) <= 60 else given[:57] + '...'})"
        problems.append(f"{loc}: {msg}")
    return f"invalid configuration ({origin}): " + "; ".join(problems)


def _read_config_text(source: Path) -> str:
    try:
        return source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {source}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {source} is a directory, not a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {source} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); is it the right file?") from None
    except OSError as e:
        raise ConfigError(f"config file {source} cannot be read: {e.strerror or e}") from None


def _parse_yaml(text: str, source: Path) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"config file {source} is not valid YAML: {where}{problem}") from None


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "download.shard_size", 100)``; list items by index (``sources.0.max_urls``)."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name!r}; choices: {choices}")
    return path


def load_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> PipelineConfig:
    """Load a config file (or a preset), apply overrides, validate; raise ConfigError on any mistake."""
    if (path is None) == (preset is None):
        raise ConfigError("give exactly one of a config file or a preset")
    source = Path(path) if path is not None else preset_path(preset)
    data = _parse_yaml(_read_config_text(source), source) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {source} must hold a mapping at the top level")
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        try:
            set_dotted(data, key, value)
        except (IndexError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"override {key}={value!r} does not fit the config: {e}") from None
    return validate_config(data, str(source))


def validate_config(data: Any, origin: str) -> PipelineConfig:
    """``data`` (a parsed config mapping) as a config; a ConfigError names every bad key, on one line."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None
