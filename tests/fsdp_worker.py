"""``dist_worker.py --fsdp N`` with FSDP really turned on for CPU ranks (``--zero3`` passes
through: DeepSpeed runs on CPU ranks as it is), plus a record of what the probes did on each
rank. Launched by tests/test_fsdp.py through torchrun (gloo).

Why a wrapper: accelerate (1.16) enables FSDP only for accelerator process groups
(``AcceleratorState.__init__`` sets ``DistributedType.FSDP`` inside its ``MULTI_GPU``/NPU/XPU/...
branch). On CPU ranks (``MULTI_CPU``) the Trainer's ``FullyShardedDataParallelPlugin`` is dropped
without a word and the Trainer trains with plain DDP. ``_enable_fsdp_on_cpu`` applies the same
switch for ``MULTI_CPU``; everything after it (accelerate's ``fsdp2_prepare_model`` /
``FullyShardedDataParallel`` wrapping, the Trainer's FSDP code paths, torch's FSDP runtime over
gloo) is the real code a GPU run uses.

Per rank, ``<out>/fsdp-rank<r>.json`` records how the model the callback saw was sharded and how
many no-grad forward passes of the language model ran at each step (the probes' generate and
scoring passes: every rank must make the same number, or the all-gathers would hang).
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (HERE, os.path.dirname(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import dist_worker  # noqa: E402


def _enable_fsdp_on_cpu() -> None:
    """Let accelerate use the FSDP plugin the Trainer passes when the ranks are CPU processes."""
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType

    original = accelerate_state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate_state.AcceleratorState.__init__ = __init__


class ForwardCounter:
    """Counts no-grad forward calls of the language model (the probes' generate and teacher-forced
    scoring passes; training forwards run with grad enabled and are not counted)."""

    def __init__(self) -> None:
        self.count = 0
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if not torch.is_grad_enabled() and type(module).__name__.endswith("LMHeadModel"):
            self.count += 1


class Record(TrainerCallback):
    """Runs after PhaseTransitionCallback: forward counts per step and the sharding it probed."""

    def __init__(self, counter: ForwardCounter) -> None:
        self.counter = counter
        self.forwards: dict[int, int] = {}
        self.sharding: dict = {}
        self._seen = 0

    def _take(self, step: int) -> None:
        delta, self._seen = self.counter.count - self._seen, self.counter.count
        if delta:
            self.forwards[step] = self.forwards.get(step, 0) + delta

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._take(state.global_step)
        params = [p for _, p in model.named_parameters()]

        def kind(p):
            if type(p).__name__ == "DTensor":
                return "fsdp2"
            if getattr(p, "ds_id", None) is not None:
                return "zero3"
            return "fsdp1" if getattr(p, "_fsdp_flattened", False) else "plain"

        def local(p):  # elements this rank holds
            k = kind(p)
            return p.to_local().numel() if k == "fsdp2" else p.ds_tensor.numel() if k == "zero3" else p.numel()

        self.sharding = {
            "model_class": type(model).__name__,
            "kinds": sorted({kind(p) for p in params}),
            "n_params": len(params),
            "n_sharded": sum(kind(p) != "plain" for p in params),
            "local_numel": sum(local(p) for p in params),
        }

    def on_step_end(self, args, state, control, **kwargs):
        self._take(state.global_step)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _enable_fsdp_on_cpu()
    if "--fsdp" in argv and argv[argv.index("--fsdp") + 1] == "1":
        # accelerate's device for CPU ranks is torch.device("cpu", 0); torch's FSDP1 init compares
        # that device_id with its compute device torch.device("cpu") and raises "Inconsistent compute
        # device and `device_id` on rank 0: cpu vs cpu:0". Plain "cpu" passes.
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    record = Record(ForwardCounter())
    rc = dist_worker.main(argv, extra_callbacks=[record])
    out = argv[argv.index("--out") + 1]
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"fsdp-rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "forwards": {str(k): v for k, v in sorted(record.forwards.items())},
                   "sharding": record.sharding}, fh)
    return rc


if __name__ == "__main__":
    sys.exit(main())
