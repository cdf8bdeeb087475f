"""The shard set: one Parquet schema, its writer and reader, and the manifest.

A shard set at URI `root` is
    root/data/[<generation>/]<split>/part-<index:05d>.parquet   rows of SHARD_SCHEMA
    root/manifest.json                                          written last
The manifest lists every file (path relative to `root`, rows, bytes); readers follow it,
never a directory listing. A shard set without a manifest is incomplete: `open_shard_set`
refuses it. Opening checks each listed file's size and Parquet footer row count against
the manifest (a truncated or swapped shard is a DataError naming it).

Overwrite is a swap (`new_generation`, `remove_listed`): a job that replaces a set writes
the new files under a fresh generation prefix beside the old ones; the new manifest
(one atomic object write) makes them the set; only then are the files the old manifest
lists removed. A killed or failed overwrite leaves the old set readable, and nothing
the old manifest does not list (a user's own file) is ever deleted.

Row layout (SHARD_SCHEMA): `image` and `mask` are the raw bytes of H×W uint8 arrays
(row-major); `image` holds 8-bit grey levels (see data.transforms for the one
normalisation), `mask` class indices. Synthetic shard sets add `logits` (C×H×W
float16 bytes), `seed` and provenance columns (see SYNTH_FIELDS).
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dakd import storage
from dakd.data.classes import ClassTable, class_table_from_dict
from dakd.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("sensor", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("off_palette_pixels", pa.int64()),
    ]
)


# Synthetic shard sets (`dakd synthesize`): the real columns (split "train", source
# "synthetic", image = denormalize_image(x0), mask = argmax of the logits) plus these.
SYNTH_FIELDS = [
    ("index", pa.int64()),  # sample id as an integer, 0..N-1 (`id` is its decimal string)
    ("seed", pa.int64()),  # dakd.seeds.sample_seed(run seed, index)
    ("logits", pa.binary()),  # C×H×W float16 bytes: the teacher's soft label
    ("num_classes", pa.int32()),
    ("teacher_checkpoint", pa.string()),
    ("teacher_hash", pa.string()),  # sha256 of the teacher weights used
    ("b", pa.float64()),
    ("sampler", pa.string()),
    ("steps", pa.int32()),
    ("code_version", pa.string()),
]
SYNTH_SCHEMA = pa.schema(list(SHARD_SCHEMA) + [pa.field(n, t) for n, t in SYNTH_FIELDS])

# Split names: ingest carves VAL_SPLIT out of VAL_FROM; `dakd synthesize` writes its samples to SYNTHETIC_SPLIT.
VAL_SPLIT = "val"
VAL_FROM = "train"
SYNTHETIC_SPLIT = "train"

# The columns each kind of reader needs (read only these: the rest is provenance).
PAIR_COLUMNS = ["id", "height", "width", "image", "mask"]  # image + mask: training crops, evaluation, balance
IMAGE_COLUMNS = ["id", "height", "width", "image"]  # image only: FID / IS features
SOFT_COLUMNS = ["id", "height", "width", "num_classes", "image", "logits"]  # synthetic image + teacher logits


def decode_plane(data: bytes, height: int, width: int) -> np.ndarray:
    """The bytes of an `image` or `mask` cell -> (H, W) uint8 (a read-only view of the bytes)."""
    return np.frombuffer(data, dtype=np.uint8).reshape(int(height), int(width))


def decode_logits(data: bytes, height: int, width: int, num_classes: int = -1) -> np.ndarray:
    """The bytes of a `logits` cell -> (C, H, W) float16 (C inferred when not given)."""
    return np.frombuffer(data, dtype=np.float16).reshape(int(num_classes), int(height), int(width))


def shard_name(split: str, index: int, generation: str | None = None) -> str:
    """Deterministic relative object name of shard `index` of `split` (under `generation`, when given)."""
    prefix = f"data/{generation}" if generation else "data"
    return f"{prefix}/{split}/part-{index:05d}.parquet"


def new_generation() -> str:
    """A fresh generation name (UTC time + random suffix): new files of an overwrite go beside the old."""
    return f"gen-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def listed_files(manifest: dict) -> list[str]:
    """Relative paths of every file a manifest lists (all splits, plus the contact sheet)."""
    paths = [f["path"] for entry in manifest.get("splits", {}).values() for f in entry.get("files", [])]
    if manifest.get("contact_sheet"):
        paths.append(manifest["contact_sheet"])
    return paths


def discard_generation(uri: str) -> None:
    """After a failed run: remove that run's own generation folder `uri`, best effort (a
    warning when it cannot: the run's own error matters more)."""
    try:
        storage.delete_dir(uri)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not remove the failed run's files under %s: %s", uri, exc)


def remove_listed(root: str, paths: list[str], keep: set[str] = frozenset()) -> int:
    """Delete the files `paths` (relative to `root`, as a manifest lists them) except `keep`;
    missing files are ignored; local directories left empty under root are removed.
    Returns how many were deleted. Never deletes anything that is not listed."""
    loc = storage.resolve(root)
    removed = 0
    for rel in paths:
        if rel in keep or rel.startswith("/") or ".." in rel.split("/"):
            continue  # a listed path can never point outside the set
        path = posixpath.join(loc.path, rel)
        try:
            loc.fs.delete_file(path)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DataError(storage.join_uri(root, rel), f"cannot remove ({exc})") from exc
        if loc.scheme == "file":  # tidy empty local folders up to root
            parent, stop = os.path.dirname(path), loc.path.rstrip("/")
            while parent.startswith(stop + os.sep):
                try:
                    os.rmdir(parent)
                except OSError:
                    break
                parent = os.path.dirname(parent)
    return removed


def records_to_table(records: list[dict], schema: pa.Schema = SHARD_SCHEMA) -> pa.Table:
    """Records (id, split, source, sensor, height, width, image H×W uint8, mask H×W uint8, …) -> table."""
    cols: dict[str, list] = {name: [] for name in schema.names}
    for r in records:
        h, w = int(r["height"]), int(r["width"])
        for name in schema.names:
            v = r.get(name)
            if name in ("image", "mask"):
                arr = np.ascontiguousarray(v, dtype=np.uint8)
                if arr.shape != (h, w):
                    raise DataError(r["id"], f"{name} has shape {arr.shape}, expected ({h}, {w})")
                v = arr.tobytes()
            elif name == "logits":
                v = np.ascontiguousarray(v, dtype=np.float16).tobytes()
            cols[name].append(v)
    return pa.table(cols, schema=schema)


def row_to_record(row: dict) -> dict:
    """A table row (dict of Python/bytes values) -> record with numpy arrays."""
    h, w = int(row["height"]), int(row["width"])
    rec = dict(row)
    rec["image"] = decode_plane(row["image"], h, w)
    rec["mask"] = decode_plane(row["mask"], h, w)
    if row.get("logits") is not None:
        rec["logits"] = decode_logits(row["logits"], h, w)
    return rec


def write_table(uri: str, table: pa.Table) -> int:
    """Write one Parquet object; returns its size in bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    storage.write_bytes(uri, data)
    return len(data)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet object as a table (DataError naming it when it is not valid Parquet or
    lacks one of `columns`).

    Read with `ParquetFile`, not `pq.read_table`: on an in-memory file the latter's dataset
    scan can leave Arrow pool threads running at interpreter exit, and the process then
    aborts ("terminate called without an active exception", apache/arrow#34314): measured
    on pyarrow 25 as ~1 exit in 7 under load, 0 in 200 with this reader."""
    try:
        parquet = pq.ParquetFile(pa.BufferReader(storage.read_bytes(uri)))
        missing = [c for c in columns or [] if c not in parquet.schema_arrow.names]
        if missing:
            raise DataError(uri, f"has no column(s) {missing}; expected a shard with {columns}")
        return parquet.read(columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(uri, f"not a readable Parquet shard, truncated or damaged ({exc})") from exc


def verify_files(root: str, manifest: dict) -> None:
    """Check every file the manifest lists against its recorded bytes (object size) and rows
    (Parquet footer); DataError naming the first file that is missing, truncated or swapped."""
    loc = storage.resolve(root)
    entries = [f for entry in manifest.get("splits", {}).values() for f in entry.get("files", [])]
    for f in entries:
        rel = str(f.get("path", ""))
        uri = storage.join_uri(root, rel)
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise DataError(storage.join_uri(root, MANIFEST), f"lists a file outside the set: {rel!r}")
        path = posixpath.join(loc.path, rel)
        try:
            info = loc.fs.get_file_info(path)
        except OSError as exc:
            raise DataError(uri, f"cannot be checked ({exc})") from exc
        if info.type != pafs.FileType.File:
            raise DataError(uri, "listed in the manifest but missing (the shard set is damaged)")
        if f.get("bytes") is not None and info.size != int(f["bytes"]):
            raise DataError(uri, f"is {info.size} bytes, the manifest records {f['bytes']} "
                                 "(truncated, or replaced by another file)")
        if f.get("rows") is not None:
            try:
                with loc.fs.open_input_file(path) as fh:
                    rows = pq.read_metadata(fh).num_rows
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(uri, f"not a readable Parquet shard, truncated or damaged ({exc})") from exc
            if rows != int(f["rows"]):
                raise DataError(uri, f"holds {rows} rows, the manifest records {f['rows']} (replaced by another file?)")


@dataclass(frozen=True)
class ShardSet:
    """A complete shard set: its root URI and manifest."""

    root: str
    manifest: dict

    @property
    def classes(self) -> ClassTable:
        return class_table_from_dict(self.manifest["classes"])

    @property
    def splits(self) -> list[str]:
        return sorted(self.manifest["splits"])

    def files(self, split: str) -> list[str]:
        """URIs of the shard files of `split` (DataError if the split is absent)."""
        if split not in self.manifest["splits"]:
            raise DataError(
                storage.join_uri(self.root, MANIFEST),
                f"split {split!r} not in this shard set (has: {', '.join(self.splits) or 'none'})",
            )
        return [storage.join_uri(self.root, f["path"]) for f in self.manifest["splits"][split]["files"]]

    def iter_records(self, split: str):
        """Yield records of `split` in shard order (single process; for small sets and tests)."""
        for uri in self.files(split):
            for row in read_table(uri).to_pylist():
                yield row_to_record(row)

    @property
    def balance(self) -> dict | None:
        return self.manifest.get("balance")


def read_manifest(root: str) -> dict | None:
    """The manifest of the shard set at `root`, or None when there is none."""
    uri = storage.join_uri(root, MANIFEST)
    if not storage.exists(uri):
        return None
    return storage.read_json_object(uri, what="manifest is ")


def open_shard_set(root: str, verify: bool = True) -> ShardSet:
    """Open a complete shard set; DataError naming `root` if it has no manifest, or naming
    the file when (verify) a listed file's size or row count differs from the manifest."""
    manifest = read_manifest(root)
    if manifest is None:
        has_data = bool(storage.list_files(storage.join_uri(root, "data")))
        what = ("holds shards but no manifest.json: an incomplete or failed write" if has_data
                else "no shard set here: no manifest.json (never written, or an incomplete or failed write)")
        raise DataError(root, f"{what} (expected {MANIFEST}; run `dakd ingest` to create one)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            storage.join_uri(root, MANIFEST),
            f"format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}",
        )
    if not isinstance(manifest.get("splits"), dict):
        raise DataError(storage.join_uri(root, MANIFEST), "has no 'splits' mapping (damaged manifest)")
    if verify:
        verify_files(root, manifest)
    return ShardSet(root=str(root), manifest=manifest)


def write_manifest(root: str, manifest: dict) -> None:
    """Write the manifest (last step of a job that creates or updates a shard set)."""
    manifest = {"format_version": FORMAT_VERSION, **manifest, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_text(storage.join_uri(root, MANIFEST), json.dumps(manifest, indent=2, sort_keys=False))


def remove_manifest(root: str) -> None:
    uri = storage.join_uri(root, MANIFEST)
    if storage.exists(uri):
        loc = storage.resolve(uri)
        loc.fs.delete_file(loc.path)
