"""LoReFT (peft.pet_type loreft) against a direct implementation of the paper's equation (Wu et al. 2024):
at the chosen layers' outputs, at the first / last prompt tokens of each document, h <- h + R^T (W h + b - R h),
written here with forward hooks and per-token loops on the plain base model. peft has no LoReFT, so the adapter
is this project's format; `trainer generate` loads it, merging refuses it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.tiny_run import learns_and_resumes_exactly, tiny_setup
from trainer.config import ConfigError, load_config
from trainer.lora import load_lora_model
from trainer.reft import ReftPositions, interventions, packed_mask
from trainer.weights import load_pretrained

IGNORE = -100


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("loreft"), n_records=120, seq_length=96)


def _peft(*extra: str):
    return load_config(None, ["peft.pet_type=loreft", "peft.reft_rank=4", *extra]).peft


def test_config_keys_aliases_and_errors():
    p = load_config(None, ["peft.pet_type=loreft", "peft.rank=2", "peft.layers=0;1", "peft.position=f3+l1"]).peft
    assert (p.reft_rank, p.reft_layers, p.reft_positions) == (2, "0;1", "f3+l1")
    assert load_config(None, ["peft.pet_type=loreft", "peft.reft_layers=[1]"]).peft.reft_layers == [1]
    assert ReftPositions.parse("l5") == ReftPositions(0, 5) and str(ReftPositions(7, 7)) == "f7+l7"
    for override, message in [
        ("peft.reft_positions=x3", "expected f<k>\\+l<k>"),
        ("peft.reft_positions=f0", "selects no position"),
        ("peft.reft_rank=0", "reft_rank must be >= 1"),
        ("peft.reft_layers=first", "reft_layers 'first'"),
        ("peft.export_merged=true", "cannot be merged"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["peft.pet_type=loreft", override])
    with pytest.raises(ConfigError, match="peft.reft_rank needs peft.pet_type: loreft"):
        load_config(None, ["peft.pet_type=lora", "peft.rank=16"])  # PaddleNLP's `rank` is LoReFT's only
    with pytest.raises(ConfigError, match="conflicts with"):
        load_config(None, ["peft.pet_type=loreft", "peft.rank=2", "peft.reft_rank=3"])


def _reference_positions(doc_lengths: list[int], labels: list[int] | None, first: int, last: int) -> set[int]:
    """Flat row positions to edit: per document, the prompt runs up to the first trained label (included)."""
    chosen, start = set(), 0
    for n in doc_lengths:
        prompt = n
        if labels is not None:
            for j in range(n):
                if labels[start + j] != IGNORE:
                    prompt = j + 1
                    break
        for j in range(prompt):
            if j < first or j >= prompt - last:
                chosen.add(start + j)
        start += n
    return chosen


def test_packed_mask_selects_first_and_last_prompt_tokens_of_each_document():
    # Row 0: documents of 9 (prompt 6: first trained label at 5) and 3 (no labels: all prompt), then padding 4.
    # Row 1: one document of 16 whose prompt is 2 tokens (shorter than first + last: each position once).
    labels = torch.full((2, 16), IGNORE)
    labels[0, 5:8] = 7
    labels[1, 1:15] = 3
    cu = torch.tensor([0, 9, 12, 16, 32], dtype=torch.int32)
    mask = packed_mask(ReftPositions(2, 3), 2, 16, labels, cu, torch.device("cpu"))
    want = torch.zeros(2, 16, dtype=torch.bool)
    for row, docs in ((0, [9, 3, 4]), (1, [16])):
        for pos in _reference_positions(docs, labels[row].tolist(), 2, 3):
            want[row, pos] = True
    assert torch.equal(mask, want)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 3, 4, 5, 9, 10, 11, 12, 13, 14, 15]
    assert mask[1].nonzero().flatten().tolist() == [0, 1]


def _equation_hooks(base, tensors: dict[str, torch.Tensor], masks: torch.Tensor):
    """Hooks on `base`'s layers: h_t <- h_t + R^T (W h_t + b - R h_t) at every masked (row, t), token by token."""
    handles = []
    layers = sorted({int(k.split(".")[2]) for k in tensors})
    for i in layers:
        r = tensors[f"model.layers.{i}.reft.rotation"].double()
        w = tensors[f"model.layers.{i}.reft.source_weight"].double()
        b = tensors[f"model.layers.{i}.reft.source_bias"].double()

        def hook(module, args, out, r=r, w=w, b=b):
            out = out.clone()
            for row, t in masks.nonzero().tolist():
                h = out[row, t].double()
                out[row, t] = (h + r.t() @ (w @ h + b - r @ h)).to(out.dtype)
            return out

        handles.append(base.model.layers[i].register_forward_hook(hook))
    return handles, layers


def _tensors(model) -> dict[str, torch.Tensor]:
    from trainer.reft import reft_state

    return reft_state(model)


def _packed_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (2, 20), generator=g)
    labels = torch.full((2, 20), IGNORE)
    labels[0, 6:10] = ids[0, 7:11]  # doc 0 (12 tokens): prompt 7
    labels[0, 15:18] = ids[0, 16:19]  # doc 1 (8 tokens): prompt 4
    labels[1, 9:19] = ids[1, 10:20]  # one doc: prompt 10
    cu = torch.tensor([0, 12, 20, 40], dtype=torch.int32)
    docs = [[12, 8], [20]]
    return ids, labels, cu, docs


@pytest.mark.parametrize("layers, positions", [("all", "f2+l2"), ("1", "l3"), ("[0]", "f5")])
def test_forward_is_the_papers_equation_on_the_chosen_layers_and_positions(tiny, layers, positions):
    _, model_dir, _ = tiny
    model = load_lora_model(str(model_dir), _peft(f"peft.reft_layers={layers}", f"peft.reft_positions={positions}"),
                            seed=3).eval()
    base = load_pretrained(model_dir).eval()
    spec = ReftPositions.parse(positions)
    tensors = _tensors(model)
    for r in (t for k, t in tensors.items() if k.endswith("rotation")):
        torch.testing.assert_close(r @ r.t(), torch.eye(4), atol=1e-5, rtol=0)
    ids, labels, cu, docs = _packed_batch()
    want_mask = torch.zeros(2, 20, dtype=torch.bool)
    for row in range(2):
        for pos in _reference_positions(docs[row], labels[row].tolist(), spec.first, spec.last):
            want_mask[row, pos] = True
    handles, hooked = _equation_hooks(base, tensors, want_mask)
    assert [i for i, _ in interventions(model)] == hooked
    with torch.no_grad():
        loss = model(ids, cu_seqlens=cu, max_seqlen=20, labels=labels)
        ref_logits = base(ids, cu_seqlens=cu, max_seqlen=20)
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, 300).double(), labels.flatten(), reduction="sum",
                               ignore_index=IGNORE)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-4, rtol=1e-5)
    for h in handles:
        h.remove()
    # Without labels every document is prompt throughout (what generation's prefill sees).
    whole = torch.zeros(2, 20, dtype=torch.bool)
    for row in range(2):
        for pos in _reference_positions(docs[row], None, spec.first, spec.last):
            whole[row, pos] = True
    handles, _ = _equation_hooks(base, tensors, whole)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, cu_seqlens=cu, max_seqlen=20), base(ids, cu_seqlens=cu, max_seqlen=20),
                                   atol=1e-4, rtol=1e-4)
    for h in handles:
        h.remove()
    with torch.no_grad():  # the edit changes the output (the hooks were what made them equal)
        assert not torch.allclose(model(ids, cu_seqlens=cu, max_seqlen=20), base(ids, cu_seqlens=cu, max_seqlen=20),
                                  atol=1e-3)


def test_gradients_reach_only_r_w_b_and_r_stays_orthonormal(tiny):
    _, model_dir, _ = tiny
    model = load_lora_model(str(model_dir), _peft("peft.reft_positions=f3+l3"), seed=5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.reft.{p}" for i in (0, 1)
                         for p in ("rotation", "source_weight", "source_bias")}
    ids, labels, cu, _ = _packed_batch(1)
    for p in model.parameters():
        p.requires_grad_(True)  # so a gradient reaching the base would show
    model(ids, cu_seqlens=cu, max_seqlen=20, labels=labels).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    model(ids, cu_seqlens=cu, max_seqlen=20, labels=labels).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing = True  # recomputed blocks get the same mask: the same gradients
    model.train()
    model(ids, cu_seqlens=cu, max_seqlen=20, labels=labels).backward()
    for name, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, atol=1e-6, rtol=1e-5)
    model.activation_checkpointing = False
    before = {k: v.clone() for k, v in _tensors(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    for _ in range(6):
        opt.zero_grad()
        model(ids, cu_seqlens=cu, max_seqlen=20, labels=labels).backward()
        opt.step()
    after = _tensors(model)
    for key, r in after.items():
        if key.endswith("rotation"):
            assert (r - before[key]).abs().max() > 1e-2, key  # R moved
            torch.testing.assert_close(r @ r.t(), torch.eye(4), atol=1e-5, rtol=0)  # and is orthonormal


@pytest.mark.slow
def test_run_learns_resumes_exactly_and_generate_loads_the_adapter(tiny):
    from safetensors.torch import load_file

    from trainer.generate import SamplingConfig, generate, load_model
    from trainer.merge_lora import merge_lora
    from trainer.weights import WeightsError

    root, model_dir, _ = tiny
    learns_and_resumes_exactly(root, model_dir, ["peft.pet_type=loreft", "peft.reft_rank=4",
                                                 "peft.reft_positions=f3+l3"], lr=0.1)
    export = root / "straight" / "export"
    a, b = load_file(export / "adapter_model.safetensors"), load_file(root / "resumed" / "export" /
                                                                       "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOREFT" and config["layers"] == [0, 1] and config["positions"] == "f3+l3"

    # Generation: the adapter alone (base from its config) and the run's checkpoint give the equation's logits
    # for a prompt (prefill edits its first / last 3 tokens) and the same greedy tokens as decoding by full
    # recomputation with only the prompt positions edited.
    prompt = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    base = load_pretrained(model_dir).eval()
    for loaded in (load_model(export), load_model(root / "straight")):
        assert loaded.kind in ("hf+adapter", "checkpoint")
        model = loaded.model
        edit = torch.zeros(1, 9, dtype=torch.bool)
        edit[0, [0, 1, 2, 6, 7, 8]] = True
        handles, _ = _equation_hooks(base, a, edit)
        with torch.no_grad():
            torch.testing.assert_close(model(prompt), base(prompt), atol=1e-4, rtol=1e-4)
        for h in handles:
            h.remove()
        tokens = generate(model, [prompt[0].tolist()], SamplingConfig(max_new_tokens=5))[0].tokens
        seq = prompt[0].tolist()
        for _ in range(5):
            mask = torch.zeros(1, len(seq), dtype=torch.bool)
            mask[0, :9] = edit[0]
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]), intervene=mask)[0, -1].argmax()))
        assert tokens == seq[9:]
    with pytest.raises(WeightsError, match="cannot be merged"):
        merge_lora(model_dir, export, root / "merged")


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_match_one_rank(tmp_path, repo_root):
    """FSDP2 over 2 gloo ranks shards each intervention with its block (rank 3: rows split unevenly) and trains
    like one process with the same global batch: same losses, same exported adapter."""
    from tests.helpers.dist_run import adapter_ranks_agree

    a = adapter_ranks_agree(tmp_path, repo_root, ["peft.pet_type=loreft", "peft.reft_rank=3",
                                                  "peft.reft_positions=f2+l4"])
    assert sorted(a) == sorted(f"model.layers.{i}.reft.{p}" for i in (0, 1)
                               for p in ("rotation", "source_weight", "source_bias"))
