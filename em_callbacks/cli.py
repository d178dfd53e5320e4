"""``em-callbacks`` command line: ``demo``, ``report``, ``analyze`` and ``discover``.

Exit codes: 0 success, 1 the command failed (e.g. an optional component is missing),
2 bad usage (unknown option, missing or invalid run directory).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Optional

import typer
from typing_extensions import Annotated

from .report import format_value as _fmt

app = typer.Typer(
    name="em-callbacks",
    help="Watch fine-tuning runs for behavioural phase transitions (emergent misalignment).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _fail(message: str, code: int = EXIT_FAIL) -> "typer.Exit":
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"em-callbacks {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def main(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    """em-callbacks: detect, time and decompose behavioural phase transitions during fine-tuning."""


def _resolve_run_dir(run_dir: Path) -> Path:
    """The directory holding the run store; exits 2 naming the path when there is none."""
    from .report import RunNotFoundError, find_store

    try:
        return find_store(run_dir).parent
    except RunNotFoundError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None




def _lag(x: Any) -> str:
    return "-" if x is None else f"{int(x):+d}"


def _lag_note(x: Any) -> str:
    if x is None:
        return ""
    if x > 0:
        return "behaviour changed after the grad-norm peak"
    return "behaviour changed before the grad-norm peak" if x < 0 else "same step"


def _summary_table(summary: Mapping[str, Any], title: str):
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("step", justify="right")
    table.add_column("note")
    peak_note = ""
    if summary.get("peak_value") is not None:
        peak_note = f"D = {_fmt(summary.get('peak_value'))}"
        if summary.get("peak_confirmed") is False and summary.get("peak_step") is not None:
            peak_note += " (provisional)"
    lag_o, lag_p = summary.get("lag_onset_minus_grad_peak"), summary.get("lag_peak_minus_grad_peak")
    detected = summary.get("transition_detected")
    table.add_row("Onset", _fmt(summary.get("onset_step")),
                  {True: "transition detected", False: "no transition detected"}.get(
                      detected, "undecided: too few probes to detect"))
    table.add_row("D peak", _fmt(summary.get("peak_step")), peak_note)
    table.add_row("Grad-norm peak", _fmt(summary.get("grad_norm_peak_step")), "")
    table.add_row("Lag onset - grad peak", _lag(lag_o), _lag_note(lag_o))
    table.add_row("Lag D peak - grad peak", _lag(lag_p), _lag_note(lag_p))
    if "crossing_step" in summary:
        table.add_row("Crossing (>50% misaligned)", _fmt(summary.get("crossing_step")), "organism ground truth")
    stop = "stopped early" if summary.get("stopped_early") else "ran to the end"
    if summary.get("stop_reason"):
        stop += f": {summary['stop_reason']}"
    table.add_row("Stop", _fmt(summary.get("stop_step")), stop)
    return table


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (holding run.sqlite), or the Trainer output_dir.",
                                            show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the report "
                                                "(default: the run directory).")] = None,
) -> None:
    """Rebuild plots, example samples and summary.json of a run from its run store."""
    from .report import RunNotFoundError, build_report

    store_dir = _resolve_run_dir(run_dir)
    try:
        result = build_report(store_dir, out)
    except RunNotFoundError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        raise _fail(f"could not build the report for {store_dir}: {type(exc).__name__}: {exc}") from None
    console = _console()
    title = "Phase transition" + (" (summary rebuilt from the store)" if result["summary_rebuilt"] else "")
    console.print(_summary_table(result["summary"], title))
    offline = result["summary"].get("offline") or {}
    if offline.get("change_points") is not None:
        cps = ", ".join(str(c) for c in offline["change_points"]) or "none"
        console.print(f"Offline level shifts of D(t) (ruptures): {cps}", markup=False)
        if offline.get("note"):
            console.print(f"  ({offline['note']})", markup=False)
    if result["summary"].get("detection_note"):
        console.print(result["summary"]["detection_note"], markup=False)
    console.print(f"Report written to {result['out_dir']}:", markup=False)
    for name in ("report", "overview", "order_parameters", "captured", "samples", "summary"):
        console.print(f"  {Path(result['files'][name]).name}", markup=False)


@app.command()
def demo(
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the organism run.")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (summary.json, run store, plots).")]
    = Path("em-callbacks-demo"),
    control: Annotated[bool, typer.Option("--control", help="Fine-tune on aligned answers instead (no transition "
                                                            "expected).")] = False,
    early_stop: Annotated[bool, typer.Option("--early-stop", help="Stop training once the transition is "
                                                                  "detected.")] = False,
    wandb: Annotated[WandbMode, typer.Option("--wandb", help="Weights & Biases mode.", case_sensitive=False)]
    = WandbMode.offline,
    retrain: Annotated[bool, typer.Option("--retrain", help="Pretrain the organism from scratch (1-2 min on 2 "
                                                            "cores) instead of loading the shipped or cached "
                                                            "copy; the result replaces the cached copy.")] = False,
) -> None:
    """Train the synthetic model organism on CPU with the callback attached, end to end."""
    try:
        from .organism.demo import run_demo
    except ImportError as exc:
        raise _fail(f"the demo needs em_callbacks.organism.demo, which could not be imported ({exc})") from None
    try:
        result = run_demo(seed=seed, out=out, control=control, early_stop=early_stop, wandb_mode=wandb.value,
                          retrain=retrain)
    except ImportError as exc:  # a component the demo loads lazily is missing
        raise _fail(f"the demo could not load a component it needs: {exc}") from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    console = _console()
    if isinstance(result, Mapping):
        console.print(_summary_table(result, "Demo: " + ("control run" if control else "misalignment run")))
        try:
            from .organism.demo import verdict
        except ImportError:  # a demo module without a verdict (e.g. a user's own)
            verdict = None
        if verdict is not None:
            console.print(verdict(result), markup=False)
    console.print(f"Outputs in {out}", markup=False)


@app.command()
def analyze(
    paths: Annotated[list[Path], typer.Argument(help="A Trainer output_dir (its checkpoint-* folders, in step "
                                                "order) or checkpoint folders.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the run store, summary.json and "
                                      "report.")],
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="Base model of adapter checkpoints "
                                                      "(default: the adapter config's); for full-model "
                                                      "checkpoints, adds a probe of it at step 0.")] = None,
    probes: Annotated[str, typer.Option("--probes", help="Built-in probe set name or a JSONL/YAML file.")]
    = "em-first-plot",
    samples_per_prompt: Annotated[int, typer.Option("--samples-per-prompt", min=2)] = 16,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
    seed: Annotated[int, typer.Option("--seed", help="The live run's seed, to draw the same samples.")] = 0,
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", help="Judge model for order parameters "
                                                       "(OpenAI-compatible).")] = None,
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="OpenAI-compatible judge server.")] = None,
    order_parameter: Annotated[Optional[list[str]], typer.Option("--order-parameter", help="Built-in order "
                                                                 "parameter to judge (repeatable; default "
                                                                 "'aligned' with a judge).")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable or partial checkpoints "
                                           "instead of failing.")] = False,
    wandb: Annotated[WandbMode, typer.Option("--wandb", help="Weights & Biases mode.", case_sensitive=False)]
    = WandbMode.disabled,
) -> None:
    """Run the probe pipeline over saved checkpoints: the same store, summary and report as a live run."""
    from .analyze import CheckpointError, analyze_checkpoints
    from .engine import ConfigError

    judge, ops = None, []
    if judge_model:
        from .judges import OpenAIJudge
        from .order import OrderParameter

        judge = OpenAIJudge(model=judge_model, base_url=base_url)
        try:
            ops = [OrderParameter.builtin(name) for name in (order_parameter or ["aligned"])]
        except (KeyError, ValueError) as exc:
            raise _fail(str(exc), EXIT_USAGE) from None
    elif order_parameter:
        raise _fail("--order-parameter needs --judge-model", EXIT_USAGE)
    try:
        summary = analyze_checkpoints(
            paths, out, base_model=base_model, probes=probes, samples_per_prompt=samples_per_prompt,
            max_new_tokens=max_new_tokens, seed=seed, judge=judge, order_parameters=ops, skip_bad=skip_bad,
            wandb_mode=wandb.value,
        )
    except (CheckpointError, ConfigError) as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    console = _console()
    console.print(_summary_table(summary.to_dict(), "Phase transition (offline analysis)"))
    if summary.detection_note:
        console.print(summary.detection_note, markup=False)
    console.print(f"Run store, summary.json and report in {out}", markup=False)


@app.command()
def discover(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (holding run.sqlite).", show_default=False)],
    judge_model: Annotated[str, typer.Option("--judge-model", help="Judge / proposer model name.",
                                             show_default=False)],
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="OpenAI-compatible server "
                                                    "(vLLM, ...); default: OpenAI.")] = None,
    n_candidates: Annotated[int, typer.Option("--n-candidates", min=1, help="Candidate statements to "
                                              "propose.")] = 8,
) -> None:
    """Propose and rank order parameters that explain the detected transition.

    An LLM proposes statements that tell apart samples from before and after the D peak;
    each is scored as an order parameter and ranked by the fraction r_O of D it captures."""
    store_dir = _resolve_run_dir(run_dir)
    try:
        from .discovery import run_discovery
    except ImportError as exc:
        raise _fail(f"discovery needs em_callbacks.discovery, which could not be imported ({exc})") from None
    try:
        result = run_discovery(store_dir, judge_model=judge_model, base_url=base_url, n_candidates=n_candidates)
    except ImportError as exc:  # e.g. the openai client
        raise _fail(f"discovery could not load a component it needs: {exc}") from None
    except (RuntimeError, ValueError) as exc:  # DiscoveryError: no D series, unusable proposer answer, HTTP error
        raise _fail(f"discovery failed: {exc}") from None
    _print_candidates(result)


def _print_candidates(result: Any) -> None:
    console = _console()
    rows = result.get("candidates") if isinstance(result, Mapping) else result
    if isinstance(rows, (list, tuple)) and rows and all(isinstance(r, Mapping) or hasattr(r, "__dict__") for r in rows):
        from rich.table import Table

        dicts = [dict(r) if isinstance(r, Mapping) else dict(vars(r)) for r in rows]
        cols: list[str] = []
        for d in dicts:
            cols += [k for k in d if k not in cols]
        table = Table(title="Candidate order parameters", show_header=True, header_style="bold")
        for c in cols:
            table.add_column(c, overflow="fold")
        for d in dicts:
            table.add_row(*(_fmt(d.get(c)) for c in cols))
        console.print(table)
    elif result is not None:
        console.print(json.dumps(result, indent=2, default=str), markup=False)
    if isinstance(result, Mapping):
        for k, v in result.items():
            if k != "candidates" and isinstance(v, (str, Path)) and str(v):
                console.print(f"{k}: {v}", markup=False)


if __name__ == "__main__":  # pragma: no cover
    app()
