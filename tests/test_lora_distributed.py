"""2-process FSDP2 LoRA (gloo, CPU, torchrun --standalone) trains like 1 process with the same global batch:
same losses, same exported adapters. Adapters are initialised whole and sliced per rank, so they start equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from safetensors.torch import load_file

from tests.helpers.tiny_run import make_tokenizer_and_model, pack_rows

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _run(args: list[str], cwd, nproc: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(cwd))
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "cli.trainer", "run", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _losses(out_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")
def test_two_ranks_lora_match_one_rank(tmp_path, repo_root):
    model_dir = make_tokenizer_and_model(tmp_path)
    data_dir = pack_rows(model_dir, tmp_path / "data", n_records=120, seq_length=96)
    common = [f"model.path={model_dir}", f"data.train=[{data_dir}]", "train.max_steps=5", "train.lr=1e-2",
              "logging.progress_bar=false", "data.micro_batch_size=1", "train.seed=3", "peft.pet_type=lora",
              "peft.target_modules=.*q_proj|.*v_proj|.*down_proj", "peft.use_dora=true", "peft.lora_rank=4",
              "peft.loraplus_lr_ratio=2", "peft.lora_b_init=normal"]
    sets = lambda items: [x for item in items for x in ("--set", item)]  # noqa: E731
    _run(sets([*common, f"logging.output_dir={tmp_path / 'one'}", "train.grad_accum_steps=2"]), repo_root, 1)
    _run(sets([*common, f"logging.output_dir={tmp_path / 'two'}", "train.grad_accum_steps=1"]), repo_root, 2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert two == pytest.approx(one, rel=2e-5, abs=1e-6)
    a = load_file(tmp_path / "one" / "export" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "export" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("lora_magnitude_vector") for k in a)
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-5, key
