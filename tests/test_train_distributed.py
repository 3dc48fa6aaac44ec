"""2-process FSDP2 (gloo, CPU) under torchrun trains to the same loss curve as 1 process with the same global batch."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.helpers.dist_run import assert_ranks_agree, assert_same_tensors

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")
def test_two_ranks_match_one_rank(tmp_path, repo_root):
    one, _ = assert_ranks_agree(tmp_path, repo_root, "train.lr=3e-3", "data.shuffle=true", steps=6, n_records=120)
    assert one[-1] < one[0]
    # Both exports hold the same trained weights (rank 0 gathered the FSDP shards).
    assert_same_tensors(tmp_path / "one" / "export" / "model.safetensors",
                        tmp_path / "two" / "export" / "model.safetensors")
