"""Nothing lost, nothing leaked (issue 15): overwrite is a swap, outputs and run names
cannot escape, damaged files are named errors (exit 2), credentials are redacted,
resources stay bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dakd import storage
from dakd.cli import main
from dakd.config import IngestConfig, ProceduralSource, SourceConfig, load_config
from dakd.data import shards
from dakd.data.ingest import run_ingest
from dakd.errors import ConfigError, DataError

SOURCE = SourceConfig(kind="procedural", procedural=ProceduralSource(splits={"train": 6, "test": 2}, height=16, width=16, seed=5))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_all(root: str) -> dict[str, np.ndarray]:
    s = shards.open_shard_set(root)
    return {r["id"]: r["image"] for split in s.splits for r in s.iter_records(split)}


def bad_folder_source(root) -> SourceConfig:
    from PIL import Image

    os.makedirs(root / "images")
    os.makedirs(root / "masks")
    for i in range(3):
        Image.fromarray(np.full((16, 16), 9 * i, np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / f"s{i}.png")
    (root / "images" / "s1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return SourceConfig(kind="folder", root=str(root))


# ---------------------------------------------------------------- 1. overwrite is a swap
@pytest.mark.parametrize("where", ["file", "s3"])
def test_failed_overwrite_keeps_old_set_and_user_files(where, tmp_path, s3_uri, ray_local):
    out = str(tmp_path / "real") if where == "file" else s3_uri + "/real"
    run_ingest(IngestConfig(source=SOURCE, output=out, rows_per_file=4))
    before = read_all(out)
    storage.write_text(storage.join_uri(out, "data", "notes.txt"), "mine")  # a user's own file

    with pytest.raises(DataError, match="s1.png"):  # a bad new source: the overwrite fails
        run_ingest(IngestConfig(source=bad_folder_source(tmp_path / "src"), output=out, overwrite=True))
    after = read_all(out)  # the old set is still complete and identical
    assert sorted(after) == sorted(before) and all(np.array_equal(after[k], before[k]) for k in before)
    listed = shards.open_shard_set(out).files("train") + shards.open_shard_set(out).files("test")
    notes = storage.join_uri(out, "data", "notes.txt")
    assert set(storage.list_files(storage.join_uri(out, "data"))) == set(listed) | {notes}  # the failed run left nothing

    small = SOURCE.model_copy(update={"procedural": ProceduralSource(splits={"train": 2}, height=16, width=16)})
    run_ingest(IngestConfig(source=small, output=out, overwrite=True))
    new = shards.open_shard_set(out)
    assert new.manifest["splits"]["train"]["count"] == 2 and "test" not in new.splits
    left = storage.list_files(storage.join_uri(out, "data"))
    assert sorted(left) == sorted(new.files("train") + [storage.join_uri(out, "data", "notes.txt")])
    assert storage.read_text(storage.join_uri(out, "data", "notes.txt")) == "mine"


def test_killed_overwrite_keeps_old_set(tmp_path, ray_local):
    out = str(tmp_path / "real")
    run_ingest(IngestConfig(source=SOURCE, output=out))
    before = read_all(out)
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "platform"),
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dakd.cli", "ingest", "--output", out, "--overwrite", "--set", "rows_per_file=1",
         "--set", "source.procedural.splits={train: 400}", "--set", "source.procedural.height=16",
         "--set", "source.procedural.width=16"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while not [f for f in storage.list_files(os.path.join(out, "data")) if "/gen-" in f]:
            assert proc.poll() is None and time.time() < deadline, "the overwrite ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # killed part-way through writing the new set
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    after = read_all(out)
    assert sorted(after) == sorted(before) and all(np.array_equal(after[k], before[k]) for k in before)


def test_empty_or_root_like_output_refused(tmp_path):
    for value in ["output=", "output=''", "output=/", "output=s3://bucket", f"output={os.path.expanduser('~')}"]:
        with pytest.raises(ConfigError, match="output"):
            load_config(IngestConfig, None, [value])
    assert main(["ingest", "--set", "output=", "--overwrite"]) == 2


# ---------------------------------------------------------------- 2. run names stay under the output
def test_run_name_cannot_leave_the_output():
    from dakd.config import TrainJointNetConfig, TrainSarossConfig

    for model in (TrainJointNetConfig, TrainSarossConfig):
        for bad in ["../x", "../../escaped", "/etc/x", "a/b", ".hidden", ""]:
            with pytest.raises(ConfigError, match="run_name"):
                load_config(model, None, [f"run_name={bad!r}"])
        assert load_config(model, None, ["run_name=jointnet-osd_2.1"]).run_name == "jointnet-osd_2.1"
    assert main(["train-saross", "--set", "run_name=/etc/x"]) == 2


# ---------------------------------------------------------------- 4. damaged shard sets
def test_truncated_and_swapped_shards_are_named(tmp_path, capsys, ray_local):
    out, other = str(tmp_path / "a"), str(tmp_path / "b")
    run_ingest(IngestConfig(source=SOURCE, output=out, rows_per_file=4))
    run_ingest(IngestConfig(source=SOURCE.model_copy(update={"procedural": ProceduralSource(
        splits={"train": 3}, height=16, width=16, seed=9)}), output=other, rows_per_file=4))
    victim = storage.resolve(shards.open_shard_set(out).files("train")[0]).path
    good = open(victim, "rb").read()

    with open(victim, "wb") as f:  # truncated
        f.write(good[: len(good) // 2])
    with pytest.raises(DataError, match="truncated") as err:
        shards.open_shard_set(out)
    assert victim in str(err.value)
    assert main(["balance", "--set", f"shards={out}"]) == 2
    assert victim in capsys.readouterr().err

    with open(victim, "wb") as f:  # replaced by another valid shard
        f.write(open(storage.resolve(shards.open_shard_set(other).files("train")[0]).path, "rb").read())
    with pytest.raises(DataError) as err:
        shards.open_shard_set(out)
    assert victim in str(err.value) and ("rows" in str(err.value) or "bytes" in str(err.value))
    with pytest.raises(DataError, match="not a readable Parquet"):
        with open(victim, "wb") as f:
            f.write(b"junk")
        shards.read_table(shards.open_shard_set(out, verify=False).files("train")[0])


def test_shard_reader_names_missing_columns_and_lets_the_process_exit(tmp_path):
    """read_table names a column the shard lacks, and a process that read a shard exits 0:
    pyarrow's dataset reader could abort at interpreter exit (apache/arrow#34314), which
    failed a finished job. Eight readers at once, so the exits race as they do in a job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = str(tmp_path / "part.parquet")
    images = [np.full((8, 8), i, np.uint8).tobytes() for i in range(64)]
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(64)], "image": images}), uri)
    assert shards.read_table(uri, columns=["id"]).column("id").to_pylist()[:2] == ["s0", "s1"]
    with pytest.raises(DataError, match=r"part.parquet: has no column\(s\) \['mask'\]"):
        shards.read_table(uri, columns=["id", "mask"])

    probe = "import sys; from dakd.data import shards; assert shards.read_table(sys.argv[1]).num_rows == 64"
    procs = [subprocess.Popen([sys.executable, "-c", probe, uri], stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    ends = [(p.communicate(timeout=120)[1][-300:], p.returncode) for p in procs]  # reads stderr while waiting
    assert [e for e in ends if e[1] != 0] == []


# ---------------------------------------------------------------- 2./5. predict: unique masks, skip, tiles
@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    import torch

    from dakd.config import SarossModelConfig
    from dakd.data.classes import OSD_CLASSES
    from dakd import checkpoints as ckpt_io
    from dakd.checkpoints import STUDENT_KIND as KIND
    from dakd.models.saross import arch_dict, build_student

    torch.manual_seed(0)
    model = SarossModelConfig(encoder="mobilenetv3_small_050", decoder_channels=[8, 8, 8], caft_heads=2)
    location = str(tmp_path_factory.mktemp("student") / "run" / "checkpoint_000")
    ckpt_io.save_checkpoint(location, build_student(model, 5).state_dict(),
                            {"kind": KIND, "epoch": 1, "step": 1, "arch": arch_dict(model, 5), "classes": OSD_CLASSES.to_dict()})
    return location


def test_predict_same_stem_two_masks_and_skip(tiny_student, tmp_path, ray_local):
    import pyarrow.csv as pacsv
    from PIL import Image

    from dakd.config import PredictConfig
    from dakd.predict import mask_names, run_predict

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 40), dtype=np.uint8)).save(folder / "scene.png")
    Image.fromarray(rng.integers(0, 256, (24, 36), dtype=np.uint8)).convert("RGB").save(folder / "scene.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "junk.tif").write_bytes(b"this is not a tiff")
    base = ["model=" + tiny_student, f"input={folder}", "tracking.enabled=false"]

    # default: the first unreadable input to come back from the actors stops the job (either one:
    # the actors run in parallel), named with what is wrong with it
    with pytest.raises(DataError, match=r"empty\.png: empty file \(0 bytes\)|junk\.tif: cannot decode image"):
        run_predict(load_config(PredictConfig, None, base + [f"output={tmp_path / 'p1'}"]))

    out = tmp_path / "p2"
    summary = run_predict(load_config(PredictConfig, None, base + [f"output={out}", "on_error=skip"]))
    assert summary["images"] == 2
    assert sorted(s["id"] for s in summary["skipped"]) == ["empty.png", "junk.tif"]
    assert "not an image" in [s for s in summary["skipped"] if s["id"] == "junk.tif"][0]["reason"]
    assert "BytesIO" not in json.dumps(summary["skipped"])
    assert json.loads((out / "skipped.json").read_text()) == summary["skipped"]
    rows = {r["id"]: r for r in pacsv.read_csv(out / "areas.csv").to_pylist()}
    assert rows["scene.jpg"]["mask"] != rows["scene.png"]["mask"]
    for image_id, (h, w) in {"scene.png": (32, 40), "scene.jpg": (24, 36)}.items():
        assert Image.open(out / rows[image_id]["mask"]).size == (w, h)
        assert (rows[image_id]["height"], rows[image_id]["width"]) == (h, w)
    assert mask_names(["a.png", "b.png"]) == {"a.png": "masks/a.png", "b.png": "masks/b.png"}  # the usual layout
    assert all(".." not in n for n in mask_names(["../../x.png", "a/../b.png"]).values())


def _files_under(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow  # predict and evaluate twice each (about a minute): CI runs it, test-fast does not
def test_predict_and_evaluate_overwrite_are_swaps(tiny_student, tmp_path, ray_local, monkeypatch):
    """A failed re-run leaves the old result whole (and nothing of its own); a successful one
    replaces it and removes only the files the old result listed."""
    import pyarrow.parquet as pq
    from PIL import Image

    from dakd.config import EvaluateConfig, PredictConfig
    from dakd.eval.evaluate import run_evaluate
    from dakd.predict import run_predict

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "pred"
    base = ["model=" + tiny_student, f"input={folder}", f"output={out}", "tracking.enabled=false"]
    run_predict(load_config(PredictConfig, None, base))
    first = pq.read_table(out / "areas.parquet").to_pylist()
    old = {r["mask"]: (out / r["mask"]).read_bytes() for r in first}
    (out / "masks" / "mine.txt").write_text("mine")  # a user's own file
    before = _files_under(out)

    (folder / "c.png").write_bytes(b"")  # the overwrite fails on it (on_error=fail) ...
    with pytest.raises(DataError, match="c.png"):
        run_predict(load_config(PredictConfig, None, base + ["overwrite=true"]))
    assert pq.read_table(out / "areas.parquet").to_pylist() == first  # ... the old result is whole
    assert all((out / m).read_bytes() == data for m, data in old.items())
    assert _files_under(out) == before  # and the failed run left nothing of its own

    (folder / "c.png").unlink()
    run_predict(load_config(PredictConfig, None, base + ["overwrite=true"]))
    second = pq.read_table(out / "areas.parquet").to_pylist()
    assert [r["id"] for r in second] == ["a.png", "b.png"] and not {r["mask"] for r in second} & set(old)
    assert _files_under(out) == {"areas.parquet", "areas.csv", "masks/mine.txt", *(r["mask"] for r in second)}

    real = str(tmp_path / "real")
    run_ingest(IngestConfig(source=SOURCE, output=real, rows_per_file=4))
    ev = tmp_path / "eval"
    cfg = ["checkpoint=" + tiny_student, f"shards={real}", f"output={ev}", "tracking.enabled=false", "split=train"]
    run_evaluate(load_config(EvaluateConfig, None, cfg + ["overlay_count=3"]), print_table=False)
    report = json.loads((ev / "metrics.json").read_text())
    listed = {report["files"]["confusion_matrix"], *report["files"]["overlays"]}
    assert len(report["files"]["overlays"]) == 3 and _files_under(ev) == {"metrics.json", "table.md", *listed}

    real_write = storage.write_text

    def fail_on_metrics(uri, text):
        if uri.endswith("metrics.json"):
            raise OSError("disk full (injected)")
        return real_write(uri, text)

    monkeypatch.setattr(storage, "write_text", fail_on_metrics)
    with pytest.raises(OSError, match="injected"):
        run_evaluate(load_config(EvaluateConfig, None, cfg + ["overlay_count=1"]), print_table=False)
    monkeypatch.undo()
    assert json.loads((ev / "metrics.json").read_text()) == report and _files_under(ev) == {"metrics.json", "table.md", *listed}

    run_evaluate(load_config(EvaluateConfig, None, cfg + ["overlay_count=1"]), print_table=False)
    again = json.loads((ev / "metrics.json").read_text())
    assert len(again["files"]["overlays"]) == 1 and again["confusion_matrix"] == report["confusion_matrix"]
    assert _files_under(ev) == {"metrics.json", "table.md", again["files"]["confusion_matrix"], *again["files"]["overlays"]}


def test_tiled_segmentation_matches_whole(tiny_student):
    """Tiles give the whole-image answer away from tile borders."""
    from dakd.checkpoints import load_student
    from dakd.inference import segment

    model, _ = load_student(tiny_student)
    img = np.random.default_rng(1).integers(0, 256, (96, 160), dtype=np.uint8)
    whole = segment(model, img, tile=4096)
    tiled = segment(model, img, tile=64, overlap=16)
    assert tiled.shape == whole.shape and (tiled == whole).mean() > 0.5  # same model, tiles see less context


def test_segment_many_equals_one_image_per_forward(tiny_student, monkeypatch):
    """Batches of same-size images (cut at a size change, at batch_size and at TILE x TILE
    pixels), and images over TILE on a side (tiled alone), give each image's own class map, in
    order; a real student's logits in a batch are its logits one image at a time."""
    import torch

    from dakd import inference
    from dakd.checkpoints import load_student

    rng = np.random.default_rng(2)
    sizes = [(64, 64)] * 5 + [(96, 160), (64, 64), (64, 96), (64, 96)]
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in sizes]
    student, _ = load_student(tiny_student)
    stacked = inference.batch_logits(student, np.stack(images[:3]))
    for k in range(3):
        assert torch.allclose(stacked[k], inference.segment_logits(student, images[k]), atol=1e-4)
    # a stand-in whose class map is each image's own (logits x, -x: class 1 where darker than mid-grey)
    sign = torch.nn.Conv2d(1, 2, kernel_size=1, bias=False)
    with torch.no_grad():
        sign.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
    single = [inference.segment(sign, im) for im in images]
    assert all((s == (im < 128)).all() for s, im in zip(single, images))
    monkeypatch.setattr(inference, "TILE", 128)  # the 96x160 image now goes through segment on its own,
    sizes_seen = []  # and a batch holds at most four 64x64 images (128 x 128 pixels)
    real_batch_logits = inference.batch_logits

    def counted_batch_logits(model, batch, device="cpu"):
        sizes_seen.append(len(batch))
        return real_batch_logits(model, batch, device)

    monkeypatch.setattr(inference, "batch_logits", counted_batch_logits)
    for batch_size in (1, 2, 8):
        many = inference.segment_many(sign, images, batch_size=batch_size)
        assert len(many) == len(images) and all(m.dtype == np.uint8 for m in many)
        assert all(np.array_equal(m, s) for m, s in zip(many, single))
        assert max(sizes_seen) == min(batch_size, 4) and sum(sizes_seen) == len(images)  # 96x160: one forward
        sizes_seen.clear()
    with pytest.raises(ValueError, match="batch_size"):
        inference.segment_many(sign, images, batch_size=0)


@pytest.mark.slow
def test_large_scene_predicted_within_bounded_memory(tmp_path):
    """A 6000x6000 scene is predicted (decode, tiled segmentation, mask PNG) within 2 GB of
    peak RSS in a fresh process."""
    from PIL import Image

    scene = tmp_path / "big.png"
    ramp = np.arange(6000, dtype=np.int64)
    Image.fromarray(((ramp[:, None] // 7 + ramp[None, :] // 13) % 256).astype(np.uint8)).save(scene)  # compresses fast
    # the same predict_one the actors run, with a tiny stand-in network (a 3x3 conv, 5 classes) so
    # the test costs seconds: what is measured is the job's own memory (decode, tiles, mask PNG)
    code = f"""
import json
import torch
from dakd.data.classes import OSD_CLASSES
from dakd.predict import predict_one
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Conv2d(1, 5, 3, padding=1).eval()
def peak_mb():  # VmHWM: this process's own peak RSS (ru_maxrss would carry the forking parent's over exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
h, w, counts = predict_one(model, OSD_CLASSES, {str(scene)!r}, {str(tmp_path / 'big-mask.png')!r})
print(json.dumps({{"h": h, "w": w, "pixels": int(counts.sum()), "peak_mb": peak_mb()}}))
"""
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "platform"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print("6000x6000 predict:", result)
    assert (result["h"], result["w"], result["pixels"]) == (6000, 6000, 36_000_000)
    assert result["peak_mb"] < 2048


# ---------------------------------------------------------------- 3. credentials and buckets
SECRET = "S3cr3t-PW"


def evaluate_args(tiny_student, tmp_path, tracked: str) -> list[str]:
    return ["evaluate", "--set", f"checkpoint={tiny_student}", "--set", f"shards={tmp_path / 'real'}", "--output",
            str(tmp_path / "ev"), "--set", f"tracking.uri={tracked}", "--set", "tracking.experiment=redact-test",
            "--set", "overlay_count=0"]


def test_password_in_tracking_uri_is_redacted_in_config_and_errors(tiny_student, tmp_path, capsys, ray_local):
    from dakd.redact import redact

    assert redact("http://alice:PW@host/x?token=abc&b=1") == "http://alice:***@host/x?token=***&b=1"
    dead = f"http://alice:{SECRET}@127.0.0.1:9/"  # nothing listens on port 9: the job fails, naming the server
    run_ingest(IngestConfig(source=SOURCE, output=str(tmp_path / "real")))
    args = evaluate_args(tiny_student, tmp_path, dead)
    assert main([*args, "--print-config"]) == 0
    assert main([*args, "--json"]) == 2
    assert main(["evaluate", "--set", f"tracking.uri={dead}", "--set", "tracking.enabled=maybe"]) == 2  # config error
    seen = capsys.readouterr()
    assert "alice:***@" in seen.out and "alice:***@" in seen.err and SECRET not in seen.out + seen.err


@pytest.mark.slow
def test_password_in_tracking_uri_never_leaves_the_job(tiny_student, tmp_path, ray_local, mlflow_server):
    """The whole job as a user runs it: every line it prints (stdout, stderr, logs), and the
    params and tags it logs."""
    import mlflow

    from dakd.redact import redact

    tracked = mlflow_server.replace("http://", f"http://alice:{SECRET}@")  # the server ignores the credentials
    run_ingest(IngestConfig(source=SOURCE, output=str(tmp_path / "real")))
    args = evaluate_args(tiny_student, tmp_path, tracked)
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "platform"),
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    job = subprocess.run([sys.executable, "-m", "dakd.cli", *args, "--json"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert job.returncode == 0, redact(job.stderr[-3000:])
    assert SECRET not in job.stdout + job.stderr

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("redact-test").experiment_id])
    assert runs
    for run in runs:
        assert SECRET not in json.dumps(run.data.params) + json.dumps(run.data.tags)
        assert run.data.params["tracking.uri"] == redact(tracked)


def test_misspelled_bucket_is_an_error_never_created(tmp_path, s3_server, ray_local):
    import boto3

    from dakd.errors import StorageError

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    with pytest.raises(StorageError, match="'nonexistent-bucket-x' does not exist"):
        run_ingest(IngestConfig(source=SOURCE, output="s3://nonexistent-bucket-x/real"))
    assert "nonexistent-bucket-x" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    run_ingest(IngestConfig(source=SOURCE, output="s3://created-on-request/real", create_bucket=True))
    assert "created-on-request" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert shards.open_shard_set("s3://created-on-request/real").manifest["splits"]["train"]["count"] == 6


# ---------------------------------------------------------------- 4. damaged checkpoints, teacher checked on the driver
def _copy_checkpoint(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def _edit_state(location: str, **changes) -> None:
    path = os.path.join(location, "state.json")
    state = json.loads(open(path).read())
    for k, v in changes.items():
        if v is None:
            state.pop(k, None)
        else:
            state[k] = v
    open(path, "w").write(json.dumps(state))


def test_damaged_checkpoints_exit_2_naming_the_file(tiny_student, tmp_path, capsys):
    from dakd.checkpoints import load_student, read_state

    assert len(read_state(tiny_student)["weights_sha256"]["model.safetensors"]) == 64
    good = open(os.path.join(tiny_student, "model.safetensors"), "rb").read()

    def evaluate(location) -> str:
        assert main(["evaluate", "--set", f"checkpoint={location}", "--output", str(tmp_path / "ev"),
                     "--set", "tracking.enabled=false"]) == 2
        return capsys.readouterr().err

    flipped = _copy_checkpoint(tiny_student, tmp_path / "flipped")  # same size, one byte changed
    data = bytearray(good)
    data[len(data) - 10] ^= 0xFF
    open(os.path.join(flipped, "model.safetensors"), "wb").write(bytes(data))
    err = evaluate(flipped)
    assert os.path.join(flipped, "model.safetensors") in err and "sha256" in err

    truncated = _copy_checkpoint(tiny_student, tmp_path / "truncated")
    open(os.path.join(truncated, "model.safetensors"), "wb").write(good[: len(good) // 3])
    _edit_state(truncated, weights_sha256=None)  # an older checkpoint: no hash, the file itself is checked
    err = evaluate(truncated)
    assert os.path.join(truncated, "model.safetensors") in err and "safetensors" in err

    header = _copy_checkpoint(tiny_student, tmp_path / "header")
    open(os.path.join(header, "model.safetensors"), "wb").write((2**62).to_bytes(8, "little") + b"{}" + b"\0" * 64)
    _edit_state(header, weights_sha256=None)
    assert os.path.join(header, "model.safetensors") in evaluate(header)

    junk = _copy_checkpoint(tiny_student, tmp_path / "junk")
    open(os.path.join(junk, "state.json"), "w").write("{not json")
    assert os.path.join(junk, "state.json") in evaluate(junk)

    huge = _copy_checkpoint(tiny_student, tmp_path / "huge")
    state = json.loads(open(os.path.join(huge, "state.json")).read())
    _edit_state(huge, arch={**state["arch"], "decoder_channels": [1e9, 8, 8]})
    err = evaluate(huge)
    assert os.path.join(huge, "state.json") in err and "decoder_channels" in err

    old = _copy_checkpoint(tiny_student, tmp_path / "old")  # written before hashes were recorded: still loads
    _edit_state(old, weights_sha256=None)
    model, _ = load_student(old)
    assert model is not None


def test_broken_teacher_fails_on_the_driver_before_actors(tmp_path, monkeypatch):
    import torch

    from dakd.config import SynthesizeConfig
    from dakd.data.classes import OSD_CLASSES
    from dakd.models.jointnet import JointNet
    from dakd.synth import synthesize
    from dakd import checkpoints as ckpt_io

    torch.manual_seed(0)
    net = JointNet(in_channels_image=1, num_classes=5, block_out_channels=(8, 16), layers_per_block=1,
                   attention_levels=(1,), norm_num_groups=4, attention_head_dim=4, sample_size=32)
    teacher = str(tmp_path / "teacher")
    ckpt_io.save_checkpoint(teacher, net.state_dict(), ckpt_io.teacher_meta(
        net, OSD_CLASSES, step=1, b=0.5, num_train_timesteps=100, label_loss="ce"))

    def no_actors(*args, **kwargs):
        raise AssertionError("actors were started for a broken teacher")

    monkeypatch.setattr(synthesize, "run_ranges", no_actors)
    cfg = load_config(SynthesizeConfig, None, [f"teacher={teacher}", f"output={tmp_path / 'syn'}", "count=2", "steps=1",
                                              "tracking.enabled=false"])
    weights = os.path.join(teacher, "model.safetensors")
    good = open(weights, "rb").read()
    open(weights, "wb").write(good[: len(good) // 2])
    with pytest.raises(DataError, match="sha256") as err:  # recorded hash: a damaged file is caught by it
        synthesize.run_synthesize(cfg)
    assert weights in str(err.value)
    _edit_state(teacher, weights_sha256=None)
    with pytest.raises(DataError, match="safetensors") as err:  # no hash (older checkpoint): loading it fails
        synthesize.run_synthesize(cfg)
    assert weights in str(err.value)


# ---------------------------------------------------------------- 5. bounded planning
def test_synthesize_count_bounded_and_ranges_lazy():
    from dakd.config import SynthesizeConfig
    from dakd.synth.plan import plan_ranges

    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="count"):
        load_config(SynthesizeConfig, None, [f"count={10**12}"])
    with pytest.raises(ConfigError, match="rows_per_file"):
        plan_ranges(10**8, 1)
    plan = plan_ranges(10**8, 64)  # lazy: nothing is built for 1.56 million ranges
    assert time.perf_counter() - t0 < 5
    assert len(plan) == 1_562_500 and plan[-1] == (1_562_499, 99_999_936, 100_000_000)
    assert list(plan_ranges(10, 4)) == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]


def test_local_mlflow_store_keeps_artifacts_under_the_output_not_the_cwd(tmp_path, monkeypatch):
    """The embedded default store (sqlite under the job's output): a run's artifacts land beside
    the database, nothing is written under the current directory."""
    from dakd.tracking import RunLogger, resolve_tracking_uri, start_or_resume_run

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    uri = resolve_tracking_uri(None, str(out))
    run_id = start_or_resume_run(uri, "exp", run_key="k", run_name="r", params={"a": 1})
    logger = RunLogger(uri, run_id)
    logger.log_dict({"x": 1}, "summary.json")
    logger.end()
    assert logger.failures == 0
    assert list(cwd.iterdir()) == []
    found = list((out / "mlartifacts").rglob("summary.json"))
    assert len(found) == 1 and json.loads(found[0].read_text()) == {"x": 1}


def test_run_logger_pauses_after_a_failed_call(tmp_path):
    """A tracking outage costs a training loop one call's retries per pause, not every call's:
    the calls in the pause after a failure are counted as not logged without being tried;
    after the pause they are tried again; closing the run is tried even in a pause."""
    import mlflow

    from dakd.tracking import RunLogger, resolve_tracking_uri, start_or_resume_run

    uri = resolve_tracking_uri(None, str(tmp_path))
    run_id = start_or_resume_run(uri, "exp", run_key="k", run_name="r", params={})
    now, tried = [0.0], []

    def down(*args):
        tried.append(args)
        raise ConnectionError("tracking server down")

    logger = RunLogger(uri, run_id, pause_s=60, clock=lambda: now[0])
    assert logger.call(down, 1) is None and len(tried) == 1 and logger.failures == 1
    now[0] = 59.0
    logger.log_metrics({"loss": 1.0}, step=1)
    assert logger.call(down, 2) is None and len(tried) == 1 and logger.failures == 3  # skipped, not tried
    now[0] = 61.0
    logger.log_metrics({"loss": 2.0}, step=2)
    assert logger.call(down, 3) is None and len(tried) == 2 and logger.failures == 4  # tried again
    logger.end("FINISHED")  # in the new pause, but a run's end is always tried
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [2.0]
    assert client.get_run(run_id).info.status == "FINISHED" and logger.failures == 4
