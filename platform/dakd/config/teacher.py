"""Config of the teacher jobs: `dakd train-jointnet`, `dakd sample`, `dakd synthesize`,
`dakd evaluate-synthesis`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dakd.config.base import (ActorPool, DataParallel, LabelLoss, Location, Output, Precision, RayConfig, RunName,
                              Sampler, Strict, TrackingConfig)


class JointNetModelConfig(Strict):
    """SAR-JointNet U-Nets (both branches share the layout). Defaults: paper scale (GPU);
    the presets `tiny` and `demo` shrink it for CPUs."""

    block_out_channels: list[int] = Field(default_factory=lambda: [128, 128, 256, 256, 512, 512])
    layers_per_block: int = Field(2, ge=1)
    attention_levels: list[int] = Field(default_factory=lambda: [3, 4, 5])  # 32, 16, 8 px at 256 (ADM-256)
    norm_num_groups: int = Field(32, ge=1)
    attention_head_dim: int = Field(64, ge=1)


class StageConfig(Strict):
    """One training stage: optimizer steps and AdamW learning rate."""

    iterations: int = Field(ge=0)
    lr: float = Field(gt=0)


class JointNetStages(Strict):
    """PAPER.md: 50K / 150K (SOS; OSD 250K) / 50K (SOS; OSD 100K) iterations; lr 1e-4, 1e-4, 1e-5."""

    stage1: StageConfig = Field(default_factory=lambda: StageConfig(iterations=50_000, lr=1e-4))
    stage2: StageConfig = Field(default_factory=lambda: StageConfig(iterations=150_000, lr=1e-4))
    stage3: StageConfig = Field(default_factory=lambda: StageConfig(iterations=50_000, lr=1e-5))


class TrainJointNetConfig(DataParallel):
    """`dakd train-jointnet`: SAR-JointNet in three stages on Ray Train (DDP)."""

    shards: Location = "runs/demo/real"
    output: Output = "runs/demo/teacher"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    run_name: RunName = "jointnet"
    run_stages: list[Literal[1, 2, 3]] = Field(default_factory=lambda: [1, 2, 3])
    init_checkpoint: Location | None = None
    model: JointNetModelConfig = Field(default_factory=JointNetModelConfig)
    stages: JointNetStages = Field(default_factory=JointNetStages)
    num_train_timesteps: int = Field(1000, ge=2)
    label_loss: LabelLoss = "ce"
    b: float | None = Field(None, gt=0, allow_inf_nan=False, description="None: read from the shard manifest")
    crop_size: int = Field(256, ge=8)
    cache_dataset: bool = Field(True, description="keep decoded shards in Ray's object store between epochs")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema: bool = True
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(50, ge=1)
    sample_every: int = Field(5000, ge=1)
    sample_count: int = Field(4, ge=1)
    sample_steps: int = Field(50, ge=1)
    seed: int = 0
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _stages(self):
        if sorted(set(self.run_stages)) != list(self.run_stages):
            raise ValueError(f"run_stages {self.run_stages}: expected increasing stage numbers, e.g. [1, 2, 3] or [2]")
        return self


class SampleConfig(Strict):
    """`dakd sample`: N samples from a SAR-JointNet checkpoint to a PNG grid."""

    checkpoint: Location = "runs/demo/teacher/jointnet-tiny"
    output: Output = "runs/demo/samples.png"
    count: int = Field(8, ge=1)
    sampler: Sampler = "ddim"
    steps: int = Field(200, ge=1)
    size: int | None = Field(None, ge=8, description="None: the training crop size")
    seed: int = 0
    ema: bool = True


# ---------------------------------------------------------------- synthesis (issue: synthesis at scale)
class SynthesizeConfig(ActorPool):
    """`dakd synthesize`: samples of a SAR-JointNet teacher -> a synthetic shard set.

    Sample ids 0..count-1 are cut into ranges of `rows_per_file` ids (range k = ids
    [k*R, (k+1)*R)); each range is one Parquet object written by one actor call.
    """

    teacher: Location = "runs/demo/teacher/jointnet-tiny"
    output: Output = "runs/demo/synthetic"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    count: int = Field(4480, ge=1, le=100_000_000,
                       description="N: sample ids 0..N-1 (paper: 4,480 OSD, 6,400 SOS); at most 10^8")
    sampler: Sampler = "ddim"
    steps: int = Field(200, ge=1)
    seed: int = 0
    ema: bool = True
    size: int | None = Field(None, ge=8, description="None: the teacher's training crop size")
    real: Location | None = Field(None, description="a real shard set whose class count the teacher must match")
    rows_per_file: int = Field(64, ge=1)
    # default: fixed batches of batch_size ids per forward (batch m = ids [m*B, (m+1)*B)), so a
    # stored sample is bit-identical whatever N or actor on the same hardware; exact: one sample
    # per forward, bit-identical whatever batch_size too (slower; equal to the batched samples
    # only to float rounding: rare pixels may differ by one grey level / class)
    exact: bool = False
    batch_size: int = Field(8, ge=1, description="samples per network forward (part of the set's identity); "
                                                 "best a divisor of rows_per_file")
    compile: bool = Field(False, description="wrap the teacher in torch.compile (GPU; slow start-up)")
    precision: Precision = Field("auto", description=(
        "the forward's arithmetic, part of the set's identity: auto = bf16 autocast on CUDA, float32 on the "
        "CPU; bf16 = autocast on any device (faster than float32 on a CPU with AMX or AVX512-BF16); fp32"))
    actors_min: int = Field(1, ge=1)
    actors_max: int = Field(2, ge=1)
    contact_sheet_count: int = Field(64, ge=0, description="first samples shown in contact_sheet.png")
    overwrite: bool = False
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _actors(self):
        if self.actors_max < self.actors_min:
            raise ValueError(f"actors_max {self.actors_max} must be >= actors_min {self.actors_min}")
        return self

    def pool_size(self) -> tuple[int, int]:
        return self.actors_min, self.actors_max


class EvaluateSynthesisConfig(ActorPool):
    """`dakd evaluate-synthesis`: FID and Inception Score of a synthetic shard set against a real one.

    features: "inception" (InceptionV3 pool features, 2048-d, and its 1000-way softmax for
    IS; weights from `inception_weights`), "pixels" (grey levels average-pooled to
    pixels_size x pixels_size; no IS), or "package.module:function" (a callable
    images uint8 (B, H, W) -> features (B, D), or (features, class probabilities (B, K))).
    """

    synthetic: Location = "runs/demo/synthetic"
    synthetic_split: str = "train"
    real: Location = "runs/demo/real"
    real_split: str = "train"
    features: str = Field("inception", pattern=r"^(inception|pixels|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
    inception_weights: Location | None = Field(None, description="InceptionV3 weights file (torchvision layout; .safetensors or .pth)")
    pixels_size: int = Field(8, ge=1)
    is_splits: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    max_samples: int | None = Field(None, ge=2, description="first max_samples of each set (file order)")
    actors: int = Field(2, ge=1)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

