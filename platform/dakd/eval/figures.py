"""Figures: class overlays, the confusion-matrix figure, sample grids, and PNG bytes of
an image array or a matplotlib figure. What evaluation, training, synthesis, `sample`,
`predict` and the report draw; nothing here reads data or models.
"""

from __future__ import annotations

import io

import numpy as np

from dakd.data.classes import ClassTable


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 90) -> bytes:
    """A matplotlib figure -> PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def sample_grid(images: np.ndarray, masks: np.ndarray, colorize) -> np.ndarray:
    """Rows of [image | coloured mask]: images (N, H, W) uint8, masks (N, H, W) -> (N*H, 2*W, 3) uint8."""
    rows = []
    for img, msk in zip(images, masks):
        rows.append(np.concatenate([np.repeat(img[..., None], 3, axis=-1), colorize(msk)], axis=1))
    return np.concatenate(rows, axis=0)


# Vivid colours for classes whose own colour is grey/white/black (e.g. SOS oil = white), which
# would vanish on grey speckle: magenta, yellow, orange, lime, cyan.
VIVID = ((255, 0, 255), (255, 230, 0), (255, 128, 0), (0, 255, 64), (0, 230, 255))
TITLE_HEIGHT = 20  # px: the title strip above each overlay panel
MISSED = (255, 40, 40)  # errors panel: a labelled (non-background) pixel predicted as anything else
FALSE = (0, 200, 255)  # errors panel: background predicted as a class
# (missed, false) colour pairs in order of preference: the first whose colours both stand apart
# from every class colour drawn (OSD draws look-alike red and oil cyan: it gets magenta/yellow)
ERROR_PAIRS = ((MISSED, FALSE), ((255, 0, 255), (255, 230, 0)), ((40, 80, 255), (255, 128, 0)))
MIN_PANEL = 128  # px: smaller images are enlarged (nearest neighbour) so titles and classes stay readable


def display_colors(colors, num_classes: int) -> np.ndarray:
    """(C, 3) uint8 overlay colours: the class table's, except low-saturation ones (grey,
    white, black: invisible on speckle), which take a vivid colour. Class 0 is never drawn."""
    cols = np.asarray(colors if colors is not None else [(0, 0, 0)] * num_classes, dtype=np.int32).reshape(-1, 3)
    out = cols.copy()
    k = 0
    for c in range(1, len(cols)):
        if cols[c].max() - cols[c].min() < 80:
            out[c] = VIVID[k % len(VIVID)]
            k += 1
    return out.astype(np.uint8)


def error_colors(colors: np.ndarray, min_distance: float = 120.0) -> tuple[tuple, tuple]:
    """(missed, false) RGB for the errors panel: the first ERROR_PAIRS pair whose colours are both
    at least `min_distance` (RGB Euclidean) from every drawn class colour, colors[1:] of
    display_colors; the last pair if none is."""
    drawn = np.asarray(colors, dtype=np.float32).reshape(-1, 3)[1:]
    for pair in ERROR_PAIRS:
        if all(len(drawn) == 0 or np.linalg.norm(drawn - np.asarray(c), axis=1).min() >= min_distance for c in pair):
            return pair
    return ERROR_PAIRS[-1]


def title_ink(rgb) -> tuple:
    """A colour darkened until it reads on the white title strip (luma <= 150; yellow -> olive)."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return tuple(int(v * min(1.0, 150 / luma)) for v in rgb) if luma else tuple(rgb)


def _blend(grey: np.ndarray, mask: np.ndarray, colors: np.ndarray, alpha: float = 0.65) -> np.ndarray:
    base = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    col = colors[np.minimum(mask, len(colors) - 1)].astype(np.float32)
    out = np.where((mask > 0)[..., None], (1 - alpha) * base + alpha * col, base)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _titled(panel: np.ndarray, title: str | list[tuple[str, tuple]]) -> np.ndarray:
    """(H, W, 3) uint8 -> (TITLE_HEIGHT + H, W, 3): a white strip with `title` above the panel;
    a title given as [(text, RGB), ...] is drawn piece by piece in those colours."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (panel.shape[1], TITLE_HEIGHT), (255, 255, 255))
    draw, x = ImageDraw.Draw(strip), 4
    for text, fill in [(title, (0, 0, 0))] if isinstance(title, str) else title:
        draw.text((x, 4), text, fill=fill)
        x += draw.textlength(text)
    return np.concatenate([np.asarray(strip), panel], axis=0)


def error_mask(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(H, W) uint8: 0 right, 1 missed (a labelled pixel predicted as anything else), 2 false
    (a background pixel predicted as a class). For binary oil: missed oil and false oil."""
    wrong = pred != target
    return np.where(wrong & (target != 0), 1, np.where(wrong & (target == 0), 2, 0)).astype(np.uint8)


def overlay_panel(image: np.ndarray, pred: np.ndarray, classes: ClassTable, target: np.ndarray | None = None) -> np.ndarray:
    """Titled panels [image | ground truth over image | prediction over image | errors over
    image] (ground truth and errors only when `target` is given) -> (TITLE_HEIGHT + s*H,
    k*s*W, 3) uint8, s = the enlargement of images narrower than MIN_PANEL. Class 0
    (background) is left uncoloured; others blend 65 % of their display colour
    (display_colors); errors (error_mask): missed and false in two colours apart from the
    classes' (error_colors: red and cyan, or magenta and yellow where classes are red or cyan)."""
    colors = display_colors(classes.colors, classes.num_classes)
    s = max(1, -(-MIN_PANEL // image.shape[1]))
    up = (lambda a: np.repeat(np.repeat(a, s, axis=0), s, axis=1)) if s > 1 else (lambda a: a)
    image, pred = up(image), up(pred)
    parts = [_titled(np.repeat(image[..., None], 3, axis=-1), "image")]
    if target is not None:
        parts.append(_titled(_blend(image, up(target), colors), "ground truth"))
    parts.append(_titled(_blend(image, pred, colors), "prediction"))
    if target is not None:
        missed, false = error_colors(colors)
        errors = np.asarray([(0, 0, 0), missed, false], dtype=np.uint8)
        title = [("errors: ", (0, 0, 0)), ("missed", title_ink(missed)), (", ", (0, 0, 0)),
                 ("false", title_ink(false))]  # fits MIN_PANEL
        parts.append(_titled(_blend(image, error_mask(pred, up(target)), errors, alpha=0.8), title))
    return np.concatenate(parts, axis=1)


def confusion_png(cm: np.ndarray, names) -> bytes:
    """A confusion-matrix figure (rows: target, columns: prediction; colour: row share; cells: counts)."""
    plt = pyplot()
    cm = np.asarray(cm, dtype=np.int64)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.2 * n + 1.5))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for t in range(n):
        for p in range(n):
            ax.text(p, t, f"{cm[t, p]}\n{100 * share[t, p]:.1f}%", ha="center", va="center", fontsize=8,
                    color="white" if share[t, p] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=30)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("target")
    fig.tight_layout()
    return figure_png(fig, dpi=100)
