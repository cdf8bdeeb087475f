"""The Ray Train backend of a training job: torch.distributed for several workers, none for one.

Ray Train's controller (a new process per run) unpickles the trainer's backend config before it
starts any worker. TorchConfig's module imports torch, 1.4 s of the controller's start-up on a
2-core machine, on the critical path of every run. A one-worker run needs no process group
(dakd wraps the model in DDP and all-reduces metrics only when the world is larger than one),
so it gets `OneWorkerConfig`, whose module (this one) imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.backend import BackendConfig


@dataclass
class OneWorkerConfig(BackendConfig):
    """No distributed backend: Ray Train's no-op Backend. `backend` names it for TorchTrainer,
    which reads the field (it fills in gloo/nccl when it is empty)."""

    backend: str = "none"


def backend_config(num_workers: int, use_gpu: bool):
    """TorchConfig (gloo on CPU, nccl on GPU) for several workers; OneWorkerConfig for one."""
    if num_workers == 1:
        return OneWorkerConfig()
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if use_gpu else "gloo")
