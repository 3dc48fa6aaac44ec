"""Generation against transformers' `generate` on tiny random checkpoints of every native family.

Greedy decoding must give exactly the tokens transformers gives: full checkpoints, PEFT adapters applied without
merging, and models merged by `trainer merge-lora`; one prompt at a time and left-padded batches. Right-padded
batches must give what left-padded ones give. The logits processors are checked against transformers' own.
"""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import FAMILIES, checkpoint_factory

from trainer.generate import SamplingConfig, generate, generate_padded, left_pad, load_model, process_logits

transformers = pytest.importorskip("transformers")

V = 256
NEW = 16


def _prompts(seed: int = 0, lengths=(5, 13, 9)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, V, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(hf, prompts, stop: int | list[int] | None, new: int = NEW, **kw) -> list[list[int]]:
    """transformers' greedy tokens per prompt, cut after the first stop token, from one left-padded batch."""
    tok_pad = 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok_pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          eos_token_id=stop, pad_token_id=tok_pad, **kw)
    stops = set([stop] if isinstance(stop, int) else stop or [])
    result = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return checkpoint_factory(tmp_path_factory)


def _stop_from(hf, prompt) -> int:
    """A token the model emits a few steps in, so that stopping is exercised."""
    return _hf_greedy(hf, [prompt], None)[0][5]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers_batch_one_and_padded(checkpoint, family):
    hf, d = checkpoint(family)
    ours = load_model(d).model
    prompts = _prompts()
    stop = _stop_from(hf, prompts[0])
    cfg = SamplingConfig(max_new_tokens=NEW, stop_ids=(stop,))
    batched = generate(ours, prompts, cfg)
    singles = [generate(ours, [p], cfg)[0] for p in prompts]
    ref_singles = [_hf_greedy(hf, [p], stop)[0] for p in prompts]
    ref_batched = _hf_greedy(hf, prompts, stop)
    assert [g.tokens for g in singles] == ref_singles
    assert [g.tokens for g in batched] == ref_batched
    assert batched[0].stop_reason == "stop" and batched[0].tokens[-1] == stop and len(batched[0].tokens) <= 6
    for g in batched:
        assert g.stop_reason == ("stop" if g.tokens[-1] == stop else "length")
        assert g.stop_reason == "stop" or len(g.tokens) == NEW


@pytest.mark.parametrize("family", ["llama", "mistral_window"])
def test_right_padding_gives_what_left_padding_gives(checkpoint, family):
    _, d = checkpoint(family)
    ours = load_model(d).model
    prompts = _prompts(seed=3, lengths=(4, 12, 7, 12))
    cfg = SamplingConfig(max_new_tokens=10)
    left = generate(ours, prompts, cfg)
    width = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    right = generate_padded(ours, ids, mask, cfg)
    assert [g.tokens for g in right] == [g.tokens for g in left]
    assert [g.prompt_tokens for g in right] == [len(p) for p in prompts]


def _peft_adapter(hf, out_dir, seed: int, **lora_kw):
    """A random (non-zero) PEFT LoRA adapter on `hf`, saved with save_pretrained; returns the PeftModel."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, **lora_kw)
    model = peft.get_peft_model(hf, config)
    with torch.no_grad():  # make the adapters matter: a large random update on every adapted layer
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    model.eval()
    model.save_pretrained(out_dir)
    return model


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_unmerged_and_merged_match_peft(checkpoint, family, tmp_path):
    from trainer.merge_lora import merge_lora

    _, base_dir = checkpoint(family)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    hf_base.config._attn_implementation = "eager"
    prompts = _prompts(seed=1)
    base_tokens = _hf_greedy(hf_base, prompts, None)
    peft_model = _peft_adapter(hf_base, tmp_path / "adapter", seed=5, target_modules=ALL_LINEAR)
    ref = _hf_greedy(peft_model, prompts, None)
    assert ref != base_tokens  # the adapter changes what the model says, so the comparison below means something

    cfg = SamplingConfig(max_new_tokens=NEW)
    loaded = load_model(base_dir, tmp_path / "adapter")
    assert loaded.kind == "hf+adapter"
    assert [g.tokens for g in generate(loaded.model, prompts, cfg)] == ref
    assert [generate(loaded.model, [p], cfg)[0].tokens for p in prompts] == ref

    merge_lora(base_dir, tmp_path / "adapter", tmp_path / "merged", show_progress=False)
    merged_ref = _hf_greedy(peft_model.merge_and_unload(), prompts, None)
    assert merged_ref == ref
    merged = load_model(tmp_path / "merged")
    assert [g.tokens for g in generate(merged.model, prompts, cfg)] == merged_ref


def test_dora_and_embedding_adapters_match_peft(checkpoint, tmp_path):
    _, base_dir = checkpoint("llama")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    hf_base.config._attn_implementation = "eager"
    prompts = _prompts(seed=2)
    emb = _peft_adapter(hf_base, tmp_path / "emb", seed=6, target_modules=["q_proj", "v_proj", "embed_tokens"])
    ref = _hf_greedy(emb, prompts, None)
    got = generate(load_model(base_dir, tmp_path / "emb").model, prompts, SamplingConfig(max_new_tokens=NEW))
    assert [g.tokens for g in got] == ref

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    hf_base.config._attn_implementation = "eager"
    dora = _peft_adapter(hf_base, tmp_path / "dora2", seed=7, target_modules=["q_proj", "down_proj"], use_dora=True)
    ref = _hf_greedy(dora, prompts, None)
    got = generate(load_model(base_dir, tmp_path / "dora2").model, prompts, SamplingConfig(max_new_tokens=NEW))
    assert [g.tokens for g in got] == ref


def test_lora_export_dir_alone_finds_its_base(checkpoint, tmp_path):
    import json

    _, base_dir = checkpoint("qwen3_qknorm")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = _peft_adapter(hf_base, tmp_path / "adapter", seed=8, target_modules=["q_proj", "o_proj"])
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    raw = json.loads(cfg_path.read_text())
    raw["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(raw))
    loaded = load_model(tmp_path / "adapter")
    assert loaded.kind == "hf+adapter" and loaded.base_dir == base_dir
    prompts = _prompts(seed=4)
    assert [g.tokens for g in generate(loaded.model, prompts, SamplingConfig(max_new_tokens=8))] == \
        _hf_greedy(peft_model, prompts, None, new=8)


def test_repetition_penalty_matches_transformers(checkpoint):
    hf, d = checkpoint("qwen2_bias_tied")
    ours = load_model(d).model
    changed = 0
    for p in _prompts(seed=9):
        ref = _hf_greedy(hf, [p], None, repetition_penalty=4.0)[0]
        got = generate(ours, [p], SamplingConfig(max_new_tokens=NEW, repetition_penalty=4.0))[0].tokens
        assert got == ref
        changed += got != _hf_greedy(hf, [p], None)[0]
    assert changed  # the penalty did change what was generated


def test_logits_processors_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    history = torch.randint(0, 50, (4, 7), generator=g)
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, history, True)
    for temp, k, p, rep in ((0.7, None, None, 1.0), (1.3, 5, None, 1.0), (0.9, None, 0.8, 1.0), (0.5, 10, 0.6, 1.4)):
        want = logits.clone()
        if rep != 1.0:
            want = RepetitionPenaltyLogitsProcessor(rep)(history, want)
        want = TemperatureLogitsWarper(temp)(history, want)
        if k is not None:
            want = TopKLogitsWarper(k)(history, want)
        if p is not None:
            want = TopPLogitsWarper(p)(history, want)
        got = process_logits(logits.clone(), seen, SamplingConfig(temperature=temp, top_k=k, top_p=p,
                                                                  repetition_penalty=rep))
        assert torch.equal(torch.isinf(got), torch.isinf(want)), (temp, k, p, rep)
        torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_sampling_is_seeded_and_degenerates_to_greedy(checkpoint):
    _, d = checkpoint("llama")
    ours = load_model(d).model
    prompts = _prompts(seed=11)
    greedy = [g.tokens for g in generate(ours, prompts, SamplingConfig(max_new_tokens=12))]
    hot = SamplingConfig(max_new_tokens=12, temperature=5.0, seed=1)
    a = [g.tokens for g in generate(ours, prompts, hot)]
    b = [g.tokens for g in generate(ours, prompts, hot)]
    c = [g.tokens for g in generate(ours, prompts, SamplingConfig(max_new_tokens=12, temperature=5.0, seed=2))]
    assert a == b and a != c and a != greedy
    assert [g.tokens for g in generate(ours, prompts, SamplingConfig(max_new_tokens=12, temperature=5.0, top_k=1,
                                                                     seed=3))] == greedy
    assert [g.tokens for g in generate(ours, prompts, SamplingConfig(max_new_tokens=12, temperature=0.8,
                                                                     top_p=1e-6, seed=3))] == greedy


def test_bad_settings_and_prompts_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1, 2], []], 0)


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_hf_backend_family_matches_transformers_full_adapter_and_merged(family, tmp_path):
    """Families the native decoder does not implement generate through the HF backend (transformers' own cache
    and masks): Gemma 3 has sliding-window layers and scaled embeddings, Phi-3 fused qkv / gate_up projections."""
    from test_hf_backend import make_hf

    from trainer.hf_backend import is_hf_backend
    from trainer.merge_lora import merge_lora

    base_dir = tmp_path / "base"
    make_hf(family).save_pretrained(base_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    loaded = load_model(base_dir)
    assert is_hf_backend(loaded.model)
    prompts = _prompts(seed=4)
    stop = _stop_from(hf, prompts[0])
    cfg = SamplingConfig(max_new_tokens=NEW, stop_ids=(stop,))
    assert [g.tokens for g in generate(loaded.model, prompts, cfg)] == _hf_greedy(hf, prompts, stop)
    assert [generate(loaded.model, [p], cfg)[0].tokens for p in prompts] == [_hf_greedy(hf, [p], stop)[0]
                                                                             for p in prompts]

    base_tokens = _hf_greedy(hf, prompts, None)
    peft_model = _peft_adapter(hf, tmp_path / "adapter", seed=7, target_modules=["o_proj", "down_proj"])
    ref = _hf_greedy(peft_model, prompts, None)
    assert ref != base_tokens  # the adapter changes what the model says, so the comparisons below mean something
    plain = SamplingConfig(max_new_tokens=NEW)
    adapted = load_model(base_dir, tmp_path / "adapter")
    assert adapted.kind == "hf+adapter" and is_hf_backend(adapted.model)
    assert [g.tokens for g in generate(adapted.model, prompts, plain)] == ref
    merge_lora(base_dir, tmp_path / "adapter", tmp_path / "merged", show_progress=False)
    assert [g.tokens for g in generate(load_model(tmp_path / "merged").model, prompts, plain)] == ref
