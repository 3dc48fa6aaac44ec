"""2-process FSDP2 (gloo, CPU) runs of VeRA, LoKr and QLoRA (NF4 base) train like 1 process with the same
global batch: same losses, same exported adapters. NF4 shards are cut from the whole tensor's quantization,
so every rank sees the same 4-bit base as one process does."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.helpers.dist_run import assert_same_tensors, one_and_two_ranks
from tests.helpers.tiny_run import make_tokenizer_and_model, pack_rows

pytestmark = [pytest.mark.dist, pytest.mark.slow]

METHODS = {
    "vera": ["peft.pet_type=vera", "peft.vera_rank=8", "peft.target_modules=.*q_proj|.*v_proj|.*down_proj"],
    "lokr": ["peft.pet_type=lokr", "peft.lokr_rank=2", "peft.target_modules=.*q_proj|.*v_proj|.*down_proj"],
    "qlora": ["peft.pet_type=lora", "peft.lora_rank=4", "peft.lora_b_init=normal", "peft.target_modules=.*proj",
              "peft.weight_quantize_algo=nf4", "peft.qlora_weight_double_quant_block_size=4"],
}


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_ranks_match_one_rank(tmp_path, repo_root, method):
    model_dir = make_tokenizer_and_model(tmp_path)
    data_dir = pack_rows(model_dir, tmp_path / "data", n_records=80, seq_length=96)
    common = [f"model.path={model_dir}", f"data.train=[{data_dir}]", "train.max_steps=3", "train.lr=3e-2",
              "logging.progress_bar=false", "data.micro_batch_size=1", "train.seed=3", *METHODS[method]]
    one, two = one_and_two_ranks(common, tmp_path, repo_root)
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=2e-5, abs=1e-6)
    a = assert_same_tensors(tmp_path / "one" / "export" / "adapter_model.safetensors",
                            tmp_path / "two" / "export" / "adapter_model.safetensors")
    assert any((a[k] != 0).any() for k in a if "lambda_b" in k or "lokr_w1" in k or "lora_B" in k)


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")
def test_qlora_with_bf16_compute_one_and_two_ranks(tmp_path, repo_root):
    """The CUDA default path on CPU: bf16 compute, NF4 codes of bf16 weights. One process runs under autocast,
    two under FSDP2 mixed precision (the NF4 shards are gathered as 4-bit data); both train alike."""
    model_dir = make_tokenizer_and_model(tmp_path)
    data_dir = pack_rows(model_dir, tmp_path / "data", n_records=80, seq_length=96)
    common = [f"model.path={model_dir}", f"data.train=[{data_dir}]", "train.max_steps=4", "train.lr=3e-2",
              "logging.progress_bar=false", "data.micro_batch_size=1", "train.seed=3", "model.dtype=bf16",
              "model.frozen_dtype=bf16", *METHODS["qlora"]]
    one, two = one_and_two_ranks(common, tmp_path, repo_root)
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=3e-2)
    assert (tmp_path / "two" / "export" / "adapter_model.safetensors").is_file()
