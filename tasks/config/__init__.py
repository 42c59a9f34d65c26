"""One configuration for the whole pipeline: a YAML file validated by pydantic.

Every section is a frozen pydantic model with its defaults in the model, and
unknown keys are an error naming their path (``download.shard_sise: extra
inputs are not permitted``), so a typo fails before any work starts. Presets
(``demo``, ``open30m``) ship in ``pipelines/configs/``; CLI overrides are
``dotted.key=value`` pairs whose values are parsed as YAML.

The sections live by family (``base``, ``data``, ``annotate``, ``ray``, ``train``), the whole
file and its loading in ``pipeline``; ``reference`` writes the README's configuration table.
Import them from here: ``from tasks.config import PipelineConfig, load_config``.
"""

from tasks.config.base import ConfigError, Section, fingerprint
from tasks.config.data import (
    GENERIC_HEADS,
    LEADING_WORDS,
    CaptionsConfig,
    DatasetConfig,
    DownloadConfig,
    PhrasesConfig,
    ShardsConfig,
    SourceConfig,
)
from tasks.config.annotate import (
    BoxesConfig,
    ManagedServerConfig,
    OpenAIBackendConfig,
    TransformersBackendConfig,
    VqaConfig,
)
from tasks.config.ray import ActorPoolConfig, RayConfig
from tasks.config.train import EvalDatasetConfig, EvaluateConfig, TrainConfig, TrainMemoryConfig
from tasks.config.pipeline import (
    PRESET_DIR,
    PipelineConfig,
    load_config,
    parse_override,
    preset_path,
    set_dotted,
    validate_config,
)

__all__ = [
    "ActorPoolConfig",
    "BoxesConfig",
    "CaptionsConfig",
    "ConfigError",
    "DatasetConfig",
    "DownloadConfig",
    "EvalDatasetConfig",
    "EvaluateConfig",
    "GENERIC_HEADS",
    "LEADING_WORDS",
    "ManagedServerConfig",
    "OpenAIBackendConfig",
    "PRESET_DIR",
    "PhrasesConfig",
    "PipelineConfig",
    "RayConfig",
    "Section",
    "ShardsConfig",
    "SourceConfig",
    "TrainConfig",
    "TrainMemoryConfig",
    "TransformersBackendConfig",
    "VqaConfig",
    "fingerprint",
    "load_config",
    "parse_override",
    "preset_path",
    "set_dotted",
    "validate_config",
]
