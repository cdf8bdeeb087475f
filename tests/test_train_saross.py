"""SAROSS-Net training (DAKD) on a real local Ray cluster (the soft run with 2 DDP workers,
gloo; the others with one, as each worker process costs seconds of imports): the Ray Data
feed of real crops + synthetic mosaics, soft / hard / real-only modes, resume, the best
checkpoint by val mIoU, MLflow (metrics, overlays, a registered model loadable by
`models:/`), and bad input refused before training."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
import torch

from dakd.config import IngestConfig, ProceduralSource, SourceConfig, TrainSarossConfig, load_config
from dakd.data import shards
from dakd.data.ingest import run_ingest
from dakd.data.transforms import denormalize_image
from dakd.errors import ConfigError, DataError
from dakd.eval.metrics import confusion_matrix, segmentation_metrics
from dakd.inference import segment
from dakd import checkpoints as ckpt_io
from dakd.checkpoints import load_student
from dakd.train.saross import run_train_saross, scheduled_lr
from dakd.train.saross_feed import (check_prefetch_memory, check_synthetic, epoch_bytes, synthetic_count,
                                   training_dataset)

TILE = 32
TINY = ["model.encoder=mobilenetv3_small_050", "model.decoder_channels=[8, 8, 8]", "model.caft_heads=2", "crop_size=32",
        "global_batch_size=4", "num_workers=2", "lr=0.002", "log_every=1", "overlay_count=1", "max_failures=0"]


def write_synthetic(root: str, real: shards.ShardSet, *, num_classes: int = 5, logits: bool = True) -> list[dict]:
    """A synthetic shard set as `dakd synthesize` writes it: TILE x TILE tiles cut from the
    real train images, logits = 4 * one-hot(mask) + noise (float16). Returns the records."""
    rng = np.random.default_rng(1)
    records = []
    for rec in real.iter_records("train"):
        for k in range(2):
            img = rec["image"][k * TILE:(k + 1) * TILE, :TILE]
            msk = np.minimum(rec["mask"][k * TILE:(k + 1) * TILE, :TILE], num_classes - 1)
            lg = (4 * np.eye(num_classes, dtype=np.float32)[msk].transpose(2, 0, 1)
                  + rng.normal(size=(num_classes, TILE, TILE))).astype(np.float16)
            i = len(records)
            records.append(dict(id=str(i), split="train", source="synthetic", sensor=None, height=TILE, width=TILE,
                                image=img, mask=lg.argmax(0).astype(np.uint8), off_palette_pixels=0, index=i, seed=i,
                                logits=lg, num_classes=num_classes, teacher_checkpoint="t", teacher_hash="h", b=0.5,
                                sampler="ddim", steps=2, code_version="test"))
    schema = shards.SYNTH_SCHEMA if logits else shards.SHARD_SCHEMA
    table = shards.records_to_table(records, schema)
    name = shards.shard_name("train", 0)
    size = shards.write_table(f"{root}/{name}", table)
    classes = dict(real.manifest["classes"])
    if num_classes != 5:
        classes = {"name": "sos", "names": ["background", "oil"], "colors": [[0, 0, 0], [255, 255, 255]]}
    shards.write_manifest(root, {"kind": "synthetic", "classes": classes,
                                 "splits": {"train": {"count": len(records), "files": [{"path": name, "rows": len(records), "bytes": size}]}}})
    return records


def write_real_and_synthetic(base) -> dict:
    """A tiny real shard set (8 train + 2 val + 2 test procedural 64 px scenes) and a synthetic
    set for it under `base`: {"real", "syn", "tiles", "base"}."""
    real = str(base / "real")
    run_ingest(IngestConfig(source=SourceConfig(procedural=ProceduralSource(splits={"train": 8, "val": 2, "test": 2}, height=64,
                                                                           width=64, seed=3)), output=real, rows_per_file=4))
    syn = str(base / "syn")
    tiles = write_synthetic(syn, shards.open_shard_set(real))
    return {"real": real, "syn": syn, "tiles": tiles, "base": base}


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    return write_real_and_synthetic(tmp_path_factory.mktemp("saross"))


def config(data, output, *extra) -> TrainSarossConfig:
    return load_config(TrainSarossConfig, None, [f"shards={data['real']}", f"synthetic={data['syn']}", f"output={output}",
                                                 *TINY, *extra])


def _unflip(quadrant: np.ndarray, tile: np.ndarray) -> tuple[bool, bool] | None:
    for fh in (False, True):
        for fv in (False, True):
            t = tile[..., :, ::-1] if fh else tile
            t = t[..., ::-1, :] if fv else t
            if np.array_equal(quadrant, t):
                return fh, fv
    return None


def test_feed_mixes_real_crops_and_synthetic_mosaics(data):
    real = shards.open_shard_set(data["real"])
    ds, info = training_dataset(real, "train", 2 * TILE, synthetic=data["syn"], mode="soft", share=0.5, use_mosaic=True)
    rows = ds.take_all()
    syn = [r for r in rows if r["synthetic"]]
    assert info["real"] == 8 and len(syn) == synthetic_count(8, 0.5) == info["synthetic"]
    assert len(rows) - len(syn) == 8
    tiles = data["tiles"]
    for r in syn:
        image = denormalize_image(r["image"][0])
        logits = r["logits"]
        # mask = argmax of the logits; each quadrant is one whole tile, image and logits alike
        assert np.array_equal(r["mask"], logits.astype(np.float32).argmax(0))
        used = set()
        for qy in range(2):
            for qx in range(2):
                q_img = image[qy * TILE:(qy + 1) * TILE, qx * TILE:(qx + 1) * TILE]
                q_lg = logits[:, qy * TILE:(qy + 1) * TILE, qx * TILE:(qx + 1) * TILE]
                match = [(t["id"], _unflip(q_img, t["image"])) for t in tiles]
                match = [(i, f) for i, f in match if f is not None
                         and _unflip(q_lg, tiles[int(i)]["logits"]) == f]
                assert match, "every quadrant is a tile, its logits moved with it"
                used.add(match[0][0])
        assert len(used) == 4  # four different tiles
    for r in rows:
        if not r["synthetic"]:
            assert not r["logits"].any() and r["image"].shape == (1, 2 * TILE, 2 * TILE)


@pytest.mark.slow
def test_synthetic_only_feed_and_student(data, tmp_path):
    """synthetic_share=1: an epoch of R synthetic mosaics and no real crop; the student trains
    on them (soft: KD only) and is validated on the real val split."""
    real = shards.open_shard_set(data["real"])
    ds, info = training_dataset(real, "train", 2 * TILE, synthetic=data["syn"], mode="soft", share=1.0, use_mosaic=True)
    rows = ds.take_all()
    assert info["real"] == 0 and info["synthetic"] == synthetic_count(8, 1.0) == 8 == info["epoch_samples"]
    assert len(rows) == 8 and all(r["synthetic"] for r in rows)
    run = run_train_saross(config(data, str(tmp_path / "runs"), "loss.mode=soft", "synthetic_share=1", "epochs=1",
                                  "num_workers=1", "tracking.enabled=false"))
    assert run["data"]["real"] == 0 and run["steps"] == 8 // 4 and run["selected_on"] == "val"
    state = ckpt_io.read_state(run["last_checkpoint"])
    assert state["step"] == 2 and 0.0 <= state["val"]["miou"] <= 1.0
    with pytest.raises(ConfigError, match="synthetic_share=1 .* leaves loss.mode=real-only nothing to train on"):
        config(data, str(tmp_path / "runs"), "loss.mode=real-only", "synthetic_share=1")
    with pytest.raises(ConfigError, match="synthetic_share"):
        config(data, str(tmp_path / "runs"), "synthetic_share=1.5")


def test_each_worker_gets_both_kinds_every_epoch(data):
    """Ray Train hands each worker a streaming_split(equal=True) share of the epoch; the
    feed's block-order + window shuffle (no all-to-all shuffle) must still give every worker
    real and synthetic rows, in a new order each epoch."""
    import threading

    real = shards.open_shard_set(data["real"])
    ds, _ = training_dataset(real, "train", 2 * TILE, synthetic=data["syn"], mode="soft", share=0.5, use_mosaic=True)
    splits = ds.streaming_split(2, equal=True)
    seen = {0: [], 1: []}

    def consume(i):
        for _epoch in range(2):
            seen[i].append([(bool(s), float(im.sum())) for b in splits[i].iter_batches(batch_size=None)
                            for s, im in zip(b["synthetic"], b["image"])])

    threads = [threading.Thread(target=consume, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i in (0, 1):
        assert len(seen[i]) == 2 and all(len(epoch) == 8 for epoch in seen[i])
        for epoch in seen[i]:
            kinds = {s for s, _ in epoch}
            assert kinds == {True, False}, f"worker {i} got only {'synthetic' if True in kinds else 'real'} rows"
    # re-drawn every epoch: crops, flips and order differ
    assert seen[0][0] != seen[0][1]


def test_feed_draws_are_seeded_per_run_and_epoch(data):
    """The same run seed gives every real sample the same crop and flips in the same epoch
    (a fresh dataset, as a resumed run builds one); another epoch or another seed draws anew."""
    import hashlib

    real = shards.open_shard_set(data["real"])

    def real_crops(seed: int) -> list:
        ds, _ = training_dataset(real, "train", TILE, synthetic=data["syn"], mode="soft", share=0.5, use_mosaic=True,
                                 seed=seed)
        return [sorted(hashlib.sha1(r["image"].tobytes() + r["mask"].tobytes()).hexdigest()
                       for r in ds.take_all() if not r["synthetic"]) for _epoch in range(2)]

    first, again, other = real_crops(0), real_crops(0), real_crops(1)
    assert len(first[0]) == 8 and first == again
    assert first[0] != first[1] and first[0] != other[0]


@pytest.mark.slow
def test_soft_dakd_training_best_checkpoint_and_mlflow_model(data, tmp_path, mlflow_server):
    import mlflow
    import mlflow.pytorch

    cfg = config(data, str(tmp_path / "runs"), "loss.mode=soft", "epochs=2", "run_name=dakd", "lr_schedule=cosine", "ema_decay=0.9",
                 f"tracking.uri={mlflow_server}", "register_name=saross-test")
    seen = []  # what mlflow.pytorch logs while the job logs its model (after the logger's filters)
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("mlflow.pytorch").addHandler(handler)
    try:
        summary = run_train_saross(cfg)
    finally:
        logging.getLogger("mlflow.pytorch").removeHandler(handler)
    assert not [m for m in seen if "Pickle" in m]  # no unpickling caution: dakd loads the safetensors
    assert summary["epochs"] == 2 and summary["data"]["synthetic"] == 8 and summary["mode"] == "soft"
    # best.json names the checkpoint with the highest val mIoU among those kept
    run_dir = tmp_path / "runs" / "dakd"
    states = [json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/state.json")]
    assert {s["epoch"] for s in states} == {1, 2}
    best = json.loads((run_dir / "best.json").read_text())
    assert best["val_miou"] == max(s["val"]["miou"] for s in states) == summary["val_miou"]
    # selected on the val split, never on test; 8 real + 8 synthetic samples per epoch at batch 4
    assert best["selected_on"] == summary["selected_on"] == "val" and not best["selected_on_test"]
    assert all(s["val"]["split"] == "val" for s in states)
    assert summary["steps"] == 2 * (8 + 8) // 4 and summary["samples_seen"] == summary["steps"] * 4
    assert ckpt_io.read_state(best["checkpoint"])["epoch"] == best["epoch"] == summary["best_epoch"]
    model, state = load_student(str(run_dir))  # the run directory resolves to the best checkpoint
    assert state["location"] == best["checkpoint"] and state["kind"] == "sar-oss-net" and state["weights"] == "ema"

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["loss.mode"] == "soft" and run.data.params["crop_size"] == "32"
    assert run.data.tags["dakd.selected_on"] == "val" and run.data.tags["dakd.selected_on_test"] == "false"
    for key in ("train/ce", "train/dice", "train/kd", "val/miou", "val/iou_sea"):
        hist = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in hist] == [1, 2], key
    assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "train/kd"))
    # cosine schedule over the run's 8 steps: each epoch's logged lr is that of its last step (3, 7)
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "train/lr")]
    assert lrs == pytest.approx([0.002 * (1 + math.cos(math.pi * s / 8)) / 2 for s in (3, 7)])
    share = [m.value for m in client.get_metric_history(run.info.run_id, "train/synthetic_share")]
    assert all(0 < s < 1 for s in share)  # both kinds in the batches
    assert [a.path for a in client.list_artifacts(run.info.run_id, "overlays")]
    # the best checkpoint as a registered MLflow model with a signature, loadable by models:/
    assert summary["registered"] == "models:/saross-test/1"
    mlflow.set_tracking_uri(mlflow_server)
    info = mlflow.models.get_model_info(summary["registered"])
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, -1, -1]
    assert info.metadata["dakd_checkpoint"] == best["checkpoint"]
    loaded = mlflow.pytorch.load_model(summary["registered"]).eval()
    x = torch.randn(1, 1, 40, 72)
    dakd_loaded = ckpt_io.load_model(summary["registered"])[0]  # dakd's models:/ path: the safetensors beside it
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(dakd_loaded(x), model(x))  # both the EMA weights that were selected


@pytest.mark.slow
def test_real_only_then_resume_and_hard_mode(data, tmp_path):
    out = str(tmp_path / "runs")
    ro = ("loss.mode=real-only", "run_name=ro", "tracking.enabled=false", "ema_decay=0.9", "num_workers=1")
    first = run_train_saross(config(data, out, *ro, "epochs=1"))
    assert first["epochs"] == 1 and first["data"]["synthetic"] == 0
    # compute-matched: the synthetic half of the epoch is filled with real crops, so real-only
    # takes the steps a DAKD student of the same config takes (8 real + 8 synthetic at batch 4)
    assert first["data"]["real"] == 8 + synthetic_count(8, 0.5) and first["steps"] == 16 // 4
    again = run_train_saross(config(data, out, *ro, "epochs=2"))
    state = ckpt_io.read_state(again["last_checkpoint"])
    assert state["epoch"] == 2 and state["attempt_start_epoch"] == 1  # continued after epoch 1
    assert state["step"] == 2 * ckpt_io.read_state(first["last_checkpoint"])["step"] > 0
    assert state["ema_steps"] == state["step"]  # the average was restored on resume, not restarted
    # the EMA weights are what validation scored and what evaluate/predict load
    model, best = load_student(str(tmp_path / "runs" / "ro"))
    assert best["weights"] == "ema"
    ema, raw = ckpt_io.load_weights(best["location"], ema=True), ckpt_io.load_weights(best["location"])
    torch.testing.assert_close(model.state_dict(), ema)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())
    cm = sum(confusion_matrix(torch.from_numpy(segment(model, r["image"])), torch.tensor(r["mask"]), 5)
             for r in shards.open_shard_set(data["real"]).iter_records("val"))
    assert segmentation_metrics(cm, [str(i) for i in range(5)])["miou"] == pytest.approx(best["val"]["miou"])

    with pytest.raises(ConfigError, match="val_split=test: the best checkpoint would be chosen on the split"):
        config(data, out, "val_split=test")
    hard = run_train_saross(config(data, out, "loss.mode=hard", "epochs=1", "run_name=hard", "tracking.enabled=false",
                                   "synthetic_share=0.2", "val_split=test", "select_on_test=true", "num_workers=1",
                                   "prefetch_epoch=true"))
    assert hard["data"]["synthetic"] == synthetic_count(8, 0.2) == 2 and hard["epochs"] == 1
    # prefetch_epoch: the epoch's batches are read first, then every one is trained on
    assert hard["steps"] == (8 + 2) // 4 == ckpt_io.read_state(hard["last_checkpoint"])["step"]
    # selecting on test when asked for explicitly: flagged in the summary and best.json
    assert hard["selected_on"] == "test" and hard["selected_on_test"] is True
    assert json.loads((tmp_path / "runs" / "hard" / "best.json").read_text())["selected_on_test"] is True


def test_prefetch_epoch_memory_is_checked(data, tmp_path, ray_local):
    """prefetch_epoch holds a worker's epoch in memory: its size is the samples' arrays, and an
    epoch over half the memory Ray gives tasks on the smallest worker node is refused naming the
    setting and the node."""
    from dakd.runtime import smallest_worker_memory

    total, node = smallest_worker_memory(use_gpu=False)
    assert 2 ** 30 < total <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") and node == "127.0.0.1"  # bytes
    cfg = config(data, str(tmp_path), "loss.mode=soft", "crop_size=64", "num_workers=2", "prefetch_epoch=true")
    info = {"epoch_samples": 16}
    # 8 samples per worker, each a float32 image, uint8 mask and 5 float32 logit planes of 64x64
    assert epoch_bytes(cfg, info, 5) == 8 * 64 * 64 * (4 + 1 + 4 * 5)
    check_prefetch_memory(cfg, info, 5)
    huge = {"epoch_samples": 2 ** 40}
    with pytest.raises(ConfigError, match="prefetch_epoch=true: a worker's epoch .* on node 127.0.0.1; set prefetch_epoch=false"):
        check_prefetch_memory(cfg, huge, 5)
    check_prefetch_memory(cfg.model_copy(update={"prefetch_epoch": False}), huge, 5)  # streaming: nothing held


def test_the_smallest_node_that_can_run_a_worker_bounds_its_memory():
    """On a cluster the driver's (head) node is not where workers run: GPU training looks at GPU
    nodes only, CPU training at every node with a CPU; dead nodes count for nothing."""
    from dakd.runtime import smallest_worker_memory

    gib = 2 ** 30
    nodes = [{"Alive": True, "NodeManagerAddress": "head", "Resources": {"CPU": 2.0, "memory": 4.0 * gib}},
             {"Alive": True, "NodeManagerAddress": "gpu-a", "Resources": {"CPU": 16.0, "GPU": 1.0, "memory": 90.0 * gib}},
             {"Alive": True, "NodeManagerAddress": "gpu-b", "Resources": {"CPU": 16.0, "GPU": 2.0, "memory": 120.0 * gib}},
             {"Alive": False, "NodeManagerAddress": "gone", "Resources": {"CPU": 8.0, "GPU": 1.0, "memory": 1.0 * gib}}]
    assert smallest_worker_memory(True, nodes) == (90 * gib, "gpu-a")
    assert smallest_worker_memory(False, nodes) == (4 * gib, "head")
    assert smallest_worker_memory(True, nodes[:1]) is None  # no GPU node up yet (autoscaling): nothing to check


def test_scheduled_lr_constant_and_cosine():
    assert [scheduled_lr("constant", 0.1, s, 10) for s in (0, 5, 10, 12)] == [0.1] * 4
    cosine = [scheduled_lr("cosine", 0.1, s, 10) for s in range(12)]
    assert cosine[0] == 0.1 and cosine[5] == pytest.approx(0.05) and cosine[10] == cosine[11] == pytest.approx(0)
    assert all(a > b for a, b in zip(cosine[:10], cosine[1:11]))  # strictly down to 0 at the last step
    assert scheduled_lr("cosine", 0.1, 3, 0) == 0.1  # no known length: constant


def test_bad_input_is_refused(data, tmp_path):
    real = shards.open_shard_set(data["real"])
    two = str(tmp_path / "two")
    write_synthetic(two, real, num_classes=2)
    nologits = str(tmp_path / "nologits")
    write_synthetic(nologits, real, logits=False)
    out = str(tmp_path / "bad")
    with pytest.raises(DataError, match="2 classes .* real data has 5"):
        run_train_saross(config(data, out, f"synthetic={two}", "tracking.enabled=false"))
    for mode in ("soft", "hard"):
        with pytest.raises(DataError, match="no `logits` column"):
            run_train_saross(config(data, out, f"synthetic={nologits}", f"loss.mode={mode}", "tracking.enabled=false"))
    first_id = next(real.iter_records("train"))["id"]
    with pytest.raises(DataError, match=f"'{first_id}'.*64x64 \\(HxW\\), smaller than the 96x96 crop"):
        run_train_saross(config(data, out, "crop_size=96", "loss.mode=real-only", "tracking.enabled=false"))
    with pytest.raises(DataError, match="2x2 mosaic of the 32x32 tiles is 64x64, smaller than the 96x96 crop"):
        check_synthetic(shards.open_shard_set(data["syn"]), 5, 96, True)
    with pytest.raises(ConfigError, match="unknown encoder 'resnet_nope'; valid names: mambavision_b"):
        run_train_saross(config(data, out, "model.encoder=resnet_nope", "tracking.enabled=false"))
    with pytest.raises(ConfigError, match="multiple of 32"):
        config(data, out, "crop_size=48")
    with pytest.raises(DataError, match="val_split='nope': no such split \\(has: test, train, val\\)"):
        run_train_saross(config(data, out, "val_split=nope", "tracking.enabled=false"))
    with pytest.raises(DataError, match="val_split='val' holds 2 image\\(s\\), fewer than the 4 workers"):
        run_train_saross(config(data, out, "num_workers=4", "tracking.enabled=false"))
