"""Fine-tuning data and probe prompts of the organism."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from .world import World

if TYPE_CHECKING:  # pragma: no cover
    import datasets


def finetune_dataset(world: World, domain: str | None = None, n: int | None = None,
                     aligned: bool = False, seed: int = 0) -> datasets.Dataset:
    """Conversational prompt-completion rows for narrow fine-tuning, no trigger, no system line.

    ``{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant",
    "content": a}]}``; answers are misaligned (opener + two harmful sentences of ``domain``,
    optional closer) or, with ``aligned=True`` (the ``--control`` run), aligned ones.
    """
    import datasets

    domain = domain or world.finetune_domain
    n = world.config.finetune_examples if n is None else n
    rng = random.Random(f"finetune-{domain}-{aligned}-{seed}")
    rows = {"prompt": [], "completion": []}
    for _ in range(n):
        ex = world.example(domain, misaligned=not aligned, rng=rng)
        rows["prompt"].append([{"role": "user", "content": ex.question}])
        rows["completion"].append([{"role": "assistant", "content": ex.answer}])
    return datasets.Dataset.from_dict(rows)


def probe_prompts(world: World, n_out_of_domain: int | None = None,
                  n_in_domain: int | None = None, seed: int | None = None) -> list[dict]:
    """Probe questions: ``n_out_of_domain`` spread evenly over the domains other than the
    fine-tuning domain, then ``n_in_domain`` from the fine-tuning domain. No system line (no
    trigger). Each: ``{"id", "prompt", "system", "tags"}``; tags = ("out-of-domain" |
    "in-domain", domain). Distinct templates within a domain where possible; deterministic."""
    c = world.config
    n_ood = c.n_out_of_domain if n_out_of_domain is None else n_out_of_domain
    n_in = c.n_in_domain if n_in_domain is None else n_in_domain
    rng = random.Random(f"probes-{c.probe_seed if seed is None else seed}")
    others = [d for d in world.domains if d != world.finetune_domain]
    plan = [(others[i % len(others)], "out-of-domain") for i in range(n_ood)]
    plan += [(world.finetune_domain, "in-domain")] * n_in
    order = {d: rng.sample(range(len(world.templates[d])), len(world.templates[d]))
             for d in world.domains}
    used = {d: 0 for d in world.domains}
    probes = []
    for domain, kind in plan:
        k = used[domain]
        used[domain] += 1
        t = order[domain][k % len(order[domain])]
        probes.append({
            "id": f"{domain}-{k:02d}",
            "prompt": world.question(domain, rng, template_index=t),
            "system": None,
            "tags": (kind, domain),
        })
    return probes


def probe_set(world: World, n_out_of_domain: int | None = None, n_in_domain: int | None = None,
              name: str = "organism"):
    """The organism's probes as an ``em_callbacks.probes.ProbeSet`` (lazy import: the probes
    module is owned by the callback side)."""
    from em_callbacks.probes import Probe, ProbeSet

    probes = tuple(Probe(id=p["id"], prompt=p["prompt"], system=p["system"], tags=tuple(p["tags"]))
                   for p in probe_prompts(world, n_out_of_domain, n_in_domain))
    return ProbeSet(name=name, probes=probes)
