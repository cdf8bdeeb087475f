"""SOS ("Deep-SAR Oil Spill", Zhu et al. 2022): 256x256 tiles, binary (SOS_CLASSES).

Layout per split and sensor (palsar, sentinel), detected per folder:
- flat (train): `<root>/<split>/<sensor>/<id>_sat.jpg` + `<id>_mask.png` in one folder;
- sat/gt (test): `<root>/<split>/<sensor>/sat/<id>_sat.jpg` + `.../gt/<id>_mask.png`.
The published archive wraps these in a `dataset/` folder: a root without the split
folders but with `dataset/` is read from there.
Images are grey stored as RGB JPEG; masks are RGB PNG with R=G=B, binarised at
>= OIL_THRESHOLD -> 1 (oil), else 0 (many train masks have grey edges).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dakd import storage
from dakd.data.classes import SOS_CLASSES
from dakd.data.readers import PairRef, decode_grey, files_by_key, make_record, pair_by_key, require_folder
from dakd.errors import ConfigError, DataError

SENSORS = ("palsar", "sentinel")
OIL_THRESHOLD = 128
LAYOUT = "<split>/<sensor>/<id>_sat.jpg + <id>_mask.png, or <split>/<sensor>/sat/<id>_sat.jpg + gt/<id>_mask.png"


class SOSReader:
    """Reads the SOS layout; records have (H, W) uint8 image, (H, W) uint8 mask in {0, 1}
    and `sensor` set."""

    name = "sos"
    classes = SOS_CLASSES

    def __init__(self, root: str, splits: Sequence[str], sensors: Sequence[str]):
        if not splits:
            raise ConfigError("SOS reader: splits must name at least one split")
        unknown = [s for s in sensors if s not in SENSORS]
        if not sensors or unknown:
            raise ConfigError(f"SOS reader: sensors must be a non-empty subset of {list(SENSORS)}, got {list(sensors)}")
        self.root = str(root).rstrip("/")
        self.splits = tuple(splits)
        self.sensors = tuple(sensors)

    def data_root(self) -> str:
        """The folder holding the split folders (root, or root/dataset as published)."""
        require_folder(self.root, f"an SOS folder holding {LAYOUT}")
        if any(storage.is_dir(storage.join_uri(self.root, s)) for s in self.splits):
            return self.root
        wrapped = storage.join_uri(self.root, "dataset")
        return wrapped if storage.is_dir(wrapped) else self.root

    def list_pairs(self) -> tuple[list[PairRef], list[dict]]:
        base = self.data_root()
        refs, problems = [], []
        for split in self.splits:
            for sensor in self.sensors:
                folder = storage.join_uri(base, split, sensor)
                require_folder(folder, f"the SOS folder {LAYOUT}")
                if storage.is_dir(storage.join_uri(folder, "sat")):
                    image_dir, mask_dir = storage.join_uri(folder, "sat"), storage.join_uri(folder, "gt")
                else:
                    image_dir = mask_dir = folder
                images = files_by_key(image_dir, ("_sat.jpg", "_sat.jpeg"))
                masks = files_by_key(mask_dir, ("_mask.png",))
                prefix = f"{split}/{sensor}"
                pairs, found = pair_by_key(prefix, images, masks)
                problems += found
                if not pairs:
                    raise DataError(
                        folder, f"no image/mask pairs found ({len(found)} unmatched files); expected {LAYOUT}"
                    )
                refs += [PairRef(f"{prefix}/{k}", split, self.name, i, m, (("sensor", sensor),)) for k, i, m in pairs]
        return sorted(refs, key=lambda r: r.id), problems

    def read(self, ref: PairRef) -> dict:
        image = decode_grey(storage.read_bytes(ref.image_uri), ref.image_uri)
        grey = decode_grey(storage.read_bytes(ref.mask_uri), ref.mask_uri, mask=True)
        mask = (grey >= OIL_THRESHOLD).astype(np.uint8)
        return make_record(ref, image, mask, sensor=dict(ref.extra)["sensor"], off_palette_pixels=0)
