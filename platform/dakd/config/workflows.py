"""Config of the jobs made of other jobs: `dakd tune`, `dakd pipeline`; and the job table."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dakd.config.base import (PIPELINE_STAGES, LossMode, OnError, Output, PipelineStage, RayConfig, Strict,
                              TrackingConfig)
from dakd.config.sources import BalanceConfig, IngestConfig, SourceConfig
from dakd.config.student import EvaluateConfig, PredictConfig, TrainSarossConfig
from dakd.config.teacher import EvaluateSynthesisConfig, SampleConfig, SynthesizeConfig, TrainJointNetConfig


class TuneConfig(Strict):
    """`dakd tune`: a Ray Tune sweep (ASHA) whose trials are Ray Train runs, each tracked in MLflow.

    level "student": each trial trains SAROSS-Net (`student`) on its fixed synthetic set.
    level "teacher": each trial trains SAR-JointNet (`teacher`), synthesises a set
    (`synthesize`) and trains the student on it; the objective is the student's metric.
    `space` maps a dotted config path, starting with the section it sets (`student.`,
    `teacher.`, `synthesize.`), to one of {grid: [v, ...]}, {choice: [v, ...]},
    {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]} (hi excluded).
    """

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="re-running a name resumes it")
    output: Output = "runs/demo/tune"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    level: Literal["student", "teacher"] = "student"
    space: dict[str, dict[str, list]] = Field(default_factory=dict)
    num_samples: int = Field(1, ge=1, description="samples of the random dimensions per grid point")
    metric: Literal["val/miou", "loss"] = "val/miou"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as the cluster's CPUs/GPUs hold")
    driver_cpus: float = Field(0.05, gt=0, description="CPUs of a trial's driver function (its Train workers reserve their own)")
    data_cpus: float = Field(1.0, ge=0, description="CPUs left free for the Ray Data tasks feeding the trials")
    max_failures: int = Field(0, ge=0, description="retries of a failed trial (its Train run resumes from its checkpoint)")
    resume_errored: bool = Field(True, description="on resume, run errored trials again (same trial id: their runs continue from their checkpoints)")
    seed: int = 0
    student: TrainSarossConfig = Field(default_factory=TrainSarossConfig)
    teacher: TrainJointNetConfig = Field(default_factory=TrainJointNetConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    evaluate_synthesis: EvaluateSynthesisConfig = Field(
        default_factory=EvaluateSynthesisConfig,
        description="level teacher: each trial's synthetic set is scored (FID, IS) when inception_weights is set "
                    "or another extractor (features) is chosen")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class PipelineConfig(Strict):
    """`dakd pipeline`: every stage in order under one output root. Each stage's section is
    that job's own config; the pipeline sets its input/output locations (under `output`),
    `ray` and `tracking`, so those fields in the sections are ignored."""

    output: Output = "runs/demo"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    stages: list[PipelineStage] = Field(default_factory=lambda: list(PIPELINE_STAGES))
    source: SourceConfig = Field(default_factory=SourceConfig)
    rows_per_file: int = Field(256, ge=1)
    on_error: OnError = "fail"
    overwrite: bool = False
    jointnet: TrainJointNetConfig = Field(default_factory=TrainJointNetConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    evaluate_synthesis: EvaluateSynthesisConfig = Field(default_factory=EvaluateSynthesisConfig)
    saross: TrainSarossConfig = Field(default_factory=TrainSarossConfig)
    student_modes: list[LossMode] = Field(
        default_factory=lambda: ["real-only", "soft"],
        description="one student per mode (run names = modes); evaluate compares them in one table")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _inception_weights(self):
        e = self.evaluate_synthesis
        if "evaluate-synthesis" in self.stages and e.features == "inception" and not e.inception_weights:
            raise ValueError("evaluate_synthesis.inception_weights: required for features=inception (a local file "
                             "or URI; they cannot be downloaded), or set evaluate_synthesis.features=pixels")
        return self


JOB_CONFIGS: dict[str, type[Strict]] = {
    "ingest": IngestConfig,
    "balance": BalanceConfig,
    "pipeline": PipelineConfig,
    "train-jointnet": TrainJointNetConfig,
    "sample": SampleConfig,
    "synthesize": SynthesizeConfig,
    "evaluate-synthesis": EvaluateSynthesisConfig,
    "train-saross": TrainSarossConfig,
    "evaluate": EvaluateConfig,
    "predict": PredictConfig,
    "tune": TuneConfig,
}

