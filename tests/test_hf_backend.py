"""The transformers backend (model.backend: hf) against transformers itself on tiny random models of families the
native decoder does not implement: logits, packed rows, one training step, export layout, LoRA on a MoE."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.helpers.loss_check import assert_step_loss_matches  # noqa: E402
from tests.helpers.peft_check import assert_merge_equals_peft  # noqa: E402
from tests.helpers.tiny_run import logged_losses  # noqa: E402
from trainer import hf_backend  # noqa: E402
from trainer.loss import LossConfig  # noqa: E402

V = 256
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=V, max_position_embeddings=256)
# name -> (config class, extra kwargs). Gemma 3 (text, sliding + full layers, tied, scaled embeddings), Phi-3 (fused
# qkv / gate_up), two MoEs whose experts transformers 5 fuses in memory but saves per expert, and Gemma 2
# (final logit soft-capping, eager attention).
FAMILIES = {
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                        layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", dict(pad_token_id=0, eos_token_id=1, bos_token_id=1)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, final_logit_softcapping=5.0, sliding_window=4,
                                    query_pre_attn_scalar=16)),
}


def make_hf(family: str, seed: int = 0, **overrides):
    cfg_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_name)(**{**BASE, **extra, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move norms and biases off their init values, so a missing one shows
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else 0.02))
    return model.eval()


def load_ours(model_dir, **overrides) -> hf_backend.HFCausalLM:
    model = hf_backend.build_meta_model(model_dir, overrides)
    hf_backend.materialize(model, "cpu")
    hf_backend.load_weights(model, model_dir, show_progress=False)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            make_hf(family).save_pretrained(d)
            cache[family] = d
        return cache[family]

    return get


def _ids(shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def test_backend_choice(saved, tmp_path):
    assert hf_backend.resolve_backend("auto", saved("phi3")) == "hf"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert hf_backend.resolve_backend("auto", tmp_path) == "native"
    assert hf_backend.resolve_backend("hf", tmp_path) == "hf"
    with pytest.raises(ValueError, match="auto, native or hf"):
        hf_backend.resolve_backend("torch", tmp_path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_packed_rows_match_transformers(saved, family):
    d = saved(family)
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load_ours(d).eval()
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in ref.named_parameters()}
    ids = _ids((2, 20), seed=1)
    lengths = [7, 1, 12]  # a one-token document too
    pos = torch.cat([torch.arange(n) for n in lengths]).expand(2, -1)
    cu = torch.tensor([0, 7, 8, 20, 27, 28, 40])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)
        for packed in (ours(ids, position_ids=pos), ours(ids, cu_seqlens=cu)):
            start = 0
            for n in lengths:  # each document of the packed row, alone through transformers
                alone = ref(ids[:, start:start + n]).logits
                torch.testing.assert_close(packed[:, start:start + n], alone, atol=1e-5, rtol=1e-5)
                start += n


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_step_matches_transformers(saved, family):
    d = saved(family)
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    ref.train()
    ours = load_ours(d).train()
    ours.loss_config = LossConfig("chunked", 9, ours.loss_config.softcap, ours.loss_config.logit_scale)
    ref_grads = assert_step_loss_matches(ref, ours, _ids((2, 20), seed=3))
    for name, p in ours.named_parameters():
        g = ref_grads[name].grad
        if g is None:  # an expert no token was routed to
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
            continue
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_export_writes_the_checkpoint_layout(saved, family, tmp_path):
    """Fused in memory, per expert on disk: the export has exactly the base checkpoint's keys and loads back."""
    from safetensors.torch import load_file

    from trainer.weights import export_hf

    d = saved(family)
    ours = load_ours(d)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "experts" in name:
                p.mul_(1.5)  # a change the export must carry
    export_hf(ours, tmp_path / "out", source_dir=d)
    base_keys = set(load_file(d / "model.safetensors"))
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == base_keys
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = _ids((1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours.eval()(ids), atol=1e-5, rtol=1e-5)


def test_layer_override_and_unknown_checkpoint_keys(saved, tmp_path):
    d = saved("gemma3")
    one = load_ours(d, num_hidden_layers=1)
    assert one.config.num_hidden_layers == 1 and len(hf_backend.decoder_blocks(one)) == 1
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, num_hidden_layers=1,
                                                            layer_types=["sliding_attention"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(one.eval()(_ids((1, 12))), ref(_ids((1, 12))).logits, atol=1e-5, rtol=1e-5)
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    del tensors["model.norm.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    from trainer.weights import WeightsError

    with pytest.raises(WeightsError, match=r"missing from checkpoint \(1\): model.norm.weight.*unexpected.*extra"):
        load_ours(bad)


# ------------------------------------------------------------------------------------ through `trainer run`


def hf_model_with_tokenizer(root, family: str, **overrides):
    """A tiny random transformers model of `family`, sized to a ChatML tokenizer trained here, tokenizer included."""
    from dataprep.tokenizer import load_tokenizer
    from tests.helpers.tiny_run import make_tokenizer_and_model

    native = make_tokenizer_and_model(root / "native")
    tokenizer = load_tokenizer(native)
    model = make_hf(family, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                    eos_token_id=tokenizer.eos_id, bos_token_id=None, **overrides)
    out = root / family
    model.save_pretrained(out)
    for f in native.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    from tests.helpers.tiny_run import pack_rows

    root = tmp_path_factory.mktemp("moe")
    model_dir = hf_model_with_tokenizer(root, "qwen3_moe")
    data_dir = pack_rows(model_dir, root / "data", n_records=60, seq_length=96)
    return root, model_dir, data_dir


def _moe_config(root, model_dir, data_dir, name, *extra):
    from trainer.config import load_config

    return load_config(None, [
        f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={root / name}",
        "logging.progress_bar=false", "train.lr=1e-2", "train.seed=5", "train.deterministic=true", "train.schedule=constant",
        "data.micro_batch_size=2", "peft.pet_type=lora", "peft.lora_rank=4",
        r"peft.target_modules=.*self_attn\.(q|k|v|o)_proj", *extra,
    ])


@pytest.mark.slow
def test_moe_lora_trains_resumes_exactly_and_exports_peft(moe_run):
    """LoRA on a Qwen3-MoE's attention projections (experts frozen): learns, resumes bit for bit, and its
    PEFT adapter and merge-lora output agree through transformers."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from trainer.loop import train

    root, model_dir, data_dir = moe_run
    straight = train(_moe_config(root, model_dir, data_dir, "straight", "train.max_steps=8"))
    assert straight.losses[-1] < straight.losses[0]
    assert 0 < straight.trainable_params < 0.1 * straight.total_params
    train(_moe_config(root, model_dir, data_dir, "resumed", "train.max_steps=4", "checkpoint.every_steps=4"))
    resumed = train(_moe_config(root, model_dir, data_dir, "resumed", "train.max_steps=8", "checkpoint.every_steps=4"))
    assert logged_losses(root / "resumed") == logged_losses(root / "straight") == straight.losses
    assert resumed.steps == 8

    export = root / "straight" / "export"
    tensors = load_file(export / "adapter_model.safetensors")
    assert tensors and all(".lora_" in k and "self_attn" in k for k in tensors)  # experts frozen: nothing else
    assert_merge_equals_peft(model_dir, export, root / "merged")


@pytest.mark.slow
def test_moe_lora_with_experts_trained_in_full(moe_run):
    """freeze_exclude '*.experts.*' trains the fused expert weights next to the adapters; they are exported as PEFT
    modules_to_save, and merge-lora writes them back per expert, as the base checkpoint stores them."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from trainer.loop import train
    from trainer.merge_lora import merge_lora

    root, model_dir, data_dir = moe_run
    train(_moe_config(root, model_dir, data_dir, "experts", "train.max_steps=3",
                      "peft.freeze_exclude=['*.experts.*']"))
    export = root / "experts" / "export"
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    merge_lora(model_dir, export, root / "experts-merged", show_progress=False)
    assert set(load_file(root / "experts-merged" / "model.safetensors")) == set(load_file(model_dir / "model.safetensors"))
    load = transformers.AutoModelForCausalLM.from_pretrained
    tuned = peft.PeftModel.from_pretrained(load(model_dir, dtype=torch.float32), export).eval()
    merged = load(root / "experts-merged", dtype=torch.float32).eval()
    base = load(model_dir, dtype=torch.float32)
    assert not torch.equal(merged.model.layers[0].mlp.experts.down_proj, base.model.layers[0].mlp.experts.down_proj)
    ids = torch.randint(0, merged.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_match_one_rank_on_the_hf_backend(tmp_path, repo_root):
    """FSDP2 over 2 gloo ranks trains a Gemma 3 (tied, sliding-window layers) to the same losses and export as 1 rank."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from tests.helpers.dist_run import assert_ranks_agree, assert_same_tensors

    if not dist.is_gloo_available():
        pytest.skip("torch was built without gloo")
    model_dir = hf_model_with_tokenizer(tmp_path, "gemma3")
    one, _ = assert_ranks_agree(tmp_path, repo_root, "train.lr=3e-3", "model.backend=hf", steps=4,
                                model_dir=model_dir)
    assert one[-1] < one[0]
    a = assert_same_tensors(tmp_path / "one" / "export" / "model.safetensors",
                            tmp_path / "two" / "export" / "model.safetensors")
    assert a.keys() == set(load_file(model_dir / "model.safetensors"))


def test_activation_checkpointing_keeps_loss_and_grads(saved):
    """model.activation_checkpointing on the hf backend (transformers' own, non-reentrant) changes nothing numerically."""
    d = saved("phi3")
    ids = _ids((1, 16), seed=4)
    labels = ids.roll(-1, 1)
    grads = []
    for on in (False, True):
        ours = load_ours(d).train()
        if on:
            hf_backend.enable_activation_checkpointing(ours)
            assert any(getattr(m, "gradient_checkpointing", False) for m in ours.modules())
        loss = ours(ids, labels=labels)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, msg=name)


@pytest.mark.slow
def test_native_and_hf_backends_train_alike(tmp_path):
    """The same Qwen3 run on both backends (native decoder vs transformers' model): same losses, same export."""
    from safetensors.torch import load_file

    from tests.helpers.tiny_run import make_tokenizer_and_model, pack_rows
    from trainer.config import load_config
    from trainer.loop import train

    model_dir = make_tokenizer_and_model(tmp_path)
    data_dir = pack_rows(model_dir, tmp_path / "data", n_records=60, seq_length=96)
    runs = {}
    for backend in ("native", "hf"):
        runs[backend] = train(load_config(None, [
            f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={tmp_path / backend}",
            "logging.progress_bar=false", "train.lr=3e-3", "train.max_steps=4", "train.seed=2",
            "data.micro_batch_size=2", f"model.backend={backend}",
        ])).losses
    assert runs["hf"] == pytest.approx(runs["native"], rel=1e-4)
    a = load_file(tmp_path / "native" / "export" / "model.safetensors")
    b = load_file(tmp_path / "hf" / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    base = load_file(model_dir / "model.safetensors")
    for key in a:
        # AdamW normalises each gradient element, so rounding-level gradient differences can move an element whose
        # gradient is ~0 by up to lr per step; compare against the size of the update itself.
        moved = (a[key] - base[key]).abs().mean()
        diff = (b[key] - a[key]).abs()
        assert diff.mean() < 1e-4 * moved and diff.max() < 1e-4, (key, float(diff.mean() / moved), float(diff.max()))
