"""OSD (Krestenitis et al. 2019): Sentinel-1 scenes, 5 classes (OSD_CLASSES).

Layout: `<root>/<split>/images/<name>.jpg` (8-bit grey JPEG, often 3 identical channels)
with `<root>/<split>/labels_1D/<name>.png` (class index) and/or
`<root>/<split>/labels/<name>.png` (RGB, the OSD palette). The class-index label is used
when present for that image; otherwise the RGB label is mapped to the nearest palette
colour, and the pixels that were not exactly a palette colour are counted.
"""

from __future__ import annotations

from typing import Sequence

from dakd import storage
from dakd.data.classes import OSD_CLASSES
from dakd.data.readers import (PairRef, check_off_palette, decode_grey, decode_index_mask, decode_rgb, files_by_key,
                               make_record, map_palette, pair_by_key, problem, require_folder)
from dakd.errors import ConfigError, DataError

LAYOUT = "<split>/images/*.jpg with <split>/labels_1D/*.png (class index) or <split>/labels/*.png (RGB palette)"


class OSDReader:
    """Reads the OSD folder layout; records have (H, W) uint8 image and class-index mask."""

    name = "osd"
    classes = OSD_CLASSES

    def __init__(self, root: str, splits: Sequence[str], max_off_palette_share: float):
        if not splits:
            raise ConfigError("OSD reader: splits must name at least one split")
        if not 0.0 <= max_off_palette_share <= 1.0:
            raise ConfigError(f"OSD reader: max_off_palette_share must be in [0, 1], got {max_off_palette_share}")
        self.root = str(root).rstrip("/")
        self.splits = tuple(splits)
        self.max_off_palette_share = float(max_off_palette_share)

    def list_pairs(self) -> tuple[list[PairRef], list[dict]]:
        require_folder(self.root, f"an OSD folder holding {LAYOUT}")
        refs, problems = [], []
        for split in self.splits:
            base = storage.join_uri(self.root, split)
            require_folder(base, f"the OSD split folder {LAYOUT}")
            images = files_by_key(storage.join_uri(base, "images"), (".jpg", ".jpeg"))
            rgb = files_by_key(storage.join_uri(base, "labels"), (".png",))
            index = files_by_key(storage.join_uri(base, "labels_1D"), (".png",))
            pairs, found = pair_by_key(split, images, {**rgb, **index})
            # an RGB label shadowed by a labels_1D file of the same name, both without image
            shadowed = sorted((rgb.keys() & index.keys()) - images.keys())
            found += [problem(f"{split}/{k}", rgb[k], "mask without image") for k in shadowed]
            problems += found
            if not pairs:
                raise DataError(base, f"no image/label pairs found ({len(found)} unmatched files); expected {LAYOUT}")
            for key, image_uri, mask_uri in pairs:
                kind = "index" if key in index else "rgb"
                refs.append(PairRef(f"{split}/{key}", split, self.name, image_uri, mask_uri, (("label", kind),)))
        return sorted(refs, key=lambda r: r.id), problems

    def read(self, ref: PairRef) -> dict:
        image = decode_grey(storage.read_bytes(ref.image_uri), ref.image_uri)
        data = storage.read_bytes(ref.mask_uri)
        off = 0
        if dict(ref.extra).get("label") == "index":
            mask = decode_index_mask(data, ref.mask_uri, self.classes.num_classes)
        else:
            rgb = decode_rgb(data, ref.mask_uri, mask=True)
            mask, off = map_palette(rgb, self.classes.palette())
            check_off_palette(off, mask.size, self.max_off_palette_share, ref.mask_uri)
        return make_record(ref, image, mask, sensor=None, off_palette_pixels=off)
