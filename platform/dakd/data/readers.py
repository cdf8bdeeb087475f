"""The reader protocol every data source implements, and the helpers they share.
The readers themselves (osd, sos, folder, procedural) import this module; which reader a
source config gets is decided in one place, `dakd.data.sources.make_reader`.

A reader lists its samples cheaply as `PairRef`s (no decoding) and turns one ref into a
record dict with exactly the keys in `RECORD_KEYS`:
`id` (str), `split` (str), `source` (str), `image` ((H, W) uint8 grey), `mask`
((H, W) uint8 class index), `height` (int), `width` (int), `sensor` (str or None),
`off_palette_pixels` (int).

Every file is read through `dakd.storage`, so a root may be a local path, file:// or
s3:// URI. Every bad-input error is a `DataError` naming the file and what was expected.

Decoding relies on PIL refusing truncated files (`PIL.ImageFile.LOAD_TRUNCATED_IMAGES`
left at its default, False).
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from dakd import storage
from dakd.data.classes import ClassTable
from dakd.errors import DataError

RECORD_KEYS = ("id", "split", "source", "image", "mask", "height", "width", "sensor", "off_palette_pixels")

# PIL modes holding 8-bit samples; anything else (16-bit, float) is refused.
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


@dataclass(frozen=True)
class PairRef:
    """A cheap, picklable reference to one sample (what Ray tasks receive)."""

    id: str  # unique within the data set, e.g. "train/palsar/10777"
    split: str  # "train" | "test" | ...
    source: str  # reader name: "osd" | "sos" | "folder" | "procedural"
    image_uri: str | None
    mask_uri: str | None
    extra: tuple = ()  # reader-specific (key, value) pairs, e.g. (("sensor", "palsar"),)


@runtime_checkable
class Reader(Protocol):
    name: str
    classes: ClassTable

    def list_pairs(self) -> tuple[list[PairRef], list[dict]]:
        """Cheap listing (no decoding) -> (refs sorted by id, problems).

        A problem is {"id", "path", "reason"} for an image without mask or a mask
        without image. Raises DataError naming the root when the source folder is
        missing or holds no pairs."""
        ...

    def read(self, ref: PairRef) -> dict:
        """Decode and validate one pair -> record (keys RECORD_KEYS). Raises DataError
        naming the file on a corrupt or truncated image, an image/mask size mismatch,
        invalid mask values or too many off-palette pixels."""
        ...


def _open(data: bytes, path: str) -> Image.Image:
    """Bytes -> fully decoded PIL image of 8-bit mode; DataError(path) otherwise."""
    if not data:
        raise DataError(path, "empty file (0 bytes), expected an image")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now, so a truncated file raises here
    except Image.UnidentifiedImageError as exc:
        raise DataError(path, f"cannot decode image: not an image file PIL can read ({len(data)} bytes, starting {data[:8]!r})") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(path, f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    if img.mode not in _EIGHT_BIT_MODES:
        raise DataError(path, f"expected an 8-bit grey or RGB image, got PIL mode {img.mode!r}")
    return img


def check_opaque(img: Image.Image, path: str) -> None:
    """DataError(path) when a mask has transparent pixels (alpha < 255): their class is not
    defined by the colour or index under them. Opaque RGBA / LA masks are fine."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = np.asarray(img.convert("RGBA").getchannel("A"))
        n = int((alpha < 255).sum())
        if n:
            raise DataError(path, f"mask has {n} transparent pixel(s) (alpha < 255, {int((alpha == 0).sum())} fully "
                                  "transparent): their class is undefined; save the mask without transparency")


def _open_mask(data: bytes, path: str) -> Image.Image:
    """Like _open, for a mask: also refuses transparent pixels (check_opaque)."""
    img = _open(data, path)
    check_opaque(img, path)
    return img


def _array(img: Image.Image) -> np.ndarray:
    """PIL image -> (H, W) uint8 for L/P (P: palette indices) or (H, W, 3) uint8."""
    if img.mode in ("1", "LA"):
        img = img.convert("L")
    elif img.mode == "PA":
        img = img.convert("P")
    elif img.mode not in ("L", "P", "RGB"):
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)


def decode_image(data: bytes, path: str) -> np.ndarray:
    """Encoded image -> (H, W) uint8 for single-channel files (mode L; mode P gives the
    palette indices) or (H, W, 3) uint8 RGB (alpha dropped)."""
    return _array(_open(data, path))


def decode_rgb(data: bytes, path: str, mask: bool = False) -> np.ndarray:
    """Encoded image -> (H, W, 3) uint8 RGB (a P-mode file through its own palette); `mask`:
    refuse transparent pixels (check_opaque)."""
    return np.array((_open_mask if mask else _open)(data, path).convert("RGB"), dtype=np.uint8)


def to_grey(array: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> (H, W) uint8 grey.

    Three identical channels (how grey SAR JPEGs are usually stored) give the first
    channel unchanged; differing channels give PIL's "L" luminance
    L = R*299/1000 + G*587/1000 + B*114/1000."""
    if array.ndim == 2:
        return array
    if (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
        return np.ascontiguousarray(array[..., 0])
    return np.array(Image.fromarray(array, "RGB").convert("L"), dtype=np.uint8)


def decode_grey(data: bytes, path: str, mask: bool = False) -> np.ndarray:
    """Encoded image -> (H, W) uint8 grey levels (see `to_grey`); `mask`: refuse transparent
    pixels (check_opaque)."""
    img = (_open_mask if mask else _open)(data, path)
    if img.mode in ("P", "PA"):
        img = img.convert("RGB")  # colours, not palette indices
    return to_grey(_array(img))


def decode_index_mask(data: bytes, path: str, num_classes: int) -> np.ndarray:
    """Class-index PNG (mode L or P, or RGB with R=G=B) -> (H, W) uint8, every value
    < num_classes; DataError(path) otherwise."""
    mask = _array(_open_mask(data, path))
    if mask.ndim == 3:
        if not ((mask[..., 0] == mask[..., 1]).all() and (mask[..., 1] == mask[..., 2]).all()):
            raise DataError(path, "expected a single-channel class-index mask (mode L or P), got colour RGB")
        mask = np.ascontiguousarray(mask[..., 0])
    check_class_values(mask, num_classes, path)
    return mask


def check_class_values(mask: np.ndarray, num_classes: int, path: str) -> None:
    """DataError(path) unless every value of the (H, W) mask is < num_classes."""
    if mask.size and int(mask.max()) >= num_classes:
        bad = np.unique(mask[mask >= num_classes])
        shown = ", ".join(str(int(v)) for v in bad[:10])
        raise DataError(path, f"mask values must be class indices < {num_classes}; found {shown}")


# ---------------------------------------------------------------- palettes


def map_palette(rgb: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, int]:
    """(H, W, 3) uint8 RGB, (C, 3) palette -> ((H, W) uint8 index of the nearest palette
    colour, number of pixels whose colour is not exactly a palette colour).

    Nearest = smallest Euclidean distance in RGB; a tie goes to the lower index.
    Distances are computed once per distinct colour, so large labels stay cheap."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) RGB, got shape {rgb.shape}")
    pal = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    if not 0 < len(pal) <= 256:
        raise ValueError(f"palette must hold 1..256 colours, got {len(pal)}")
    key = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colours, inverse, counts = np.unique(key.ravel(), return_inverse=True, return_counts=True)
    crgb = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=1).astype(np.int64)
    dist = ((crgb[:, None, :] - pal[None, :, :]) ** 2).sum(-1)  # (distinct colours, C)
    nearest = dist.argmin(axis=1).astype(np.uint8)
    n_off = int(counts[dist.min(axis=1) > 0].sum())
    return nearest[inverse].reshape(rgb.shape[:2]), n_off


def check_off_palette(n_off: int, n_pixels: int, max_share: float, path: str) -> None:
    """DataError(path) when the share of off-palette pixels exceeds max_share."""
    share = n_off / max(n_pixels, 1)
    if share > max_share:
        raise DataError(
            path,
            f"{n_off} of {n_pixels} label pixels ({share:.4%}) are not palette colours; "
            f"at most {max_share:.4%} allowed",
        )


# ---------------------------------------------------------------- records


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: str, mask_path: str) -> None:
    """DataError(mask_path) unless image and mask have the same height and width."""
    if image.shape[:2] != mask.shape[:2]:
        (ih, iw), (mh, mw) = image.shape[:2], mask.shape[:2]
        raise DataError(mask_path, f"mask is {mw}x{mh} (WxH) but its image {image_path} is {iw}x{ih}")


def make_record(ref: PairRef, image: np.ndarray, mask: np.ndarray, sensor: str | None, off_palette_pixels: int) -> dict:
    """One record (keys RECORD_KEYS) from a (H, W) uint8 image and (H, W) uint8 mask."""
    check_same_size(image, mask, str(ref.image_uri), str(ref.mask_uri))
    assert image.dtype == np.uint8 and image.ndim == 2 and mask.dtype == np.uint8
    return {
        "id": ref.id,
        "split": ref.split,
        "source": ref.source,
        "image": image,
        "mask": mask,
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "sensor": sensor,
        "off_palette_pixels": int(off_palette_pixels),
    }


# ---------------------------------------------------------------- listing


def require_folder(uri: str, expected: str) -> None:
    """DataError(uri) unless the folder exists; `expected` describes the layout."""
    if not storage.is_dir(uri):
        raise DataError(uri, f"folder not found; expected {expected}")


def files_by_key(folder: str, suffixes: tuple[str, ...]) -> dict[str, str]:
    """Files directly in `folder` whose name ends with one of `suffixes` (case-insensitive)
    -> {name without the suffix: uri}. Hidden files are skipped; two files with the same
    key raise DataError(folder)."""
    found: dict[str, str] = {}
    for uri in storage.list_files(folder, recursive=False):
        name = posixpath.basename(uri)
        if name.startswith("."):
            continue
        suffix = next((s for s in suffixes if name.lower().endswith(s)), None)
        if suffix is None:
            continue
        key = name[: -len(suffix)]
        if key in found:
            raise DataError(folder, f"two files share the name {key!r}: {found[key]} and {uri}")
        found[key] = uri
    return found


def pair_by_key(
    id_prefix: str, images: dict[str, str], masks: dict[str, str]
) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """Match images and masks by key -> ([(key, image_uri, mask_uri)] sorted by key,
    problems for an image without mask or a mask without image; ids are id_prefix/key)."""
    pairs = [(k, images[k], masks[k]) for k in sorted(images.keys() & masks.keys())]
    problems = [
        problem(f"{id_prefix}/{k}", images[k], "image without mask")
        for k in sorted(images.keys() - masks.keys())
    ]
    problems += [
        problem(f"{id_prefix}/{k}", masks[k], "mask without image")
        for k in sorted(masks.keys() - images.keys())
    ]
    return pairs, problems


def problem(id: str, path: str, reason: str) -> dict:
    return {"id": id, "path": path, "reason": reason}
