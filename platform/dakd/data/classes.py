"""The fixed class tables of the data sets the platform reads.

A class table maps class index -> name and display colour (RGB). The OSD palette is
also the label encoding of the OSD data set (RGB label PNGs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassTable:
    """Class names and their RGB colours; index i is class i."""

    name: str
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def palette(self) -> np.ndarray:
        """(C, 3) uint8 colours."""
        return np.asarray(self.colors, dtype=np.uint8)

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) class index -> (H, W, 3) uint8 RGB."""
        return self.palette()[np.clip(mask, 0, self.num_classes - 1)]

    def to_dict(self) -> dict:
        return {"name": self.name, "names": list(self.names), "colors": [list(c) for c in self.colors]}


# Krestenitis et al. 2019 (OSD): the label PNG colours are the class encoding.
OSD_CLASSES = ClassTable(
    name="osd",
    names=("sea", "oil", "look-alike", "ship", "land"),
    colors=((0, 0, 0), (0, 255, 255), (255, 0, 0), (153, 76, 0), (0, 153, 0)),
)

# Zhu et al. 2022 (SOS, "Deep-SAR Oil Spill"): binary.
SOS_CLASSES = ClassTable(
    name="sos",
    names=("background", "oil"),
    colors=((0, 0, 0), (255, 255, 255)),
)


def class_pixel_counts(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) int64 pixels of each class in an index mask of any shape; values
    >= num_classes are not counted. A comparison per class: on a uint8 mask ~6x faster than
    np.bincount, which first widens every pixel to int64."""
    return np.array([np.count_nonzero(mask == c) for c in range(num_classes)], dtype=np.int64)


def class_table_from_dict(d: dict) -> ClassTable:
    """Inverse of ClassTable.to_dict (used when reading a manifest)."""
    return ClassTable(
        name=d["name"], names=tuple(d["names"]), colors=tuple(tuple(int(v) for v in c) for c in d["colors"])
    )
