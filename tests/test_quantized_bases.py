"""Quantized frozen bases beyond NF4 (fp4: bitsandbytes; weight_only_int8 / weight_only_int4: torchao), checked
against each library's own quantize + dequantize of the checkpoint tensor, and through `trainer run`: the loss
falls, resume is exact, 2 ranks train like 1, and export_merged folds the adapter into the dequantized base."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.helpers.dist_run import assert_same_tensors, one_and_two_ranks
from tests.helpers.tiny_run import logged_losses, tiny_setup
from trainer.config import ConfigError, PeftSection, load_config
from trainer.lora import count_parameters, load_lora_model
from trainer.quantize import QuantizedLinear, stored_bytes

torchao_q = pytest.importorskip("torchao.quantization")
bnb_f = pytest.importorskip("bitsandbytes.functional")

ALGOS = ("fp4", "weight_only_int8", "weight_only_int4")
GROUP = 32  # the tiny model's rows are 64 or 128 long: torchao's default int4 group of 128 would skip most


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("qbases"))


def reference(algo: str, w: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """The library's dequantization of its quantization of `w`, called directly (no trainer code)."""
    if algo == "fp4":
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="fp4")
        return bnb_f.dequantize_4bit(packed, state)
    if algo == "weight_only_int8":
        return torchao_q.Int8Tensor.from_hp(w, granularity=torchao_q.PerRow()).dequantize()
    return torchao_q.IntxUnpackedToInt8Tensor.from_hp(w, block_size=(1, group), target_dtype=torch.int4).dequantize()


def _peft(algo: str, **kw) -> PeftSection:
    return PeftSection(pet_type="lora", target_modules=".*proj", weight_quantize_algo=algo,
                       weight_only_int4_group_size=GROUP, **kw)


def test_config_takes_paddlenlp_names_and_refuses_others():
    for algo in ("nf4", *ALGOS):
        assert load_config(None, ["peft.pet_type=lora", f"peft.weight_quantize_algo={algo}"]
                           ).peft.weight_quantize_algo == algo
    cfg = load_config(None, ["peft.pet_type=lora", "peft.weight_quantize_algo=weight_only_int4",
                             "peft.weight_only_int4_group_size=-1"])
    assert cfg.peft.weight_only_int4_group_size == -1
    for extra, message in [
        (["peft.weight_quantize_algo=int8"], "weight_quantize_algo: 'int8' is not one of"),
        (["peft.weight_quantize_algo=fp4", "peft.qlora_weight_double_quant_block_size=4"], "must stay 256"),
        (["peft.weight_quantize_algo=weight_only_int4", "peft.weight_only_int4_group_size=7"], "even number"),
        (["peft.weight_quantize_algo=fp4", "peft.use_dora=true"], "cannot be combined with pissa or use_dora"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["peft.pet_type=lora", *extra])


@pytest.mark.parametrize("algo", ALGOS)
def test_stored_base_dequantizes_to_the_librarys_dequantization(tiny, algo):
    _, model_dir, _ = tiny
    ckpt = load_file(model_dir / "model.safetensors")
    model = load_lora_model(str(model_dir), _peft(algo), seed=0)
    quantized = {n.replace(".base_layer", "") + ".weight": m for n, m in model.named_modules()
                 if isinstance(m, QuantizedLinear)}
    assert sorted(quantized) == sorted(k for k in ckpt if ".layers." in k and k.endswith("proj.weight"))
    for key, module in quantized.items():
        assert module.weight.dtype == torch.uint8 and not module.weight.requires_grad
        want = reference(algo, ckpt[key])
        assert torch.equal(module.dequantize(), want), key
        assert not torch.equal(want, ckpt[key])  # it really is quantized
    assert torch.equal(model.model.embed_tokens.weight, ckpt["model.embed_tokens.weight"])
    numel, stored = stored_bytes(model)
    per_weight = stored / numel
    bounds = {"fp4": (0.5, 0.8), "weight_only_int8": (1.0, 1.1), "weight_only_int4": (0.5, 0.5 + 5 / GROUP + 1e-9)}
    assert bounds[algo][0] < per_weight <= bounds[algo][1], per_weight
    # the parameter count is the model's, not the bytes the quantized weights are stored in
    plain = load_lora_model(str(model_dir), PeftSection(pet_type="lora", target_modules=".*proj"), seed=0)
    assert count_parameters(model).total_params == count_parameters(plain).total_params
    assert count_parameters(model).trainable_params == count_parameters(plain).trainable_params


def test_int4_rows_the_group_does_not_divide_stay_full_precision_and_are_reported(tiny, caplog):
    _, model_dir, _ = tiny
    cfg = PeftSection(pet_type="lora", weight_quantize_algo="weight_only_int4")  # torchao's group of 128
    with caplog.at_level("WARNING"):
        model = load_lora_model(str(model_dir), cfg, seed=0)
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    assert quantized == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]  # the 128-long rows
    assert "left in float32" in caplog.text and "model.layers.0.self_attn.q_proj" in caplog.text


@pytest.mark.parametrize("algo", ALGOS)
def test_forward_and_input_gradient_are_those_of_the_dequantized_linear(tiny, algo):
    _, model_dir, _ = tiny
    model = load_lora_model(str(model_dir), _peft(algo), seed=0)
    module = model.model.layers[1].mlp.down_proj.base_layer
    x = torch.randn(3, 5, module.in_features, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    out, want = module(x), torch.nn.functional.linear(ref_x, module.dequantize())
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-6)


def _config(root, model_dir, data_dir, name, algo, *extra):
    return load_config(None, [
        f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={root / name}",
        "logging.progress_bar=false", "train.lr=3e-2", "train.seed=7", "train.schedule=constant",
        "train.deterministic=true", "peft.pet_type=lora", "peft.lora_rank=8", "data.micro_batch_size=2",
        "peft.target_modules=.*proj", "peft.freeze_exclude=[model.norm.weight]",
        f"peft.weight_quantize_algo={algo}", f"peft.weight_only_int4_group_size={GROUP}", *extra,
    ])


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGOS)
def test_run_learns_resumes_exactly_and_merges_into_the_dequantized_base(tiny, algo):
    from trainer.loop import train

    root, model_dir, data_dir = tiny
    straight = train(_config(root, model_dir, data_dir, f"{algo}-straight", algo, "train.max_steps=24",
                             "peft.export_merged=true"))
    first, last = sum(straight.losses[:4]) / 4, sum(straight.losses[-4:]) / 4
    assert last < first - 0.2, straight.losses
    train(_config(root, model_dir, data_dir, f"{algo}-resumed", algo, "train.max_steps=12",
                  "checkpoint.every_steps=12"))
    train(_config(root, model_dir, data_dir, f"{algo}-resumed", algo, "train.max_steps=24",
                  "checkpoint.every_steps=12"))
    assert logged_losses(root / f"{algo}-resumed") == straight.losses
    # Merged = the library's dequantized base + s B A, for every adapted Linear; the rest as in the checkpoint.
    # (Without export_merged's dequantized base the merge would differ by the whole quantization error.)
    ckpt = load_file(model_dir / "model.safetensors")
    adapter = load_file(root / f"{algo}-straight" / "export" / "adapter_model.safetensors")
    merged = load_file(root / f"{algo}-straight" / "export-merged" / "model.safetensors")
    scaling = 16.0 / 8
    checked = 0
    for key, base in ckpt.items():
        if ".layers." in key and key.endswith("proj.weight"):
            module = "base_model.model." + key.removesuffix(".weight")
            b, a = adapter[f"{module}.lora_B.weight"], adapter[f"{module}.lora_A.weight"]
            torch.testing.assert_close(merged[key], reference(algo, base) + scaling * (b @ a), rtol=0, atol=1e-6)
            checked += 1
        elif key != "model.norm.weight":  # trained in full (freeze_exclude): the adapter's copy replaces it
            assert torch.equal(merged[key], base), key
    assert checked == 14


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")
@pytest.mark.parametrize("algo", ALGOS)
def test_two_ranks_train_like_one(tmp_path, repo_root, tiny, algo):
    """Each rank keeps its rows of the whole tensor's quantization, so 2 ranks see the base 1 process sees:
    same losses, same adapters."""
    _, model_dir, data_dir = tiny
    common = [f"model.path={model_dir}", f"data.train=[{data_dir}]", "train.max_steps=3", "train.lr=3e-2",
              "logging.progress_bar=false", "data.micro_batch_size=1", "train.seed=3", "peft.pet_type=lora",
              "peft.lora_rank=4", "peft.lora_b_init=normal", "peft.target_modules=.*proj",
              f"peft.weight_quantize_algo={algo}", f"peft.weight_only_int4_group_size={GROUP}"]
    one, two = one_and_two_ranks(common, tmp_path, repo_root)
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=2e-5, abs=1e-6)
    a = assert_same_tensors(tmp_path / "one" / "export" / "adapter_model.safetensors",
                            tmp_path / "two" / "export" / "adapter_model.safetensors")
    assert any((a[k] != 0).any() for k in a if "lora_B" in k)
