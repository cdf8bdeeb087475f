"""Config building blocks: the strict base model, location types, the sections several
jobs share (Ray, MLflow, data-parallel workers, actor pools) and the named choices
(`Literal` types; their tuples are derived with `typing.get_args`, never repeated)."""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# ---------------------------------------------------------------- named choices
Sampler = Literal["ddim", "dpmsolver++", "unipc"]
LabelLoss = Literal["ce", "mse"]
LossMode = Literal["real-only", "hard", "soft"]
SkipModule = Literal["caft", "conv3x3", "none"]
Sensor = Literal["palsar", "sentinel"]
SoftSynthetic = Literal["kd", "kd+hard"]
OnError = Literal["fail", "skip"]
Precision = Literal["auto", "bf16", "fp32"]
PipelineStage = Literal["ingest", "balance", "train-jointnet", "synthesize", "evaluate-synthesis", "train-saross",
                        "evaluate"]

SAMPLERS: tuple[str, ...] = get_args(Sampler)
LABEL_LOSSES: tuple[str, ...] = get_args(LabelLoss)
LOSS_MODES: tuple[str, ...] = get_args(LossMode)
SOFT_SYNTHETIC: tuple[str, ...] = get_args(SoftSynthetic)
SKIP_MODULES: tuple[str, ...] = get_args(SkipModule)
SENSORS: tuple[str, ...] = get_args(Sensor)
PIPELINE_STAGES: tuple[str, ...] = get_args(PipelineStage)  # in the order they run
PRECISIONS: tuple[str, ...] = get_args(Precision)


class Strict(BaseModel):
    """Base: unknown keys are errors; assignments and defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


def absolute_location(uri: str) -> str:
    """Local paths become absolute (Ray workers run in other directories); URIs with a
    scheme (s3://, file://, models:/) stay as they are."""
    if "://" in uri or uri.startswith("models:/"):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


# A storage location in config: a local path (made absolute), file://, s3://, or models:/.
Location = Annotated[str, AfterValidator(absolute_location)]


def _output(uri: str) -> str:
    """An output location a job may write (and, with overwrite, replace files) under:
    never empty (it would mean the current directory), a filesystem root, the home folder
    or a whole bucket."""
    if not str(uri).strip():
        raise ValueError("empty: expected a folder (path, file:// or s3://bucket/prefix); an empty value "
                         "would write into the current directory")
    uri = absolute_location(str(uri).strip())
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

class TrackingConfig(Strict):
    """MLflow: `uri` or MLFLOW_TRACKING_URI, else a local sqlite store under the job's output."""

    uri: str | None = None
    experiment: str = "dakd"
    enabled: bool = True
    parent_run_id: str | None = Field(None, description="nest this job's run under another (the pipeline sets it)")

class DataParallel(Strict):
    """Ray Train jobs: DDP workers and their batch. With `global_batch_size` set, each
    worker takes global_batch_size / num_workers samples per step."""

    batch_size_per_worker: int = Field(16, ge=1)
    global_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int = Field(1, ge=1)
    precision: Precision = Field("auto", description=(
        "the training step's arithmetic: auto = bf16 autocast on CUDA, float32 on the CPU; bf16 = bf16 "
        "autocast on any device (on a CPU with AMX or AVX512-BF16 a step takes 0.6-0.7 of float32's, "
        "benchmarks/precision.py; slower on one without); fp32 = float32 everywhere. Weights and optimizer state stay float32"))

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


class ActorPool(Strict):
    """Ray Data jobs: what each actor of the pool holds. The pool's size is the job's own
    (`actors`, or `actors_min`..`actors_max` for an autoscaling pool): see `pool_size`."""

    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    torch_threads: int = Field(1, ge=1)

    def pool_size(self) -> tuple[int, int]:
        """(min, max) actors of the pool."""
        actors = int(getattr(self, "actors"))  # fixed-size pools; SynthesizeConfig autoscales
        return actors, actors

    def peak_resources(self) -> tuple[float, float]:
        """(CPUs, GPUs) the pool holds at its largest."""
        largest = self.pool_size()[1]
        return largest * self.cpus_per_actor, largest * self.gpus_per_actor
