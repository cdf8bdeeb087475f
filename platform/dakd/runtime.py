"""Connecting to Ray: the cluster named by config or RAY_ADDRESS, else a local one on 127.0.0.1."""

from __future__ import annotations

import logging
import os

from dakd.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig):
    """Connect to (or start) Ray once per process; returns the ray module."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        # dakd/__init__.py keeps it on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).
        log.info("starting a local Ray (%d logical CPUs)", cfg.local_num_cpus)
        ray.init(
            address="local",  # a new local Ray even when another one runs on this machine
            num_cpus=cfg.local_num_cpus,
            object_store_memory=cfg.local_object_store_mb * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=True,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    return ray
