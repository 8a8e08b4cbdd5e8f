"""Multi-process training helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK).

gloo on CPU, NCCL on GPU. Ranks train on disjoint shards of each epoch's user order and
evaluate disjoint shards of the evaluation users; scores are gathered so every rank computes
the same metrics (and so takes the same early-stopping decision).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str) -> torch.device:
    """torch.device of a config's `device`, or a ConfigError saying why it cannot be used."""
    from cdsr.config import ConfigError

    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"--device cuda: {why} (torch.cuda.is_available() is False); use --device cpu")
    return torch.device(device)


def init_from_env(device: str = "cpu") -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolve_device(device)
    if world <= 1:
        return DistContext(device=torch.device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)
