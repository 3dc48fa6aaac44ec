"""2-process FSDP2 (gloo, CPU) under torchrun trains to the same loss curve as 1 process with the same global batch."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.helpers.dist_run import assert_same_tensors, one_and_two_ranks
from tests.helpers.tiny_run import make_tokenizer_and_model, pack_rows

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")
def test_two_ranks_match_one_rank(tmp_path, repo_root):
    model_dir = make_tokenizer_and_model(tmp_path)
    data_dir = pack_rows(model_dir, tmp_path / "data", n_records=120, seq_length=96)
    common = [f"model.path={model_dir}", f"data.train=[{data_dir}]", "train.max_steps=6", "train.lr=3e-3",
              "logging.progress_bar=false", "data.micro_batch_size=1", "data.shuffle=true", "train.seed=3"]
    one, two = one_and_two_ranks(common, tmp_path, repo_root)
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=2e-5, abs=1e-6)
    assert one[-1] < one[0]
    # Both exports hold the same trained weights (rank 0 gathered the FSDP shards).
    assert_same_tensors(tmp_path / "one" / "export" / "model.safetensors",
                        tmp_path / "two" / "export" / "model.safetensors")
