"""FID / IS: the Fréchet distance against an independent scipy computation, the Inception
Score against a direct numpy one, and `dakd evaluate-synthesis` end to end on a real local
Ray (pixels extractor; InceptionV3 from a weights file; missing weights)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from dakd.config import EvaluateSynthesisConfig, IngestConfig, ProceduralSource, SourceConfig, load_config
from dakd.data import shards
from dakd.data.ingest import run_ingest
from dakd.data.transforms import normalize_image
from dakd.errors import ConfigError
from dakd.synth.evaluate import run_evaluate_synthesis
from dakd.synth.fid import ISAccumulator, RunningStats, frechet_distance, make_extractor, pixel_features


def scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """Reference: np.mean / np.cov of the raw features and scipy's sqrtm (Schur method)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


def stats_of(x: np.ndarray, chunk: int = 7) -> RunningStats:
    s = RunningStats()
    for i in range(0, len(x), chunk):
        s.update(x[i : i + chunk])
    return s


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    sa, sb = stats_of(a), stats_of(b)
    np.testing.assert_allclose(sa.cov, np.cov(a, rowvar=False), rtol=1e-9, atol=1e-9)
    got = frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov)
    assert got == pytest.approx(scipy_frechet(a, b), rel=1e-6)
    assert frechet_distance(sa.mean, sa.cov, sa.mean, sa.cov) == pytest.approx(0.0, abs=1e-7)
    # a pure shift: the distance is |shift|^2
    assert frechet_distance(sa.mean, sa.cov, sa.mean + 3.0, sa.cov) == pytest.approx(9.0 * 6, rel=1e-6)


def test_inception_score_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(90, 12))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    split = np.arange(90) % 3
    acc = ISAccumulator(3)
    acc.update(probs[:50], split[:50])
    acc.update(probs[50:], split[50:])
    ref = []
    for s in range(3):
        p = probs[split == s]
        py = p.mean(0)
        ref.append(np.exp(np.mean((p * (np.log(p) - np.log(py))).sum(1))))
    mean, std = acc.score()
    assert mean == pytest.approx(np.mean(ref), rel=1e-9) and std == pytest.approx(np.std(ref), rel=1e-9)
    one_class = ISAccumulator(1)
    one_class.update(np.tile(np.eye(12)[3], (10, 1)), np.zeros(10, int))
    assert one_class.score()[0] == pytest.approx(1.0)  # all samples the same class: IS = 1


@pytest.fixture(scope="module")
def real_and_shifted(tmp_path_factory, ray_local):
    """A procedural set (48 images, 32 px) and a copy whose images are 30 grey levels brighter."""
    root = tmp_path_factory.mktemp("fid")
    real, shifted = str(root / "real"), str(root / "shifted")
    source = SourceConfig(procedural=ProceduralSource(splits={"train": 48}, height=32, width=32, seed=2))
    run_ingest(IngestConfig(source=source, output=real, rows_per_file=20))
    recs = list(shards.open_shard_set(real).iter_records("train"))
    for r in recs:
        r["image"] = np.clip(r["image"].astype(int) + 30, 0, 255).astype(np.uint8)
    files = []
    for k in range(0, len(recs), 16):
        name = shards.shard_name("train", k // 16)
        shards.write_table(f"{shifted}/{name}", shards.records_to_table(recs[k : k + 16]))
        files.append({"path": name, "rows": len(recs[k : k + 16])})
    manifest = dict(shards.open_shard_set(real).manifest)
    manifest["splits"] = {"train": {"count": len(recs), "files": files}}
    shards.write_manifest(shifted, manifest)
    return real, shifted


def pooled_reference(root: str, size: int) -> np.ndarray:
    """Independent pixel features: x = u8/127.5 - 1, block means by reshape (32 px -> size)."""
    imgs = np.stack([r["image"] for r in shards.open_shard_set(root).iter_records("train")]).astype(np.float64)
    x = imgs / 127.5 - 1.0
    n, h, w = x.shape
    return x.reshape(n, size, h // size, size, w // size).mean(axis=(2, 4)).reshape(n, -1)


def evaluate(synthetic: str, real: str, *extra: str) -> dict:
    return run_evaluate_synthesis(load_config(EvaluateSynthesisConfig, None, [
        f"synthetic={synthetic}", f"real={real}", "features=pixels", "pixels_size=4", "batch_size=7",
        "actors=1", "tracking.enabled=false", *extra]))  # one actor: the driver accumulates, whatever the pool


def test_evaluate_pixels_self_and_shifted(real_and_shifted):
    real, shifted = real_and_shifted
    same = evaluate(real, real)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["counts"] == {"synthetic": 48, "real": 48}
    assert same["inception_score"] is None and "not defined" in same["inception_score_note"]
    got = evaluate(shifted, real)
    ref = scipy_frechet(pooled_reference(shifted, 4), pooled_reference(real, 4))
    assert got["fid"] == pytest.approx(ref, rel=1e-6) and got["fid"] > 0.01
    assert got["feature_dim"] == 16
    part = evaluate(shifted, real, "max_samples=30")  # first 30 of each set, in file order
    ref30 = scipy_frechet(pooled_reference(shifted, 4)[:30], pooled_reference(real, 4)[:30])
    assert part["counts"] == {"synthetic": 30, "real": 30} and part["fid"] == pytest.approx(ref30, rel=1e-6)


def test_evaluate_inception_from_weights_file(real_and_shifted, tmp_path):
    torch = pytest.importorskip("torch")
    from torchvision.models import inception_v3

    real, shifted = real_and_shifted
    with pytest.raises(ConfigError, match="inception_weights: not set"):
        evaluate(shifted, real, "features=inception")
    with pytest.raises(ConfigError, match="file not found"):
        evaluate(shifted, real, "features=inception", f"inception_weights={tmp_path / 'none.pth'}")
    # torchvision's layout with random weights (the real ones cannot be downloaded here)
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), weights)
    got = evaluate(shifted, real, "features=inception", f"inception_weights={weights}", "max_samples=4",
                   "is_splits=2", "batch_size=4")
    assert got["feature_dim"] == 2048 and np.isfinite(got["fid"]) and got["fid"] >= 0
    assert 1.0 <= got["inception_score"] <= 1000.0
    # the extractor itself: pool features and a 1000-way softmax
    feats, probs = make_extractor("inception", inception_weights=str(weights))(np.zeros((2, 32, 32), np.uint8))
    assert feats.shape == (2, 2048) and probs.shape == (2, 1000)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-9)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ConfigError, match="not InceptionV3 weights"):
        make_extractor("inception", inception_weights=str(bad))


@pytest.mark.parametrize("h, w, size", [(32, 32, 4), (37, 29, 8), (5, 7, 8), (30, 45, 7)])
def test_pixel_features_are_torch_adaptive_pooling(h, w, size):
    """The NumPy pooling equals torch's adaptive_avg_pool2d, also where the windows overlap
    (sizes that do not divide) or repeat pixels (an image smaller than size)."""
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(h * w).integers(0, 256, (3, h, w), dtype=np.uint8)
    x = torch.from_numpy(normalize_image(images).astype(np.float64))[:, None]  # the one normalisation
    ref = torch.nn.functional.adaptive_avg_pool2d(x, size).reshape(3, -1).numpy()
    np.testing.assert_allclose(pixel_features(images, size), ref, rtol=0, atol=1e-12)


def test_pixel_features_need_no_torch(real_and_shifted):
    """A pixels FID actor (its module, set-up and extractor) never imports torch."""
    import subprocess
    import sys

    part = shards.open_shard_set(real_and_shifted[0]).files("train")[0]
    probe = ("import sys, numpy as np; from dakd.synth.evaluate import FeatureActor; "
             "out = FeatureActor('pixels', 4, None, 2, 1, False)("
             "{'set': np.array(['real']), 'uri': np.array([sys.argv[1]]), 'take': np.array([3])}); "
             "assert out['features'].shape == (3, 16), out['features'].shape; "
             "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", probe, part], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_pluggable_extractor_spec():
    fn = make_extractor("dakd.synth.fid:pixel_features")
    feats, probs = fn(np.full((3, 16, 16), 255, np.uint8))
    assert feats.shape == (3, 64) and probs is None and np.allclose(feats, 1.0)
    with pytest.raises(ConfigError, match="cannot be imported"):
        make_extractor("dakd.nope:missing")
    with pytest.raises(ConfigError, match="features"):
        load_config(EvaluateSynthesisConfig, None, ["features=not a spec"])
