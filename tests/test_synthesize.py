"""`dakd synthesize` on a real local Ray cluster and a real S3-protocol server: a tiny
teacher fitted here, N samples across Ray Data actors into Parquet shards, exactly once
through a kill and re-run, a grown N and an actor that dies mid-range; bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re

import boto3
import numpy as np
import pytest
import torch

from dakd import __version__, storage
from dakd.cli import main
from dakd.config import SynthesizeConfig, load_config
from dakd.data import shards
from dakd.data.balance import balance_factor, sample_powers
from dakd.data.classes import OSD_CLASSES, SOS_CLASSES
from dakd.data.procedural import generate_scene
from dakd.data.transforms import denormalize_image, normalize_image
from dakd.diffusion.samplers import sample
from dakd.diffusion.schedule import joint_loss, make_train_scheduler, sample_timesteps
from dakd.errors import ConfigError, DataError, StorageError, SynthesisError
from dakd.seeds import sample_seed
from dakd.synth.actor import generate
from dakd.synth.synthesize import run_synthesize
from dakd import checkpoints as ckpt_io
from dakd.checkpoints import load_teacher
from dakd.models.jointnet import JointNet
from dakd.train.ema import EMA

STEPS = 3

pytestmark = pytest.mark.slow  # end to end: synthesis on Ray Data actors


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, ray_local):
    """A tiny SAR-JointNet checkpoint written as train-jointnet writes it (model + EMA weights,
    state.json with b of its scenes, latest.json in its run directory), fitted in-process for 8
    joint-loss steps on 16 procedural 32 px scenes (5 classes). Training through Ray Train is
    test_train_jointnet's (and every pipeline test's); here the teacher only has to generate."""
    root = tmp_path_factory.mktemp("synth")
    scenes = [generate_scene(seed, 32, 32, looks=4) for seed in range(16)]
    powers = np.array([sample_powers(image, mask, 5) for image, mask in scenes])
    b = balance_factor(*powers.mean(axis=0))  # as `dakd balance` computes it
    torch.manual_seed(0)
    model = JointNet(in_channels_image=1, num_classes=5, block_out_channels=(8, 16), layers_per_block=1,
                     attention_levels=(1,), norm_num_groups=4, attention_head_dim=4, sample_size=32)
    ema, opt, scheduler = EMA(model, 0.9), torch.optim.AdamW(model.parameters(), lr=3e-3), make_train_scheduler(100)
    g = torch.Generator().manual_seed(0)
    for step in range(8):
        batch = scenes[4 * (step % 4): 4 * (step % 4) + 4]
        x0 = torch.from_numpy(np.stack([normalize_image(image) for image, _ in batch]))[:, None]
        mask = torch.from_numpy(np.stack([m for _, m in batch])).long()
        t = sample_timesteps(scheduler, 4, "cpu", generator=g)
        loss = joint_loss(model, scheduler, x0, mask, b, t, torch.randn(x0.shape, generator=g),
                          torch.randn(4, 5, 32, 32, generator=g), "ce")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    run = str(root / "runs" / "jointnet")
    checkpoint = f"{run}/checkpoint_000008"
    ckpt_io.save_checkpoint(checkpoint, model.state_dict(), ckpt_io.teacher_meta(
        model, OSD_CLASSES, step=8, b=b, num_train_timesteps=100, label_loss="ce", ema_steps=ema.steps),
        ema_state=ema.state_dict())
    storage.write_text(f"{run}/{ckpt_io.LATEST}", json.dumps({"checkpoint": checkpoint, "step": 8}))
    model, state = load_teacher(run)
    assert state["location"] == checkpoint and state["weights"] == "ema"
    return {"run": run, "checkpoint": checkpoint, "model": model, "state": state}


def synth_cfg(teacher: dict, output: str, *extra: str) -> SynthesizeConfig:
    return load_config(SynthesizeConfig, None, [f"teacher={teacher['run']}", f"output={output}", f"steps={STEPS}",
                                                 "rows_per_file=16", "actors_min=1", "actors_max=1",
                                                 "tracking.enabled=false", *extra])


def records(output: str) -> dict[str, dict]:
    """id -> record of a complete synthetic set; fails on a duplicate id."""
    got = {}
    for rec in shards.open_shard_set(output).iter_records("train"):
        assert rec["id"] not in got, f"id {rec['id']} twice"
        got[rec["id"]] = rec
    return got


def s3_objects(prefix: str) -> dict[str, tuple[str, int]]:
    """key -> (ETag, size) of every object under an s3:// prefix (real S3 API listing)."""
    bucket, _, key = prefix[len("s3://"):].partition("/")
    client = boto3.client("s3")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(key) + 1:]] = (o["ETag"], o["Size"])
    return out


def reference(teacher: dict, ids: list[int], seed: int = 0, size: int = 32, batch_size: int = 1):
    """Independent in-process generation -> float32 (images, logits) of `ids`: batch_size 1
    (exact mode): one sampler call per sample; else sample i comes from the sampler call on
    the fixed batch of ids [m*B, (m+1)*B) that holds it, m = i // B."""
    st = teacher["state"]
    images, logits = [], []
    for i in ids:
        m = i // batch_size
        o = sample(teacher["model"], sampler="ddim", steps=STEPS, b=float(st["b"]),
                   seeds=[sample_seed(seed, j) for j in range(m * batch_size, (m + 1) * batch_size)],
                   height=size, width=size, device="cpu", num_classes=5,
                   num_train_timesteps=int(st["num_train_timesteps"]), label_loss=st["label_loss"])
        images.append(o.images[i - m * batch_size, 0])
        logits.append(o.logits[i - m * batch_size])
    return torch.stack(images), torch.stack(logits)


def test_forty_to_s3_kill_resume_and_grow(teacher, s3_uri, monkeypatch, mlflow_server):
    """Batched (the default), in batches of 5 that straddle the 16-id ranges: ids exactly
    once through a kill and a re-run; a range re-run (the grown last range) writes identical
    samples."""
    out = s3_uri + "/synthetic"
    cfg = synth_cfg(teacher, out, "count=40", "batch_size=5", f"tracking.uri={mlflow_server}", "tracking.enabled=true")

    # "kill" the job after one range: the actor raises right after writing it
    monkeypatch.setenv("DAKD_SYNTH_FAIL_AFTER_RANGES", "1")
    with pytest.raises(SynthesisError, match="re-run the same command"):
        run_synthesize(cfg)
    monkeypatch.delenv("DAKD_SYNTH_FAIL_AFTER_RANGES")
    before = s3_objects(out)
    assert "manifest.json" not in before
    finished = sorted(k for k in before if re.match(r"data/syn-[0-9a-f]+/train/part-\d+\.parquet$", k))  # the range taken first
    assert 1 <= len(finished) < 3

    summary = run_synthesize(cfg)  # the same command again: resumes
    assert summary["ranges_kept"] == [int(k[-13:-8]) for k in finished]
    assert sorted(summary["ranges_kept"] + summary["ranges_written"]) == [0, 1, 2]
    after = s3_objects(out)
    for key in finished:  # untouched: same ETag and size
        assert after[key] == before[key]

    got = records(out)
    assert sorted(got, key=int) == [str(i) for i in range(40)]  # ids exactly 0..39, once each
    model_hash = hashlib.sha256(open(f"{teacher['checkpoint']}/{ckpt_io.EMA_FILE}", "rb").read()).hexdigest()
    class_pixels = np.zeros(5, np.int64)
    for sid, rec in got.items():
        i = int(sid)
        assert rec["index"] == i and rec["seed"] == sample_seed(0, i)
        assert rec["image"].shape == (32, 32) and rec["image"].dtype == np.uint8
        assert rec["mask"].shape == (32, 32) and rec["mask"].dtype == np.uint8
        assert rec["logits"].shape == (5, 32, 32) and rec["logits"].dtype == np.float16
        assert (rec["split"], rec["source"], rec["num_classes"]) == ("train", "synthetic", 5)
        assert rec["teacher_hash"] == model_hash and rec["teacher_checkpoint"] == teacher["checkpoint"]
        assert rec["b"] == pytest.approx(teacher["state"]["b"]) and rec["sampler"] == "ddim"
        assert rec["steps"] == STEPS and rec["code_version"] == __version__
        class_pixels += np.bincount(rec["mask"].ravel(), minlength=5)
    images, logits = reference(teacher, [0, 17, 39], batch_size=5)
    for n, i in enumerate([0, 17, 39]):
        np.testing.assert_array_equal(got[str(i)]["image"], denormalize_image(images[n]).numpy())
        np.testing.assert_array_equal(got[str(i)]["logits"], logits[n].numpy().astype(np.float16))

    m = shards.open_shard_set(out).manifest
    assert m["kind"] == "synthetic" and m["count"] == 40 and m["teacher"]["hash"] == model_hash
    assert (m["sampler"], m["steps"], m["seed"], m["nfe_per_sample"]) == ("ddim", STEPS, 0, STEPS)
    assert (m["identity"]["exact"], m["identity"]["batch_size"]) == (False, 5)
    assert [(h["device"], h["precision"]) for h in m["hardware"]] == [("cpu", "fp32")]
    assert [f["rows"] for f in m["splits"]["train"]["files"]] == [16, 16, 8]
    assert m["splits"]["train"]["class_pixels"] == class_pixels.tolist()
    assert m["splits"]["train"]["class_share"] == pytest.approx((class_pixels / class_pixels.sum()).tolist())
    assert m["last_run"]["samples_per_s"] > 0 and m["classes"]["names"][1] == "oil"
    from PIL import Image
    import io

    sheet = Image.open(io.BytesIO(storage.read_bytes(out + "/contact_sheet.png")))
    assert sheet.size == (8 * 64, 5 * 32)  # 40 samples, 8 tiles [image | mask] per row

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    assert "contact_sheet.png" in [a.path for a in client.list_artifacts(summary["mlflow_run_id"])]
    assert client.get_run(summary["mlflow_run_id"]).data.metrics["synthesis/count"] == 40

    # grow 40 -> 60: ranges 0, 1 untouched; range 2 (ids 32..39) is re-run as ids 32..47 (its
    # old ids regenerate identically: the same fixed batches [30, 35), [35, 40)); range 3 is new.
    # A growth killed after one range leaves the set readable as its complete ranges (ids 0..31).
    monkeypatch.setenv("DAKD_SYNTH_FAIL_AFTER_RANGES", "1")
    with pytest.raises(SynthesisError, match="re-run the same command"):
        run_synthesize(cfg.model_copy(update={"count": 60}))
    monkeypatch.delenv("DAKD_SYNTH_FAIL_AFTER_RANGES")
    interim = shards.open_shard_set(out)
    assert interim.manifest["count"] == 32 and [f["rows"] for f in interim.manifest["splits"]["train"]["files"]] == [16, 16]
    got32 = records(out)
    assert sorted(got32, key=int) == [str(i) for i in range(32)]
    np.testing.assert_array_equal(got32["31"]["logits"], got["31"]["logits"])
    grown = run_synthesize(cfg.model_copy(update={"count": 60}))
    rows = {2: 16, 3: 12}
    assert sorted(grown["ranges_kept"] + grown["ranges_written"]) == [0, 1, 2, 3] and {0, 1} <= set(grown["ranges_kept"])
    assert len(grown["ranges_written"]) == 1 and grown["generated"] == rows[grown["ranges_written"][0]]  # one was written before the kill
    final = s3_objects(out)
    for key in [k for k in after if k.endswith(("/train/part-00000.parquet", "/train/part-00001.parquet"))]:
        assert final[key] == after[key]
    got60 = records(out)
    assert sorted(got60, key=int) == [str(i) for i in range(60)]
    for i in range(40):
        for col in ("image", "mask", "logits"):
            np.testing.assert_array_equal(got60[str(i)][col], got[str(i)][col])
    assert shards.open_shard_set(out).manifest["count"] == 60


def test_sample_seven_same_for_any_n_batched_and_exact(teacher, tmp_path):
    small = run_synthesize(synth_cfg(teacher, str(tmp_path / "n10"), "count=10", "rows_per_file=4", "batch_size=3"))
    large = run_synthesize(synth_cfg(teacher, str(tmp_path / "n40"), "count=40", "batch_size=3", "actors_max=2"))
    exact = run_synthesize(synth_cfg(teacher, str(tmp_path / "exact"), "count=10", "rows_per_file=4", "exact=true",
                                     "batch_size=5"))
    assert small["count"] == 10 and large["count"] == 40 and exact["count"] == 10
    a, b, e = records(str(tmp_path / "n10")), records(str(tmp_path / "n40")), records(str(tmp_path / "exact"))
    # batched: the same batch_size gives the same samples whatever N, rows_per_file, actors
    for i in range(10):
        for col in ("image", "mask", "logits", "seed"):
            np.testing.assert_array_equal(a[str(i)][col], b[str(i)][col])
    # exact: one sample per forward, whatever batch_size (its identity records batch 1)
    assert shards.open_shard_set(str(tmp_path / "exact")).manifest["identity"]["batch_size"] == 1
    ids = list(range(10))
    images32, logits32 = reference(teacher, ids)
    for i in ids:
        np.testing.assert_array_equal(e[str(i)]["image"], denormalize_image(images32[i]).numpy())
        np.testing.assert_array_equal(e[str(i)]["logits"], logits32[i].numpy().astype(np.float16))

    # float16 logits keep the argmax of the float32 logits: the stored mask is argmax of the
    # float32 logits (regenerated here); argmax of the stored float16 logits gives the same
    # class wherever the float16 maximum is unique; where rounding makes a tie, argmax of
    # the float16 logits is the first tied class and the stored mask one of the tied classes
    stored16 = np.stack([e[str(i)]["logits"] for i in ids]).astype(np.float32)
    masks = np.stack([e[str(i)]["mask"] for i in ids])
    np.testing.assert_array_equal(masks, logits32.argmax(dim=1).numpy())
    top = stored16.max(axis=1, keepdims=True)
    ties = (stored16 == top).sum(axis=1) > 1
    arg16 = stored16.argmax(axis=1)
    np.testing.assert_array_equal(arg16[~ties], masks[~ties])
    assert np.all(np.take_along_axis(stored16, masks[:, None], axis=1)[:, 0][ties] == top[:, 0][ties])
    assert (~ties).sum() > 0.99 * ties.size

    # batched equals exact only to float rounding
    assert np.abs(np.stack([a[str(i)]["logits"] for i in ids]).astype(np.float32) - logits32.numpy()).max() < 2e-3
    assert np.abs(np.stack([a[str(i)]["image"] for i in ids]).astype(int)
                  - np.stack([e[str(i)]["image"] for i in ids]).astype(int)).max() <= 1
    # generate() in-process (the bare loop of the benchmarks) writes what the actors write
    st = teacher["state"]
    identity = {"seed": 0, "exact": False, "batch_size": 3, "sampler": "ddim", "steps": STEPS, "b": float(st["b"]),
                "size": 32, "num_classes": 5, "num_train_timesteps": int(st["num_train_timesteps"]),
                "label_loss": st["label_loss"]}
    gen = generate(teacher["model"], identity, list(range(4, 9)), "cpu")
    np.testing.assert_array_equal(gen["image"], np.stack([a[str(i)]["image"] for i in range(4, 9)]))
    assert gen["seed"] == [sample_seed(0, i) for i in range(4, 9)] and gen["nfe"] == STEPS


def test_bf16_set_has_its_own_identity(teacher, tmp_path):
    """precision=bf16 on the CPU: the actors write what the sampler gives under bf16 autocast
    (an independent in-process call), close to the float32 samples; the set's identity and
    hardware name the precision, and a float32 run into it is refused with nothing changed."""
    out = str(tmp_path / "bf16")
    run_synthesize(synth_cfg(teacher, out, "count=6", "batch_size=3", "precision=bf16"))
    m = shards.open_shard_set(out).manifest
    assert m["identity"]["precision"] == "bf16" and [h["precision"] for h in m["hardware"]] == ["bf16-autocast"]
    got, st = records(out), teacher["state"]
    for lo in (0, 3):
        kw = dict(sampler="ddim", steps=STEPS, b=float(st["b"]), seeds=[sample_seed(0, j) for j in range(lo, lo + 3)],
                  height=32, width=32, device="cpu", num_classes=5,
                  num_train_timesteps=int(st["num_train_timesteps"]), label_loss=st["label_loss"])
        o16, o32 = sample(teacher["model"], precision="bf16", **kw), sample(teacher["model"], **kw)
        for n in range(3):
            rec = got[str(lo + n)]
            np.testing.assert_array_equal(rec["image"], denormalize_image(o16.images[n, 0]).numpy())
            np.testing.assert_array_equal(rec["logits"], o16.logits[n].numpy().astype(np.float16))
            assert np.abs(rec["logits"].astype(np.float32) - o32.logits[n].numpy()).mean() < 0.05
            assert (rec["mask"] == o32.logits[n].argmax(0).numpy()).mean() > 0.9
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "bf16").rglob("*") if p.is_file()}
    with pytest.raises(DataError, match="precision=.bf16."):
        run_synthesize(synth_cfg(teacher, out, "count=6", "batch_size=3"))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "bf16").rglob("*") if p.is_file()} == before


def test_actor_dying_mid_range_is_retried_exactly_once(teacher, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setenv("DAKD_SYNTH_DIE_AT_RANGE", f"1:{marker}")
    out = str(tmp_path / "die")
    summary = run_synthesize(synth_cfg(teacher, out, "count=24", "rows_per_file=8"))
    assert marker.exists(), "the drill killed an actor in range 1"
    assert summary["ranges_written"] == [0, 1, 2]
    got = records(out)
    assert sorted(got, key=int) == [str(i) for i in range(24)]
    images, _ = reference(teacher, [8, 15], batch_size=8)
    np.testing.assert_array_equal(got["8"]["image"], denormalize_image(images[0]).numpy())
    np.testing.assert_array_equal(got["15"]["image"], denormalize_image(images[1]).numpy())


def test_bad_input(teacher, tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="count"):
        synth_cfg(teacher, str(tmp_path / "x"), "count=0")
    with pytest.raises(ConfigError, match="teacher"):
        run_synthesize(synth_cfg(teacher, str(tmp_path / "x"), "count=2", f"teacher={tmp_path / 'missing'}"))
    # a malformed fault drill: refused before anything is written
    for name, value, expected in [("DAKD_SYNTH_HOLD_AFTER_RANGES", "2", "k:/path/to/marker"),
                                  ("DAKD_SYNTH_FAIL_AFTER_RANGES", "one", "a number of ranges")]:
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(ConfigError, match=f"{name}={value!r}: expected {expected}"):
                run_synthesize(synth_cfg(teacher, str(tmp_path / "drill"), "count=2"))
    assert not (tmp_path / "drill").exists()
    # a real set with another class count
    sos = str(tmp_path / "sos")
    shards.write_manifest(sos, {"kind": "real", "classes": SOS_CLASSES.to_dict(), "splits": {}})
    with pytest.raises(DataError, match="2 classes"):
        run_synthesize(synth_cfg(teacher, str(tmp_path / "x"), "count=2", f"real={sos}"))
    # an output that cannot be written
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match=str(blocker)):
        run_synthesize(synth_cfg(teacher, str(blocker / "out"), "count=2"))
    # another config into the same output: refused, then replaced with --overwrite
    out = str(tmp_path / "other")
    run_synthesize(synth_cfg(teacher, out, "count=4", "rows_per_file=2"))
    with pytest.raises(DataError, match="another teacher or config.*seed"):
        run_synthesize(synth_cfg(teacher, out, "count=4", "rows_per_file=2", "seed=1"))
    with pytest.raises(DataError, match="shrinking"):
        run_synthesize(synth_cfg(teacher, out, "count=3", "rows_per_file=2"))
    old_set = records(out)
    old_files = set(shards.open_shard_set(out).files("train"))
    overwrite = ["synthesize", "--set", f"teacher={teacher['run']}", "--output", out, "--overwrite", "--set", "seed=1",
                 "--set", "count=4", "--set", "rows_per_file=2", "--set", f"steps={STEPS}",
                 "--set", "tracking.enabled=false", "--json"]
    # an overwrite that stops after one range (as if killed): the old set is still the set, whole
    monkeypatch.setenv("DAKD_SYNTH_FAIL_AFTER_RANGES", "1")
    assert main(overwrite) != 0
    monkeypatch.delenv("DAKD_SYNTH_FAIL_AFTER_RANGES")
    capsys.readouterr()
    assert records(out).keys() == old_set.keys() and all(
        np.array_equal(records(out)[i]["image"], old_set[i]["image"]) for i in old_set)
    assert {r["seed"] for r in records(out).values()} == {sample_seed(0, i) for i in range(4)}
    # the same command again continues the new set, then swaps it in and removes the old files
    assert main(overwrite) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(summary["ranges_kept"]) == 1 and sorted(summary["ranges_kept"] + summary["ranges_written"]) == [0, 1]
    assert {r["seed"] for r in records(out).values()} == {sample_seed(1, i) for i in range(4)}
    new_files = set(shards.open_shard_set(out).files("train"))
    assert not new_files & old_files and not any(storage.exists(f) for f in old_files)
    assert set(storage.list_files(os.path.join(out, "data"))) == new_files
    assert main(["synthesize", "--set", "count=-1"]) == 2
