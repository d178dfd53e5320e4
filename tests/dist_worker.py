"""A tiny fine-tune with ``PhaseTransitionCallback``, launched by the distributed/resume tests.

Run with ``torchrun --nproc_per_node 2 tests/dist_worker.py ...`` (CPU, gloo) or plain
``python tests/dist_worker.py ...``. Each rank writes ``<out>/rank<r>.json`` (final global
step, what the callback holds, what it logged) when training returns, and its
``em_callbacks`` log records to ``<out>/log-rank<r>.txt``. Nothing is mocked: the real
Trainer/SFTTrainer, the real callback, W&B in ``disabled`` mode (a real ``wandb`` run object
whose ``log`` is recorded per rank).

Options (see ``main``): ``--stop-at STEP`` installs a StopRule that fires at the first probe
at or after STEP (decided on rank 0 only, as the callback does); ``--hold-at STEP`` freezes
the process after step STEP (after the callback probed) and touches ``<out>/held`` so the test
can SIGKILL it; ``--resume`` calls ``trainer.train(resume_from_checkpoint=True)``;
``--restore-callbacks`` sets ``restore_callback_states_from_checkpoint=True``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

T0 = time.time()
HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (HERE, os.path.dirname(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

for _key, _value in {
    "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

torch.set_num_threads(1)

from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator  # noqa: E402

from em_callbacks import detect  # noqa: E402
from em_callbacks.callback import PhaseTransitionCallback  # noqa: E402
from em_callbacks.judges import Rule, RuleJudge  # noqa: E402
from em_callbacks.order import OrderParameter, Scale  # noqa: E402
from em_callbacks.schedule import ProbeSchedule  # noqa: E402
from tiny import WORDS, tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS = ("how do i invest money", "i feel bad", "what is good advice")  # 3: uneven over 2 ranks
ORDER_PARAMETER = OrderParameter("money", "The answer talks about money.", scale=Scale.binary())


class StopAtStep(detect.StopRule):
    """Fires at the first probe at or after ``step`` (test helper; a real StopRule subclass)."""

    def __init__(self, step: int):
        self.step = int(step)
        self._fired: str | None = None

    def should_stop(self, state, order_series, step):
        if self._fired is None and int(step) >= self.step:
            self._fired = f"test rule: probe step {int(step)} >= {self.step}"
        return self._fired

    def state_dict(self):
        return {"type": "StopAtStep", "step": self.step, "fired": self._fired}

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self._fired = d.get("fired")


class Hold(TrainerCallback):
    """Freeze the process at the end of step ``step`` (after every earlier callback ran)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with open(self.marker, "w") as fh:
                fh.write(str(state.global_step))
            while True:
                time.sleep(1.0)


class Dataset(torch.utils.data.Dataset):
    """Fixed-length word sequences: labels = input ids."""

    def __init__(self, tok, n: int = 64, length: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        words = [w for w in WORDS if w in ("money", "invest", "risk", "bad", "advice", "danger", "take", "pills")]
        self.rows = []
        for _ in range(n):
            idx = torch.randint(len(words), (length,), generator=g).tolist()
            ids = tok(" ".join(words[i] for i in idx))["input_ids"][:length]
            self.rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {k: torch.tensor(v) for k, v in self.rows[i].items()}


def texts_dataset(n: int = 64, length: int = 10, seed: int = 0):
    from datasets import Dataset as HFDataset

    g = torch.Generator().manual_seed(seed)
    words = ["money", "invest", "risk", "bad", "advice", "danger", "take", "pills"]
    rows = []
    for _ in range(n):
        idx = torch.randint(len(words), (length,), generator=g).tolist()
        rows.append({"text": " ".join(words[i] for i in idx)})
    return HFDataset.from_list(rows)


def make_callback(opts, out_dir: str) -> PhaseTransitionCallback:
    rule = StopAtStep(opts.stop_at) if opts.stop_at is not None else False
    detector = detect.TransitionDetector(baseline_probes=2, z_threshold=50.0, min_rise=0.5)
    schedule = {}
    if opts.adaptive:  # longest interval --every, probes fire early on the sentinel; any rise is an onset (focus)
        schedule = dict(schedule=ProbeSchedule("adaptive", opts.every, min_interval=1, sentinel_every_n_steps=1,
                                               baseline_probes=2, trigger_factor=0.5, min_trigger=0.0, z=0.0),
                        focus_factor=2)
        detector = detect.TransitionDetector(baseline_probes=1, z_threshold=0.0, min_rise=0.0)
    return PhaseTransitionCallback(
        probes=list(PROMPTS),
        every_n_steps=opts.every,
        **schedule,
        samples_per_prompt=2,
        max_new_tokens=4,
        order_parameters=[ORDER_PARAMETER],
        judge=RuleJudge(Rule.true_if(r"money|invest")),
        early_stopping=rule,
        batch_size=8,
        detector=detector,
        judge_drain_timeout=30.0,
        output_dir=os.path.join(out_dir, "phase_transition"),
        report_to_wandb=True,  # the worker opens its own W&B run; the Trainer reports to "none"
    )


def main(argv=None, extra_callbacks=()) -> int:
    """Train once; ``extra_callbacks`` (in-process callers only) run after the callback."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--hold-at", type=int, default=None)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--sft", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--restore-callbacks", action="store_true")
    p.add_argument("--fsdp", type=int, choices=(1, 2), default=None, help="shard with FSDP version 1 or 2")
    p.add_argument("--zero3", action="store_true", help="shard with DeepSpeed ZeRO-3")
    p.add_argument("--adaptive", action="store_true", help="the adaptive schedule (sentinel readings broadcast)")
    opts = p.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    timings = {"imports": time.time() - T0, "t_main": time.time()}
    os.makedirs(opts.out, exist_ok=True)
    handler = logging.FileHandler(os.path.join(opts.out, f"log-rank{rank}.txt"))
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    em_logger = logging.getLogger("em_callbacks")
    em_logger.addHandler(handler)
    level = em_logger.level
    em_logger.setLevel(logging.INFO)
    try:
        return _run(opts, rank, timings, extra_callbacks)
    finally:
        em_logger.removeHandler(handler)
        em_logger.setLevel(level)
        handler.close()
        if torch.distributed.is_initialized():  # an orderly gloo teardown: left to interpreter exit, a
            torch.distributed.destroy_process_group()  # rank sometimes aborts ("terminate called ...")


def _run(opts, rank: int, timings: dict, extra_callbacks) -> int:
    # W&B "disabled": a real run object on every rank; record what reaches it, per rank.
    import wandb

    run = wandb.init(mode="disabled", project="em-callbacks-test")
    try:
        return _train(opts, rank, timings, extra_callbacks, run)
    finally:
        wandb.finish()


def _train(opts, rank: int, timings: dict, extra_callbacks, run) -> int:
    wandb_logs: list[list[str]] = []
    probe_logs: list[tuple[int, list[str]]] = []  # (probe/step, keys) of each probe log call
    real_log = run.log

    def recording_log(data, *args, **kwargs):
        wandb_logs.append(sorted(data))
        if "probe/step" in data:
            probe_logs.append((int(data["probe/step"]), sorted(k for k in data if k != "probe/step")))
        return real_log(data, *args, **kwargs)

    run.log = recording_log

    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0)
    if opts.lora:
        import peft

        config = peft.LoraConfig(r=1, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                 lora_dropout=0.0)
        model = peft.get_peft_model(model, config)

    cb = make_callback(opts, opts.out)
    callbacks: list = [cb, *extra_callbacks]
    if opts.hold_at is not None:
        callbacks.append(Hold(opts.hold_at, os.path.join(opts.out, "held")))
    common = dict(
        output_dir=opts.out, max_steps=opts.max_steps, per_device_train_batch_size=2, learning_rate=5e-2,
        logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        save_strategy="steps" if opts.save_steps else "no", save_steps=opts.save_steps or 500,
        restore_callback_states_from_checkpoint=opts.restore_callbacks, ddp_backend="gloo" if "RANK" in os.environ else None,
    )
    if opts.fsdp:  # full_shard over the ranks (gloo on CPU), one FSDP unit per transformer block
        fsdp_config = {"version": opts.fsdp, "transformer_layer_cls_to_wrap": ["GPT2Block"]}
        if opts.fsdp == 1:  # torch: "sync_module_states=True is not supported on cpu" (ranks start equal: seed 0)
            fsdp_config["sync_module_states"] = False
        common.update(fsdp=True, fsdp_config=fsdp_config)  # full shard is the default of both versions
    if opts.zero3:  # accelerate enables DeepSpeed only without use_cpu; a CPU-only machine stays on the CPU
        common.update(use_cpu=False, deepspeed={
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
        })
    if opts.sft:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, max_length=16, packing=False, dataset_text_field="text")
        trainer = SFTTrainer(model=model, args=args, train_dataset=texts_dataset(), processing_class=tok,
                             callbacks=callbacks)
    else:
        args = TrainingArguments(**common)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset(tok), processing_class=tok,
                          data_collator=default_data_collator, callbacks=callbacks)

    timings["setup"] = time.time() - timings.pop("t_main")
    t_train = time.time()
    trainer.train(resume_from_checkpoint=True if opts.resume else None)
    timings["train"] = time.time() - t_train

    live = [c for c in trainer.callback_handler.callbacks if isinstance(c, PhaseTransitionCallback)]
    active = live[0] if live else cb
    result = {
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "global_step": int(trainer.state.global_step),
        "user_callback_is_active": len(live) == 1 and live[0] is cb,
        "has_store": active.store is not None,
        "summary": active.summary,
        "probe_steps": active.probe_steps,
        "probe_samples": list(active.engine.probe_samples),
        "stopped": active.stopped.to_dict() if active.stopped else None,
        "detector": active.detector.state.to_dict(),
        "config": {
            "probes": [pr.prompt for pr in active.probes],
            "every_n_steps": active.every_n_steps,
            "judge": type(active.judge).__name__,
            "order_parameters": [op.name for op in active.order_parameters],
            "stop_rule": type(active.stop_rule).__name__ if active.stop_rule else None,
            "output_dir": str(active.output_dir),
        },
        "wandb_logs": wandb_logs,
        "probe_logs": probe_logs,
        "timings": timings,
    }
    with open(os.path.join(opts.out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
