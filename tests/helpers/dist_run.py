"""Launch `trainer run` as 1 process or under torchrun (gloo on CPU) and compare what the runs wrote: the
multi-rank tests all check that N ranks train like 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.tiny_run import logged_losses, make_tokenizer_and_model, pack_rows


def run_trainer(overrides: list[str], cwd: Path, nproc: int, timeout: float = 300) -> None:
    """`trainer run --set ...` in a fresh process (torchrun --standalone when nproc > 1); fails with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(cwd))
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    sets = [x for item in overrides for x in ("--set", item)]
    proc = subprocess.run([sys.executable, *launch, "-m", "cli.trainer", "run", *sets], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def one_and_two_ranks(common: list[str], tmp_path: Path, cwd: Path) -> tuple[list[float], list[float]]:
    """Run `common` as 1 process with 2 accumulation steps and as 2 ranks with 1 (the same global batch), into
    tmp_path/one and tmp_path/two; returns both loss curves."""
    run_trainer([*common, f"logging.output_dir={tmp_path / 'one'}", "train.grad_accum_steps=2"], cwd, 1)
    run_trainer([*common, f"logging.output_dir={tmp_path / 'two'}", "train.grad_accum_steps=1"], cwd, 2)
    return logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")


def assert_ranks_agree(tmp_path: Path, cwd: Path, *extra: str, steps: int, n_records: int = 80,
                       model_dir: Path | None = None, rel: float = 2e-5, abs: float | None = 1e-6,
                       ) -> tuple[list[float], list[float]]:
    """The distributed tests' one check: `model_dir` (default: the tiny model) trained `steps` steps on the same
    packed rows (96 tokens, one row per micro-batch, seed 3) as 1 process and as 2 ranks gives as many losses,
    equal within rel/abs. `extra` holds the test's own keys (lr, PEFT method, ...); returns both curves."""
    model_dir = model_dir or make_tokenizer_and_model(tmp_path)
    data_dir = pack_rows(model_dir, tmp_path / "data", n_records=n_records, seq_length=96)
    common = [f"model.path={model_dir}", f"data.train=[{data_dir}]", f"train.max_steps={steps}",
              "logging.progress_bar=false", "data.micro_batch_size=1", "train.seed=3", *extra]
    one, two = one_and_two_ranks(common, tmp_path, cwd)
    assert len(one) == len(two) == steps
    assert two == pytest.approx(one, rel=rel, abs=abs)
    return one, two


def assert_same_tensors(a_file: Path, b_file: Path, atol: float = 1e-5) -> dict[str, torch.Tensor]:
    """Both safetensors files hold the same names and (within atol) the same values; returns the first."""
    a, b = load_file(a_file), load_file(b_file)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < atol, key
    return a


def adapter_ranks_agree(tmp_path: Path, cwd: Path, method: list[str]) -> dict[str, torch.Tensor]:
    """An adapter method (`method`: its peft.* overrides) trained 3 steps on 1 process and on 2 gloo ranks (same
    global batch, one row per micro batch) logs the same losses and exports the same tensors; returns them."""
    import pytest
    import torch.distributed as dist

    from tests.helpers.tiny_run import make_tokenizer_and_model, pack_rows

    if not dist.is_gloo_available():
        pytest.skip("torch was built without gloo")
    model_dir = make_tokenizer_and_model(tmp_path)
    data_dir = pack_rows(model_dir, tmp_path / "data", n_records=80, seq_length=96)
    common = [f"model.path={model_dir}", f"data.train=[{data_dir}]", "train.max_steps=3", "train.lr=5e-2",
              "logging.progress_bar=false", "data.micro_batch_size=1", "train.seed=3", *method]
    one, two = one_and_two_ranks(common, tmp_path, cwd)
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=2e-5, abs=1e-6)
    return assert_same_tensors(tmp_path / "one" / "export" / "adapter_model.safetensors",
                               tmp_path / "two" / "export" / "adapter_model.safetensors")
