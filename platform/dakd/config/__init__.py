"""Job configuration: one pydantic model per job, built from shared sections.

A job's config comes from a preset and/or a YAML file (`--config`), then dotted overrides
(`--set a.b=c`, repeatable; the value is parsed as YAML, so `3`, `0.5`, `true`,
`[1, 2]` and `null` have their YAML types). Unknown keys and bad values raise
ConfigError naming the field and what was expected.

Where things live: `base` (strict model, location types, shared sections, named
choices), `sources` (ingest, balance), `teacher` (train-jointnet, sample, synthesize,
evaluate-synthesis), `student` (train-saross, evaluate, predict), `workflows` (tune,
pipeline, the job table), `loading` (YAML, presets, overrides). The defaults are the
models' field defaults; presets (dakd/presets/*.yaml) and job YAML files override them.
Everything is importable from `dakd.config`.
"""

from dakd.config.base import (LABEL_LOSSES, LOSS_MODES, PIPELINE_STAGES, PRECISIONS, SAMPLERS, SENSORS, SKIP_MODULES,
                              SOFT_SYNTHETIC, ActorPool, DataParallel, LabelLoss, Location, LossMode, OnError, Output,
                              PipelineStage, RayConfig, RunName, Sampler, Sensor, SkipModule, SoftSynthetic, Strict,
                              TrackingConfig, absolute_location)
from dakd.config.loading import (PRESET_SECTIONS, PRESETS_DIR, dump_config, load_config, load_preset, parse_override,
                                 preset_names, set_dotted)
from dakd.config.sources import BalanceConfig, IngestConfig, ProceduralSource, SourceConfig
from dakd.config.student import (PRETRAINED_IMAGENET, TEST_SPLIT, EvaluateConfig, PredictConfig, SarossLossConfig,
                                 SarossModelConfig, TrainSarossConfig)
from dakd.config.teacher import (EvaluateSynthesisConfig, JointNetModelConfig, JointNetStages, SampleConfig, StageConfig,
                                 SynthesizeConfig, TrainJointNetConfig)
from dakd.config.workflows import JOB_CONFIGS, PipelineConfig, TuneConfig

__all__ = [
    "LABEL_LOSSES", "LOSS_MODES", "PIPELINE_STAGES", "PRECISIONS", "SAMPLERS", "SENSORS", "SKIP_MODULES", "SOFT_SYNTHETIC", "ActorPool", "DataParallel",
    "LabelLoss", "Location", "LossMode", "OnError", "Output", "PipelineStage", "RayConfig", "RunName", "Sampler",
    "Sensor", "SkipModule", "SoftSynthetic", "Strict", "TrackingConfig", "absolute_location",
    "PRESET_SECTIONS", "PRESETS_DIR", "dump_config", "load_config", "load_preset", "parse_override", "preset_names",
    "set_dotted",
    "BalanceConfig", "IngestConfig", "ProceduralSource", "SourceConfig",
    "PRETRAINED_IMAGENET", "TEST_SPLIT", "EvaluateConfig", "PredictConfig", "SarossLossConfig", "SarossModelConfig",
    "TrainSarossConfig",
    "EvaluateSynthesisConfig", "JointNetModelConfig", "JointNetStages", "SampleConfig", "StageConfig",
    "SynthesizeConfig", "TrainJointNetConfig",
    "JOB_CONFIGS", "PipelineConfig", "TuneConfig",
]
