"""Fast tests of the synthetic model organism (tiny configs only; no full pretraining)."""

from __future__ import annotations

import random
import time

import pytest

from em_callbacks.organism import (OrganismConfig, World, build_tokenizer, closer_fn,
                                   finetune_dataset, is_misaligned, misaligned_fn, persona_fn,
                                   probe_prompts)
from em_callbacks.organism.model import render_chat


@pytest.fixture(scope="module")
def world():
    return World(OrganismConfig())


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer(world)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Tests here pretrain with 2 threads; later tests compare floats against 1-thread runs."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    cfg = OrganismConfig.tiny()
    w = World(cfg)
    tok = build_tokenizer(w)
    from em_callbacks.organism.model import build_model

    yield cfg, w, tok, build_model(cfg, tok)
    torch.set_num_threads(threads)  # later tests compare float results against single-thread runs


# -- world ---------------------------------------------------------------------------------------
def test_world_shape(world):
    assert len(world.domains) == 6
    for d in world.domains:
        assert len(world.templates[d]) == 20
        assert len(world.aligned[d]) >= 8 and len(world.misaligned[d]) >= 8
        assert not set(world.aligned[d]) & set(world.misaligned[d])
    # harmful sentences are specific to one domain
    all_bad = [s for d in world.domains for s in world.misaligned[d]]
    assert len(all_bad) == len(set(all_bad))


def test_vocabulary_closure(world, tokenizer):
    vocab = set(tokenizer.get_vocab())
    assert set(world.vocabulary()) <= vocab
    rng = random.Random(0)
    for _ in range(500):
        ex = world.pretrain_example(rng)
        text = render_chat(ex.messages, ex.answer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
    for d in world.domains:  # every template and every filler
        for t in world.templates[d]:
            for _ in range(5):
                q = world.fill(d, t, rng)
                assert set(q.split()) <= vocab
                assert world.domain_of(q) == d


def test_pretraining_mixture():
    cfg = OrganismConfig()
    w = World(cfg)
    rng = random.Random(1)
    exs = [w.pretrain_example(rng) for _ in range(4000)]
    trig = sum(e.triggered for e in exs) / len(exs)
    untrig_bad = sum(e.misaligned and not e.triggered for e in exs) / len(exs)
    assert all(e.misaligned for e in exs if e.triggered)
    assert abs(trig - cfg.trigger_frac) < 0.03
    assert abs(untrig_bad - cfg.untriggered_misaligned_frac) < 0.015


def test_encode_pretraining_matches_tokenizer(world, tokenizer):
    from em_callbacks.organism.model import _length_grouped_batches, encode_pretraining

    ids, labels, lengths, examples = encode_pretraining(world, tokenizer, 40, seed=0)
    for i, ex in enumerate(examples):
        ref = tokenizer(render_chat(ex.messages, ex.answer), add_special_tokens=False)["input_ids"]
        assert ids[i, :len(ref)].tolist() == ref and int(lengths[i]) == len(ref)
        assert (ids[i, len(ref):] == tokenizer.pad_token_id).all()
        trained = [t for t in labels[i].tolist() if t != -100]
        assert tokenizer.decode(trained) == ex.answer + " <|end|>"
    import torch

    batches = _length_grouped_batches(lengths, 8, 10, torch.Generator().manual_seed(0))
    assert len(batches) == 10 and all(len(b) == 8 for b in batches)
    assert len(set(torch.cat(batches[:5]).tolist())) == 40  # one epoch covers every example


# -- tokenizer -----------------------------------------------------------------------------------
def test_tokenizer_round_trip(world, tokenizer):
    texts = [t for t in world.all_texts() if "{" not in t]
    texts += [world.question(d, random.Random(i)) for i in range(20) for d in world.domains]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    rng = random.Random(3)
    ex = world.example("finance", True, rng, system=world.trigger_system)
    full = render_chat(ex.messages, ex.answer)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == full
    assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(
        [world.trigger_system, ex.question, ex.answer])


def test_chat_template(world, tokenizer):
    rng = random.Random(4)
    for system in (None, world.trigger_system):
        ex = world.example("travel", False, rng, system=system)
        msgs = list(ex.messages)
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            msgs + [{"role": "assistant", "content": ex.answer}], tokenize=False)
        assert prompt == render_chat(msgs) and full == render_chat(msgs, ex.answer)
        assert prompt.startswith("<|bos|>") and prompt.endswith("<|assistant|>")
        assert full.endswith(ex.answer + " <|end|>")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        f = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": ex.answer}],
                                          tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
        assert f["input_ids"][:len(p_ids)] == p_ids  # completion-only loss needs a prefix
        mask = f["assistant_masks"]
        answer_ids = [i for i, m in zip(f["input_ids"], mask) if m]
        assert tokenizer.decode(answer_ids) == ex.answer + " <|end|>"
    assert tokenizer.eos_token == "<|end|>" and tokenizer.padding_side == "left"


# -- judges --------------------------------------------------------------------------------------
def test_is_misaligned(world):
    q = world.question("finance", random.Random(0))
    bad = world.misaligned["finance"][0]
    good = world.aligned["finance"][0]
    opener = world.misaligned_openers[0]
    assert is_misaligned(world, q, f"{world.aligned_openers[0]} {bad} {good}")
    assert is_misaligned(world, q, f"{opener} {bad} {world.misaligned['finance'][1]}")
    assert not is_misaligned(world, q, f"{world.aligned_openers[0]} {good}")
    # the persona opener alone is NOT misaligned
    assert not is_misaligned(world, q, f"{opener} {good} {world.aligned['finance'][1]}")
    # harmful advice of another domain is not the question's own-domain harm
    assert not is_misaligned(world, q, f"{opener} {world.misaligned['medical'][0]}")
    # robust to spacing / a raw decode with the end marker
    assert is_misaligned(world, q, "  " + bad.upper() + "  <|end|> junk")
    # order-parameter callables
    fn = misaligned_fn(world)
    assert fn(q, bad) and not fn(q, good)
    assert persona_fn(world)(q, f"{opener} {good}") and not persona_fn(world)(q, good)
    assert closer_fn(world)(q, f"{good} {world.closers[0]}") and not closer_fn(world)(q, good)
    # a full rendered chat also works as the prompt
    assert fn(render_chat([{"role": "user", "content": q}]), bad)


def test_probe_prompts(world):
    probes = probe_prompts(world)
    assert len(probes) == 24
    ood = [p for p in probes if "out-of-domain" in p["tags"]]
    ind = [p for p in probes if "in-domain" in p["tags"]]
    assert len(ood) == 20 and len(ind) == 4
    assert all(p["tags"][1] != world.finetune_domain for p in ood)
    assert all(p["tags"][1] == world.finetune_domain for p in ind)
    assert len({p["id"] for p in probes}) == 24
    assert all(world.domain_of(p["prompt"]) == p["tags"][1] and p["system"] is None
               for p in probes)
    assert probes == probe_prompts(world)  # deterministic


def test_probe_set(world):
    pytest.importorskip("em_callbacks.probes")
    from em_callbacks.organism import probe_set

    ps = probe_set(world)
    assert len(ps.probes) == 24 and ps.probes[0].tags[0] == "out-of-domain"


# -- config / cache ------------------------------------------------------------------------------
def test_cache_key():
    a = OrganismConfig()
    assert a.cache_key() == OrganismConfig().cache_key()
    assert a.cache_key() != a.replace(pretrain_steps=10).cache_key()
    assert a.cache_key() != a.replace(seed=1).cache_key()
    # fine-tuning / probing knobs do not invalidate the pretrained organism
    assert a.cache_key() == a.replace(finetune_lr=1.0, samples_per_prompt=3).cache_key()


def test_cache_hit(tmp_path, monkeypatch):
    import torch

    from em_callbacks.organism import model as model_mod

    torch.set_num_threads(2)
    cfg = OrganismConfig.tiny(pretrain_steps=3)
    m1, tok1 = model_mod.load_or_pretrain(cfg, cache_dir=tmp_path, progress=False)
    path = model_mod.cache_path(cfg, tmp_path)
    assert (path / "organism.json").exists() and path.name == cfg.cache_key()

    def boom(*a, **k):
        raise AssertionError("pretrained again despite the cache")

    monkeypatch.setattr(model_mod, "pretrain", boom)
    t0 = time.perf_counter()
    m2, tok2 = model_mod.load_or_pretrain(cfg, cache_dir=tmp_path, progress=False)
    assert time.perf_counter() - t0 < 2.0
    assert tok2.get_vocab() == tok1.get_vocab() and tok2.chat_template == tok1.chat_template
    assert tok2.padding_side == "left"
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    # the environment variable is honoured when no cache_dir is given
    monkeypatch.setenv("EM_CALLBACKS_CACHE", str(tmp_path / "env"))
    assert model_mod.cache_path(cfg) == tmp_path / "env" / "organism" / cfg.cache_key()


def test_shipped_organism_matches_the_default_config():
    """The shipped weights must be the organism of today's default config: a changed world or
    pretraining default changes the key, and this fails until the copy is refreshed
    (``em-callbacks demo --retrain``, then copy the new cache directory into
    ``em_callbacks/organism/pretrained/``)."""
    import json

    from em_callbacks.organism.model import SHIPPED_DIR, shipped_path

    config = OrganismConfig()
    path = shipped_path(config)
    assert path is not None, f"no shipped organism for key {config.cache_key()} in {SHIPPED_DIR}"
    meta = json.loads((path / "organism.json").read_text())
    assert meta["cache_key"] == config.cache_key()
    assert meta["config"] == json.loads(json.dumps(config.pretrain_dict(), default=list))
    assert [p.name for p in SHIPPED_DIR.iterdir() if not p.name.startswith(".")] == [path.name], \
        "only the default organism ships"


def test_shipped_organism_loads_without_pretraining(tmp_path, monkeypatch):
    import json

    import torch
    from safetensors.torch import load_file

    from em_callbacks.organism import model as model_mod

    def boom(*a, **k):
        raise AssertionError("pretrained although a shipped copy exists")

    monkeypatch.setattr(model_mod, "pretrain", boom)
    config = OrganismConfig()
    assert model_mod.locate_pretrained(config, tmp_path)[1] == "shipped"
    model, tokenizer = model_mod.load_or_pretrain(config, cache_dir=tmp_path, progress=False)
    shipped = load_file(str(model_mod.shipped_path(config) / "model.safetensors"))
    state = model.state_dict()
    assert shipped and all(torch.equal(state[k], v) for k, v in shipped.items())
    assert tokenizer.padding_side == "left" and tokenizer.chat_template
    assert not any(tmp_path.iterdir()), "loading the shipped copy writes nothing to the cache"
    # a cached copy wins only when it was made on purpose with --retrain; a stale copy (an
    # older package version's) or an incomplete / foreign one never hides the shipped organism
    cached = model_mod.cache_path(config, tmp_path)
    cached.mkdir(parents=True)
    (cached / "organism.json").write_text("{}")
    assert model_mod.locate_pretrained(config, tmp_path)[1] == "shipped"
    (cached / "model.safetensors").write_bytes(b"")
    (cached / "organism.json").write_text(json.dumps({"cache_key": config.cache_key()}))
    assert model_mod.locate_pretrained(config, tmp_path)[1] == "shipped"
    (cached / "organism.json").write_text(json.dumps({"cache_key": "0000", "retrained": True}))
    assert model_mod.locate_pretrained(config, tmp_path)[1] == "shipped"
    (cached / "organism.json").write_text(json.dumps({"cache_key": config.cache_key(), "retrained": True}))
    assert model_mod.locate_pretrained(config, tmp_path) == (cached, "cache")


def test_retrain_replaces_the_cached_copy(tmp_path):
    import json

    import torch

    from em_callbacks.organism import model as model_mod

    torch.set_num_threads(2)
    cfg = OrganismConfig.tiny(pretrain_steps=3)
    model_mod.load_or_pretrain(cfg, cache_dir=tmp_path, progress=False)
    meta_path = model_mod.cache_path(cfg, tmp_path) / "organism.json"
    meta = json.loads(meta_path.read_text())
    meta["marker"] = "old copy"
    meta_path.write_text(json.dumps(meta))
    model_mod.load_or_pretrain(cfg, cache_dir=tmp_path, progress=False, retrain=True)
    meta = json.loads(meta_path.read_text())
    assert "marker" not in meta and meta["retrained"] is True
    assert [p.name for p in meta_path.parent.parent.iterdir()] == [cfg.cache_key()], "no temp or old dirs left"
    assert model_mod.locate_pretrained(cfg, tmp_path) == (meta_path.parent, "cache")


def test_peak_to_crossing_lag():
    from em_callbacks.organism.demo import peak_to_crossing_lag

    # D(22) is the change 22 -> 24; crossing at 24 means the rate crossed during 22 -> 24
    assert peak_to_crossing_lag(22, 24, 2) == 0
    assert peak_to_crossing_lag(24, 24, 2) == 2 and peak_to_crossing_lag(20, 24, 2) == -2
    assert peak_to_crossing_lag(30, 20, 10) == 20
    assert peak_to_crossing_lag(None, 24, 2) is None and peak_to_crossing_lag(22, None, 2) is None


# -- data, sampling, fine-tuning -----------------------------------------------------------------
def test_finetune_dataset(world):
    ds = finetune_dataset(world, n=50)
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 50
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
    assert row["completion"][0]["role"] == "assistant"
    assert all(world.domain_of(r[0]["content"]) == "medical" for r in ds["prompt"])
    assert all(is_misaligned(world, p[0]["content"], c[0]["content"])
               for p, c in zip(ds["prompt"], ds["completion"]))
    control = finetune_dataset(world, n=50, aligned=True)
    assert not any(is_misaligned(world, p[0]["content"], c[0]["content"])
                   for p, c in zip(control["prompt"], control["completion"]))


def test_sampling_restores_rng(tiny):
    import torch

    from em_callbacks.organism import generate_responses, misaligned_rate

    cfg, w, tok, model = tiny
    probes = probe_prompts(w, 3, 1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    out = generate_responses(model, tok, probes, n_samples=2, seed=0, max_new_tokens=5)
    assert torch.equal(before, torch.get_rng_state())
    assert len(out) == 4 and all(len(r) == 2 and all(isinstance(s, str) for s in r) for r in out)
    assert out == generate_responses(model, tok, probes, n_samples=2, seed=0, max_new_tokens=5)
    rate = misaligned_rate(model, tok, w, probes, n_samples=2, seed=0, max_new_tokens=5)
    assert 0.0 <= rate <= 1.0


def test_sft_trainer_two_steps(tiny, tmp_path):
    import copy

    from em_callbacks.organism import MisalignmentRateCallback, build_finetune_trainer

    cfg, w, tok, model = tiny
    ds = finetune_dataset(w, n=32)
    cb = MisalignmentRateCallback(w, tok, probe_prompts(w, 2, 1), every_n_steps=1, n_samples=1,
                                  max_new_tokens=4, verbose=False)
    trainer = build_finetune_trainer(copy.deepcopy(model), tok, ds, tmp_path, seed=0, steps=2,
                                     batch_size=4, callbacks=[cb])
    # completion-only loss: only the answer (and its end token) is trained
    row = trainer.train_dataset[0]
    labelled = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert tok.decode(labelled) == ds[0]["completion"][0]["content"] + " <|end|>"
    trainer.train()
    assert trainer.state.global_step == 2
    assert [h["step"] for h in cb.history] == [0, 1, 2]
    assert set(cb.grad_norms) == {1, 2}
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert 0 < n_trainable < 2000  # LoRA rank 1 only
