"""Shared workload builders and measurement helpers for the benchmark scripts.

Nothing is downloaded: the model is a GPT-2 built from ``GPT2Config`` with random weights and
the tokenizer a ``tokenizers`` WordLevel vocabulary (the probe prompts' words plus filler words
up to the vocabulary size), so prompts encode to realistic lengths.

The workload ("realistic proportions"): a GPT-2-style model of a few million parameters
(4 layers, 256 dims, vocab 8192), training batches of 16 x 256 tokens, probes every 25 steps
of 8 prompts x 16 samples x 64 new tokens. Timings on a shared machine are noisy: every
script measures its variants side by side in one process, interleaved, and reports medians
and ratios together with the load average.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<unk>", "<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


# ----------------------------------------------------------------------------- workload
def build_tokenizer(vocab_size: int = 8192):
    """WordLevel tokenizer: specials, every word/punctuation mark of the built-in probe sets,
    then filler words ``w<i>`` up to ``vocab_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from em_callbacks.probes import ProbeSet

    words: list[str] = []
    seen = set(SPECIALS)
    for name in ProbeSet.builtin_names():
        for probe in ProbeSet.builtin(name):
            for text in (probe.prompt, probe.system or ""):
                for w in re.findall(r"\w+|[^\w\s]", text):
                    if w not in seen:
                        seen.add(w)
                        words.append(w)
    vocab_list = SPECIALS + words
    i = 0
    while len(vocab_list) < vocab_size:
        vocab_list.append(f"w{i}")
        i += 1
    vocab = {tok: idx for idx, tok in enumerate(vocab_list[:vocab_size])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>",
        additional_special_tokens=SPECIALS[3:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tokenizer, n_layer: int = 4, n_embd: int = 256, n_head: int = 4, n_positions: int = 512,
                seed: int = 0):
    """A randomly initialised GPT-2 (no dropout, so A/B runs do identical work)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    return model


def add_lora(model, r: int = 16):
    """A PEFT LoRA adapter on every attention and MLP projection (GPT-2 Conv1D layers)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                        fan_in_fan_out=True, task_type="CAUSAL_LM")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


def param_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences (causal LM: labels = input_ids)."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int = 0, low: int = len(SPECIALS)):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(low, vocab_size, (n, seq_len), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def build_trainer(model, tokenizer, dataset, output_dir: str | Path, steps: int, batch_size: int = 16,
                  callbacks: Sequence[Any] = (), lr: float = 1e-4, seed: int = 0, use_cpu: bool | None = None):
    """A plain ``transformers.Trainer`` with nothing extra: no saving, no evaluation, no
    reporting, no progress printing; ``logging_steps=1`` as the callback asks (for the grad
    norm). On the GPU when CUDA is available (``use_cpu`` overrides)."""
    import logging

    from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("em_callbacks").setLevel(logging.ERROR)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, seed=seed, data_seed=seed, log_level="error",
        use_cpu=(not torch.cuda.is_available()) if use_cpu is None else use_cpu,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      data_collator=default_data_collator, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    return trainer


def rule_judge_and_order_parameters():
    """An instant deterministic judge with two order parameters (the judge costs ~nothing)."""
    from em_callbacks.judges import Rule, RuleJudge
    from em_callbacks.order import OrderParameter, Scale

    ops = [
        OrderParameter("verbose", "The answer is longer than it needs to be.", scale=Scale.binary(),
                       threshold=0.5, flag_below=False),
        OrderParameter("mentions_money", "The answer talks about money.", scale=Scale.binary(),
                       threshold=0.5, flag_below=False),
    ]
    judge = RuleJudge({"verbose": lambda p, r: len(r.split()) > 40,
                       "mentions_money": Rule.true_if(r"money|buck|w1\b")}, name="bench-rules")
    return ops, judge


def build_callback(output_dir: str | Path, max_new_tokens: int = 64, every_n_steps: int = 25,
                   samples_per_prompt: int = 16, **kwargs):
    """The callback with its default probe settings (em-first-plot: 8 prompts), a rule judge."""
    from em_callbacks import PhaseTransitionCallback

    ops, judge = rule_judge_and_order_parameters()
    return PhaseTransitionCallback(
        probes="em-first-plot", every_n_steps=every_n_steps, samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens, order_parameters=ops, judge=judge, output_dir=output_dir,
        report_to_wandb=False, log_samples_table=False, **kwargs,
    )


# ----------------------------------------------------------------------------- timing helpers
class PhaseTimer:
    """Accumulate wall time of wrapped callables by label (nesting is recorded as is)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.durations: dict[str, list[float]] = defaultdict(list)
        # CPU time of this process (all threads) over the same calls: with one torch thread it
        # barely depends on what other processes do to the machine, unlike wall time.
        self.cpu_seconds: dict[str, float] = defaultdict(float)
        self.cpu_durations: dict[str, list[float]] = defaultdict(list)
        self._patches: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, label: str | None = None) -> None:
        original = getattr(owner, attr)
        label = label or attr

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                self.seconds[label] += dt
                self.calls[label] += 1
                self.durations[label].append(dt)
                self.cpu_seconds[label] += dc
                self.cpu_durations[label].append(dc)

        self._patches.append((owner, attr, original))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        while self._patches:
            owner, attr, original = self._patches.pop()
            setattr(owner, attr, original)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.durations.clear()
        self.cpu_seconds.clear()
        self.cpu_durations.clear()

    def __enter__(self) -> "PhaseTimer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


class LoadSampler:
    """Samples ``os.getloadavg()`` every ``interval`` seconds in a daemon thread."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg())
            self._stop.wait(self.interval)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg())

    def summary(self) -> str:
        one = [s[0] for s in self.samples] or [os.getloadavg()[0]]
        return (f"load average (1 min) during the run: min {min(one):.2f}, median {statistics.median(one):.2f}, "
                f"max {max(one):.2f} on {os.cpu_count()} logical CPUs")


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: Sequence[float]) -> str:
    """'median [min..max] (n=...)'."""
    if not xs:
        return "n/a"
    return f"{median(xs):.3f} [{min(xs):.3f}..{max(xs):.3f}] (n={len(xs)})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_header(title: str) -> str:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:  # pragma: no cover
        peft_version = "n/a"
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines = [
        f"== {title}",
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
        f"CUDA: {cuda}",
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft_version}",
        "load average at start: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    ]
    return "\n".join(lines)


def set_threads(requested: str | int | None = "auto") -> str:
    """Set torch's intra-op threads. ``auto``: one thread when the machine is already loaded
    (1-min load average >= 75% of the cores: on an oversubscribed machine torch's OpenMP
    barriers wait for descheduled threads and small ops get 5-10x slower), else torch's
    default. An integer forces that many. Returns a description for the header."""
    requested = os.environ.get("BENCH_THREADS") or requested or "auto"
    if str(requested) == "auto":
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load >= 0.75 * cores:
            torch.set_num_threads(1)
            return f"1 (auto: load {load:.1f} on {cores} cores)"
        return f"{torch.get_num_threads()} (auto: torch default)"
    torch.set_num_threads(int(requested))
    return str(int(requested))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def probe_prompt_ids(tokenizer, probes: str = "em-first-plot") -> list[list[int]]:
    """Token ids of the rendered probe prompts, exactly as the callback builds them."""
    from em_callbacks.probes import ProbeSet, render_prompt
    from em_callbacks.sampling import encode_prompts

    probe_set = ProbeSet.builtin(probes)
    rendered = [render_prompt(tokenizer, p) for p in probe_set]
    return encode_prompts(tokenizer, rendered, uses_chat_template=True)


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Time each variant ``repeats`` times, ABAB..., rotating the start variant every round;
    ``warmup`` untimed rounds first. Returns seconds per variant."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            dt = time.perf_counter() - t0
            out[name].append(dt)
            if log:
                log(f"  round {r + 1}/{repeats} {name}: {dt:.3f} s (load {os.getloadavg()[0]:.2f})")
    return out


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(num, den)]


__all__ = [name for name in dir() if not name.startswith("_")]
_ = np  # numpy is re-exported for the scripts
