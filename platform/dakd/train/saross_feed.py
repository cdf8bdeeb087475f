"""Feeding SAROSS-Net's workers: real crops + synthetic 2x2 mosaics through Ray Data.

One Ray Dataset per epoch, the union of
- real rows: random `crop_size` crops + flips of the real train split (train.feed);
- synthetic rows: tiles of a synthetic shard set (`dakd synthesize`, SYNTH_SCHEMA),
  shuffled, grouped four at a time into a 2x2 mosaic (data.mosaic: images and teacher
  logits together; 256 tiles -> 512 mosaic), then randomly cropped to `crop_size` and
  flipped like the real crops. With `mosaic: false` each tile is one sample.
Each epoch holds every real crop once and S = round(R * share / (1 - share)) synthetic
samples (R real samples, share = `synthetic_share`), re-drawn every epoch (tiles repeat
when the set is small), so a batch holds `share` synthetic samples in expectation. Every
epoch the tiles and the union come in a new random block order and the union's rows are
permuted in windows of several small blocks (train.feed.shuffle_window: no all-to-all
shuffle), so each worker's batches mix both kinds; an epoch smaller than a window is
shuffled globally.
Every mode sees R + S samples per epoch (compute-matched students): `real-only` fills
the S slots with more random crops of real images (whole shard blocks in a random
order, re-drawn every epoch). With share 1 an epoch holds S = R synthetic samples and no
real one.
With `prefetch_epoch` a worker holds its epoch of batches: `epoch_bytes` sizes it and
`check_prefetch_memory` refuses a run whose epoch would not fit the smallest worker node.

Row layout (numpy): `image` float32 (1, s, s) in [-1, 1] (data.transforms), `mask` uint8
(s, s) (real: ground truth; synthetic: argmax of the logits), and, when synthetic data is
used, `logits` float16 (C, s, s) (zeros on real rows) and `synthetic` bool.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from dakd import storage
from dakd.data.mosaic import mosaic, random_crop_flip
from dakd.data.shards import SOFT_COLUMNS, SYNTHETIC_SPLIT, ShardSet, decode_logits, decode_plane, open_shard_set
from dakd.data.transforms import normalize_image
from dakd.errors import ConfigError, DataError
from dakd.seeds import feed_rng

if TYPE_CHECKING:
    from dakd.config import TrainSarossConfig

log = logging.getLogger(__name__)


def _read_columns(uri: str, columns: list[str]):
    loc = storage.resolve(uri)
    with loc.fs.open_input_file(loc.path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        return names, pf.read(columns=[c for c in columns if c in names])


def check_real_crops(shard_set: ShardSet, split: str, crop_size: int) -> int:
    """Every image of `split` must be at least crop_size x crop_size; returns the sample count.
    DataError naming the first sample that is smaller."""
    count = 0
    for uri in shard_set.files(split):
        _, table = _read_columns(uri, ["id", "height", "width"])
        for sid, h, w in zip(*(table.column(c).to_pylist() for c in ("id", "height", "width"))):
            if h < crop_size or w < crop_size:
                raise DataError(f"{uri} sample {sid!r}", f"image is {h}x{w} (HxW), smaller than the "
                                f"{crop_size}x{crop_size} crop (crop_size)")
            count += 1
    return count


def check_synthetic(synthetic: ShardSet, num_classes: int, crop_size: int, use_mosaic: bool) -> dict:
    """Validate a synthetic shard set against the real data and the crop; returns
    {"count", "tile": (h, w)}. DataError for a class-count mismatch, missing logits, or
    tiles (mosaics) smaller than the crop."""
    where = synthetic.root
    if synthetic.classes.num_classes != num_classes:
        raise DataError(where, f"synthetic shards have {synthetic.classes.num_classes} classes "
                        f"({', '.join(synthetic.classes.names)}) but the real data has {num_classes}")
    count, tile = 0, None
    for uri in synthetic.files(SYNTHETIC_SPLIT):
        names, table = _read_columns(uri, ["id", "height", "width", "num_classes", "logits"])
        if "logits" not in names:
            raise DataError(uri, "no `logits` column: hard and soft modes need teacher logits "
                            "(a shard set written by `dakd synthesize`), or use loss.mode=real-only")
        ids = table.column("id").to_pylist()
        logits = table.column("logits")
        for i, (sid, h, w, c) in enumerate(zip(ids, *(table.column(k).to_pylist() for k in ("height", "width", "num_classes")))):
            if logits[i].as_py() is None:
                raise DataError(f"{uri} sample {sid!r}", "logits are missing (null)")
            if c != num_classes:
                raise DataError(f"{uri} sample {sid!r}", f"logits have {c} classes, the real data {num_classes}")
            if tile is None:
                tile = (h, w)
            elif (h, w) != tile:
                raise DataError(f"{uri} sample {sid!r}", f"tile is {h}x{w}, the set's first tile {tile[0]}x{tile[1]}")
            count += 1
    if count == 0:
        raise DataError(where, "the synthetic shard set holds no samples")
    factor = 2 if use_mosaic else 1
    if tile[0] * factor < crop_size or tile[1] * factor < crop_size:
        what = "2x2 mosaic" if use_mosaic else "tile"
        raise DataError(where, f"a {what} of the {tile[0]}x{tile[1]} tiles is {tile[0] * factor}x{tile[1] * factor}, "
                        f"smaller than the {crop_size}x{crop_size} crop (crop_size)")
    return {"count": count, "tile": tile}


def mosaic_batch(batch: dict, crop_size: int, use_mosaic: bool, run_seed: int = 0, copy: int = 0) -> dict:
    """Ray Data batch of synthetic rows -> mosaics (4 random tiles each; a remainder of
    fewer than 4 tiles is dropped), cropped and flipped, images normalised. The draws come
    from (run seed, epoch, copy, tile ids) (seeds.feed_rng); `copy` tells apart the passes
    over the tiles within one epoch."""
    from dakd.train.feed import feed_epoch

    epoch = feed_epoch()
    group = 4 if use_mosaic else 1
    n = len(batch["id"])
    rng = feed_rng(run_seed, epoch, f"mosaic/{copy}/{batch['id'][0] if n else ''}")
    # random groups of `group` distinct tiles (a small set repeats tiles within an epoch)
    groups, open_groups = [], []
    for i in rng.permutation(n):
        for g in open_groups:
            if all(batch["id"][j] != batch["id"][i] for j in g):
                g.append(i)
                break
        else:
            open_groups.append([i])
        full = [g for g in open_groups if len(g) == group]
        groups += full
        open_groups = [g for g in open_groups if len(g) < group]
    images, logits, masks = [], [], []
    for idx in groups:
        tiles_i, tiles_l = [], []
        for i in idx:
            h, w, c = int(batch["height"][i]), int(batch["width"][i]), int(batch["num_classes"][i])
            tiles_i.append(decode_plane(batch["image"][i], h, w)[None])
            tiles_l.append(decode_logits(batch["logits"][i], h, w, c))
        if use_mosaic:
            image, logit = mosaic(np.stack(tiles_i), np.stack(tiles_l))
        else:
            image, logit = tiles_i[0], tiles_l[0]
        sid = "mosaic of synthetic " + ",".join(str(batch["id"][i]) for i in idx)
        image, logit = random_crop_flip(image, logit, crop_size, feed_rng(run_seed, epoch, f"crop/{copy}/{sid}"), sid)
        images.append(normalize_image(image))
        logits.append(logit.astype(np.float16))
        masks.append(logit.argmax(axis=0).astype(np.uint8))
    c = int(batch["num_classes"][0]) if n else 1
    empty = (0, crop_size, crop_size)
    return {
        "image": np.stack(images) if images else np.zeros((0, 1, crop_size, crop_size), np.float32),
        "mask": np.stack(masks) if masks else np.zeros(empty, np.uint8),
        "logits": np.stack(logits) if logits else np.zeros((0, c, crop_size, crop_size), np.float16),
        "synthetic": np.ones(len(images), dtype=bool),
    }


def mark_real(batch: dict, num_classes: int) -> dict:
    """Real crops gain zero logits and synthetic=False, so they union with synthetic rows."""
    n, s = batch["mask"].shape[0], batch["mask"].shape[-2:]
    return {**batch, "logits": np.zeros((n, num_classes, *s), dtype=np.float16), "synthetic": np.zeros(n, dtype=bool)}


def synthetic_count(real_count: int, share: float) -> int:
    """S = round(R * share / (1 - share)) synthetic samples per epoch; share 1 (synthetic
    samples only): S = R."""
    return real_count if share >= 1.0 else int(round(real_count * share / (1.0 - share)))


def training_dataset(real: ShardSet, split: str, crop_size: int, *, synthetic: str | None, mode: str,
                     share: float, use_mosaic: bool, cache: bool = True, seed: int = 0):
    """The epoch dataset (see module docstring) and a summary dict of what it holds; seed:
    the run seed every draw of the feed derives from (train.feed)."""
    import ray

    from dakd.train.feed import block_order, real_dataset, shuffle_window

    num_classes = real.classes.num_classes
    r = check_real_crops(real, split, crop_size)
    if r == 0:
        raise DataError(real.root, f"split {split!r} holds no samples")
    s = synthetic_count(r, share)
    info = {"real": r, "synthetic": 0, "mode": mode, "real_distinct": r, "epoch_samples": r + s}
    if mode == "real-only":
        # compute-matched: the synthetic share is filled with more real crops (repeats)
        info["real"] = r + s
        return real_dataset(real, split, crop_size, cache=cache, samples=r + s, seed=seed), info
    if not synthetic:
        raise ConfigError(f"loss.mode={mode}: set `synthetic` to a synthetic shard set (from `dakd synthesize`)")
    syn_set = open_shard_set(synthetic)
    syn = check_synthetic(syn_set, num_classes, crop_size, use_mosaic)
    info.update(synthetic=s, synthetic_tiles=syn["count"], tile=list(syn["tile"]))
    if share >= 1.0:  # synthetic samples only
        info.update(real=0, real_distinct=0, epoch_samples=s)
    ds = real_dataset(real, split, crop_size, cache=cache, seed=seed) if info["real"] else None
    if s == 0:
        return ds, info
    group = 4 if use_mosaic else 1
    per_pass = syn["count"] // group
    if per_pass == 0:
        raise DataError(synthetic, f"{syn['count']} synthetic tile(s): a mosaic needs 4")
    loc = storage.resolve(syn_set.root)
    paths = [storage.resolve(f).path for f in syn_set.files(SYNTHETIC_SPLIT)]
    tiles = ray.data.read_parquet(paths, filesystem=loc.fs,
                                  columns=SOFT_COLUMNS)
    if cache:
        tiles = tiles.materialize()
    reps = math.ceil(s / per_pass) + (1 if s > per_pass else 0)  # +1: remainders dropped per batch
    passes = [block_order(tiles, seed, f"tiles/{k}").map_batches(
        mosaic_batch, fn_kwargs={"crop_size": crop_size, "use_mosaic": use_mosaic, "run_seed": seed, "copy": k},
        batch_size=group * 8, batch_format="numpy") for k in range(reps)]
    syn_ds = block_order(passes[0].union(*passes[1:]) if reps > 1 else passes[0], seed, "mosaics").limit(s)
    if ds is None:  # synthetic samples only
        return shuffle_window(syn_ds, seed), info
    real_ds = ds.map_batches(mark_real, fn_kwargs={"num_classes": num_classes}, batch_format="numpy")
    # Mixing the union: the workers' split hands out whole blocks, so without it one worker
    # could get only real blocks and another only synthetic ones.
    return shuffle_window(real_ds.union(syn_ds), seed), info


def epoch_bytes(cfg: TrainSarossConfig, data_info: dict, num_classes: int) -> int:
    """Bytes one worker holds with `prefetch_epoch`: its share of the epoch's samples, each a
    crop_size^2 float32 image and uint8 mask, plus float32 teacher logits (C per pixel) when
    synthetic data is used (the per-sample flag's byte left out)."""
    per_pixel = 4 + 1 + (4 * num_classes if cfg.loss.mode != "real-only" else 0)
    return data_info["epoch_samples"] // cfg.num_workers * cfg.crop_size ** 2 * per_pixel


def check_prefetch_memory(cfg: TrainSarossConfig, data_info: dict, num_classes: int) -> None:
    """ConfigError naming `prefetch_epoch` when one worker's epoch would take more than half the
    memory Ray gives tasks on the smallest node that can run a worker (Ray must be up)."""
    if not cfg.prefetch_epoch:
        return
    from dakd.runtime import smallest_worker_memory

    smallest = smallest_worker_memory(cfg.use_gpu)
    if smallest is None:  # no worker node up yet (autoscaling): Ray Train waits for one
        log.warning("train-saross: no node that can run a worker is up yet; prefetch_epoch's memory is not checked")
        return
    total, node = smallest
    need = epoch_bytes(cfg, data_info, num_classes)
    if need > total // 2:
        raise ConfigError(f"prefetch_epoch=true: a worker's epoch ({data_info['epoch_samples']} samples of "
                          f"{cfg.crop_size}x{cfg.crop_size} over {cfg.num_workers} worker(s)) takes {need / 2**30:.1f} GiB, "
                          f"more than half the {total / 2**30:.1f} GiB Ray gives tasks on node {node}; set "
                          f"prefetch_epoch=false (stream the feed)")
