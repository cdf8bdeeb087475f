"""Data readers: OSD, SOS (genuine sample pairs), own folders, procedural scenes.

Expectations are computed independently of the readers: from the arrays the fixtures
wrote, from PIL's decoding of the files, or from the published layouts and palettes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dakd import storage
from dakd.data.classes import OSD_CLASSES, ClassTable
from dakd.data.folder import FolderReader
from dakd.data.osd import OSDReader
from dakd.data.procedural import ProceduralReader
from dakd.data.readers import RECORD_KEYS, PairRef, Reader, map_palette
from dakd.data.sos import SOSReader
from dakd.errors import DataError
from fixtures_data import (
    OSD_PALETTE,
    block_mask,
    decoded,
    grey_image,
    off_palette_rgb,
    write_folder_pair,
    write_osd_pair,
    write_sos_pair,
)

# ../shared beside the checkout (as CI lays it out) holds the genuine SOS pairs.
SOS_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "sos-sample"
SOS_SIZE = (256, 256)  # PAPER.md: SOS tiles are 256x256
H, W = 32, 48


def check_record(rec: dict, ref: PairRef) -> None:
    assert set(rec) == set(RECORD_KEYS)
    assert (rec["id"], rec["split"], rec["source"]) == (ref.id, ref.split, ref.source)
    assert rec["image"].dtype == np.uint8 and rec["mask"].dtype == np.uint8
    assert rec["image"].shape == rec["mask"].shape == (rec["height"], rec["width"])


def test_osd_palette_is_the_published_one():
    np.testing.assert_array_equal(OSD_CLASSES.palette(), OSD_PALETTE)


def test_map_palette_matches_brute_force():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(6, 7, 3)).astype(np.uint8)
    rgb[::2, ::3] = OSD_PALETTE[rng.integers(0, 5, size=rgb[::2, ::3].shape[:2])]
    index, n_off = map_palette(rgb, OSD_PALETTE)
    pal = OSD_PALETTE.astype(int).tolist()
    def nearest(p):
        return min(range(5), key=lambda c: sum((int(p[k]) - pal[c][k]) ** 2 for k in range(3)))

    expected = np.array([[nearest(p) for p in row] for row in rgb])
    np.testing.assert_array_equal(index, expected)
    assert n_off == sum(list(map(int, p)) not in pal for row in rgb for p in row)


# ---------------------------------------------------------------- SOS


@pytest.mark.skipif(not SOS_SAMPLE.is_dir(), reason="genuine SOS sample pairs not present")
@pytest.mark.parametrize("root", [SOS_SAMPLE / "dataset", SOS_SAMPLE], ids=["dataset", "wrapper"])
def test_sos_genuine_pairs(root):
    data = SOS_SAMPLE / "dataset"
    expected = {}  # id -> (image path, mask path), from the published layout
    for sensor in ("palsar", "sentinel"):
        for sat in (data / "train" / sensor).glob("*_sat.jpg"):
            expected[f"train/{sensor}/{sat.name[:-8]}"] = (sat, sat.with_name(sat.name[:-8] + "_mask.png"))
        for sat in (data / "test" / sensor / "sat").glob("*_sat.jpg"):
            gt = data / "test" / sensor / "gt" / (sat.name[:-8] + "_mask.png")
            expected[f"test/{sensor}/{sat.name[:-8]}"] = (sat, gt)
    reader = SOSReader(root=str(root), splits=["train", "test"], sensors=["palsar", "sentinel"])
    assert isinstance(reader, Reader)
    refs, problems = reader.list_pairs()
    assert [r.id for r in refs] == sorted(expected) and problems == []
    oil_pixels = 0
    for ref in refs:
        image_path, mask_path = expected[ref.id]
        rec = reader.read(ref)
        check_record(rec, ref)
        split, sensor, _ = ref.id.split("/")
        assert (rec["split"], rec["sensor"]) == (split, sensor)
        assert rec["image"].shape == SOS_SIZE
        rgb, mask_rgb = decoded(image_path), decoded(mask_path)
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        assert (mask_rgb[..., 0] == mask_rgb[..., 1]).all() and (mask_rgb[..., 1] == mask_rgb[..., 2]).all()
        np.testing.assert_array_equal(rec["image"], rgb[..., 0])
        np.testing.assert_array_equal(rec["mask"], (mask_rgb[..., 0] >= 128).astype(np.uint8))
        assert set(np.unique(rec["mask"])) <= {0, 1}
        oil_pixels += int(rec["mask"].sum())
    assert oil_pixels > 0


def test_sos_grey_edges_binarised_at_128(tmp_path):
    rng = np.random.default_rng(1)
    mask_grey = (block_mask(rng, H, W, 2) * 255).astype(np.uint8)
    edge = np.zeros_like(mask_grey, dtype=bool)
    edge[:, 1:] |= mask_grey[:, 1:] != mask_grey[:, :-1]
    mask_grey[edge] = rng.choice([1, 64, 127, 128, 129, 200, 254], size=int(edge.sum()))
    assert {127, 128} <= set(np.unique(mask_grey).tolist())
    image = grey_image(rng, H, W)
    written = {
        "train/sentinel/20001": write_sos_pair(tmp_path, "train", "sentinel", "20001", image, mask_grey, flat=True),
        "test/sentinel/20002": write_sos_pair(tmp_path, "test", "sentinel", "20002", image, mask_grey, flat=False),
    }
    write_sos_pair(tmp_path, "train", "palsar", "10001", image, mask_grey, flat=True)  # not asked for
    reader = SOSReader(root=str(tmp_path), splits=["train", "test"], sensors=["sentinel"])
    refs, problems = reader.list_pairs()
    assert [r.id for r in refs] == sorted(written) and problems == []
    for ref in refs:
        rec = reader.read(ref)
        check_record(rec, ref)
        assert rec["sensor"] == "sentinel"
        expected_mask = (decoded(written[ref.id]["mask"])[..., 0] >= 128).astype(np.uint8)
        np.testing.assert_array_equal(rec["mask"], expected_mask)
        np.testing.assert_array_equal(rec["image"], decoded(written[ref.id]["image"])[..., 0])


# ---------------------------------------------------------------- OSD


def test_osd_rgb_labels_with_off_palette_pixels(tmp_path):
    rng = np.random.default_rng(2)
    truth, images = {}, {}
    for split, name, n_off in [("train", "img_0001", 5), ("train", "img_0002", 0), ("test", "img_0003", 3)]:
        rgb, expected = off_palette_rgb(rng, block_mask(rng, H, W, 5), OSD_PALETTE, n_off)
        paths = write_osd_pair(tmp_path, split, name, grey_image(rng, H, W), rgb_label=rgb)
        truth[f"{split}/{name}"] = (expected, n_off)
        images[f"{split}/{name}"] = paths["image"]
    reader = OSDReader(root=f"file://{tmp_path}", splits=["train", "test"], max_off_palette_share=0.01)
    refs, problems = reader.list_pairs()
    assert [r.id for r in refs] == sorted(truth) and problems == []
    for ref in refs:
        rec = reader.read(ref)
        check_record(rec, ref)
        expected, n_off = truth[ref.id]
        np.testing.assert_array_equal(rec["mask"], expected)
        assert rec["off_palette_pixels"] == n_off and rec["sensor"] is None
        np.testing.assert_array_equal(rec["image"], decoded(images[ref.id]))


def test_osd_prefers_labels_1d(tmp_path):
    rng = np.random.default_rng(3)
    index_mask, other_mask = block_mask(rng, H, W, 5), block_mask(rng, H, W, 5)
    assert (index_mask != other_mask).any()
    rgb = OSD_PALETTE[other_mask]
    write_osd_pair(tmp_path, "train", "a", grey_image(rng, H, W), rgb_label=rgb, index_label=index_mask)
    write_osd_pair(tmp_path, "train", "b", grey_image(rng, H, W), rgb_label=OSD_PALETTE[other_mask])
    reader = OSDReader(root=str(tmp_path), splits=["train"], max_off_palette_share=0.0)
    refs, _ = reader.list_pairs()
    recs = {r.id: reader.read(r) for r in refs}
    np.testing.assert_array_equal(recs["train/a"]["mask"], index_mask)
    np.testing.assert_array_equal(recs["train/b"]["mask"], other_mask)
    assert recs["train/a"]["off_palette_pixels"] == recs["train/b"]["off_palette_pixels"] == 0


def test_osd_too_many_off_palette_pixels(tmp_path):
    rng = np.random.default_rng(4)
    n_off = 20
    rgb, _ = off_palette_rgb(rng, block_mask(rng, H, W, 5), OSD_PALETTE, n_off)
    paths = write_osd_pair(tmp_path, "train", "a", grey_image(rng, H, W), rgb_label=rgb)
    share = n_off / (H * W)
    ok = OSDReader(root=str(tmp_path), splits=["train"], max_off_palette_share=share)
    ref = ok.list_pairs()[0][0]
    assert ok.read(ref)["off_palette_pixels"] == n_off
    strict = OSDReader(root=str(tmp_path), splits=["train"], max_off_palette_share=share / 2)
    with pytest.raises(DataError) as err:
        strict.read(ref)
    assert err.value.path == str(paths["rgb"]) and f"{n_off} of {H * W}" in str(err.value)


def test_osd_labels_1d_values_checked(tmp_path):
    rng = np.random.default_rng(5)
    bad = block_mask(rng, H, W, 5)
    bad[0, 0] = OSD_CLASSES.num_classes
    paths = write_osd_pair(tmp_path, "train", "a", grey_image(rng, H, W), index_label=bad)
    reader = OSDReader(root=str(tmp_path), splits=["train"], max_off_palette_share=0.0)
    with pytest.raises(DataError) as err:
        reader.read(reader.list_pairs()[0][0])
    assert err.value.path == str(paths["index"])


def test_osd_unmatched_files_are_problems(tmp_path):
    rng = np.random.default_rng(6)
    label = OSD_PALETTE[block_mask(rng, H, W, 5)]
    write_osd_pair(tmp_path, "train", "pair", grey_image(rng, H, W), rgb_label=label)
    lonely = write_osd_pair(tmp_path, "train", "lonely_image", grey_image(rng, H, W))
    orphan = write_osd_pair(tmp_path, "train", "x", grey_image(rng, H, W), rgb_label=label)
    orphan["image"].unlink()
    refs, problems = OSDReader(root=str(tmp_path), splits=["train"], max_off_palette_share=0.0).list_pairs()
    assert [r.id for r in refs] == ["train/pair"]
    assert problems == [
        {"id": "train/lonely_image", "path": str(lonely["image"]), "reason": "image without mask"},
        {"id": "train/x", "path": str(orphan["rgb"]), "reason": "mask without image"},
    ]


def test_osd_reads_from_s3(tmp_path, s3_uri):
    rng = np.random.default_rng(7)
    mask = block_mask(rng, H, W, 5)
    paths = write_osd_pair(tmp_path, "train", "a", grey_image(rng, H, W), rgb_label=OSD_PALETTE[mask])
    for p in paths.values():
        storage.write_bytes(storage.join_uri(s3_uri, str(p.relative_to(tmp_path))), p.read_bytes())
    reader = OSDReader(root=s3_uri, splits=["train"], max_off_palette_share=0.0)
    refs, problems = reader.list_pairs()
    assert [r.id for r in refs] == ["train/a"] and refs[0].image_uri.startswith("s3://") and problems == []
    rec = reader.read(refs[0])
    np.testing.assert_array_equal(rec["mask"], mask)
    np.testing.assert_array_equal(rec["image"], decoded(paths["image"]))


# ---------------------------------------------------------------- bad input


def _one_osd_pair(tmp_path, rng, image_shape=(H, W), mask_shape=(H, W)):
    label = OSD_PALETTE[block_mask(rng, *mask_shape, 5)]
    paths = write_osd_pair(tmp_path, "train", "a", grey_image(rng, *image_shape), rgb_label=label)
    reader = OSDReader(root=str(tmp_path), splits=["train"], max_off_palette_share=0.0)
    return reader, reader.list_pairs()[0][0], paths


def test_corrupt_image_bytes(tmp_path):
    rng = np.random.default_rng(8)
    reader, ref, paths = _one_osd_pair(tmp_path, rng)
    paths["image"].write_bytes(rng.integers(0, 256, size=500, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="cannot decode image") as err:
        reader.read(ref)
    assert err.value.path == str(paths["image"])


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(9)
    reader, ref, paths = _one_osd_pair(tmp_path, rng)
    data = paths["image"].read_bytes()
    paths["image"].write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot decode image") as err:
        reader.read(ref)
    assert err.value.path == str(paths["image"])


def test_image_mask_size_mismatch(tmp_path):
    rng = np.random.default_rng(10)
    reader, ref, paths = _one_osd_pair(tmp_path, rng, mask_shape=(H, W - 8))
    with pytest.raises(DataError) as err:
        reader.read(ref)
    assert err.value.path == str(paths["rgb"]) and str(paths["image"]) in str(err.value)


def _readers(root: str) -> list:
    return [
        OSDReader(root=root, splits=["train"], max_off_palette_share=0.0),
        SOSReader(root=root, splits=["train"], sensors=["palsar"]),
        FolderReader(root=root, split="train", palette=None, classes=OSD_CLASSES, max_off_palette_share=0.01),
    ]


@pytest.mark.parametrize("index", range(3), ids=["osd", "sos", "folder"])
def test_missing_and_empty_root(tmp_path, index):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError) as err:
        _readers(missing)[index].list_pairs()
    assert err.value.path == missing
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        _readers(str(empty))[index].list_pairs()
    assert str(empty) in err.value.path


# ---------------------------------------------------------------- own folders


def test_folder_index_masks_mode_l_and_p(tmp_path):
    rng = np.random.default_rng(11)
    classes = ClassTable(name="own", names=("water", "oil", "ship"), colors=((0, 0, 0), (255, 255, 255), (255, 0, 0)))
    mask_l, mask_p = block_mask(rng, H, W, 3), block_mask(rng, H, W, 3)
    p_image = Image.fromarray(mask_p, "P")
    p_image.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200])  # colours unrelated to indices
    colour = rng.integers(0, 256, size=(H, W, 3)).astype(np.uint8)
    written = {
        "train/l": write_folder_pair(tmp_path, "l", grey_image(rng, H, W), mask_l),
        "train/p": write_folder_pair(tmp_path, "p", colour, p_image),
    }
    reader = FolderReader(root=str(tmp_path), split="train", palette=None, classes=classes, max_off_palette_share=0.01)
    refs, problems = reader.list_pairs()
    assert [r.id for r in refs] == sorted(written) and problems == []
    recs = {r.id: reader.read(r) for r in refs}
    for ref in refs:
        check_record(recs[ref.id], ref)
    np.testing.assert_array_equal(recs["train/l"]["mask"], mask_l)
    np.testing.assert_array_equal(recs["train/p"]["mask"], mask_p)
    np.testing.assert_array_equal(recs["train/l"]["image"], decoded(written["train/l"]["image"]))
    # differing channels -> luminance 0.299 R + 0.587 G + 0.114 B (PIL rounds in fixed point)
    luma = colour.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(recs["train/p"]["image"].astype(float) - luma).max() <= 1


def test_folder_index_mask_out_of_range(tmp_path):
    rng = np.random.default_rng(12)
    mask = block_mask(rng, H, W, 3)
    mask[3, 4] = 3
    paths = write_folder_pair(tmp_path, "a", grey_image(rng, H, W), mask)
    classes = ClassTable(name="own", names=("a", "b", "c"), colors=((0, 0, 0), (1, 1, 1), (2, 2, 2)))
    reader = FolderReader(root=str(tmp_path), split="val", palette=None, classes=classes, max_off_palette_share=0.01)
    with pytest.raises(DataError, match="< 3") as err:
        reader.read(reader.list_pairs()[0][0])
    assert err.value.path == str(paths["mask"])


def test_folder_palette_masks(tmp_path):
    rng = np.random.default_rng(13)
    palette = np.array([(0, 0, 0), (255, 255, 255), (0, 0, 255)], dtype=np.uint8)
    classes = ClassTable(name="own", names=("water", "oil", "ship"), colors=tuple(map(tuple, palette.tolist())))
    n_off = 4
    rgb, expected = off_palette_rgb(rng, block_mask(rng, H, W, 3), palette, n_off)
    write_folder_pair(tmp_path, "a", grey_image(rng, H, W), rgb, image_suffix=".jpg")
    orphan = write_folder_pair(tmp_path, "b", grey_image(rng, H, W), rgb)
    orphan["mask"].unlink()
    reader = FolderReader(root=str(tmp_path), split="train", palette=palette.tolist(), classes=classes, max_off_palette_share=0.5)
    refs, problems = reader.list_pairs()
    assert [r.id for r in refs] == ["train/a"]
    assert problems == [{"id": "train/b", "path": str(orphan["image"]), "reason": "image without mask"}]
    rec = reader.read(refs[0])
    np.testing.assert_array_equal(rec["mask"], expected)
    assert rec["off_palette_pixels"] == n_off


def test_folder_palette_too_many_off_palette_pixels(tmp_path):
    rng = np.random.default_rng(14)
    palette = np.array([(0, 0, 0), (255, 255, 255)], dtype=np.uint8)
    classes = ClassTable(name="own", names=("water", "oil"), colors=tuple(map(tuple, palette.tolist())))
    rgb, _ = off_palette_rgb(rng, block_mask(rng, H, W, 2), palette, 10)
    paths = write_folder_pair(tmp_path, "a", grey_image(rng, H, W), rgb)
    share = 9 / (H * W)  # just under the 10 off-palette pixels written
    reader = FolderReader(root=str(tmp_path), split="train", palette=palette.tolist(), classes=classes,
                          max_off_palette_share=share)
    refs, _ = reader.list_pairs()
    with pytest.raises(DataError) as err:
        reader.read(refs[0])
    assert str(paths["mask"]) in str(err.value) and "palette" in str(err.value)


# ---------------------------------------------------------------- procedural


def _scenes(seed: int, n: int = 8, height: int = 96, width: int = 96, looks: int = 4):
    reader = ProceduralReader(splits={"train": n}, height=height, width=width, seed=seed, looks=looks)
    refs, problems = reader.list_pairs()
    assert problems == [] and len(refs) == n
    return [reader.read(r) for r in refs]


def test_procedural_listing():
    reader = ProceduralReader(splits={"train": 3, "test": 2}, height=64, width=64, seed=0, looks=1)
    refs, problems = reader.list_pairs()
    assert [r.id for r in refs] == sorted(r.id for r in refs) and len({r.id for r in refs}) == 5
    expected = [("test", 0), ("test", 1), ("train", 0), ("train", 1), ("train", 2)]
    assert sorted((r.split, dict(r.extra)["index"]) for r in refs) == expected
    assert all(r.image_uri is None and r.mask_uri is None and r.source == "procedural" for r in refs)
    assert problems == []


def test_procedural_deterministic_by_seed():
    a, b, c = _scenes(seed=5), _scenes(seed=5), _scenes(seed=6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])
    assert any((x["image"] != z["image"]).any() for x, z in zip(a, c))
    # a scene depends on (seed, split, index) only, not on what was read before it
    reader = ProceduralReader(splits={"train": 8, "test": 8}, height=96, width=96, seed=5, looks=4)
    refs = {r.id: r for r in reader.list_pairs()[0]}
    last = reader.read(refs["train/000007"])
    np.testing.assert_array_equal(last["image"], a[7]["image"])
    assert (reader.read(refs["test/000000"])["image"] != a[0]["image"]).any()


def test_procedural_classes_and_radiometry():
    recs = _scenes(seed=0, n=8)
    masks = np.stack([r["mask"] for r in recs])
    images = np.stack([r["image"] for r in recs]).astype(float)
    assert set(np.unique(masks).tolist()) == set(range(OSD_CLASSES.num_classes))
    sea, oil, lookalike, ship, land = (images[masks == c].mean() for c in range(5))
    assert oil < lookalike < sea < land < ship


@pytest.mark.parametrize("looks", [1, 4])
def test_procedural_any_size(looks):
    (rec,) = _scenes(seed=1, n=1, height=64, width=96, looks=looks)
    assert rec["image"].shape == rec["mask"].shape == (64, 96)
    assert (rec["height"], rec["width"]) == (64, 96)
    assert rec["mask"].max() < OSD_CLASSES.num_classes


def test_registry_and_pickling(tmp_path):
    import pickle

    from dakd.data import sources as readers

    names = ("osd", "sos", "folder", "procedural")
    assert {name: cls.name for name, cls in readers.READERS.items()} == {n: n for n in names}
    reader = ProceduralReader(splits={"train": 1}, height=32, width=32, seed=0, looks=1)
    ref = reader.list_pairs()[0][0]
    clone, ref2 = pickle.loads(pickle.dumps((reader, ref)))
    assert ref2 == ref and hash(ref2) == hash(ref)
    np.testing.assert_array_equal(clone.read(ref2)["image"], reader.read(ref)["image"])


@pytest.mark.parametrize("kind", ["index", "palette"])
def test_transparent_mask_pixels_are_an_error_naming_the_file(tmp_path, kind):
    rng = np.random.default_rng(14)
    palette = np.array([(0, 0, 0), (255, 255, 255), (0, 0, 255)], dtype=np.uint8)
    classes = ClassTable(name="own", names=("water", "oil", "ship"), colors=tuple(map(tuple, palette.tolist())))
    idx = block_mask(rng, H, W, 3)
    rgba = np.concatenate([palette[idx] if kind == "palette" else np.repeat(idx[..., None], 3, axis=2),
                           np.full((H, W, 1), 255, np.uint8)], axis=2)
    write_folder_pair(tmp_path / "ok", "a", grey_image(rng, H, W), Image.fromarray(rgba, "RGBA"))
    rgba[2:5, 3:7, 3] = 0  # 12 fully transparent pixels
    holed = write_folder_pair(tmp_path / "bad", "a", grey_image(rng, H, W), Image.fromarray(rgba, "RGBA"))
    pal = palette.tolist() if kind == "palette" else None
    ok = FolderReader(root=str(tmp_path / "ok"), split="train", palette=pal, classes=classes, max_off_palette_share=0.01)
    np.testing.assert_array_equal(ok.read(ok.list_pairs()[0][0])["mask"], idx)  # opaque RGBA reads as before
    bad = FolderReader(root=str(tmp_path / "bad"), split="train", palette=pal, classes=classes, max_off_palette_share=0.01)
    with pytest.raises(DataError, match="12 transparent pixel") as err:
        bad.read(bad.list_pairs()[0][0])
    assert err.value.path == str(holed["mask"])
