"""Feeding training workers from a shard set through Ray Data: decode, random crop, flips,
normalisation. Each output row: `image` float32 (1, s, s) in [-1, 1] (data.transforms),
`mask` uint8 (s, s) class index.

Shuffling without an all-to-all shuffle (which costs seconds of task start-up per epoch even
for 16 samples): every epoch the blocks come in a new random order
(`randomize_block_order`, a reordering of object references) and the rows inside each
window of blocks are permuted (`shuffle_window`)."""

from __future__ import annotations

import math

import numpy as np

from dakd import storage
from dakd.data.mosaic import random_crop_flip
from dakd.data.shards import PAIR_COLUMNS, ShardSet, decode_plane
from dakd.data.transforms import normalize_image


BLOCK_ROWS = 16  # rows per block the crops are made in: small blocks mix well when reordered
WINDOW_ROWS = 64  # rows permuted together by shuffle_window


def permute_rows(batch: dict) -> dict:
    """A Ray Data numpy batch with its rows in a random order."""
    n = len(next(iter(batch.values()))) if batch else 0
    order = np.random.default_rng().permutation(n)
    return {k: v[order] for k, v in batch.items()}


def shuffle_window(ds, window_rows: int = WINDOW_ROWS):
    """`ds` with its blocks in a new random order every epoch and the rows of each window of
    `window_rows` rows (several blocks) permuted: a local shuffle, no all-to-all exchange.
    An epoch smaller than a window is shuffled globally."""
    return ds.randomize_block_order().map_batches(permute_rows, batch_size=window_rows, batch_format="numpy")


def crop_flip_batch(batch: dict, crop_size: int) -> dict:
    """Ray Data batch of shard rows -> cropped, flipped, normalised arrays (rows in a random order)."""
    rng = np.random.default_rng()
    images, masks = [], []
    order = rng.permutation(len(batch["id"]))
    for sid, h, w, img, msk in zip(*(batch[k][order] for k in ("id", "height", "width", "image", "mask"))):
        image, mask = decode_plane(img, h, w), decode_plane(msk, h, w)
        image, mask = random_crop_flip(image, mask, crop_size, rng, str(sid))
        images.append(normalize_image(image)[None])
        masks.append(mask)
    return {"image": np.stack(images), "mask": np.stack(masks)}


def real_dataset(shard_set: ShardSet, split: str, crop_size: int, cache: bool = True, samples: int | None = None):
    """A Ray Dataset of random crops of `split`, re-drawn and re-ordered every epoch (blocks
    in a random order, rows permuted within blocks of BLOCK_ROWS).

    cache: keep the decoded shards in Ray's object store (spilling to disk when large), so
    an epoch does not list and re-read the files; on a small set that is 30x faster per
    epoch. Crops and flips stay lazy, drawn anew each epoch.
    samples: rows per epoch when more than the split holds: every sample once, then
    repeats (whole blocks in a random order each epoch) up to `samples`.
    """
    import ray

    loc = storage.resolve(shard_set.root)
    paths = [storage.resolve(f).path for f in shard_set.files(split)]
    ds = ray.data.read_parquet(paths, filesystem=loc.fs, columns=PAIR_COLUMNS)
    if cache:
        ds = ds.materialize()
    count = shard_set.manifest["splits"][split]["count"]
    if samples is not None and samples > count:
        extra = samples - count
        copies = math.ceil(extra / count)
        filler = ds.union(*([ds] * (copies - 1))) if copies > 1 else ds
        ds = ds.union(filler.randomize_block_order().limit(extra))
    return ds.randomize_block_order().map_batches(crop_flip_batch, fn_kwargs={"crop_size": crop_size},
                                                  batch_size=BLOCK_ROWS, batch_format="numpy")
