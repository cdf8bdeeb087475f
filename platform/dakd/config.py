"""Job configuration: one pydantic model per job, with every user-settable default (module
constants that are not settings, e.g. tile sizes or file names, live beside the code using them).

A job's config comes from a YAML file (`--config`), then dotted overrides
(`--set a.b=c`, repeatable; the value is parsed as YAML, so `3`, `0.5`, `true`,
`[1, 2]` and `null` have their YAML types). Unknown keys and bad values raise
ConfigError naming the field and what was expected.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from dakd.errors import ConfigError
from dakd.redact import redact


class Strict(BaseModel):
    """Base: unknown keys are errors; assignments and defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


def _absolute(uri: str) -> str:
    """Local paths become absolute (Ray workers run in other directories); URIs with a
    scheme (s3://, file://, models:/) stay as they are."""
    if "://" in uri or uri.startswith("models:/"):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


# A storage location in config: a local path (made absolute), file://, s3://, or models:/.
Location = Annotated[str, AfterValidator(_absolute)]


def _output(uri: str) -> str:
    """An output location a job may write (and, with overwrite, replace files) under:
    never empty (it would mean the current directory), a filesystem root, the home folder
    or a whole bucket."""
    if not str(uri).strip():
        raise ValueError("empty: expected a folder (path, file:// or s3://bucket/prefix); an empty value "
                         "would write into the current directory")
    uri = _absolute(str(uri).strip())
    if uri.startswith("s3://"):
        if "/" not in uri[len("s3://"):].strip("/"):
            raise ValueError(f"{uri}: a whole bucket; expected s3://bucket/prefix")
        return uri
    path = os.path.normpath(uri[len("file://"):] if uri.startswith("file://") else uri)
    if "://" not in path and (os.path.dirname(path) == path or path == os.path.expanduser("~")):
        raise ValueError(f"{uri}: a filesystem root or the home folder; expected a folder of its own")
    return uri


def _path_segment(name: str) -> str:
    """A name that becomes one path segment under an output root (run names): letters,
    digits, '.', '_' and '-', not starting with '.', so it can never leave the root."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", name or ""):
        raise ValueError(f"{name!r}: expected one folder name of letters, digits, '.', '_' or '-' "
                         "(no '/', no leading '.'), so it stays under the output root")
    return name


# An output location (see _output) and a run name (one path segment under it).
Output = Annotated[str, AfterValidator(_output)]
RunName = Annotated[str, AfterValidator(_path_segment)]


# ---------------------------------------------------------------- shared sections
class RayConfig(Strict):
    """Where jobs run: the cluster named by `address` or RAY_ADDRESS, else a local Ray."""

    address: str | None = None
    # Logical CPUs of a locally started Ray. More than the cores, so Train workers
    # cannot starve the Ray Data tasks that feed them (DESIGN.md).
    local_num_cpus: int = Field(8, ge=1)
    local_object_store_mb: int = Field(512, ge=80)


class ProceduralSource(Strict):
    """Built-in SAR-like scenes with the five OSD classes (the embedded default data)."""

    splits: dict[str, int] = Field(default_factory=lambda: {"train": 48, "test": 16})
    height: int = Field(64, ge=8)
    width: int = Field(64, ge=8)
    seed: int = 0
    looks: int = Field(4, ge=1, description="speckle looks L (gamma shape)")


class SourceConfig(Strict):
    """A data source: `kind` picks the reader; `root` is a path or URI (not for procedural)."""

    kind: Literal["procedural", "osd", "sos", "folder"] = "procedural"
    root: Location | None = None
    splits: list[str] = Field(default_factory=lambda: ["train", "test"])
    sensors: list[Literal["palsar", "sentinel"]] = Field(default_factory=lambda: ["palsar", "sentinel"])
    # folder reader: the split its files belong to, and an optional RGB palette
    # (index i = class i) with class names; without a palette masks are index PNGs.
    folder_split: str = "train"
    palette: list[tuple[int, int, int]] | None = None
    class_names: list[str] | None = None
    # share of a label's pixels allowed off the palette (mapped to the nearest colour)
    max_off_palette_share: float = Field(0.01, ge=0.0, le=1.0)
    # Carve a validation split out of train: sample `id` goes to "val" when
    # seeds.unit_hash(id) < val_fraction (stable across runs and machines; data.splits).
    val_fraction: float | None = Field(None, gt=0.0, le=0.5,
                                       description="share of train moved to a `val` split, in (0, 0.5]; None: no val split")
    procedural: ProceduralSource = Field(default_factory=ProceduralSource)

    @model_validator(mode="after")
    def _root_needed(self):
        if self.kind != "procedural" and not self.root:
            raise ValueError(f"source.root is required for source.kind={self.kind!r} (a folder path or URI)")
        if self.val_fraction is not None and "val" in self.splits:
            raise ValueError("source.val_fraction: the source already has a `val` split (source.splits); "
                             "carve one or read one, not both")
        if self.kind == "folder" and self.palette is not None and self.class_names is not None:
            if len(self.palette) != len(self.class_names):
                raise ValueError("source.palette and source.class_names must have the same length")
        return self


# ---------------------------------------------------------------- jobs
class IngestConfig(Strict):
    """`dakd ingest`: a source -> a Parquet shard set at `output`."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    output: Output = "runs/demo/real"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    rows_per_file: int = Field(256, ge=1)
    on_error: Literal["fail", "skip"] = "fail"
    overwrite: bool = False
    ray: RayConfig = Field(default_factory=RayConfig)


class BalanceConfig(Strict):
    """`dakd balance`: b = sqrt(P(x0) / P(y0)) over one split of a shard set."""

    shards: Location = "runs/demo/real"
    split: str = "train"
    ray: RayConfig = Field(default_factory=RayConfig)


class TrackingConfig(Strict):
    """MLflow: `uri` or MLFLOW_TRACKING_URI, else a local sqlite store under the job's output."""

    uri: str | None = None
    experiment: str = "dakd"
    enabled: bool = True
    parent_run_id: str | None = Field(None, description="nest this job's run under another (the pipeline sets it)")


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


class DataParallel(Strict):
    """Ray Train jobs: DDP workers and their batch. With `global_batch_size` set, each
    worker takes global_batch_size / num_workers samples per step."""

    batch_size_per_worker: int = Field(16, ge=1)
    global_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _global_batch(self):
        if self.global_batch_size is not None and self.global_batch_size % self.num_workers:
            raise ValueError(f"global_batch_size {self.global_batch_size} must be a multiple of "
                             f"num_workers {self.num_workers}")
        return self

    @property
    def per_worker_batch(self) -> int:
        if self.global_batch_size is not None:
            return self.global_batch_size // self.num_workers
        return self.batch_size_per_worker


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
    label_loss: Literal["ce", "mse"] = "ce"
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
    sampler: Literal["ddim", "dpmsolver++", "unipc"] = "ddim"
    steps: int = Field(200, ge=1)
    size: int | None = Field(None, ge=8, description="None: the training crop size")
    seed: int = 0
    ema: bool = True


# ---------------------------------------------------------------- synthesis (issue: synthesis at scale)
class SynthesizeConfig(Strict):
    """`dakd synthesize`: samples of a SAR-JointNet teacher -> a synthetic shard set.

    Sample ids 0..count-1 are cut into ranges of `rows_per_file` ids (range k = ids
    [k*R, (k+1)*R)); each range is one Parquet object written by one actor call.
    """

    teacher: Location = "runs/demo/teacher/jointnet-tiny"
    output: Output = "runs/demo/synthetic"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    count: int = Field(4480, ge=1, le=100_000_000,
                       description="N: sample ids 0..N-1 (paper: 4,480 OSD, 6,400 SOS); at most 10^8")
    sampler: Literal["ddim", "dpmsolver++", "unipc"] = "ddim"
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
    actors_min: int = Field(1, ge=1)
    actors_max: int = Field(2, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    torch_threads: int = Field(1, ge=1)
    contact_sheet_count: int = Field(64, ge=0, description="first samples shown in contact_sheet.png")
    overwrite: bool = False
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _actors(self):
        if self.actors_max < self.actors_min:
            raise ValueError(f"actors_max {self.actors_max} must be >= actors_min {self.actors_min}")
        return self


class EvaluateSynthesisConfig(Strict):
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
    gpus_per_actor: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


# ---------------------------------------------------------------- student (issue: SAROSS-Net)
PRETRAINED_IMAGENET = "imagenet"


def _pretrained(value: str | None) -> str | None:
    """`imagenet` (the encoder's published weights through the Hugging Face hub cache) stays
    as it is; a local path becomes absolute; URIs stay."""
    return value if value in (None, PRETRAINED_IMAGENET) else _absolute(value)


class SarossModelConfig(Strict):
    """SAROSS-Net: encoder + UNet++ decoder with CAFT. Paper: MambaVision-B (non-commercial
    licence); resnet34 is the unencumbered ablation encoder.

    pretrained: None (random init), `imagenet` (the encoder's published ImageNet weights via
    the Hugging Face hub cache: HF_HOME, HF_HUB_OFFLINE), or a weight file's path/URI."""

    encoder: str = "mambavision_b"
    pretrained: Annotated[str | None, AfterValidator(_pretrained)] = None
    decoder_channels: list[int] = Field(default_factory=lambda: [64, 128, 256])
    skip_module: Literal["caft", "conv3x3", "none"] = "caft"
    caft_heads: int = Field(4, ge=1)


class SarossLossConfig(Strict):
    """L = λ_ce·CE + λ_dice·Dice + λ_kd·KD (Eq. 10); T: KD temperature (not given by the paper)."""

    mode: Literal["real-only", "hard", "soft"] = "soft"
    # soft mode, synthetic samples: "kd" = KD against the teacher's logits only (the paper's
    # Eq. 10 as written); "kd+hard" = KD plus CE/Dice on the teacher's argmax (the other reading)
    soft_synthetic: Literal["kd", "kd+hard"] = "kd"
    lambda_ce: float = Field(1.0, ge=0)
    lambda_dice: float = Field(0.5, ge=0)
    lambda_kd: float = Field(0.1, ge=0)
    temperature: float = Field(2.0, gt=0)
    dice_eps: float = Field(1.0, ge=0)


TEST_SPLIT = "test"  # the split figures are reported on; never selected on by default


class TrainSarossConfig(DataParallel):
    """`dakd train-saross`: SAROSS-Net on real crops + synthetic 2x2 mosaics (DAKD) on Ray Train.
    Paper: 200 epochs, batch 16, AdamW lr 5e-5, 512 crops (OSD; SOS 256).

    Every loss mode sees the same samples per epoch, R / (1 - synthetic_share) for R real
    train samples (real-only fills the synthetic share with more real crops), so students
    of one config get equal optimiser steps. The best checkpoint is selected on `val_split`
    ("val", carved at ingest by source.val_fraction); selecting on the test split is refused
    unless `select_on_test` is set, and is then flagged in the summary, best.json and MLflow."""

    shards: Location = "runs/demo/real"
    synthetic: Location | None = Field("runs/demo/synthetic", description="synthetic shard set (ignored in real-only mode)")
    output: Output = "runs/demo/student"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    run_name: RunName = "saross"
    model: SarossModelConfig = Field(default_factory=SarossModelConfig)
    loss: SarossLossConfig = Field(default_factory=SarossLossConfig)
    train_split: str = "train"
    val_split: str = "val"
    select_on_test: bool = Field(False, description="allow val_split=test (flagged as selected on the test split)")
    crop_size: int = Field(512, ge=32)
    mosaic: bool = Field(True, description="synthetic tiles four at a time into 2x2 mosaics (else one tile per sample)")
    synthetic_share: float = Field(0.5, ge=0.0, lt=1.0, description="expected share of synthetic samples per batch")
    epochs: int = Field(200, ge=1)
    batch_size_per_worker: int = Field(8, ge=1)
    global_batch_size: int | None = Field(16, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    cache_dataset: bool = True
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(20, ge=1)
    overlay_count: int = Field(4, ge=0, description="validation images drawn as overlays each epoch")
    register_name: str | None = Field(None, description="MLflow registered-model name for the best checkpoint")
    seed: int = 0
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _crop(self):
        if self.val_split == TEST_SPLIT and not self.select_on_test:
            raise ValueError(f"val_split={TEST_SPLIT}: the best checkpoint would be chosen on the split its figures are "
                             "reported on. Carve a validation split at ingest (source.val_fraction=0.1) and use "
                             "val_split=val, or set select_on_test=true (flagged in the summary, best.json and MLflow)")
        if self.val_split == self.train_split:
            raise ValueError(f"val_split={self.val_split}: must differ from train_split")
        if self.crop_size % 32:
            raise ValueError(f"crop_size {self.crop_size}: must be a multiple of 32 (the encoder's deepest stride)")
        return self


class EvaluateConfig(Strict):
    """`dakd evaluate`: a SAROSS-Net checkpoint on a shard set's split at full resolution."""

    checkpoint: Location = "runs/demo/student/soft"
    shards: Location = "runs/demo/real"
    split: str = "test"
    output: Output = "runs/demo/eval"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    name: str | None = Field(None, description="row name in the table (default: the checkpoint's run name)")
    overlay_count: int = Field(4, ge=0)
    batch_size: int = Field(1, ge=1)
    actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    torch_threads: int = Field(1, ge=1)
    compile: bool = Field(False, description="wrap the network in torch.compile (GPU; slow start-up)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class PredictConfig(Strict):
    """`dakd predict`: batch inference over a folder or bucket of images -> mask PNGs + class areas."""

    model: Location = Field("runs/demo/student/soft", description="checkpoint URI, run dir, or models:/<name>/<version>")
    input: Location = "runs/demo/predict-in"
    output: Output = "runs/demo/predict"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    pixel_size_m: float | None = Field(None, gt=0, description="ground size of a pixel (m); adds km² areas")
    batch_size: int = Field(1, ge=1)
    actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    torch_threads: int = Field(1, ge=1)
    compile: bool = Field(False, description="wrap the network in torch.compile (GPU; slow start-up)")
    overwrite: bool = False
    on_error: Literal["fail", "skip"] = Field("fail", description="an unreadable input: fail, or skip it and list it "
                                                                  "in skipped.json and the summary")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="resolves models:/ URIs")
    ray: RayConfig = Field(default_factory=RayConfig)


# ---------------------------------------------------------------- sweeps (issue: Ray Tune)
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


PIPELINE_STAGES = ("ingest", "balance", "train-jointnet", "synthesize", "evaluate-synthesis", "train-saross",
                   "evaluate")
PipelineStage = Literal["ingest", "balance", "train-jointnet", "synthesize", "evaluate-synthesis", "train-saross",
                        "evaluate"]


class PipelineConfig(Strict):
    """`dakd pipeline`: every stage in order under one output root. Each stage's section is
    that job's own config; the pipeline sets its input/output locations (under `output`),
    `ray` and `tracking`, so those fields in the sections are ignored."""

    output: Output = "runs/demo"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    stages: list[PipelineStage] = Field(default_factory=lambda: list(PIPELINE_STAGES))
    source: SourceConfig = Field(default_factory=SourceConfig)
    rows_per_file: int = Field(256, ge=1)
    on_error: Literal["fail", "skip"] = "fail"
    overwrite: bool = False
    jointnet: TrainJointNetConfig = Field(default_factory=TrainJointNetConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    evaluate_synthesis: EvaluateSynthesisConfig = Field(default_factory=EvaluateSynthesisConfig)
    saross: TrainSarossConfig = Field(default_factory=TrainSarossConfig)
    student_modes: list[Literal["real-only", "hard", "soft"]] = Field(
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


# ---------------------------------------------------------------- loading
def _set_dotted(data: dict, dotted: str, value, model: type[BaseModel]) -> None:
    """Set data[a][b][c] = value for dotted 'a.b.c', checking each key against the model."""
    keys = dotted.split(".")
    node, cls = data, model
    for i, key in enumerate(keys):
        where = ".".join(keys[: i + 1])
        if cls is not None:
            if key not in cls.model_fields:
                valid = ", ".join(sorted(cls.model_fields))
                raise ConfigError(f"--set {dotted}: unknown field '{where}' (valid here: {valid})")
            annotation = cls.model_fields[key].annotation
            cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if i == len(keys) - 1:
            node[key] = value
        else:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child


def parse_override(text: str) -> tuple[str, object]:
    """'a.b=c' -> ('a.b', yaml value of c)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set ingest.rows_per_file=128")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from exc
    return key, value


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        else:
            msg = err["msg"]
        got = err.get("input")
        got_text = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
        lines.append(redact(f"  {where}: {msg}{got_text}"))
    return "\n".join(lines)


# ---------------------------------------------------------------- presets
PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
# job -> the part of a pipeline preset that configures it (None: the whole preset)
PRESET_SECTIONS: dict[str, str | tuple | None] = {
    "pipeline": None, "ingest": ("source", "rows_per_file", "on_error"), "train-jointnet": "jointnet",
    "synthesize": "synthesize", "evaluate-synthesis": "evaluate_synthesis", "train-saross": "saross",
    "evaluate": "evaluate"}


def preset_names() -> list[str]:
    """The pipeline presets shipped with the package (dakd/presets/<name>.yaml)."""
    return sorted(f[:-5] for f in os.listdir(PRESETS_DIR) if f.endswith(".yaml"))


def load_preset(name: str, job: str = "pipeline") -> dict:
    """Preset `name` as config data for `job`: the whole pipeline preset, or the job's section of it."""
    if job not in PRESET_SECTIONS:
        raise ConfigError(f"--preset: {job} has no presets (jobs with presets: {', '.join(PRESET_SECTIONS)})")
    if name not in preset_names():
        raise ConfigError(f"--preset {name}: unknown preset (one of {', '.join(preset_names())})")
    with open(os.path.join(PRESETS_DIR, f"{name}.yaml")) as f:
        data = yaml.safe_load(f) or {}
    section = PRESET_SECTIONS[job]
    if section is None:
        return data
    if isinstance(section, tuple):
        return {k: data[k] for k in section if k in data}
    return dict(data.get(section, {}))


def _merge(base: dict, top: dict) -> dict:
    """Nested dicts merged key by key (top wins); other values replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(model: type[Strict], path: str | None = None, overrides: list[str] | tuple = (),
                preset: tuple[str, str] | None = None) -> Strict:
    """Preset (optional: (name, job)) <- YAML file (optional) <- dotted overrides -> validated
    model; ConfigError on any problem."""
    data: dict = load_preset(*preset) if preset else {}
    origin = f"preset {preset[0]}" if preset else "defaults"
    if path:
        origin = f"{origin} + {path}" if preset else path
        if not os.path.exists(path):
            raise ConfigError(f"--config {path}: file not found")
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields at the top level, got {type(loaded).__name__}")
        data = _merge(data, loaded)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value, model)
    if overrides:
        origin += " + --set overrides"
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None


def dump_config(cfg: BaseModel) -> dict:
    """A config as plain JSON-able data (for manifests, provenance and MLflow params)."""
    return cfg.model_dump(mode="json")
