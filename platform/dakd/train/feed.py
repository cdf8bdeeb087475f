"""Feeding training workers from a shard set through Ray Data: decode, random crop, flips,
normalisation. Each output row: `image` float32 (1, s, s) in [-1, 1] (data.transforms),
`mask` uint8 (s, s) class index.

Shuffling without an all-to-all shuffle (which costs seconds of task start-up per epoch even
for 16 samples): every epoch the blocks come in a new random order
(`randomize_block_order`, a reordering of object references) and the rows inside each
window of blocks are permuted (`shuffle_window`).

Every draw is seeded (seeds.feed_rng): a sample's crop and flips are a function of (run
seed, epoch, sample id, copy), a window's order of (run seed, epoch, its rows), and block
orders come from Ray Data's own seeded `randomize_block_order`, re-seeded every execution
(one execution per epoch). So with the same seed every sample gets the same crop in the
same epoch on any machine. Not fixed: the interleaving of parallel tasks, and so which
repeats fill an epoch's budget where a `limit` follows a union (real-only's extra crops,
synthetic mosaics beyond the first pass)."""

from __future__ import annotations

import math
import zlib

import numpy as np

from dakd import storage
from dakd.data.mosaic import random_crop_flip
from dakd.data.shards import PAIR_COLUMNS, ShardSet, decode_plane
from dakd.data.transforms import normalize_image
from dakd.seeds import feed_rng, sample_seed


BLOCK_ROWS = 16  # rows per block the crops are made in: small blocks mix well when reordered
WINDOW_ROWS = 64  # rows permuted together by shuffle_window


def feed_epoch() -> int:
    """The epoch a Ray Data task works for: Ray Data numbers the executions of a dataset
    (`DataContext._execution_idx`, the counter its own seeded shuffles use), and each
    training epoch is one execution. 0 outside Ray Data."""
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0) or 0)


def block_order(ds, run_seed: int, name: str):
    """`ds` with its blocks in a random order that is new every execution (epoch) and the
    same for the same (run seed, name) on any machine."""
    from ray.data import RandomSeedConfig

    seed = sample_seed(run_seed, f"blocks/{name}") % (1 << 32)
    return ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def permute_rows(batch: dict, run_seed: int = 0) -> dict:
    """A Ray Data numpy batch with its rows in a random order (drawn from the run seed, the
    epoch and the rows' content)."""
    n = len(next(iter(batch.values()))) if batch else 0
    if n == 0:
        return batch
    key = zlib.crc32(np.ascontiguousarray(next(iter(batch.values()))).tobytes())
    order = feed_rng(run_seed, feed_epoch(), f"window/{key}").permutation(n)
    return {k: v[order] for k, v in batch.items()}


def shuffle_window(ds, run_seed: int = 0, window_rows: int = WINDOW_ROWS):
    """`ds` with its blocks in a new random order every epoch and the rows of each window of
    `window_rows` rows (several blocks) permuted: a local shuffle, no all-to-all exchange.
    An epoch smaller than a window is shuffled globally."""
    return block_order(ds, run_seed, "window").map_batches(permute_rows, fn_kwargs={"run_seed": run_seed},
                                                           batch_size=window_rows, batch_format="numpy")


def crop_flip_batch(batch: dict, crop_size: int, run_seed: int = 0, copy: int = 0) -> dict:
    """Ray Data batch of shard rows -> cropped, flipped, normalised arrays (rows in a random
    order). Sample `id`'s crop in this epoch is drawn from (run seed, epoch, copy, id); `copy`
    tells apart the repeats of a sample within one epoch."""
    epoch = feed_epoch()
    images, masks = [], []
    ids = [str(i) for i in batch["id"]]
    order = feed_rng(run_seed, epoch, f"order/{copy}/{ids[0] if ids else ''}").permutation(len(ids))
    for sid, h, w, img, msk in zip(*(batch[k][order] for k in ("id", "height", "width", "image", "mask"))):
        image, mask = decode_plane(img, h, w), decode_plane(msk, h, w)
        rng = feed_rng(run_seed, epoch, f"crop/{copy}/{sid}")
        image, mask = random_crop_flip(image, mask, crop_size, rng, str(sid))
        images.append(normalize_image(image)[None])
        masks.append(mask)
    return {"image": np.stack(images), "mask": np.stack(masks)}


def real_dataset(shard_set: ShardSet, split: str, crop_size: int, cache: bool = True, samples: int | None = None,
                 seed: int = 0):
    """A Ray Dataset of random crops of `split`, re-drawn and re-ordered every epoch (blocks
    in a random order, rows permuted within blocks of BLOCK_ROWS); seed: the run seed.

    cache: keep the decoded shards in Ray's object store (spilling to disk when large), so
    an epoch does not list and re-read the files; on a small set that is 30x faster per
    epoch. Crops and flips stay lazy, drawn anew each epoch.
    samples: rows per epoch when more than the split holds: every sample once, then
    repeats (whole blocks in a random order each epoch, each repeat cropped anew) up to
    `samples`.
    """
    import ray

    loc = storage.resolve(shard_set.root)
    paths = [storage.resolve(f).path for f in shard_set.files(split)]
    ds = ray.data.read_parquet(paths, filesystem=loc.fs, columns=PAIR_COLUMNS)
    if cache:
        ds = ds.materialize()

    def crops(copy: int):
        return block_order(ds, seed, f"real/{copy}").map_batches(
            crop_flip_batch, fn_kwargs={"crop_size": crop_size, "run_seed": seed, "copy": copy},
            batch_size=BLOCK_ROWS, batch_format="numpy")

    count = shard_set.manifest["splits"][split]["count"]
    if samples is None or samples <= count:
        return crops(0)
    extra = samples - count
    copies = [crops(k) for k in range(1, math.ceil(extra / count) + 1)]
    filler = copies[0].union(*copies[1:]) if len(copies) > 1 else copies[0]
    return block_order(crops(0).union(block_order(filler, seed, "repeats").limit(extra)), seed, "real")
