"""dakd: diffusion-based data augmentation and knowledge distillation for SAR
oil-spill segmentation, on Ray."""

__version__ = "0.1.0"

import os as _os

if not _os.environ.get("RAY_ADDRESS"):
    # A Ray started locally stays on 127.0.0.1 (DESIGN.md "Ray and addresses"). Ray reads
    # this variable when it is first imported, so it is set here, before any `import ray`.
    # Jobs on a cluster (RAY_ADDRESS set, as `ray job submit` does) keep Ray's defaults.
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
