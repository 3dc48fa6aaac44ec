"""2-process FSDP2 LoRA (gloo, CPU, torchrun --standalone) trains like 1 process with the same global batch:
same losses, same exported adapters. Adapters are initialised whole and sliced per rank, so they start equal."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.helpers.dist_run import assert_ranks_agree, assert_same_tensors

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")
def test_two_ranks_lora_match_one_rank(tmp_path, repo_root):
    assert_ranks_agree(tmp_path, repo_root, "train.lr=1e-2", "peft.pet_type=lora",
                       "peft.target_modules=.*q_proj|.*v_proj|.*down_proj", "peft.use_dora=true", "peft.lora_rank=4",
                       "peft.loraplus_lr_ratio=2", "peft.lora_b_init=normal", steps=5, n_records=120)
    a = assert_same_tensors(tmp_path / "one" / "export" / "adapter_model.safetensors",
                            tmp_path / "two" / "export" / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in a)
