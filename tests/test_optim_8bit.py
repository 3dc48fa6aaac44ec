"""train.optimizer: adamw_8bit (bitsandbytes) keeps 8-bit moments, trains, and resumes exactly."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from tests.helpers.tiny_run import logged_losses, make_tokenizer_and_model, pack_rows  # noqa: E402
from trainer.config import load_config  # noqa: E402

pytestmark = pytest.mark.slow


def test_adamw_8bit_state_training_and_exact_resume(tmp_path):
    from trainer.loop import train
    from trainer.optim import build_optimizer

    model_dir = make_tokenizer_and_model(tmp_path)
    data_dir = pack_rows(model_dir, tmp_path / "data", n_records=60, seq_length=96)

    def cfg(name, *extra):
        return load_config(None, [
            f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={tmp_path / name}",
            "logging.progress_bar=false", "train.lr=3e-3", "train.seed=1", "train.schedule=constant",
            "train.deterministic=true", "checkpoint.export=false", *extra,
        ])

    param = torch.nn.Parameter(torch.randn(512, 64))
    opt = build_optimizer(torch.nn.ParameterList([param]), cfg("x", "train.optimizer=adamw_8bit").train)
    param.grad = torch.randn_like(param)
    opt.step()
    assert opt.state[param]["state1"].dtype == torch.uint8 and opt.state[param]["state2"].dtype == torch.uint8

    fp32 = train(cfg("fp32", "train.max_steps=6"))
    eight = train(cfg("8bit", "train.max_steps=6", "train.optimizer=adamw_8bit"))
    assert eight.losses[-1] < eight.losses[0]
    assert eight.losses == pytest.approx(fp32.losses, rel=5e-2)
    assert eight.losses != fp32.losses  # it really is another optimizer
    train(cfg("resumed", "train.max_steps=3", "checkpoint.every_steps=3", "train.optimizer=adamw_8bit"))
    train(cfg("resumed", "train.max_steps=6", "checkpoint.every_steps=3", "train.optimizer=adamw_8bit"))
    assert logged_losses(tmp_path / "resumed") == eight.losses
