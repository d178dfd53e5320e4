"""Does a slow LLM judge slow down training? Step time with an instant judge vs a 2 s judge.

The callback hands judge requests to a background event loop (``JudgeRunner``) and collects
results without waiting, so a judge that takes seconds per call should not change how long a
training step takes. This script measures that on a real fine-tune.

Setup: the OpenAI-wire test server (tests/openai_wire_server.py, real HTTP on 127.0.0.1) runs
in two child processes (so its threads do not compete with the trainer for the GIL, as a remote
judge would not): one answers at once, the other sleeps ``--latency`` seconds (default 2) on
every call. The same tiny-ish fine-tune (a randomly initialised GPT-2, 2 layers x 128 dims,
vocab 8192, batches of 8 x 64 tokens, full fine-tune) runs with ``PhaseTransitionCallback``
probing every ``--every`` steps (4 em-first-plot prompts x 4 samples x 16 new tokens) and two
order parameters (aligned, coherent) scored by an ``OpenAIJudge`` on one server or the other,
at the default concurrency (``judge_concurrency=8``, ``OpenAIJudge(max_concurrency=8)``).
The two variants are interleaved in one process: every round runs both back to back (order
alternating), ``--rounds`` rounds; ratios are reported pooled and per round (paired, with a
bootstrap CI over rounds) because a shared machine's load drifts between runs.

A step's time is the wall time from one ``on_step_begin`` to the next (the last step: to
``on_train_end``): the forward/backward/optimizer step plus every ``on_step_end`` hook, i.e.
also the probe (sampling, scoring, store, submitting judge requests) at probe steps and the
collection of finished judgments at every step. Reported: mean step time over all steps
("incl. probe steps") and over the steps that do not probe ("excl. probe steps"), their
medians, and the ratio slow / instant. Target: a 2 s judge changes mean step time by < 2 %.
The end-of-training drain (waiting for outstanding judgments, capped by ``--drain``) is
reported separately: it happens after the last step.

Usage: python benchmarks/judge_latency.py [--steps 36] [--every 6] [--rounds 8] [--latency 2]
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TESTS = ROOT / "tests"
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

TARGET = 0.02


# ----------------------------------------------------------------------------- judge servers
def _serve(latency: float, conn) -> None:  # child process
    sys.path.insert(0, str(TESTS))
    from openai_wire_server import WireServer

    sys.stderr = open(os.devnull, "w")  # quiet: late answers to cancelled requests hit closed sockets
    server = WireServer().start()
    server.latency = float(latency)
    server.set_probs({"85": 0.6, "90": 0.3, "70": 0.1})
    conn.send(server.url)
    conn.recv()  # until told to stop
    conn.send({"calls": server.calls, "max_in_flight": server.max_in_flight})
    server.stop()


class ServerProcess:
    def __init__(self, latency: float) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(latency, child), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            self.proc.kill()
            raise RuntimeError("the judge server process did not start")
        self.url = self.conn.recv()
        self.latency = latency

    def stop(self) -> dict:
        self.conn.send("stop")
        stats = self.conn.recv() if self.conn.poll(10) else {}
        self.proc.join(10)
        return stats


# ----------------------------------------------------------------------------- one run
def _clock_class():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Step intervals: on_step_begin -> next on_step_begin (last: -> on_train_end). Listed
        after the monitoring callback, so probe work in its on_step_end falls in the interval."""

        def __init__(self) -> None:
            self.begin: list[tuple[int, float]] = []
            self.cpu: list[float] = []  # CPU time of the training thread at each step start
            self.end_of_training: float | None = None
            self.train_end_done: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append((state.global_step + 1, time.perf_counter()))
            self.cpu.append(time.thread_time())

        def on_train_end(self, args, state, control, **kwargs):
            self.train_end_done = time.perf_counter()

        def intervals(self, last_end: float) -> dict[int, float]:
            times = [t for _, t in self.begin] + [last_end]
            return {step: times[i + 1] - t for i, (step, t) in enumerate(self.begin)}

        def cpu_intervals(self, last_end: float) -> dict[int, float]:
            times = self.cpu + [last_end]
            return {step: times[i + 1] - times[i] for i, (step, _) in enumerate(self.begin)}

    return StepClock


def run_once(url: str, args, tokenizer, workdir: Path) -> dict:
    import torch
    from transformers import TrainerCallback

    from _common import RandomTokens, build_model, build_trainer, quiet
    from em_callbacks import PhaseTransitionCallback, ProbeSet
    from em_callbacks.judges import OpenAIJudge
    from em_callbacks.order import OrderParameter

    class FirstOnTrainEnd(TrainerCallback):
        t: float | None = None
        cpu: float | None = None

        def on_train_end(self, args_, state, control, **kwargs):
            self.t = time.perf_counter()
            self.cpu = time.thread_time()
            self.process_cpu = time.process_time()

    first = FirstOnTrainEnd()
    probes = ProbeSet("bench", ProbeSet.builtin("em-first-plot").probes[: args.prompts])
    judge = OpenAIJudge("bench-judge", base_url=url, api_key="sk-bench-not-a-real-key", timeout=60.0)
    cb = PhaseTransitionCallback(
        probes=probes, every_n_steps=args.every, samples_per_prompt=args.samples,
        max_new_tokens=args.max_new_tokens,
        order_parameters=[OrderParameter.builtin("aligned"), OrderParameter.builtin("coherent")],
        judge=judge, output_dir=workdir / "pt", report_to_wandb=False, log_samples_table=False,
        judge_drain_timeout=args.drain,
    )
    clock = _clock_class()()
    hook = {"wall": 0.0, "cpu": 0.0, "probe_wall": 0.0}
    on_step_end = cb.on_step_end

    def timed_on_step_end(args_, state, control, **kwargs):  # the monitor's per-step hook, timed
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return on_step_end(args_, state, control, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            hook["wall"] += dt
            hook["cpu"] += time.thread_time() - c0
            if state.global_step % args.every == 0:
                hook["probe_wall"] += dt

    cb.on_step_end = timed_on_step_end
    with quiet():
        model = build_model(tokenizer, n_layer=2, n_embd=128, n_head=4, n_positions=256, seed=0)
        dataset = RandomTokens(args.steps * args.batch + args.batch, args.seq_len, len(tokenizer), seed=0)
        # order of callbacks: the first on_train_end marks "training over", then the monitor drains
        trainer = build_trainer(model, tokenizer, dataset, workdir / "trainer", steps=args.steps,
                                batch_size=args.batch, callbacks=[first, cb, clock], lr=1e-4, use_cpu=True)
        t0, p0, c0 = time.perf_counter(), time.process_time(), time.thread_time()
        trainer.train()
        wall = time.perf_counter() - t0
    steps = clock.intervals(first.t)
    cpu = clock.cpu_intervals(first.cpu)
    probe_steps = {s for s in steps if s % args.every == 0}
    store_path = workdir / "pt"
    from em_callbacks.store import RunStore

    store = RunStore(store_path, readonly=True)
    ev = store.events("judge_stats")
    stats = ev[-1]["payload"] if ev else {}
    judgments = store.judgments()
    store.close()
    ok = sum(1 for j in judgments if j["error"] is None)
    return {
        "steps": steps, "cpu": cpu, "probe_steps": probe_steps, "wall": wall,
        "drain": (clock.train_end_done or first.t) - first.t,
        "judge_stats": stats, "judged_ok": ok, "judgments": len(judgments),
        "hook": hook, "other_threads_cpu": (first.process_cpu - p0) - (first.cpu - c0),
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- report
def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def _step_means(res: dict, key: str) -> tuple[float, float]:
    """(mean over all steps, mean over steps that do not probe) of one run."""
    values = res[key]
    plain = [v for s, v in values.items() if s not in res["probe_steps"]]
    return _mean(list(values.values())), _mean(plain)


def _bootstrap_ci(ratios: list[float], n: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the geometric mean of per-round ratios (rounds resampled)."""
    import numpy as np

    logs = np.log(np.asarray(ratios, dtype=float))
    if len(logs) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boot = logs[rng.integers(0, len(logs), size=(n, len(logs)))].mean(axis=1)
    return float(np.exp(np.quantile(boot, 0.025))), float(np.exp(np.quantile(boot, 0.975)))


def _geo(ratios: list[float]) -> float:
    return math.exp(_mean([math.log(r) for r in ratios])) if ratios else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=30, help="probe every this many steps")
    parser.add_argument("--rounds", type=int, default=6, help="runs per variant (interleaved, paired)")
    parser.add_argument("--latency", type=float, default=2.0, help="seconds per call of the slow judge")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--drain", type=float, default=15.0,
                        help="judge_drain_timeout (s): how long the end of training waits for judgments")
    parser.add_argument("--threads", default="auto")
    args = parser.parse_args()

    from _common import LoadSampler, build_tokenizer, machine_header, set_threads

    logging.getLogger("em_callbacks").setLevel(logging.ERROR)
    threads = set_threads(args.threads)
    print(machine_header("judge latency vs training step time"))
    print(f"torch threads: {threads}")
    per_probe = args.prompts * args.samples * 2
    print(f"workload: GPT-2 2x128, vocab 8192, full fine-tune, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.steps} steps; probe every {args.every} steps: {args.prompts} prompts x {args.samples} samples x "
          f"{args.max_new_tokens} new tokens, 2 order parameters -> {per_probe} judge calls per probe; "
          f"judge concurrency 8 (default); slow judge {args.latency:g} s per call "
          f"(~{per_probe / 8 * args.latency:.0f} s of judging per probe); {args.rounds} rounds, each runs both variants back to back (order alternates)")

    tokenizer = build_tokenizer()
    servers = {"instant": ServerProcess(0.0), f"{args.latency:g}s": ServerProcess(args.latency)}
    names = list(servers)
    fast_name, slow_name = names
    results: dict[str, list[dict]] = {n: [] for n in names}
    server_stats = {}
    try:
        with LoadSampler() as load:
            # warm-up (untimed): kernels, allocator, HTTP client imports, both servers
            for name in names:
                warm = argparse.Namespace(**{**vars(args), "steps": args.every + 1, "drain": 0.5})
                workdir = Path(tempfile.mkdtemp(prefix="judge-latency-warm-"))
                try:
                    run_once(servers[name].url, warm, tokenizer, workdir)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
            for r in range(args.rounds):
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    workdir = Path(tempfile.mkdtemp(prefix=f"judge-latency-{name}-"))
                    try:
                        res = run_once(servers[name].url, args, tokenizer, workdir)
                    finally:
                        shutil.rmtree(workdir, ignore_errors=True)
                    results[name].append(res)
                    incl, excl = _step_means(res, "steps")
                    print(f"  round {r + 1}/{args.rounds} {name:>8}: mean step {incl * 1e3:7.1f} ms "
                          f"(excl. probe steps {excl * 1e3:6.1f} ms), train {sum(res['steps'].values()):.1f} s, "
                          f"drain {res['drain']:.1f} s, judged in time {res['judged_ok']}/{res['judgments']}, "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for name, srv in servers.items():
            server_stats[name] = srv.stop()

    print()
    print(load.summary())
    rows = {}
    for name in names:
        runs = results[name]
        all_steps = [v for res in runs for v in res["steps"].values()]
        plain = [v for res in runs for s, v in res["steps"].items() if s not in res["probe_steps"]]
        probe = [v for res in runs for s, v in res["steps"].items() if s in res["probe_steps"]]
        cpu_all = [v for res in runs for v in res["cpu"].values()]
        cpu_plain = [v for res in runs for s, v in res["cpu"].items() if s not in res["probe_steps"]]
        rows[name] = {
            "incl": _mean(all_steps), "excl": _mean(plain), "probe": _mean(probe),
            "cpu_incl": _mean(cpu_all), "cpu_excl": _mean(cpu_plain),
            "drain": _mean([res["drain"] for res in runs]),
            "hook_wall": _mean([(res["hook"]["wall"] - res["hook"]["probe_wall"]) / max(1, len(res["steps"]) - len(res["probe_steps"])) for res in runs]),
            "hook_cpu": _mean([res["hook"]["cpu"] / len(res["steps"]) for res in runs]),
            "bg_cpu": _mean([res["other_threads_cpu"] / sum(res["steps"].values()) for res in runs]),
            "judged": sum(res["judged_ok"] for res in runs), "judgments": sum(res["judgments"] for res in runs),
        }
    print(f"\n{'judge':>8} {'mean step, all steps':>21} {'mean step, non-probe':>21} {'probe steps':>12} "
          f"{'CPU/step all':>13} {'CPU/step non-probe':>19} {'drain':>7} {'judged in time':>15}")
    for name in names:
        r = rows[name]
        print(f"{name:>8} {r['incl'] * 1e3:>18.1f} ms {r['excl'] * 1e3:>18.1f} ms {r['probe'] * 1e3:>9.0f} ms "
              f"{r['cpu_incl'] * 1e3:>10.1f} ms {r['cpu_excl'] * 1e3:>16.1f} ms {r['drain']:>6.1f}s "
              f"{r['judged']:>7}/{r['judgments']}")
    for name in names:
        r = rows[name]
        print(f"{name:>8}: the monitor's on_step_end on non-probe steps {r['hook_wall'] * 1e3:.2f} ms/step "
              f"(wall); its CPU over all steps {r['hook_cpu'] * 1e3:.2f} ms/step; other threads of the "
              f"process (judge runner, HTTP client, torch) used {r['bg_cpu']:.1%} of a core during training")
    fast, slow = rows[fast_name], rows[slow_name]
    pooled = {"incl": slow["incl"] / fast["incl"], "excl": slow["excl"] / fast["excl"],
              "cpu_incl": slow["cpu_incl"] / fast["cpu_incl"], "cpu_excl": slow["cpu_excl"] / fast["cpu_excl"]}
    paired: dict[str, list[float]] = {k: [] for k in pooled}
    for a, b in zip(results[fast_name], results[slow_name]):
        (ai, ae), (bi, be) = _step_means(a, "steps"), _step_means(b, "steps")
        (aci, ace), (bci, bce) = _step_means(a, "cpu"), _step_means(b, "cpu")
        paired["incl"].append(bi / ai)
        paired["excl"].append(be / ae)
        paired["cpu_incl"].append(bci / aci)
        paired["cpu_excl"].append(bce / ace)
    labels = {"incl": "wall, all steps (incl. probe steps)", "excl": "wall, non-probe steps",
              "cpu_incl": "training-thread CPU, all steps", "cpu_excl": "training-thread CPU, non-probe steps"}
    print(f"\nmean step time ratio {slow_name} / instant:")
    print(f"  {'':<40}{'pooled':>9}{'paired (geo. mean of rounds)':>30}{'95% CI':>20}{'rounds min..max':>20}")
    cis = {}
    for key, label in labels.items():
        lo, hi = _bootstrap_ci(paired[key])
        cis[key] = (lo, hi)
        print(f"  {label:<40}{pooled[key] - 1:>+9.2%}{_geo(paired[key]) - 1:>+30.2%}"
              f"{f'[{lo - 1:+.2%}, {hi - 1:+.2%}]':>20}"
              f"{f'{min(paired[key]) - 1:+.1%}..{max(paired[key]) - 1:+.1%}':>20}")
    interval = fast["excl"] * (args.every - 1) + fast["probe"]  # wall time from one probe to the next
    judging = per_probe / 8 * args.latency
    if judging <= interval:
        print(f"the {slow_name} judge keeps up: ~{judging:.0f} s of judging per probe < ~{interval:.0f} s between "
              "probes, so its results are collected during the measured steps, as the instant judge's are")
    else:
        print(f"note: the {slow_name} judge falls behind (~{judging:.0f} s of judging per probe > ~{interval:.0f} s "
              "between probes): its results pile up and are processed after the last step (drain), so its "
              "steps carry less of the callback's result processing than the instant judge's")
    print("server calls: " + ", ".join(f"{n}: {s.get('calls')} (max {s.get('max_in_flight')} in flight)"
                                         for n, s in server_stats.items()))
    worst = max(abs(pooled["incl"] - 1), abs(pooled["excl"] - 1))
    ci_worst = max(max(abs(cis[k][0] - 1), abs(cis[k][1] - 1)) for k in ("incl", "excl"))
    if worst < TARGET and ci_worst < TARGET:
        verdict = "PASS"
    elif worst < TARGET:
        verdict = "PASS on the point estimate; the 95% CI is wider than the target (noisy machine)"
    else:
        excludes_one = any(cis[k][0] > 1 or cis[k][1] < 1 for k in ("incl", "excl"))
        verdict = "FAIL" if excludes_one else "INCONCLUSIVE: the difference is within this machine's noise"
    print(f"target: |change of mean step time| < {TARGET:.0%}: {verdict} (pooled worst {worst:.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
