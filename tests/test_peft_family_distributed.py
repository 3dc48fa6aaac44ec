"""2-process FSDP2 (gloo, CPU) runs of VeRA, LoKr and QLoRA (NF4 base) train like 1 process with the same
global batch: same losses, same exported adapters. NF4 shards are cut from the whole tensor's quantization,
so every rank sees the same 4-bit base as one process does."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.helpers.dist_run import assert_ranks_agree, assert_same_tensors

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
    assert_ranks_agree(tmp_path, repo_root, "train.lr=3e-2", *METHODS[method], steps=3)
    a = assert_same_tensors(tmp_path / "one" / "export" / "adapter_model.safetensors",
                            tmp_path / "two" / "export" / "adapter_model.safetensors")
    assert any((a[k] != 0).any() for k in a if "lambda_b" in k or "lokr_w1" in k or "lora_B" in k)


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")
def test_qlora_with_bf16_compute_one_and_two_ranks(tmp_path, repo_root):
    """The CUDA default path on CPU: bf16 compute, NF4 codes of bf16 weights. One process runs under autocast,
    two under FSDP2 mixed precision (the NF4 shards are gathered as 4-bit data); both train alike."""
    assert_ranks_agree(tmp_path, repo_root, "train.lr=3e-2", "model.dtype=bf16", "model.frozen_dtype=bf16",
                       *METHODS["qlora"], steps=4, rel=3e-2, abs=None)
    assert (tmp_path / "two" / "export" / "adapter_model.safetensors").is_file()
