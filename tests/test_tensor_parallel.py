"""Tensor + sequence parallelism: the parallel.* mesh keys and their errors, and 2-rank tp=2 (gloo, CPU) runs
that train like one process, export the same weights and resume on one process from a tp=2 checkpoint.

The reference for the multi-rank runs is the one-process run of the same config (whose numerics the model
parity tests check against transformers); fp32 on CPU, so the tolerance is rounding only (rel 2e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers.tiny_run import make_tokenizer_and_model, pack_rows
from trainer.config import ConfigError, ParallelSection, load_config
from trainer.distributed import MeshError, MeshShape, init_distributed, resolve_mesh_shape
from trainer.model_config import ModelConfig
from trainer.tensor_parallel import TensorParallelError, check_model, check_sequence

# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("alias", "value", "key", "expected"), [
    ("model_parallel", 2, "tp", 2),  # MindFormers
    ("data_parallel", 4, "dp_shard", 4),
    ("context_parallel", 1, "cp", 1),
    ("pipeline_stage", 1, "pp", 1),
    ("use_seq_parallel", "false", "sequence_parallel", False),
    ("tensor_parallel_degree", 2, "tp", 2),  # PaddleNLP
    ("sharding_parallel_degree", 2, "dp_shard", 2),
    ("sep_parallel_degree", 1, "cp", 1),
    ("context_parallel_degree", 1, "cp", 1),
    ("pipeline_parallel_degree", 1, "pp", 1),
])
def test_seed_names_are_read_as_the_mesh_keys(alias, value, key, expected) -> None:
    cfg = load_config(None, [f"parallel.{alias}={value}"])
    assert getattr(cfg.parallel, key) == expected
    assert alias not in cfg.to_dict()["parallel"]  # the resolved config records the key's own name


def test_yaml_file_with_seed_names(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  model_parallel: 2\n  data_parallel: 2\n  use_seq_parallel: true\n")
    cfg = load_config(path)
    assert (cfg.parallel.tp, cfg.parallel.dp_shard, cfg.parallel.sequence_parallel) == (2, 2, True)


def test_alias_and_target_with_different_values_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"parallel\.model_parallel = 2 conflicts with parallel\.tp = 4"):
        load_config(None, ["parallel.tp=4", "parallel.model_parallel=2"])
    with pytest.raises(ConfigError, match=r"context_parallel_degree = 4 conflicts with parallel\.sep_parallel"):
        load_config(None, ["parallel.sep_parallel_degree=2", "parallel.context_parallel_degree=4"])
    # The same value twice is one setting, not a conflict.
    assert load_config(None, ["parallel.tp=2", "parallel.tensor_parallel_degree=2"]).parallel.tp == 2


def test_alias_value_of_the_wrong_type_names_the_alias() -> None:
    with pytest.raises(ConfigError, match=r"parallel\.model_parallel \(read as parallel\.tp\): expected an integer"):
        load_config(None, ["parallel.model_parallel=two"])


@pytest.mark.parametrize("key", ["pp", "pipeline_stage", "pipeline_parallel_degree"])
def test_pipeline_parallel_is_refused(key) -> None:
    with pytest.raises(ConfigError, match=r"parallel\.pp = 2: pipeline parallelism is not supported; use parallel\.tp"):
        load_config(None, [f"parallel.{key}=2"])


@pytest.mark.parametrize(("override", "message"), [
    ("parallel.tp=0", r"parallel\.tp = 0 must be >= 1"),
    ("parallel.dp_replicate=0", r"parallel\.dp_replicate = 0 must be >= 1"),
    ("parallel.dp_shard=0", r"parallel\.dp_shard = 0 must be >= 1, or -1"),
    ("parallel.cp=0", r"parallel\.cp = 0 must be >= 1"),
])
def test_degrees_below_one_are_refused(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(("extra", "named"), [
    (["peft.pet_type=lora"], "peft.pet_type lora"),
    (["model.backend=hf"], "model.backend hf"),
    (["peft.neftune_noise_alpha=5"], "peft.neftune_noise_alpha"),
    (["eval.generate_every_n_steps=5", "eval.generate_data=dev.json"], "eval.generate_every_n_steps"),
])
def test_tensor_parallel_refuses_what_it_does_not_split(extra, named) -> None:
    with pytest.raises(ConfigError, match=rf"parallel\.tp = 2 cannot be combined with {named}"):
        load_config(None, ["parallel.tp=2", *extra])
    load_config(None, extra)  # fine without tp


# ------------------------------------------------------------------------------------------------ mesh


def _parallel(**kw) -> ParallelSection:
    return ParallelSection(**kw)


def test_mesh_shape_fills_dp_shard_with_the_rest() -> None:
    shape = resolve_mesh_shape(_parallel(tp=2, dp_replicate=2), 8, "cpu")
    assert shape == MeshShape(dp_replicate=2, dp_shard=2, cp=1, tp=2)
    assert shape.dp == 4 and shape.world_size == 8
    assert shape.dims() == [("dp_replicate", 2), ("dp_shard", 2), ("tp", 2)]
    # Only the dimensions > 1, plus dp_shard when HSDP needs it.
    assert resolve_mesh_shape(_parallel(tp=2), 2, "cpu").dims() == [("tp", 2)]
    assert resolve_mesh_shape(_parallel(), 4, "cpu").dims() == [("dp_shard", 4)]
    assert resolve_mesh_shape(_parallel(dp_replicate=2, dp_shard=1), 2, "cpu").dims() == [
        ("dp_replicate", 2), ("dp_shard", 1)]
    assert resolve_mesh_shape(_parallel(), 1, "cpu") == MeshShape()


def test_mesh_product_must_equal_the_world_size() -> None:
    with pytest.raises(MeshError, match=r"parallel\.dp_replicate \(1\) x parallel\.tp \(2\) x parallel\.cp \(1\) "
                                        r"x parallel\.dp_shard \(2\) = 4, but the world size is 2"):
        resolve_mesh_shape(_parallel(tp=2, dp_shard=2), 2, "cpu")
    with pytest.raises(MeshError, match=r"world size 6 is not divisible by .*parallel\.tp \(4\).* = 4"):
        resolve_mesh_shape(_parallel(tp=4), 6, "cpu")
    with pytest.raises(MeshError, match=r"= 2, but the world size is 1"):
        resolve_mesh_shape(_parallel(tp=2, dp_shard=1), 1, "cpu")


def test_pipeline_parallel_refused_by_the_mesh_too() -> None:
    with pytest.raises(MeshError, match="pipeline parallelism is not supported"):
        resolve_mesh_shape(_parallel(pp=2), 2, "cpu")


def test_a_world_of_one_refuses_tp_before_starting(monkeypatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MeshError, match=r"world size 1 is not divisible by .*parallel\.tp \(2\)"):
        init_distributed("gloo", parallel=_parallel(tp=2))
    info = init_distributed("gloo", parallel=_parallel())
    assert (info.dp_rank, info.dp_size, info.fsdp, info.tensor_parallel) == (0, 1, False, False)


# ----------------------------------------------------------------------------------------------- model


def _model_config(heads: int, kv: int, intermediate: int = 128) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=16)


def test_tp_must_divide_heads_and_mlp_width() -> None:
    check_model(_model_config(4, 2), 2)
    with pytest.raises(TensorParallelError, match=r"num_key_value_heads = 2 is not divisible by 4.*fit: 1, 2"):
        check_model(_model_config(4, 2), 4)
    with pytest.raises(TensorParallelError, match=r"num_attention_heads = 4, num_key_value_heads = 2 is not "
                                                  r"divisible by 3"):
        check_model(_model_config(4, 2, intermediate=129), 3)
    with pytest.raises(TensorParallelError, match=r"intermediate_size = 130 is not divisible by 4"):
        check_model(_model_config(8, 8, intermediate=130), 4)


def test_sequence_parallel_needs_seq_length_divisible_by_tp() -> None:
    check_sequence(96, 2, True)
    check_sequence(95, 2, False)  # without sequence parallelism rows are not split
    with pytest.raises(TensorParallelError, match=r"95 positions over parallel\.tp = 2.*--seq-length 96"):
        check_sequence(95, 2, True)


# ------------------------------------------------------------------------------------- multi-rank runs


def _run(args: list[str], cwd: Path, nproc: int, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(cwd))
    if nproc == 1:
        cmd = [sys.executable, "-m", "cli.trainer", "run", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "cli.trainer", "run", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def _losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _assert_same_export(a_dir: Path, b_dir: Path, tol: float = 1e-4) -> None:
    """Same keys and shapes, values equal to rounding: the split matmuls add their partial sums in another
    order, and Adam turns the ~1e-7 gradient differences of near-zero gradients into update differences of up
    to ~lr x 1e-2. Measured on CPU fp32: max |a - b| 2e-5, ||a - b|| / ||a|| 1.1e-5 (tp=2, 4 steps)."""
    from safetensors.torch import load_file

    a = load_file(a_dir / "export" / "model.safetensors")
    b = load_file(b_dir / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert (a[key] - b[key]).abs().max() < tol, key
        assert (a[key] - b[key]).norm() <= tol * a[key].norm(), key
    # Both runs report the model's real size (a DTensor's numel is the whole tensor's).
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a_dir, b_dir))
    assert sa["total_params"] == sb["total_params"] == sum(t.numel() for t in a.values()), (sa, sb)


gloo = pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> tuple[Path, Path]:
    """The Qwen3-shaped tiny model (q/k norms, tied embeddings) and rows of 96 tokens (divisible by tp=2)."""
    root = tmp_path_factory.mktemp("tp")
    model_dir = make_tokenizer_and_model(root)
    return model_dir, pack_rows(model_dir, root / "data", n_records=120, seq_length=96)


def _common(model_dir: Path, data_dir: Path) -> list[str]:
    return [f"model.path={model_dir}", f"data.train=[{data_dir}]", "train.max_steps=4", "train.lr=3e-3",
            "logging.progress_bar=false", "data.micro_batch_size=1", "train.grad_accum_steps=2",
            "train.seed=3", "checkpoint.every_steps=2", "logging.plot=false", "logging.report_to=none"]


@pytest.fixture(scope="module")
def reference_run(tiny_setup, tmp_path_factory, repo_root) -> Path:
    """One process, grad_accum 2: the run every mesh below must reproduce (global batch 2 rows)."""
    model_dir, data_dir = tiny_setup
    one = tmp_path_factory.mktemp("one") / "run"
    _run(_sets([*_common(model_dir, data_dir), f"logging.output_dir={one}"]), repo_root, 1)
    return one


@pytest.mark.dist
@pytest.mark.slow
@gloo
def test_tp2_matches_one_rank_and_resumes_on_one_rank(tiny_setup, reference_run, tmp_path, repo_root) -> None:
    model_dir, data_dir = tiny_setup
    common = _common(model_dir, data_dir)
    one, two, resumed = reference_run, tmp_path / "tp2", tmp_path / "resumed"
    _run(_sets([*common, f"logging.output_dir={two}", "parallel.model_parallel=2"]), repo_root, 2)
    ref, tp = _losses(one), _losses(two)
    assert sorted(ref) == sorted(tp) == [1, 2, 3, 4]
    assert [tp[s] for s in range(1, 5)] == pytest.approx([ref[s] for s in range(1, 5)], rel=2e-5, abs=1e-6)
    assert ref[4] < ref[1]
    _assert_same_export(one, two)  # rank 0 gathered the tp shards; tied head and q/k norms included

    # The tp=2 checkpoint of step 2 continues on one process exactly as the uninterrupted run did.
    step2 = two / "checkpoints" / "step-00000002"
    assert step2.is_dir()
    _run(_sets([*common, f"logging.output_dir={resumed}", f"checkpoint.resume={step2}"]), repo_root, 1)
    cont = _losses(resumed)
    assert sorted(cont) == [3, 4]
    assert [cont[3], cont[4]] == pytest.approx([ref[3], ref[4]], rel=2e-5, abs=1e-6)
    _assert_same_export(one, resumed)


@pytest.mark.dist
@pytest.mark.slow
@gloo
def test_fsdp_over_dp_shard_composed_with_tp_without_sequence_parallel(tiny_setup, reference_run, tmp_path,
                                                                        repo_root) -> None:
    """4 ranks: FSDP2 shards the tp-split blocks over 2 data-parallel ranks, each reading its own rows; the
    residual stream and norms whole on every tp rank (parallel.use_seq_parallel: false)."""
    model_dir, data_dir = tiny_setup
    out = tmp_path / "dp2tp2"
    _run(_sets([*_common(model_dir, data_dir), f"logging.output_dir={out}", "parallel.tensor_parallel_degree=2",
                "parallel.dp_shard=2", "parallel.use_seq_parallel=false", "train.grad_accum_steps=1"]),
         repo_root, 4)
    ref, got = _losses(reference_run), _losses(out)
    assert [got[s] for s in range(1, 5)] == pytest.approx([ref[s] for s in range(1, 5)], rel=2e-5, abs=1e-6)
    _assert_same_export(reference_run, out)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL tensor parallelism needs 2 CUDA devices")
def test_tp2_on_nccl_matches_one_gpu(tiny_setup, tmp_path, repo_root) -> None:
    model_dir, data_dir = tiny_setup
    common = [*_common(model_dir, data_dir), "model.dtype=fp32", "checkpoint.every_steps=0"]
    one, two = tmp_path / "one", tmp_path / "tp2"
    _run(_sets([*common, f"logging.output_dir={one}"]), repo_root, 1)
    _run(_sets([*common, f"logging.output_dir={two}", "parallel.tp=2", "parallel.backend=nccl"]), repo_root, 2)
    ref, tp = _losses(one), _losses(two)
    # GPU matmuls reduce in another order when split: rounding only, but more of it than on CPU.
    assert [tp[s] for s in range(1, 5)] == pytest.approx([ref[s] for s in range(1, 5)], rel=1e-4, abs=1e-5)
    _assert_same_export(one, two, tol=1e-3)
