"""LoRA memory: frozen base weights stored in the compute dtype, adapters and their optimizer state in fp32."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_run import tiny_setup
from trainer.config import load_config
from trainer.distributed import DistInfo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("mem"), n_records=80, seq_length=96)


def _config(root, model_dir, data_dir, name, *extra):
    return load_config(None, [
        f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={root / name}",
        "logging.progress_bar=false", "train.lr=1e-2", "train.seed=3", "train.max_steps=6",
        "data.micro_batch_size=2", "peft.pet_type=lora", "peft.lora_rank=8", "peft.target_modules=.*proj",
        "model.dtype=bf16", *extra,
    ])


def test_frozen_base_in_bf16_adapters_and_optimizer_in_fp32(tiny):
    from trainer.loop import build_model, resolve_dtype
    from trainer.optim import build_optimizer

    root, model_dir, data_dir = tiny
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    sizes = {}
    for frozen in ("fp32", "bf16"):
        cfg = _config(root, model_dir, data_dir, frozen, f"model.frozen_dtype={frozen}")
        model = build_model(cfg, info, resolve_dtype(cfg.model.dtype, info.device))
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        frozen_params = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        assert trainable and all(".lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
        assert {p.dtype for p in frozen_params.values()} == {torch.bfloat16 if frozen == "bf16" else torch.float32}
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
        sizes[frozen] = sum(p.numel() * p.element_size() for p in frozen_params.values())
        if frozen == "bf16":
            opt = build_optimizer(model, cfg.train)
            ids = torch.randint(0, model.config.vocab_size, (1, 16))
            labels = ids.roll(-1, 1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(ids, labels=labels).backward()
            opt.step()
            states = [s for s in opt.state.values()]
            assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert sizes["bf16"] * 2 == sizes["fp32"]


def test_bf16_base_trains_like_fp32_base_under_bf16_compute(tiny):
    """Same run, base stored fp32 or bf16: with bf16 compute the weights are rounded to bf16 either way."""
    from trainer.loop import train

    root, model_dir, data_dir = tiny
    a = train(_config(root, model_dir, data_dir, "run-fp32", "model.frozen_dtype=fp32", "checkpoint.export=false"))
    b = train(_config(root, model_dir, data_dir, "run-bf16", "model.frozen_dtype=bf16"))
    assert b.losses == pytest.approx(a.losses, rel=2e-2)
    assert b.losses[-1] < b.losses[0]
    assert (root / "run-bf16" / "export" / "adapter_model.safetensors").is_file()


def test_bf16_base_with_fp32_compute_is_refused(tiny):
    from trainer.loop import build_model

    root, model_dir, data_dir = tiny
    cfg = _config(root, model_dir, data_dir, "x", "model.frozen_dtype=bf16", "model.dtype=fp32")
    with pytest.raises(ValueError, match="frozen_dtype bf16 needs bf16 compute"):
        build_model(cfg, DistInfo(0, 1, 0, torch.device("cpu"), None), torch.float32)


@pytest.mark.dist
def test_two_ranks_with_a_bf16_base_match_an_fp32_base(tiny, repo_root):
    """FSDP2 with bf16 compute over a bf16-stored base and fp32 adapters: the same losses as an fp32-stored base
    (FSDP casts both to bf16 for compute), so the halved base memory costs nothing in the update."""
    import json
    import os
    import subprocess
    import sys

    import torch.distributed as dist

    if not dist.is_gloo_available():
        pytest.skip("torch was built without gloo")
    root, model_dir, data_dir = tiny
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root))
    losses = {}
    for frozen in ("fp32", "bf16"):
        sets = [f"model.path={model_dir}", f"data.train=[{data_dir}]", "train.max_steps=3", "train.lr=1e-2",
                "logging.progress_bar=false", "model.dtype=bf16", f"model.frozen_dtype={frozen}",
                "peft.pet_type=lora", "peft.target_modules=.*proj", f"logging.output_dir={root / f'dist-{frozen}'}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "cli.trainer", "run", *[x for s in sets for x in ("--set", s)]]
        proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        rows = [json.loads(line) for line in (root / f"dist-{frozen}" / "metrics.jsonl").read_text().splitlines()]
        losses[frozen] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["bf16"]) == 3 and losses["bf16"] == losses["fp32"]
