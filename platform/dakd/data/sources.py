"""Config -> reader: the one registry of readers (`READERS`, source kind -> reader class) and
the one place that maps a SourceConfig onto a reader constructor."""

from __future__ import annotations

from dakd.config import SourceConfig
from dakd.data.classes import OSD_CLASSES, ClassTable
from dakd.data.folder import FolderReader
from dakd.data.osd import OSDReader
from dakd.data.procedural import ProceduralReader
from dakd.data.sos import SOSReader

READERS = {"osd": OSDReader, "sos": SOSReader, "folder": FolderReader, "procedural": ProceduralReader}


def folder_classes(cfg: SourceConfig) -> ClassTable:
    """The class table of a folder source: its palette/names, else the OSD table."""
    if cfg.palette is None and cfg.class_names is None:
        return OSD_CLASSES
    n = len(cfg.palette) if cfg.palette is not None else len(cfg.class_names)
    names = tuple(cfg.class_names) if cfg.class_names is not None else tuple(f"class{i}" for i in range(n))
    colors = tuple(tuple(c) for c in cfg.palette) if cfg.palette is not None else OSD_CLASSES.colors[:n]
    return ClassTable(name="folder", names=names, colors=colors)


def reader_kwargs(cfg: SourceConfig) -> dict:
    """The constructor arguments of the reader of `cfg.kind`."""
    if cfg.kind == "procedural":
        p = cfg.procedural
        return {"splits": dict(p.splits), "height": p.height, "width": p.width, "seed": p.seed, "looks": p.looks}
    if cfg.kind == "osd":
        return {"root": cfg.root, "splits": list(cfg.splits), "max_off_palette_share": cfg.max_off_palette_share}
    if cfg.kind == "sos":
        return {"root": cfg.root, "splits": list(cfg.splits), "sensors": list(cfg.sensors)}
    palette = [list(c) for c in cfg.palette] if cfg.palette is not None else None
    return {"root": cfg.root, "split": cfg.folder_split, "palette": palette, "classes": folder_classes(cfg),
            "max_off_palette_share": cfg.max_off_palette_share}


def make_reader(cfg: SourceConfig):
    """A reader for `cfg` (see data.readers for the protocol)."""
    if cfg.kind not in READERS:
        raise ValueError(f"unknown source kind {cfg.kind!r}")
    return READERS[cfg.kind](**reader_kwargs(cfg))
