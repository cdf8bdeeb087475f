"""`dakd evaluate` at full resolution (a 650x1250 procedural image) against an independent
confusion-matrix computation, and `dakd predict` over a folder of PNGs (masks + class
areas against an independent count), from a checkpoint and from an MLflow `models:/` URI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dakd.cli import main
from dakd.config import (EvaluateConfig, IngestConfig, PredictConfig, ProceduralSource, SarossModelConfig,
                         SourceConfig, load_config)
from dakd.data import shards
from dakd.data.classes import OSD_CLASSES
from dakd.data.ingest import run_ingest
from dakd.errors import ConfigError, DataError
from dakd.eval.evaluate import finished_evaluation, run_evaluate, run_evaluations
from dakd.eval.figures import TITLE_HEIGHT
from dakd.predict import run_predict
from dakd import checkpoints as ckpt_io
from dakd.checkpoints import STUDENT_KIND as KIND
from dakd.models.saross import arch_dict, build_student
from dakd.train.saross import log_mlflow_model

MODEL = SarossModelConfig(encoder="resnet18", decoder_channels=[8, 8, 8], caft_heads=2)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A SAROSS-Net checkpoint written as train-saross writes it, fitted for a few steps
    to map grey levels to classes (so its predictions hold several classes)."""
    torch.manual_seed(0)
    model = build_student(MODEL, 5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(4, 1, 64, 64) * 2 - 1
    y = torch.bucketize(x[:, 0], torch.tensor([-0.6, -0.2, 0.2, 0.6]))
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    location = str(tmp_path_factory.mktemp("student") / "run" / "checkpoint_000")
    ckpt_io.save_checkpoint(location, model.state_dict(), {"kind": KIND, "epoch": 1, "step": 1,
                                                           "arch": arch_dict(MODEL, 5), "classes": OSD_CLASSES.to_dict(),
                                                           "val": {"split": "val", "miou": 0.5, "iou": {}}})
    return location, model.eval()


def reference_prediction(model, image: np.ndarray) -> np.ndarray:
    """Independent of dakd.eval: normalise by hand, forward, argmax."""
    x = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0)[None, None]
    with torch.no_grad():
        return model(x)[0].argmax(0).numpy()


def test_evaluate_full_resolution_matches_independent_metrics(student, tmp_path, ray_local, mlflow_server):
    from sklearn.metrics import confusion_matrix as sk_cm
    from sklearn.metrics import precision_recall_fscore_support

    location, model = student
    real = str(tmp_path / "real")
    run_ingest(IngestConfig(source=SourceConfig(procedural=ProceduralSource(splits={"test": 1}, height=650, width=1250,
                                                                           seed=2)), output=real))
    rec = next(shards.open_shard_set(real).iter_records("test"))
    assert rec["image"].shape == (650, 1250)
    pred = reference_prediction(model, rec["image"])
    assert len(np.unique(pred)) > 1  # a non-trivial prediction
    cm = sk_cm(rec["mask"].ravel(), pred.ravel(), labels=range(5))
    present = [c for c in range(5) if cm[c, :].sum() + cm[:, c].sum() > 0]
    p, r, f1, _ = precision_recall_fscore_support(rec["mask"].ravel(), pred.ravel(), labels=present, average="macro",
                                                  zero_division=0)
    tp = np.diag(cm)
    iou = tp / (cm.sum(0) + cm.sum(1) - tp)

    out = str(tmp_path / "eval")
    summary = run_evaluate(load_config(EvaluateConfig, None, [f"checkpoint={location}", f"shards={real}", f"output={out}",
                                                              "overlay_count=1", f"tracking.uri={mlflow_server}"]))
    assert summary["confusion_matrix"] == cm.tolist() and summary["images"] == 1
    assert summary["miou"] == pytest.approx(np.nanmean(iou[present]))
    assert summary["f1"] == pytest.approx(f1) and summary["precision"] == pytest.approx(p)
    assert summary["recall"] == pytest.approx(r) and summary["accuracy"] == pytest.approx(tp.sum() / cm.sum())
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["confusion_matrix"] == cm.tolist()
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "| model | mIoU | F1 | Accuracy | Recall | Precision |" in table and f"{100 * summary['miou']:.2f}" in table
    # the table says which split selected the checkpoint and which reports
    assert "Checkpoint selected on split 'val', reported on split 'test' (1 images)." in table
    assert summary["selected_on"] == report["selected_on"] == "val" and "WARNING" not in table
    files = report["files"]  # the figures metrics.json lists, under this run's generation folder
    assert Image.open(tmp_path / "eval" / files["confusion_matrix"]).size[0] > 100
    assert [f.rsplit("/", 1)[-1] for f in files["overlays"]] == [rec["id"].replace("/", "_") + ".png"]
    overlay = Image.open(tmp_path / "eval" / files["overlays"][0])
    assert overlay.size == (4 * 1250, 650 + TITLE_HEIGHT)  # titled [image | ground truth | prediction | errors]

    import mlflow

    run = mlflow.MlflowClient(tracking_uri=mlflow_server).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["eval/miou"] == pytest.approx(summary["miou"])

    # A re-run pipeline reuses this evaluation while its identity holds: its settings, the
    # checkpoint's weights and the split's files; not where it runs or is tracked.
    cfg = load_config(EvaluateConfig, None, [f"checkpoint={location}", f"shards={real}", f"output={out}",
                                             "overlay_count=1", "tracking.enabled=false"])
    reused = finished_evaluation(cfg)
    assert reused["skipped"] and reused["mlflow_run_id"] is None
    assert {k: v for k, v in reused.items() if k not in ("skipped", "mlflow_run_id")} == {
        k: v for k, v in summary.items() if k != "mlflow_run_id"}
    assert finished_evaluation(cfg.model_copy(update={"overlay_count": 2})) is None
    state = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    other = str(tmp_path / "other" / "checkpoint_000")  # the same model, one weight changed
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    next(v for v in weights.values() if v.is_floating_point()).add_(1e-3)
    ckpt_io.save_checkpoint(other, weights, {k: v for k, v in ckpt_io.read_state(location).items()
                                             if k not in ("weights_sha256", "location")})
    assert finished_evaluation(cfg.model_copy(update={"checkpoint": other})) is None
    run_ingest(IngestConfig(source=SourceConfig(procedural=ProceduralSource(splits={"test": 1}, height=650, width=1250,
                                                                           seed=3)), output=real, overwrite=True))
    assert finished_evaluation(cfg) is None  # the split's files changed
    assert state["identity"]["weights_sha256"] == ckpt_io.read_state(location)["weights_sha256"]

    with pytest.raises(ConfigError, match="no checkpoint here"):
        run_evaluate(load_config(EvaluateConfig, None, [f"checkpoint={tmp_path}", f"shards={real}", f"output={out}",
                                                        "tracking.enabled=false"]))
    with pytest.raises(DataError, match="split 'val' not in this shard set"):
        run_evaluate(load_config(EvaluateConfig, None, [f"checkpoint={location}", f"shards={real}", f"output={out}",
                                                        "split=val", "tracking.enabled=false"]))


def test_several_checkpoints_in_one_pool_match_each_alone(student, tmp_path, ray_local):
    """run_evaluations (a pipeline's students): one actor pool, each model's confusion matrix
    equal to an independent computation, each evaluation written to its own output; configs
    that differ in what the pool shares are refused before any compute."""
    from sklearn.metrics import confusion_matrix as sk_cm

    location, model = student
    torch.manual_seed(1)
    other = build_student(MODEL, 5).eval()  # different weights, same classes
    other_loc = str(tmp_path / "other" / "run" / "checkpoint_000")
    ckpt_io.save_checkpoint(other_loc, other.state_dict(), {"kind": KIND, "epoch": 1, "step": 1,
                                                            "arch": arch_dict(MODEL, 5), "classes": OSD_CLASSES.to_dict(),
                                                            "val": {"split": "val", "miou": 0.1, "iou": {}}})
    real = str(tmp_path / "real")
    run_ingest(IngestConfig(source=SourceConfig(procedural=ProceduralSource(splits={"test": 3}, height=64, width=96,
                                                                           seed=5)), output=real, rows_per_file=2))
    records = list(shards.open_shard_set(real).iter_records("test"))
    cfgs = [load_config(EvaluateConfig, None, [f"checkpoint={loc}", f"shards={real}", f"output={tmp_path / name}",
                                               f"name={name}", "overlay_count=2", "tracking.enabled=false"])
            for loc, name in [(location, "a"), (other_loc, "b")]]
    summaries = run_evaluations(cfgs, print_table=False)
    for summary, net, name in zip(summaries, [model, other], ["a", "b"]):
        cm = sum(sk_cm(r["mask"].ravel(), reference_prediction(net, r["image"]).ravel(), labels=range(5)) for r in records)
        assert summary["name"] == name and summary["images"] == 3 and summary["confusion_matrix"] == cm.tolist()
        report = json.loads((tmp_path / name / "metrics.json").read_text())
        assert report["confusion_matrix"] == cm.tolist() and len(report["files"]["overlays"]) == 2
    assert summaries[0]["confusion_matrix"] != summaries[1]["confusion_matrix"]  # each model's own figures

    odd = cfgs[1].model_copy(update={"split": "train", "output": str(tmp_path / "c")})
    with pytest.raises(ConfigError, match="must share split"):
        run_evaluations([cfgs[0], odd])
    assert not (tmp_path / "c").exists()


def _write_inputs(folder) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    images = {"a.png": rng.integers(0, 256, (40, 72), dtype=np.uint8),
              "sub/b.png": rng.integers(0, 256, (33, 50), dtype=np.uint8)}
    for name, img in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return images


def _colour_to_class(rgb: np.ndarray) -> np.ndarray:
    pal = OSD_CLASSES.palette().astype(np.int64)
    idx = np.full(rgb.shape[:2], -1)
    for c, col in enumerate(pal):
        idx[(rgb == col).all(-1)] = c
    assert (idx >= 0).all()
    return idx


def test_predict_folder_masks_and_areas_from_checkpoint_and_mlflow(student, tmp_path, ray_local, mlflow_server, capsys, monkeypatch):
    location, model = student
    folder = tmp_path / "in"
    images = _write_inputs(folder)
    out = tmp_path / "pred"
    summary = run_predict(load_config(PredictConfig, None, [f"model={location}", f"input={folder}", f"output={out}",
                                                            "pixel_size_m=10"]))
    assert summary["images"] == 2
    table = pq.read_table(out / "areas.parquet").to_pylist()
    csv = pacsv.read_csv(out / "areas.csv").to_pylist()
    assert [r["id"] for r in table] == sorted(images) == [r["id"] for r in csv]
    for row, crow in zip(table, csv):
        expected = reference_prediction(model, images[row["id"]])
        mask = _colour_to_class(np.asarray(Image.open(out / row["mask"]).convert("RGB")))
        assert np.array_equal(mask, expected)
        counts = np.bincount(expected.ravel(), minlength=5)
        for c, name in enumerate(OSD_CLASSES.names):
            assert row[f"pixels_{name}"] == counts[c] == crow[f"pixels_{name}"]
            assert row[f"area_km2_{name}"] == pytest.approx(counts[c] * 100 / 1e6)
        assert (row["height"], row["width"]) == images[row["id"]].shape

    # the same model logged to MLflow and registered: models:/<name>/<version> gives the same masks
    from dakd import tracking

    run_id = tracking.start_or_resume_run(mlflow_server, "dakd-test", run_key=f"predict-test-{tmp_path}",
                                          run_name="predict-test", params={})
    logged = log_mlflow_model(mlflow_server, run_id, location, "saross-predict-test")
    assert logged["registered"] == "models:/saross-predict-test/1"
    out2 = tmp_path / "pred2"
    assert main(["predict", "--set", f"model={logged['registered']}", "--set", f"input={folder}", "--output", str(out2),
                 "--set", f"tracking.uri={mlflow_server}", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["ok"] and last["images"] == 2
    again = pq.read_table(out2 / "areas.parquet").to_pylist()
    assert [{k: v for k, v in r.items() if k.startswith("pixels_")} for r in again] == \
        [{k: v for k, v in r.items() if k.startswith("pixels_")} for r in table]
    assert "area_km2_oil" not in again[0]  # no pixel size: pixel counts only
    # the registered model loads from its safetensors checkpoint, without unpickling the flavour's model file
    import mlflow.pytorch
    import torch

    from dakd.config import TrackingConfig
    from dakd.checkpoints import load_model, load_weights

    def refuse(*args, **kwargs):
        raise AssertionError("mlflow.pytorch.load_model unpickles: dakd must not call it")

    monkeypatch.setattr(mlflow.pytorch, "load_model", refuse)
    model, classes, _ = load_model(logged["registered"], TrackingConfig(uri=mlflow_server))
    assert classes.names == OSD_CLASSES.names
    want = load_weights(location)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())

    # existing output, missing input, empty input
    with pytest.raises(DataError, match="already holds predictions"):
        run_predict(load_config(PredictConfig, None, [f"model={location}", f"input={folder}", f"output={out}"]))
    with pytest.raises(DataError, match="not found"):
        run_predict(load_config(PredictConfig, None, [f"model={location}", f"input={tmp_path / 'nope'}", f"output={out}"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        run_predict(load_config(PredictConfig, None, [f"model={location}", f"input={empty}", f"output={tmp_path / 'p3'}"]))
    with pytest.raises(ConfigError, match="cannot be loaded from MLflow"):
        run_predict(load_config(PredictConfig, None, ["model=models:/no-such-model/7", f"input={folder}",
                                                      f"output={tmp_path / 'p4'}", f"tracking.uri={mlflow_server}"]))
