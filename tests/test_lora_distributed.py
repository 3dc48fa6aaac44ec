"""2-process FSDP2 LoRA (gloo, CPU, torchrun --standalone) trains like 1 process with the same global batch:
same losses, same exported adapters. Adapters are initialised whole and sliced per rank, so they start equal."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.helpers.dist_run import assert_same_tensors, one_and_two_ranks
from tests.helpers.tiny_run import make_tokenizer_and_model, pack_rows

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")
def test_two_ranks_lora_match_one_rank(tmp_path, repo_root):
    model_dir = make_tokenizer_and_model(tmp_path)
    data_dir = pack_rows(model_dir, tmp_path / "data", n_records=120, seq_length=96)
    common = [f"model.path={model_dir}", f"data.train=[{data_dir}]", "train.max_steps=5", "train.lr=1e-2",
              "logging.progress_bar=false", "data.micro_batch_size=1", "train.seed=3", "peft.pet_type=lora",
              "peft.target_modules=.*q_proj|.*v_proj|.*down_proj", "peft.use_dora=true", "peft.lora_rank=4",
              "peft.loraplus_lr_ratio=2", "peft.lora_b_init=normal"]
    one, two = one_and_two_ranks(common, tmp_path, repo_root)
    assert len(one) == len(two) == 5
    assert two == pytest.approx(one, rel=2e-5, abs=1e-6)
    a = assert_same_tensors(tmp_path / "one" / "export" / "adapter_model.safetensors",
                            tmp_path / "two" / "export" / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in a)
