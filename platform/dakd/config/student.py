"""Config of the student jobs: `dakd train-saross`, `dakd evaluate`, `dakd predict`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from dakd.config.base import (ActorPool, DataParallel, Location, LossMode, OnError, Output, RayConfig, RunName,
                              SkipModule, SoftSynthetic, Strict, TrackingConfig, absolute_location)


# ---------------------------------------------------------------- student (issue: SAROSS-Net)
PRETRAINED_IMAGENET = "imagenet"


def _pretrained(value: str | None) -> str | None:
    """`imagenet` (the encoder's published weights through the Hugging Face hub cache) stays
    as it is; a local path becomes absolute; URIs stay."""
    return value if value in (None, PRETRAINED_IMAGENET) else absolute_location(value)


class SarossModelConfig(Strict):
    """SAROSS-Net: encoder + UNet++ decoder with CAFT. Paper: MambaVision-B (non-commercial
    licence); resnet34 is the unencumbered ablation encoder.

    pretrained: None (random init), `imagenet` (the encoder's published ImageNet weights via
    the Hugging Face hub cache: HF_HOME, HF_HUB_OFFLINE), or a weight file's path/URI."""

    encoder: str = "mambavision_b"
    pretrained: Annotated[str | None, AfterValidator(_pretrained)] = None
    decoder_channels: list[int] = Field(default_factory=lambda: [64, 128, 256])
    skip_module: SkipModule = "caft"
    caft_heads: int = Field(4, ge=1)


class SarossLossConfig(Strict):
    """L = λ_ce·CE + λ_dice·Dice + λ_kd·KD (Eq. 10); T: KD temperature (not given by the paper)."""

    mode: LossMode = "soft"
    # soft mode, synthetic samples: "kd" = KD against the teacher's logits only (the paper's
    # Eq. 10 as written); "kd+hard" = KD plus CE/Dice on the teacher's argmax (the other reading)
    soft_synthetic: SoftSynthetic = "kd"
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
    of one config get equal optimiser steps; `synthetic_share: 1` trains on R synthetic
    samples per epoch and no real one ("train on synthetic, test on real"). The best
    checkpoint is selected on `val_split` ("val", carved at ingest by source.val_fraction);
    selecting on the test split is refused unless `select_on_test` is set, and is then
    flagged in the summary, best.json and MLflow."""

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
    synthetic_share: float = Field(
        0.5, ge=0.0, le=1.0, description="expected share of synthetic samples per batch; 1: synthetic samples only "
                                         "(R per epoch, loss modes hard and soft): what the synthetic set teaches "
                                         "on its own, measured on the real val split")
    epochs: int = Field(200, ge=1)
    batch_size_per_worker: int = Field(8, ge=1)
    global_batch_size: int | None = Field(16, ge=1)
    lr: float = Field(5e-5, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant: `lr` throughout (the paper names no schedule); cosine: from `lr` "
                                "down to 0 over the run's optimiser steps (train.saross.scheduled_lr)")
    weight_decay: float = Field(0.01, ge=0)
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights (decay per optimiser step, "
                                      "e.g. 0.99); validation, selection, evaluate and predict then use it. "
                                      "None: the raw weights (the paper)")
    grad_clip: float = Field(1.0, gt=0)
    cache_dataset: bool = True
    prefetch_epoch: bool = Field(
        False, description="each worker reads its whole epoch of batches into memory before the epoch's first step "
                           "(the same feed and draws, train.feed). On a CPU-only node the feed's Ray Data tasks then "
                           "do not compete with the training threads for the cores (2-core CPU, DAKD soft: 0.83-0.87 of "
                           "a bare loop against 0.65-0.66 streaming, benchmarks/saross_train.py); on a GPU node keep it "
                           "off, so the feed overlaps the GPU's work. Memory: one epoch of batches per worker "
                           "(train.saross_feed.epoch_bytes), refused above half the memory Ray gives tasks on the smallest node that can run a worker")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(20, ge=1)
    overlay_count: int = Field(4, ge=0, description="validation images drawn as overlays each epoch")
    val_batch_size: int = Field(8, ge=1, description="validation images of one size per forward (inference.segment_many; "
                                                     "benchmarks/validation.py)")
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
        if self.synthetic_share == 1.0 and self.loss.mode == "real-only":
            raise ValueError("synthetic_share=1 (synthetic samples only) leaves loss.mode=real-only nothing to train "
                             "on: use loss.mode=hard or soft")
        if self.crop_size % 32:
            raise ValueError(f"crop_size {self.crop_size}: must be a multiple of 32 (the encoder's deepest stride)")
        return self


class EvaluateConfig(ActorPool):
    """`dakd evaluate`: a SAROSS-Net checkpoint on a shard set's split at full resolution."""

    checkpoint: Location = "runs/demo/student/soft"
    shards: Location = "runs/demo/real"
    split: str = "test"
    output: Output = "runs/demo/eval"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    name: str | None = Field(None, description="row name in the table (default: the checkpoint's run name)")
    overlay_count: int = Field(4, ge=0)
    batch_size: int = Field(8, ge=1, description="images per actor call; those of one size go through the network "
                                                 "together (inference.segment_many; benchmarks/validation.py)")
    actors: int = Field(1, ge=1)
    compile: bool = Field(False, description="wrap the network in torch.compile (GPU; slow start-up)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class PredictConfig(ActorPool):
    """`dakd predict`: batch inference over a folder or bucket of images -> mask PNGs + class areas."""

    model: Location = Field("runs/demo/student/soft", description="checkpoint URI, run dir, or models:/<name>/<version>")
    input: Location = "runs/demo/predict-in"
    output: Output = "runs/demo/predict"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    pixel_size_m: float | None = Field(None, gt=0, description="ground size of a pixel (m); adds km² areas")
    batch_size: int = Field(1, ge=1)
    actors: int = Field(1, ge=1)
    compile: bool = Field(False, description="wrap the network in torch.compile (GPU; slow start-up)")
    overwrite: bool = False
    on_error: OnError = Field("fail", description="an unreadable input: fail, or skip it and list it "
                                                                  "in skipped.json and the summary")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="resolves models:/ URIs")
    ray: RayConfig = Field(default_factory=RayConfig)

