"""The trainer config: typed, documented, strict about unknown keys, overridable from the command line."""

import math

import pytest
import torch

from trainer.config import ConfigError, describe, load_config, save_config
from trainer.optim import build_optimizer, lr_factor


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_sections_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  path: /m\n  overrides: {num_hidden_layers: 4}\ntrain:\n  lr: 3e-4\n  max_steps: 10\n")
    cfg = load_config(path, ["train.lr=1e-3", "data.train=[a, b]", "train.schedule=linear"])
    assert cfg.model.path == "/m"
    assert cfg.model.overrides == {"num_hidden_layers": 4}
    assert cfg.train.lr == pytest.approx(1e-3)  # override wins over the file
    assert cfg.data.train == ["a", "b"]
    assert cfg.train.schedule == "linear"


def test_unknown_key_is_rejected_with_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 1e-5\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: unknown key 'train.learning_rate' \(did you mean 'lr'\?\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"did you mean 'micro_batch_size'"):
        load_config(None, ["data.micro_batch=2"])
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_config(None, ["modle.path=x"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=fast", "train.lr: expected a number"),
        ("train.grad_accum_steps=0", "grad_accum_steps must be >= 1"),
        ("train.schedule=step", "train.schedule: 'step' is not one of"),
        ("checkpoint.keep=1", "checkpoint.keep must be >= 2"),
        ("model.compile=yes please", "model.compile: expected true or false"),
        ("train", "must look like section.key=value"),
        ("model.dtype=fp16", "model.dtype: 'fp16' is not one of auto, fp32, bf16"),
        ("peft.pet_type=qlora", "peft.pet_type: 'qlora' is not one of lora"),
        ("train.warmup_ratio=1.5", r"train.warmup_ratio in \[0, 1\)"),
        ("train.nonfinite=ignore", "train.nonfinite: 'ignore' is not one of fail, skip"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=5e-5", "model.overrides={num_hidden_layers: 2}"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_every_key_is_documented():
    text = describe()
    keys = [line for line in text.splitlines() if line.startswith("  ") and not line.strip().startswith("#")]
    comments = [line for line in text.splitlines() if line.strip().startswith("# ") and line.startswith("  ")]
    assert len(keys) == len(comments) > 20
    assert all(len(c.strip()) > 6 for c in comments)


def test_schedules():
    cfg = load_config(None, ["train.warmup_steps=10", "train.schedule=cosine", "train.min_lr_ratio=0.1"]).train
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    cfg.schedule = "linear"
    assert lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    cfg.schedule = "constant"
    assert lr_factor(100, cfg, 110) == 1.0


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    model[2].weight.requires_grad_(False)  # frozen parameters never reach the optimizer
    cfg = load_config(None, ["train.weight_decay=0.1"]).train
    opt = build_optimizer(model, cfg)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    assert plain == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


def test_fixed_choices_are_typed_and_mindformers_zero_is_accepted():
    cfg = load_config(None, ["peft.pet_type=lora", "peft.lora_a_init=zero", "peft.lora_b_init=normal"])
    assert cfg.peft.lora_a_init == "zeros"
    assert cfg.peft.pet_type == "lora" and load_config(None, ["peft.pet_type=null"]).peft.pet_type is None


def test_warmup_ratio_is_a_fraction_of_the_run_not_a_step_count():
    cfg = load_config(None, ["train.warmup_ratio=0.1", "train.schedule=constant"]).train
    assert [lr_factor(s, cfg, 50) for s in (0, 4, 5)] == [pytest.approx(0.2), pytest.approx(1.0), 1.0]
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["train.warmup_ratio=0.1", "train.warmup_steps=3"])
    with pytest.raises(ConfigError, match="unknown key 'train.warmup'"):
        load_config(None, ["train.warmup=3"])


def test_global_batch_is_derived_in_one_place():
    cfg = load_config(None, ["data.micro_batch_size=3", "train.grad_accum_steps=4"])
    assert cfg.global_batch(2) == 24


def test_resume_changes_are_sorted_by_what_they_break():
    from trainer.config import resume_changes

    old = load_config(None, ["model.path=m", "train.lr=1e-3", "peft.pet_type=lora"]).to_dict()
    new = load_config(None, ["model.path=./m", "train.lr=2e-3", "peft.pet_type=lora", "peft.lora_rank=16",
                             "train.max_steps=9", "logging.log_every=5", "checkpoint.resume=none"]).to_dict()
    changes = resume_changes(old, new)
    assert changes.breaking == ["peft.lora_rank: 8 -> 16"]  # model.path: the same directory, spelled otherwise
    assert changes.optimizer == ["train.lr: 0.001 -> 0.002"]
    assert changes.other == ["logging.log_every: 1 -> 5", "train.max_steps: None -> 9"]


def test_errors_name_the_source_of_the_bad_value(tmp_path):
    path = write(tmp_path, "train:\n  lr: 3e-4\n  grad_accum_steps: 0\n")
    with pytest.raises(ConfigError, match=r"^--set train.lr=fast: train.lr: expected a number"):
        load_config(path, ["train.lr=fast", "train.grad_accum_steps=1"])
    with pytest.raises(ConfigError, match=r"cfg.yaml: train.grad_accum_steps must be >= 1"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^--set data.micro_batch=2: unknown key 'data.micro_batch'"):
        load_config(path, ["train.grad_accum_steps=1", "data.micro_batch=2"])
