"""Our decoder against transformers on tiny random checkpoints: logits, packed rows, one training step."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from tiny_checkpoints import FAMILIES, checkpoint_factory, save_hf_checkpoint

from trainer import attention
from trainer.model import Transformer, positions_from_cu_seqlens
from trainer.model_config import ModelConfig
from trainer.weights import load_pretrained

pytest.importorskip("transformers")

V = 256


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """family -> (transformers model, our model loaded from its save_pretrained directory)."""
    built = checkpoint_factory(tmp_path_factory)

    @functools.cache
    def get(family: str):
        hf, d = built(family)
        return hf, load_pretrained(d).eval(), d

    return get


def _ids(shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(pair, family):
    hf, ours, _ = pair(family)
    ids = _ids((2, 24))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert out.shape == (2, 24, V)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def _pack(docs_per_row: list[list[torch.Tensor]], seqlen: int):
    """Build a collate-style batch: rows of documents, padding tail as its own segment."""
    rows, pos, bounds = [], [], [0]
    offset = 0
    for docs in docs_per_row:
        row = torch.cat(docs)
        pad = seqlen - row.numel()
        p = [torch.arange(d.numel()) for d in docs]
        lengths = [d.numel() for d in docs]
        if pad:
            row = torch.cat([row, torch.zeros(pad, dtype=row.dtype)])
            p.append(torch.arange(pad))
            lengths.append(pad)
        for n in lengths:
            bounds.append(bounds[-1] + n)
        rows.append(row)
        pos.append(torch.cat(p))
        offset += seqlen
    cu = torch.tensor(bounds, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return torch.stack(rows), torch.stack(pos), cu, max_len


@pytest.mark.parametrize("family", ["llama3_rope_tied", "qwen2_bias_tied", "qwen3_qknorm", "mistral_window"])
def test_packed_row_matches_each_document_alone(pair, family):
    hf, ours, _ = pair(family)
    lengths = [[7, 9, 5], [12, 11], [24]]  # padding tails of 3 and 1 tokens in the first two rows
    docs = [[_ids((n,), seed=10 * r + i) for i, n in enumerate(row)] for r, row in enumerate(lengths)]
    ids, pos, cu, max_len = _pack(docs, 24)
    with torch.no_grad():
        out = ours(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=max_len)
        for r, row in enumerate(docs):
            start = 0
            for doc in row:
                alone = hf(doc[None]).logits[0]
                torch.testing.assert_close(out[r, start : start + doc.numel()], alone, atol=1e-4, rtol=0)
                start += doc.numel()
        # Without the segment structure the later documents would see the earlier ones: the test can fail.
        unmasked = ours(ids)
    assert (unmasked[0, 7:21] - out[0, 7:21]).abs().max() > 1e-3


def test_position_ids_default_to_restarting_per_segment(pair):
    _, ours, _ = pair("llama")
    ids, pos, cu, max_len = _pack([[_ids((5,)), _ids((8,), 1)], [_ids((10,), 2)]], 16)
    assert torch.equal(positions_from_cu_seqlens(cu, 2, 16), pos)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, cu_seqlens=cu), ours(ids, position_ids=pos, cu_seqlens=cu))


def test_segment_mask_blocks_cross_document_attention():
    cu = torch.tensor([0, 3, 4, 6, 8], dtype=torch.int32)  # two rows of 4 tokens: [3, 1] and [2, 2]
    ctx = attention.prepare("sdpa", 2, 4, torch.device("cpu"), torch.float32, cu_seqlens=cu)
    mask = ctx.masks[None][:, 0]
    expected_row0 = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool
    )
    expected_row1 = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask[0], expected_row0)
    assert torch.equal(mask[1], expected_row1)


def _hf_labels(ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return labels


@pytest.mark.parametrize("family", ["llama", "qwen2_bias_tied", "qwen3_qknorm"])
def test_training_step_matches_transformers(pair, family):
    hf, ours, d = pair(family)
    hf = hf.train()
    ours = load_pretrained(d).train()  # fresh copy: gradients must not leak between tests
    ids = _ids((2, 20), seed=3)
    hf_labels = _hf_labels(ids, prompt_len=6)
    # Pre-shifted labels as the packer writes them: position i predicts token i+1; last position -100.
    labels = torch.full_like(hf_labels, -100)
    labels[:, :-1] = hf_labels[:, 1:]
    num_trainable = int((labels != -100).sum())

    hf.zero_grad()
    ref_loss = hf(ids, labels=hf_labels).loss
    ref_loss.backward()

    logits = ours(ids)
    loss = F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100, reduction="sum") / num_trainable
    loss.backward()

    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    ref_grads = {n: p.grad for n, p in hf.named_parameters()}
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert ours_grads.keys() == ref_grads.keys()
    for name, g in ours_grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    hf.eval()


def test_reduced_depth_override_matches_transformers(tmp_path):
    import transformers

    save_hf_checkpoint("qwen3_qknorm", tmp_path)
    ours = load_pretrained(tmp_path, num_hidden_layers=1).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, num_hidden_layers=1, attn_implementation="eager")
    ids = _ids((1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)
    assert len(ours.model.layers) == 1
    assert ours.config.hf_config["num_hidden_layers"] == 1
    assert ours.config.hf_config["layer_types"] == ["full_attention"]


def test_llama3_rope_scaling_changes_frequencies():
    hf = {"model_type": "llama", "vocab_size": 8, "hidden_size": 64, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 500000.0}
    from trainer.model import rope_inv_freq

    plain = rope_inv_freq(ModelConfig.from_hf(hf))
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    scaled = rope_inv_freq(ModelConfig.from_hf({**hf, "rope_scaling": llama3}))
    assert scaled[0] == plain[0]  # wavelength 2*pi < 64/4: high frequency, kept
    assert plain[1] / 8 < scaled[1] < plain[1]  # wavelength ~32, between 64/4 and 64/1: blended
    torch.testing.assert_close(scaled[-1], plain[-1] / 8)  # long wavelengths are slowed by the factor


def test_config_errors_name_the_problem():
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 16, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="gpt2"):
        ModelConfig.from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="dynamic"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    with pytest.raises(ValueError, match="attn_backend"):
        ModelConfig.from_hf(base, attn_backend="flash9")
    with pytest.raises(ValueError, match="varlen"):
        attention.resolve_backend("varlen", torch.device("cpu"), torch.float32)


def test_meta_build_has_hf_names_and_tied_head():
    hf = {"model_type": "qwen3", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 8,
          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
          "tie_word_embeddings": True}
    cfg = ModelConfig.from_hf(hf)
    with torch.device("meta"):
        model = Transformer(cfg)
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.1.self_attn.q_norm.weight" in names
    assert "model.layers.0.mlp.down_proj.weight" in names
    assert "lm_head.weight" not in names  # tied: one parameter, listed once
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_gpu_backends_match_sdpa_on_packed_rows(pair, backend):
    _, _, d = pair("mistral_window")
    lengths = [[70, 90, 50], [128, 60]]
    docs = [[_ids((n,), seed=10 * r + i) for i, n in enumerate(row)] for r, row in enumerate(lengths)]
    ids, pos, cu, max_len = _pack(docs, 256)
    ids, pos, cu = ids.cuda(), pos.cuda(), cu.cuda()
    model = load_pretrained(d, device="cuda", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        model.config.attn_backend = "sdpa"
        ref = model(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=max_len).float()
        model.config.attn_backend = backend
        out = model(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=max_len).float()
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_backend_trains_like_sdpa(pair):
    _, _, d = pair("qwen3_qknorm")
    docs = [[_ids((n,), seed=n) for n in row] for row in [[100, 80, 60], [200, 56]]]
    ids, pos, cu, max_len = _pack(docs, 256)
    ids, pos, cu = ids.cuda(), pos.cuda(), cu.cuda()
    labels = torch.roll(ids, -1, dims=1)
    assert attention.resolve_backend("auto", ids.device, torch.bfloat16) == "varlen"
    grads = {}
    for backend in ("sdpa", "auto"):
        model = load_pretrained(d, device="cuda", dtype=torch.bfloat16, attn_backend=backend)
        logits = model(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=max_len)
        F.cross_entropy(logits.float().view(-1, V), labels.view(-1), reduction="sum").backward()
        grads[backend] = {n: p.grad.float() for n, p in model.named_parameters()}
    for name, g in grads["auto"].items():
        ref = grads["sdpa"][name]
        assert (g - ref).norm() <= 0.05 * ref.norm() + 1e-3, name


def test_from_hf_reads_transformers4_style_configs():
    """Real Hub configs written by transformers 4.x: top-level rope_theta, rope_scaling dicts, no layer_types."""
    llama31 = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               "torch_dtype": "bfloat16"}
    cfg = ModelConfig.from_hf(llama31, num_hidden_layers=4)
    assert (cfg.rope_theta, cfg.rope_scaling["rope_type"], cfg.head_dim) == (500000.0, "llama3", 128)
    assert cfg.num_hidden_layers == 4 and cfg.hf_config["num_hidden_layers"] == 4
    assert cfg.num_params() == 2 * 128256 * 4096 + 4 * 218112000 + 4096
    qwen25 = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
              "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1e6,
              "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
              "rope_scaling": None}
    cfg = ModelConfig.from_hf(qwen25)
    assert cfg.qkv_bias and not cfg.o_proj_bias and cfg.rope_scaling is None
    assert cfg.sliding_windows == [None] * 28
    mistral01 = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "sliding_window": 4096, "rope_theta": 10000.0}
    assert ModelConfig.from_hf(mistral01, num_hidden_layers=2).sliding_windows == [4096, 4096]
    old_style = {**llama31, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert ModelConfig.from_hf(old_style).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    v5 = {**mistral01, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    cfg = ModelConfig.from_hf(v5, rope_theta=1e6)
    assert cfg.rope_theta == 1e6 and cfg.hf_config["rope_parameters"]["rope_theta"] == 1e6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_gpu_compiled_blocks_match_eager(pair, backend):
    _, _, d = pair("qwen2_bias_tied")
    docs = [[_ids((n,), seed=n) for n in row] for row in [[100, 80, 60], [200, 56]]]
    ids, pos, cu, max_len = _pack(docs, 256)
    ids, pos, cu = ids.cuda(), pos.cuda(), cu.cuda()
    model = load_pretrained(d, device="cuda", dtype=torch.bfloat16, attn_backend=backend).eval()
    with torch.no_grad():
        eager = model(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=max_len)
        for i, block in enumerate(model.model.layers):
            model.model.layers[i] = torch.compile(block)
        compiled = model(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=max_len)
    torch.testing.assert_close(compiled.float(), eager.float(), atol=5e-2, rtol=5e-2)
