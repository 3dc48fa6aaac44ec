"""`trainer plan` / trainer.memory_plan: the memory model, checked against the trainer it describes.

Parameters, adapters and optimizer state are compared exactly with the model `build_model` builds and the state
AdamW allocates; the peak is compared with the measured peak of real CPU training runs (tests.helpers.memory_check,
PyTorch's profiler over the CPU allocator), within PEAK_TOLERANCE.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli.trainer import main as trainer_main
from tests.helpers.memory_check import CASES, make_model_and_data, markdown, run_case
from trainer.config import load_config
from trainer.distributed import DistInfo
from trainer.memory_plan import Mesh, ModelShape, PlanError, mesh_from_config, plan_memory

PEAK_TOLERANCE = 0.20  # |predicted / measured - 1| for the whole peak (the cases measured land within 12%)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    model_dir, data_dir = make_model_and_data(root, seq_length=256, n_records=160)
    return root, model_dir, data_dir


def _config(model_dir, data_dir, *sets):
    return load_config(None, [f"model.path={model_dir}", f"data.train=[{data_dir}]", *sets])


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes a parameter holds: an NF4 weight is its packed data and scales, not numel x element_size."""
    if type(t).__name__ == "NF4Tensor":
        inner = [t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean, t.nf4]
        return sum(x.numel() * x.element_size() for x in inner)
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------- the mesh


def test_mesh_takes_the_rest_of_the_world_for_dp_shard_and_refuses_what_does_not_fit():
    assert Mesh.resolve(8, tp=2) == Mesh(8, 1, 4, 2, 1)
    assert Mesh.resolve(16, dp_replicate=2, tp=2, cp=2) == Mesh(16, 2, 2, 2, 2)
    with pytest.raises(PlanError, match=r"not divisible by parallel\.dp_replicate \(1\) x parallel\.tp \(2\) x parallel\.cp \(1\) = 2"):
        Mesh.resolve(3, tp=2)
    with pytest.raises(PlanError, match="= 4, but the world size is 8"):
        Mesh.resolve(8, dp_shard=2, tp=2)
    with pytest.raises(PlanError, match="tp must be >= 1"):
        Mesh.resolve(8, tp=0)


def test_mesh_reads_parallel_keys_when_the_config_has_them_and_options_override_them(tiny):
    _, model_dir, data_dir = tiny
    config = _config(model_dir, data_dir)
    assert mesh_from_config(config, 4) == Mesh(4, 1, 4, 1, 1)  # before the mesh keys exist: pure FSDP
    config.parallel.tp = 2  # what parallel.tp in a config gives once the keys exist (attributes, read by getattr)
    assert mesh_from_config(config, 4) == Mesh(4, 1, 2, 2, 1)
    assert mesh_from_config(config, 4, tp=1, cp=2) == Mesh(4, 1, 2, 1, 2)


# ------------------------------------------------------------------------------ exact against the built model


@pytest.mark.parametrize("sets", [
    (),
    ("model.dtype=bf16", "model.frozen_dtype=bf16", "peft.freeze_include=[model.embed_tokens.*]"),
    ("peft.pet_type=lora", "peft.lora_rank=4"),
    ("peft.pet_type=lora", "peft.target_modules=all-linear", "peft.use_dora=true",
     "peft.freeze_exclude=['*norm.weight']"),
    ("peft.pet_type=lora", "peft.target_modules=[embed_tokens, q_proj]"),
    ("peft.pet_type=lora", "peft.lora_use_mixer=true", "peft.lora_rank=4"),
    ("peft.pet_type=lora", "peft.use_mora=true"),
    ("peft.pet_type=vera", "peft.vera_rank=16", "peft.target_modules=all-linear"),
    ("peft.pet_type=lokr", "peft.lokr_rank=4"),
    ("peft.pet_type=lora", "peft.target_modules=all-linear", "peft.weight_quantize_algo=nf4",
     "model.dtype=bf16", "model.frozen_dtype=bf16"),
    ("peft.pet_type=loreft", "peft.reft_rank=4", "peft.reft_layers=[0, 1]"),
    ("peft.pet_type=lora", "peft.weight_quantize_algo=fp4"),
    ("peft.pet_type=lora", "peft.weight_quantize_algo=weight_only_int8"),
    ("peft.pet_type=lora", "peft.weight_quantize_algo=weight_only_int4", "peft.weight_only_int4_group_size=32"),
    ("peft.pet_type=prefix_tuning", "peft.num_virtual_tokens=7"),
    ("peft.pet_type=prefix_tuning", "peft.num_virtual_tokens=7", "peft.prefix_projection=true",
     "peft.encoder_hidden_size=24"),
], ids=["full", "full-bf16-frozen-embed", "lora", "dora-norms", "lora-embed", "moslora", "mora", "vera", "lokr", "qlora",
        "loreft", "fp4", "int8", "int4", "prefix", "prefix-projection"])
def test_parameters_adapters_and_optimizer_state_equal_the_built_model(tiny, sets):
    from trainer.loop import build_model, resolve_dtype
    from trainer.optim import build_optimizer

    _, model_dir, data_dir = tiny
    config = _config(model_dir, data_dir, *sets)
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    model = build_model(config, info, resolve_dtype(config.model.dtype, info.device))
    plan = plan_memory(config, seq_length=256, device="cpu")

    built = sum(_storage_bytes(p) for p in model.parameters())
    assert plan.component("parameters") + plan.component("adapters") == pytest.approx(built, abs=64)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert plan.params_trainable == sum(p.numel() for p in trainable)
    assert plan.component("gradients") == sum(p.numel() * 4 for p in trainable)

    optimizer = build_optimizer(model, config.train)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert plan.component("optimizer state") == state


def test_published_parameter_counts_of_real_shapes(tmp_path):
    """A dense model through ModelConfig and an MoE one through the estimated path give their known sizes."""
    qwen3_8b = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                "tie_word_embeddings": False}
    qwen3_moe = {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                 "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                 "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                 "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False}
    counts = {}
    for name, raw in (("dense", qwen3_8b), ("moe", qwen3_moe)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(raw))
        plan = plan_memory(load_config(None, [f"model.path={tmp_path / name}"]), seq_length=4096,
                           mesh=Mesh.resolve(8))
        counts[name] = plan.params_total
        # full fine-tuning on 8 FSDP ranks: fp32 weights, gradients and AdamW's two moments, an eighth each
        assert plan.component("parameters") == pytest.approx(plan.params_total * 4 / 8, rel=1e-6)
        assert plan.component("optimizer state") == pytest.approx(plan.params_total * 8 / 8, rel=1e-6)
    from trainer.model_config import ModelConfig

    assert counts["dense"] == ModelConfig.from_hf(qwen3_8b).num_params()
    assert counts["dense"] / 1e9 == pytest.approx(8.19, abs=0.01)  # Qwen3-8B: 8.2B
    assert counts["moe"] / 1e9 == pytest.approx(30.5, abs=0.1)  # Qwen3-30B-A3B: 30.5B


def test_sharding_divides_what_it_should(tiny):
    _, model_dir, data_dir = tiny
    config = _config(model_dir, data_dir, "model.dtype=bf16")
    one = plan_memory(config, seq_length=4096, mesh=Mesh.resolve(1))
    fsdp = plan_memory(config, seq_length=4096, mesh=Mesh.resolve(4))
    tp = plan_memory(config, seq_length=4096, mesh=Mesh.resolve(4, tp=2))
    cp = plan_memory(config, seq_length=4096, mesh=Mesh.resolve(4, cp=2))
    for name in ("parameters", "optimizer state", "gradients"):
        assert fsdp.component(name) == pytest.approx(one.component(name) / 4, rel=1e-6)
        assert fsdp.component(name) < tp.component(name) < 2 * fsdp.component(name)  # tp: block weights only
        # cp: FSDP2 shards over dp_shard x cp, so 2 x 2 ranks divide like 4 data-parallel ones
        assert cp.component(name) == pytest.approx(fsdp.component(name), rel=1e-6)
    # FSDP2 does not divide activations; one process under autocast keeps more (each Linear its own bf16 cast)
    assert fsdp.component("activations") < one.component("activations") < 1.5 * fsdp.component("activations")
    # cp 2 halves the per-token activations; its sdpa mask [T/cp, T] and the gathered K/V are not halved
    assert cp.component("activations") < 0.7 * fsdp.component("activations")
    assert tp.component("activations") < 0.8 * fsdp.component("activations")
    # The ring keeps neither the mask nor the gathered K/V: at 32k tokens over cp 4 it keeps less than allgather
    # (whose mask alone is T/cp x T bytes), and its block working set is [heads x T/cp x T/cp] fp32 scores
    long = {m: plan_memory(_config(model_dir, data_dir, "model.dtype=bf16", f"parallel.cp_attention={m}"),
                           seq_length=32768, mesh=Mesh.resolve(4, cp=4)) for m in ("allgather", "ring")}
    mask = 32768 / 4 * 32768
    assert long["ring"].component("activations") < long["allgather"].component("activations") - mask
    assert long["ring"].model["attn_backend"] == "ring"
    # on CUDA the ring's math kernel takes the queries in chunks: scores of at most MATH_CHUNK_BYTES, three at once
    from trainer.context_parallel import MATH_CHUNK_BYTES

    whole = long["allgather"].component("working set")
    assert whole + 3 * MATH_CHUNK_BYTES <= long["ring"].component("working set") <= whole + 4 * MATH_CHUNK_BYTES
    ac = plan_memory(_config(model_dir, data_dir, "model.dtype=bf16", "model.activation_checkpointing=true"),
                     seq_length=4096, mesh=Mesh.resolve(4))
    assert ac.component("activations") < 0.75 * fsdp.component("activations")


# ------------------------------------------------------------------------------- against measured peaks


@pytest.mark.slow
def test_plan_total_is_within_tolerance_of_the_measured_peak_of_cpu_runs(tiny):
    root, model_dir, data_dir = tiny
    torch.set_num_threads(1)
    rows = [run_case(root, model_dir, data_dir, case) for case in CASES]
    print("\n" + markdown(rows))
    off = [r for r in rows if abs(r["ratio"] - 1) > PEAK_TOLERANCE]
    assert not off, markdown(off)
    by = {r["case"]: r for r in rows}
    # the directions the model predicts hold in the measurement too
    assert by["full, AC on"]["measured"] < by["full, AC off"]["measured"]
    assert by["LoRA qkvo, AC off"]["measured"] < by["full, AC off"]["measured"]


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_table_json_and_exit_codes(tiny, tmp_path):
    _, model_dir, data_dir = tiny
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {model_dir}}}\ndata: {{train: [{data_dir}]}}\n")
    runner = CliRunner()
    res = runner.invoke(trainer_main, ["plan", str(cfg), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for word in ("parameters", "optimizer state", "activations", "gradients", "peak", "rows of 256 tokens"):
        assert word in res.output
    res = runner.invoke(trainer_main, ["plan", str(cfg), "--world-size", "4", "--tp", "2", "--json",
                                       "--set", "peft.pet_type=lora"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["mesh"] == {"world_size": 4, "dp_replicate": 1, "dp_shard": 2, "tp": 2, "cp": 1}
    assert data["total_bytes"] == data["always_bytes"] + max(data["forward_bytes"], data["backward_bytes"])
    assert {c["name"] for c in data["components"]} >= {"parameters", "adapters", "optimizer state", "activations"}

    bad_mesh = runner.invoke(trainer_main, ["plan", str(cfg), "--world-size", "3", "--tp", "2"])
    assert bad_mesh.exit_code == 2 and "not divisible" in bad_mesh.output
    bad_key = runner.invoke(trainer_main, ["plan", str(cfg), "--set", "model.dtipe=bf16"])
    assert bad_key.exit_code == 2 and "dtype" in bad_key.output
    missing = runner.invoke(trainer_main, ["plan", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "nope.yaml" in missing.output
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert runner.invoke(trainer_main, ["plan", str(tmp_path / "broken.yaml")]).exit_code == 1
    (tmp_path / "empty_model").mkdir()
    no_model = runner.invoke(trainer_main, ["plan", str(cfg), "--set", f"model.path={tmp_path / 'empty_model'}"])
    assert no_model.exit_code == 1 and "config.json" in no_model.output
    no_seq = runner.invoke(trainer_main, ["plan", "--set", f"model.path={model_dir}"])
    assert no_seq.exit_code == 2 and "--seq-length" in no_seq.output


def test_model_shape_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        ModelShape.from_model_dir(tmp_path)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("sets", [()], ids=["full"])  # one case: a 2-rank launch costs ~25 s on 2 cores
def test_plan_for_two_fsdp2_ranks_is_within_tolerance_of_each_ranks_measured_peak(tiny, repo_root, tmp_path, sets):
    """dp_shard 2 on gloo: sharded parameters, gradients and optimizer state, the gathered blocks and root."""
    import os
    import subprocess
    import sys

    import torch.distributed as dist

    from tests.helpers.memory_check import Case, case_config
    from trainer.memory_plan import dataset_facts

    if not dist.is_gloo_available():
        pytest.skip("torch was built without gloo")
    root, model_dir, data_dir = tiny
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "tests/helpers/memory_dist_worker.py", str(root), str(model_dir), str(data_dir), str(tmp_path), *sets]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    peaks = [json.loads((tmp_path / f"rank{r}.json").read_text())["peak"] for r in range(2)]
    seq, share, doc = dataset_facts(data_dir)
    plan = plan_memory(case_config(root, model_dir, data_dir, Case("x", sets)), seq_length=seq, device="cpu",
                       mesh=Mesh.resolve(2), trained_fraction=share or 1.0, doc_length=doc)
    assert abs(plan.total / max(peaks) - 1) <= PEAK_TOLERANCE, (plan.total, peaks)
