"""Process layout and collectives for drivers that run on several ranks (accelerate)."""

from __future__ import annotations

from typing import Any

import torch

from .engine import RankLayout

__all__ = ["Distributed"]


class Distributed(RankLayout):
    """Process layout from accelerate when a distributed run is active."""

    @classmethod
    def detect(cls) -> "Distributed":
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return cls()
        from accelerate import PartialState

        state = PartialState()
        return cls(state.process_index, state.num_processes)

    def gather(self, items: list) -> list:
        if self.world_size == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

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
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]
