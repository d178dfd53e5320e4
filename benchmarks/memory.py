"""Memory the callback adds to a fine-tune: peak RSS, Python objects, snapshots, GPU.

Each variant runs in a fresh child process (peak RSS is per process and never goes down),
A (no callback) and B (callback) interleaved ABBA over ``--rounds``:

  peak RSS         ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` and a psutil sampler (50 ms)
  RSS after        resident memory after ``trainer.train()`` returned (what stays)
  tracemalloc      peak of Python-level allocations (includes numpy arrays, not torch tensors)
  GPU              ``torch.cuda.max_memory_allocated`` when CUDA is available, else n/a

Workload: the benchmark GPT-2 (4 x 256, vocab 8192), batch 16 x 256 tokens, ``--steps`` steps
with a probe every step (the steady-state probe, with its scoring band and, for LoRA, the
adapter snapshot swap, happens from the second probe on), default probe settings (8 prompts x
16 samples, batch 64) at 64 new tokens, RuleJudge. Modes: full (one-sided, no snapshot), LoRA
r=16 (two-sided, adapter snapshots), and full with ``snapshot_full_model=True``.

Snapshot bytes: ``WeightSnapshots.nbytes()`` (kept between probes) plus the adapter-trajectory
vectors (LoRA B), against the trainable parameters' own bytes (target <= 3x); the transient
copy of the live weights made while a snapshot is swapped in is reported too.

Usage: python benchmarks/memory.py [--quick] [--modes full,lora,full-snapshot] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LoadSampler, machine_header, median, set_threads  # noqa: E402

MB = 1024 * 1024
TARGET = 3.0


# ----------------------------------------------------------------------------- child
def child(mode: str, variant: str, steps: int, threads: str) -> dict:
    import tracemalloc

    set_threads(threads)
    try:
        import psutil
    except ImportError:  # pragma: no cover
        psutil = None
    import torch

    from _common import RandomTokens, add_lora, build_callback, build_model, build_tokenizer, build_trainer, quiet

    proc = psutil.Process() if psutil else None
    peak = {"rss": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            if proc is not None:
                peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"memory-{mode}-"))
    out: dict = {"mode": mode, "variant": variant}
    try:
        with quiet():
            tok = build_tokenizer()
            model = build_model(tok)
            if mode == "lora":
                model = add_lora(model)
            dataset = RandomTokens(steps * 16 + 16, 256, len(tok))
            cb = None
            if variant == "B":
                cb = build_callback(workdir / "pt", every_n_steps=1,
                                    **({"snapshot_full_model": True} if mode == "full-snapshot" else {}))
            trainer = build_trainer(model, tok, dataset, workdir / "tr", steps=steps, callbacks=[cb] if cb else [])
        trainable = [p for p in model.parameters() if p.requires_grad]
        out["trainable_bytes"] = sum(p.numel() * p.element_size() for p in trainable)
        out["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out["rss_before"] = proc.memory_info().rss if proc else None
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if cb is not None:  # record the transient live-weight copy made by each snapshot swap
            from em_callbacks.sampling import WeightSnapshots

            original = WeightSnapshots.swapped_in
            out["swap_live_bytes"] = 0

            def swapped_in(self, m, probe_index):
                out["swap_live_bytes"] = max(out["swap_live_bytes"], sum(
                    p.numel() * p.element_size() for p in self.trainable(m).values()))
                return original(self, m, probe_index)

            WeightSnapshots.swapped_in = swapped_in
        tracemalloc.start()
        sampler.start()
        t0 = time.perf_counter()
        with quiet():
            trainer.train()
        out["seconds"] = time.perf_counter() - t0
        stop.set()
        sampler.join()
        out["tracemalloc_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out["rss_after"] = proc.memory_info().rss if proc else None
        out["rss_peak_sampled"] = peak["rss"] or None
        out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        out["gpu_peak"] = torch.cuda.max_memory_allocated() if cuda else None
        if cb is not None:
            snaps = cb._snapshots
            out["snapshot_bytes"] = snaps.nbytes()
            out["snapshots_kept"] = len(snaps.available())
            traj = cb.engine.adapter_state()
            out["trajectory_bytes"] = sum(t.numel() * t.element_size() for t in (traj["prev"], traj["prev_delta"])
                                          if t is not None)
            out["cross_scoring"] = cb.engine.mode
            out["window"] = cb.window
            out["probes"] = len(cb.probe_steps)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- parent
def run_child(mode: str, variant: str, steps: int, threads: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, variant, "--steps", str(steps), "--threads", threads]
    res = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"child {mode}/{variant} failed (rc {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")


def mb(x) -> str:
    return "n/a" if x is None else f"{x / MB:.1f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="modes full,lora; 1 round")
    ap.add_argument("--modes", default=None, help="comma-separated: full, lora, full-snapshot")
    ap.add_argument("--rounds", type=int, default=1, help="A/B rounds (ABBA)")
    ap.add_argument("--steps", type=int, default=1, help="training steps per run (a probe every step)")
    ap.add_argument("--threads", default="auto")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps, args.threads)), flush=True)
        return
    modes = [m.strip() for m in (args.modes or ("full,lora" if args.quick else "full,lora,full-snapshot")).split(",")]
    threads = set_threads(args.threads)
    print(machine_header("memory: what PhaseTransitionCallback adds to a fine-tune"))
    print(f"torch threads: {threads}; {args.steps} step(s) per run, a probe every step (probes at steps 0..{args.steps})")
    results: dict[str, list[dict]] = {}
    with LoadSampler() as load:
        for r in range(args.rounds):
            for mode in modes:
                for variant in (("A", "B") if r % 2 == 0 else ("B", "A")):
                    if variant == "A" and mode == "full-snapshot":
                        continue  # same A as "full"
                    res = run_child(mode, variant, args.steps, args.threads)
                    results.setdefault(f"{mode}/{variant}", []).append(res)
                    print(f"  [{mode} {variant}] {res['seconds']:.1f} s, peak RSS {mb(res['ru_maxrss'])} "
                          f"(load {os.getloadavg()[0]:.2f})", flush=True)

    def med(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return median(vals) if vals else None

    for mode in modes:
        a = results.get(f"{'full' if mode == 'full-snapshot' else mode}/A")
        b = results.get(f"{mode}/B")
        if not a or not b:
            continue
        b0 = b[0]
        print(f"\n-- {mode}: model {mb(b0['model_bytes'])}, trainable {mb(b0['trainable_bytes'])}, "
              f"cross-scoring {b0.get('cross_scoring')}, {b0.get('probes')} probes")
        print(f"  {'':<34}{'A (no callback)':>18}{'B (callback)':>18}{'B - A':>14}")
        for key, label in (("rss_before", "RSS before train()"), ("ru_maxrss", "peak RSS (getrusage)"),
                           ("rss_peak_sampled", "peak RSS (psutil, 50 ms)"), ("rss_after", "RSS after train()"),
                           ("tracemalloc_peak", "tracemalloc peak (Python)"), ("gpu_peak", "GPU max allocated")):
            va, vb = med(a, key), med(b, key)
            diff = "n/a" if va is None or vb is None else f"{(vb - va) / MB:+.1f} MB"
            print(f"  {label:<34}{mb(va):>18}{mb(vb):>18}{diff:>14}")
        train_a = med(a, "ru_maxrss") - med(a, "rss_before")
        train_b = med(b, "ru_maxrss") - med(b, "rss_before")
        print(f"  peak RSS above the pre-training RSS: A {train_a / MB:.1f} MB, B {train_b / MB:.1f} MB "
              f"(B/A {train_b / train_a:.2f}x)")
        snap, traj = b0.get("snapshot_bytes", 0), b0.get("trajectory_bytes", 0)
        live = b0.get("swap_live_bytes", 0)
        own = b0["trainable_bytes"]
        if snap or traj:
            kept = (snap + traj) / own
            transient = (snap + traj + live) / own
            print(f"  snapshots kept (window {b0.get('window', 1)}: 2w-1 = {b0.get('snapshots_kept')}): "
                  f"WeightSnapshots.nbytes() = {mb(snap)} = {snap / own:.2f}x the trainable bytes   "
                  f"target <= {TARGET:g}x: {'MET' if snap / own <= TARGET else 'MISSED'}")
            print(f"  other weight copies: adapter trajectory (LoRA B, prev + delta, float32) {mb(traj)}; "
                  f"live weights copied while a snapshot is swapped in {mb(live)} (transient)")
            print(f"  all weight copies together: {kept:.2f}x the trainable bytes between probes, "
                  f"{transient:.2f}x at the peak of a probe")
        else:
            print("  snapshots: none (one-sided estimator)")
    print("\n" + load.summary())


if __name__ == "__main__":
    main()
