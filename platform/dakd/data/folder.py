"""Own data: `<root>/images/*` + `<root>/masks/*`, matched by file stem, one split.

Masks are class-index images (mode L or P, values < num_classes) when `palette` is None,
else RGB images mapped to the nearest palette colour (row i of the palette is class i;
pixels that were not exactly a palette colour are counted in `off_palette_pixels`;
more than `max_off_palette_share` of a mask is a DataError).
Images are 8-bit grey (or RGB, converted as in `readers.to_grey`).
"""

from __future__ import annotations

import numpy as np

from dakd import storage
from dakd.data.classes import ClassTable
from dakd.data.readers import (PairRef, check_off_palette, decode_grey, decode_index_mask, decode_rgb, files_by_key,
                               make_record, map_palette, pair_by_key, require_folder)
from dakd.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
LAYOUT = f"images/<name>{{{','.join(IMAGE_SUFFIXES)}}} + masks/<name>{{{','.join(MASK_SUFFIXES)}}}"


class FolderReader:
    """Reads an images/ + masks/ folder; records have (H, W) uint8 image and mask."""

    name = "folder"

    def __init__(self, root: str, split: str, palette: list[list[int]] | None, classes: ClassTable,
                 max_off_palette_share: float):
        self.root = str(root).rstrip("/")
        self.split = str(split)
        self.classes = classes
        self.max_off_palette_share = float(max_off_palette_share)
        self.palette = None
        if palette is not None:
            pal = np.asarray(palette)
            if pal.shape != (classes.num_classes, 3) or pal.min() < 0 or pal.max() > 255:
                raise ConfigError(
                    f"folder reader: palette must be {classes.num_classes} RGB triples in 0..255 "
                    f"(one per class), got shape {pal.shape}"
                )
            self.palette = pal.astype(np.uint8)

    def list_pairs(self) -> tuple[list[PairRef], list[dict]]:
        require_folder(self.root, f"a folder holding {LAYOUT}")
        images = files_by_key(storage.join_uri(self.root, "images"), IMAGE_SUFFIXES)
        masks = files_by_key(storage.join_uri(self.root, "masks"), MASK_SUFFIXES)
        pairs, problems = pair_by_key(self.split, images, masks)
        if not pairs:
            unmatched = len(problems)
            raise DataError(self.root, f"no image/mask pairs found ({unmatched} unmatched files); expected {LAYOUT}")
        refs = [PairRef(f"{self.split}/{k}", self.split, self.name, i, m) for k, i, m in pairs]
        return refs, problems

    def read(self, ref: PairRef) -> dict:
        image = decode_grey(storage.read_bytes(ref.image_uri), ref.image_uri)
        data = storage.read_bytes(ref.mask_uri)
        off = 0
        if self.palette is None:
            mask = decode_index_mask(data, ref.mask_uri, self.classes.num_classes)
        else:
            mask, off = map_palette(decode_rgb(data, ref.mask_uri, mask=True), self.palette)
            check_off_palette(off, mask.size, self.max_off_palette_share, ref.mask_uri)
        return make_record(ref, image, mask, sensor=None, off_palette_pixels=off)
