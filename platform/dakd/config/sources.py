"""Config of the data jobs: sources, `dakd ingest`, `dakd balance`."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from dakd.config.base import Location, OnError, Output, RayConfig, Sensor, Strict


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
    sensors: list[Sensor] = Field(default_factory=lambda: list(get_args(Sensor)))
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


class IngestConfig(Strict):
    """`dakd ingest`: a source -> a Parquet shard set at `output`."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    output: Output = "runs/demo/real"
    create_bucket: bool = Field(False, description="create the output's S3 bucket when it does not exist (never implicit)")
    rows_per_file: int = Field(256, ge=1)
    on_error: OnError = "fail"
    overwrite: bool = False
    ray: RayConfig = Field(default_factory=RayConfig)


class BalanceConfig(Strict):
    """`dakd balance`: b = sqrt(P(x0) / P(y0)) over one split of a shard set."""

    shards: Location = "runs/demo/real"
    split: str = "train"
    ray: RayConfig = Field(default_factory=RayConfig)

