"""Process layout and collectives for drivers that run on several ranks (torch.distributed)."""

from __future__ import annotations

from typing import Any

import torch

from .engine import RankLayout

__all__ = ["Distributed"]


class Distributed(RankLayout):
    """Process layout of the default process group when a distributed run is active.

    Rank and size come from ``torch.distributed`` itself, the group the model is sharded over,
    not from accelerate's ``PartialState``, which can disagree with it: under DeepSpeed on CPU
    ranks, accelerate 1.16 reports one process (``DistributedType`` NO before DeepSpeed's engine
    starts the gloo group) while two run, so every rank took itself for rank 0, wrote the store
    and decided the stop alone. The collectives are torch's object collectives for the same reason
    (accelerate's ``gather_object`` returns the local list when it believes it is alone)."""

    @classmethod
    def detect(cls) -> "Distributed":
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return cls()
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())

    def gather(self, items: list) -> list:
        """Every rank's ``items`` concatenated in rank order, on every rank."""
        if self.world_size == 1:
            return items
        parts: list = [None] * self.world_size
        torch.distributed.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def max_int(self, value: int, device: torch.device) -> int:
        if self.world_size == 1:
            return value
        if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        box = torch.tensor([value], dtype=torch.long, device=device)
        torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
        return int(box.item())

    def broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
