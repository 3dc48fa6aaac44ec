"""Prefix tuning (peft.pet_type prefix_tuning) against peft's PrefixTuning on the same tiny HF Qwen3 checkpoint
(peft and transformers are test-only references): the same prefix gives the same logits and the same gradients,
packed documents equal the documents alone, a saved adapter loads in `PeftModel.from_pretrained` and reproduces
our logits, and `trainer generate` loads it. With prefix_projection, peft's PrefixEncoder MLP with our weights
copied in gives the same logits and the same gradients of its embedding and both Linear layers, and its init is
peft's under the same seed."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny_run import learns_and_resumes_exactly, tiny_setup
from trainer.config import ConfigError, load_config
from trainer.lora import count_parameters, load_lora_model
from trainer.prefix import PrefixError, prefix_state, prefixes

P = 5  # virtual tokens
HIDDEN = 24  # the projection MLP's width in these tests (peft's default, kv heads x head_dim, would be 32)
PROJECTION = ["peft.prefix_projection=true", f"peft.encoder_hidden_size={HIDDEN}"]
# The projection MLP's parameters, ours (`model.prefix.*`) named as peft's prompt encoder's.
MLP = ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("prefix"), n_records=120, seq_length=96)


def _peft(*extra: str):
    return load_config(None, ["peft.pet_type=prefix_tuning", f"peft.num_virtual_tokens={P}", *extra]).peft


def _reference(model_dir, prompt_embeddings: torch.Tensor | None = None, mlp_of=None):
    """peft's PrefixTuning on the HF model, its prefix set to ours (`prompt_embeddings`, our file's tensor), or,
    with `mlp_of` (our model), peft's prefix_projection encoder with our MLP's weights copied in."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    extra = {"prefix_projection": True, "encoder_hidden_size": HIDDEN} if mlp_of is not None else {}
    ref = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **extra))
    encoder = ref.prompt_encoder["default"]
    with torch.no_grad():
        if prompt_embeddings is not None:
            encoder.embedding.weight.copy_(prompt_embeddings)
        if mlp_of is not None:
            for name in MLP:
                encoder.get_parameter(name).copy_(mlp_of.get_parameter(f"model.prefix.{name}"))
    return ref


def test_config_keys_and_paddlenlp_aliases():
    p = load_config(None, ["peft.prefix_tuning=true", "peft.num_prefix_tokens=7"]).peft  # PaddleNLP's names
    assert (p.pet_type, p.num_virtual_tokens) == ("prefix_tuning", 7)
    with pytest.raises(ConfigError, match="peft.num_virtual_tokens needs peft.pet_type: prefix_tuning"):
        load_config(None, ["peft.pet_type=lora", "peft.num_prefix_tokens=16"])
    with pytest.raises(ConfigError, match="conflicts with peft.pet_type lora"):
        load_config(None, ["peft.pet_type=lora", "peft.prefix_tuning=true"])


def test_projection_config_keys():
    """peft's default hidden size is left to the model (null here); PaddleNLP's name is an alias."""
    p = _peft("peft.prefix_projection=true")
    assert (p.prefix_projection, p.encoder_hidden_size) == (True, None)
    p = load_config(None, ["peft.prefix_tuning=true", "peft.prefix_projection=true",
                           "peft.prefix_projection_hidden_size=48"]).peft
    assert (p.pet_type, p.encoder_hidden_size) == ("prefix_tuning", 48)
    for key in ("prefix_projection=true", "encoder_hidden_size=8"):
        with pytest.raises(ConfigError, match=f"peft.{key.split('=')[0]} needs peft.pet_type: prefix_tuning"):
            load_config(None, ["peft.pet_type=lora", f"peft.{key}"])


@pytest.mark.parametrize("overrides, message", [
    (["peft.num_virtual_tokens=0"], "num_virtual_tokens must be >= 1"),
    (["peft.encoder_hidden_size=16"], "encoder_hidden_size = 16 sizes the prefix_projection MLP; it needs "
                                      "peft.prefix_projection: true"),
    (["peft.prefix_projection=true", "peft.encoder_hidden_size=0"], "encoder_hidden_size = 0 must be >= 1"),
    (["peft.export_merged=true"], "cannot be merged"),
    (["peft.modules_to_save=[lm_head]"], "not supported with pet_type prefix_tuning"),
])
def test_config_refuses(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["peft.pet_type=prefix_tuning", *overrides])


def test_refuses_backends_that_cannot_take_a_prefix(tiny):
    _, model_dir, _ = tiny
    for backend in ("flex", "varlen"):
        with pytest.raises(PrefixError, match=f"attn_backend '{backend}' cannot attend to the prefix"):
            load_lora_model(str(model_dir), _peft(), seed=0, attn_backend=backend)


def test_same_logits_and_adapter_gradients_as_peft(tiny):
    _, model_dir, _ = tiny
    model = load_lora_model(str(model_dir), _peft(), seed=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.prefix.{w}" for i in (0, 1) for w in ("key", "value")}
    emb = prefix_state(model)["prompt_embeddings"]
    assert emb.shape == (P, 2 * 2 * 2 * 16)  # layers x (key, value) x kv heads x head_dim
    ref = _reference(model_dir, emb)
    ids = torch.randint(0, 300, (1, 17), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)

    ours = model(ids)
    want = ref(input_ids=ids).logits
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    # The prefix is not a no-op (peft's default init is N(0, 1)) and the positions after it matter: without
    # the shift of the real tokens' RoPE positions by P the logits differ.
    base = _reference(model_dir).get_base_model()
    assert not torch.allclose(base(input_ids=ids).logits, want, atol=1e-2)
    with torch.no_grad():  # positions 0.. for the real tokens (the model adds P to what it is given)
        unshifted = model(ids, position_ids=torch.arange(17)[None] - P)
    assert not torch.allclose(unshifted, want, atol=1e-3)

    loss = torch.nn.functional.cross_entropy(ours[0], labels[0], reduction="sum")
    loss.backward()
    ref_loss = torch.nn.functional.cross_entropy(ref(input_ids=ids).logits[0], labels[0], reduction="sum")
    ref_loss.backward()
    grad = ref.prompt_encoder["default"].embedding.weight.grad.view(P, 2, 2, 2, 16)  # [P, layer, k/v, head, d]
    for i, module in prefixes(model):
        torch.testing.assert_close(module.key.grad, grad[:, i, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(module.value.grad, grad[:, i, 1], atol=1e-5, rtol=1e-4)
        assert module.key.grad.abs().sum() > 0 and module.value.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing = True  # recomputed blocks attend to the same prefix: the same gradients
    model.train()
    torch.nn.functional.cross_entropy(model(ids)[0], labels[0], reduction="sum").backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5)


def test_projection_same_logits_and_mlp_gradients_as_peft(tiny):
    """prefix_projection: peft's PrefixEncoder with our MLP's weights gives our logits and the same gradients of
    the embedding and both Linear layers; the MLP runs once per forward (not per layer, not again in the
    recomputation of checkpointed blocks), and the trainable count is the MLP's exactly."""
    _, model_dir, _ = tiny
    model = load_lora_model(str(model_dir), _peft(*PROJECTION), seed=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.prefix.{name}" for name in MLP}
    assert not prefixes(model)  # the layers hold no prefix of their own
    token_dim, out = 2 * 16, 2 * 2 * 2 * 16  # kv heads x head_dim; layers x (key, value) x token_dim
    assert count_parameters(model).trainable_params == P * token_dim + (token_dim + 1) * HIDDEN + (HIDDEN + 1) * out
    ref = _reference(model_dir, mlp_of=model)
    calls = []
    model.model.prefix.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 300, (1, 17), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)

    ours = model(ids)
    assert len(calls) == 1
    want = ref(input_ids=ids).logits
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    base = _reference(model_dir).get_base_model()
    assert not torch.allclose(base(input_ids=ids).logits, want, atol=1e-2)

    torch.nn.functional.cross_entropy(ours[0], labels[0], reduction="sum").backward()
    torch.nn.functional.cross_entropy(ref(input_ids=ids).logits[0], labels[0], reduction="sum").backward()
    encoder = ref.prompt_encoder["default"]
    for name in MLP:
        grad = model.get_parameter(f"model.prefix.{name}").grad
        torch.testing.assert_close(grad, encoder.get_parameter(name).grad, atol=1e-5, rtol=1e-4)
        assert grad.abs().sum() > 0
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == trainable
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing = True
    model.train()
    torch.nn.functional.cross_entropy(model(ids)[0], labels[0], reduction="sum").backward()
    assert len(calls) == 2  # the recomputed blocks take their slice of this forward's MLP output
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5)


def test_projection_init_and_default_width_are_peft_s(tiny):
    """Left unset, the MLP's width is peft's default (token_dim = kv heads x head_dim, here 32), and the MLP
    starts as peft's PrefixEncoder does under `torch.manual_seed` of our generator's seed: the same draws, in
    the same order, from the same distributions."""
    import peft
    import transformers

    from trainer.peft_methods import adapter_generator
    from trainer.prefix import prefix_config

    _, model_dir, _ = tiny
    cfg = _peft("peft.prefix_projection=true")
    model = load_lora_model(str(model_dir), cfg, seed=11)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                            prefix_projection=True))
    filled = ref.peft_config["default"]
    assert filled.encoder_hidden_size == 32 == prefix_config(model, cfg, None)["encoder_hidden_size"]
    assert model.get_parameter("model.prefix.transform.0.weight").shape == (32, 32)

    torch.manual_seed(adapter_generator(11, "model.prefix").initial_seed())
    fresh = peft.PrefixEncoder(filled)
    for name in MLP:
        assert torch.equal(model.get_parameter(f"model.prefix.{name}"), fresh.get_parameter(name)), name


def test_packed_row_equals_each_document_alone(tiny):
    _, model_dir, _ = tiny
    model = load_lora_model(str(model_dir), _peft(), seed=4).eval()
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 300, (1, n), generator=g) for n in (9, 6, 5)]
    row = torch.cat(docs, 1)
    cu = torch.tensor([0, 9, 15, 20], dtype=torch.int32)
    with torch.no_grad():
        packed = model(row, cu_seqlens=cu, max_seqlen=9)
        alone = torch.cat([model(d) for d in docs], 1)
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
        # The same through the masked sdpa path (two rows: one segment crossing nothing, masks not segments).
        rows = torch.cat([row, row.flip(1)], 0)
        cu2 = torch.tensor([0, 9, 15, 20, 40], dtype=torch.int32)
        both = model(rows, cu_seqlens=cu2, max_seqlen=20)
        torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both[1:], model(row.flip(1)), atol=1e-5, rtol=1e-5)
        # ... and a document that is the peft reference's single input.
        ref = _reference(model_dir, prefix_state(model)["prompt_embeddings"]).eval()
        torch.testing.assert_close(packed[:, 9:15], ref(input_ids=docs[1]).logits, atol=1e-5, rtol=1e-5)


def test_export_loads_in_peft_and_in_generate(tiny, tmp_path):
    import peft
    import transformers

    from trainer.adapters import save_adapter
    from trainer.generate import SamplingConfig, generate, load_model
    from trainer.merge_lora import merge_lora
    from trainer.weights import WeightsError

    _, model_dir, _ = tiny
    cfg = _peft()
    model = load_lora_model(str(model_dir), cfg, seed=5).eval()
    export = save_adapter(model, tmp_path / "export", cfg, base_model=str(model_dir))
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == P
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, export).eval()
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(tuned(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)

    loaded = load_model(export)
    assert loaded.kind == "hf+adapter" and loaded.model.prefix_tokens == P
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), ours, atol=1e-5, rtol=1e-5)
    prompts = [ids[0, :7].tolist(), ids[1].tolist()]  # different lengths: left padding in the cache
    outs = generate(loaded.model, prompts, SamplingConfig(max_new_tokens=6))
    for prompt, out in zip(prompts, outs, strict=True):
        seq = list(prompt)
        for _ in range(6):  # greedy by full recomputation through peft
            with torch.no_grad():
                seq.append(int(tuned(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert out.tokens == seq[len(prompt):]
    with pytest.raises(WeightsError, match="cannot be merged"):
        merge_lora(model_dir, export, tmp_path / "merged")


def test_projection_export_is_peft_s_file_and_loads(tiny, tmp_path):
    """peft saves a projection adapter as the MLP's output with `prefix_projection: true`; our export writes the
    same config and tensor, `PeftModel.from_pretrained` reproduces our logits from it, and generation from it
    (a plain prefix in the cache) equals generation from the training model (the MLP evaluated for the cache)."""
    import peft
    import transformers
    from safetensors.torch import load_file

    from trainer.adapters import save_adapter
    from trainer.generate import SamplingConfig, generate, load_model

    _, model_dir, _ = tiny
    cfg = _peft(*PROJECTION)
    model = load_lora_model(str(model_dir), cfg, seed=6).eval()
    export = save_adapter(model, tmp_path / "export", cfg, base_model=str(model_dir))
    ref = _reference(model_dir, mlp_of=model)
    ref.save_pretrained(tmp_path / "peft")
    ours, theirs = (json.loads((d / "adapter_config.json").read_text()) for d in (export, tmp_path / "peft"))
    assert (ours["prefix_projection"], ours["encoder_hidden_size"], ours["inference_mode"]) == (True, HIDDEN, True)
    own = {"base_model_name_or_path", "peft_version", "auto_mapping"}  # where it came from, which peft wrote it
    assert {k: v for k, v in ours.items() if k not in own} == {k: v for k, v in theirs.items() if k not in own}
    a, b = (load_file(d / "adapter_model.safetensors") for d in (export, tmp_path / "peft"))
    assert a.keys() == b.keys() == {"prompt_embeddings"}
    torch.testing.assert_close(a["prompt_embeddings"], b["prompt_embeddings"], atol=1e-6, rtol=1e-6)

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, export).eval()
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(3))
    loaded = load_model(export)
    with torch.no_grad():
        logits = model(ids)
        torch.testing.assert_close(tuned(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.model(ids), logits, atol=1e-5, rtol=1e-5)
    prompts = [ids[0, :7].tolist(), ids[1].tolist()]
    sampling = SamplingConfig(max_new_tokens=6)
    assert ([o.tokens for o in generate(model, prompts, sampling)]
            == [o.tokens for o in generate(loaded.model, prompts, sampling)])


METHODS = {"plain": [], "projection": PROJECTION}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_run_learns_resumes_exactly_and_checkpoint_generates(tiny, tmp_path, method):
    from safetensors.torch import load_file

    from trainer.generate import load_model

    _, model_dir, _ = tiny
    root = tmp_path
    learns_and_resumes_exactly(root, model_dir, ["peft.pet_type=prefix_tuning", f"peft.num_virtual_tokens={P}",
                                                 *METHODS[method]], lr=5e-2)
    a = load_file(root / "straight" / "export" / "adapter_model.safetensors")
    b = load_file(root / "resumed" / "export" / "adapter_model.safetensors")
    assert a.keys() == b.keys() == {"prompt_embeddings"} and torch.equal(a["prompt_embeddings"],
                                                                         b["prompt_embeddings"])
    ids = torch.randint(0, 300, (1, 11), generator=torch.Generator().manual_seed(4))
    from_export, from_ckpt = load_model(root / "straight" / "export"), load_model(root / "resumed")
    assert from_ckpt.kind == "checkpoint"
    with torch.no_grad():
        torch.testing.assert_close(from_ckpt.model(ids), from_export.model(ids), atol=1e-5, rtol=1e-5)
        ref = _reference(model_dir, a["prompt_embeddings"]).eval()
        torch.testing.assert_close(from_export.model(ids), ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_match_one_rank(tmp_path, repo_root, method):
    """FSDP2 over 2 gloo ranks shards each layer's prefix with its block (P = 5 slots: uneven shards), or the
    projection MLP with the root, and trains like one process with the same global batch: same losses, same
    exported adapter."""
    from tests.helpers.dist_run import adapter_ranks_agree

    a = adapter_ranks_agree(tmp_path, repo_root, ["peft.pet_type=prefix_tuning", f"peft.num_virtual_tokens={P}",
                                                  *METHODS[method]])
    assert sorted(a) == ["prompt_embeddings"]
