"""The training loop end to end on a tiny model the tests build: loss falls, accumulation is exact, export loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_run import pack_rows, tiny_setup
from trainer.config import load_config
from trainer.loop import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"))


def _config(root, model_dir, data_dir, name, *extra):
    return load_config(None, [
        f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={root / name}",
        "logging.progress_bar=false", "train.lr=3e-3", "train.warmup_steps=2", "train.seed=7",
        "train.deterministic=true", *extra,
    ])


def test_loss_falls_and_run_dir_is_complete(tiny):
    root, model_dir, data_dir = tiny
    result = train(_config(root, model_dir, data_dir, "run", "train.max_steps=30", "data.micro_batch_size=2"))
    assert result.steps == 30
    assert result.losses[-1] < 0.6 * result.losses[0], result.losses
    out = root / "run"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert all(m["trainable_tokens"] > 0 and m["tokens_per_s"] > 0 and m["grad_norm"] > 0 for m in metrics)
    # The logged lr is the rate that step used (warmup 2 steps to 3e-3, then cosine to 0 over 30 steps).
    from trainer.optim import lr_factor

    cfg = _config(root, model_dir, data_dir, "unused", "train.max_steps=30").train
    assert [m["lr"] for m in metrics] == pytest.approx([3e-3 * lr_factor(s, cfg, 30) for s in range(30)])
    assert metrics[0]["lr"] == pytest.approx(1.5e-3) and metrics[-1]["lr"] > 0
    assert (out / "config.resolved.yaml").exists() and (out / "summary.json").exists()
    assert (out / "export" / "config.json").exists()


def test_grad_accumulation_matches_one_big_micro_batch(tiny):
    """Loss is normalised by the whole step's trainable tokens, so 4x1 accumulation equals one batch of 4."""
    root, model_dir, data_dir = tiny
    # fp32 even on a GPU (where auto means bf16): the equality below is about the arithmetic, not rounding.
    common = ("train.max_steps=3", "checkpoint.export=false", "data.shuffle=false", "model.dtype=fp32")
    big = train(_config(root, model_dir, data_dir, "big", *common, "data.micro_batch_size=4"))
    acc = train(_config(root, model_dir, data_dir, "acc", *common, "data.micro_batch_size=1",
                        "train.grad_accum_steps=4"))
    assert acc.losses == pytest.approx(big.losses, rel=1e-5, abs=1e-6)


def test_export_reproduces_logits_in_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    from trainer.weights import load_pretrained

    root, model_dir, data_dir = tiny
    result = train(_config(root, model_dir, data_dir, "exp", "train.max_steps=2"))
    ours = load_pretrained(result.export_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.export_dir, dtype=torch.float32)
    ids = torch.randint(0, ours.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    before = load_pretrained(model_dir)
    with torch.no_grad():
        assert not torch.allclose(before(ids), ours(ids))  # training changed the weights
    # The export stands alone: the tokenizer (with its chat template), a model card naming the data it was
    # trained on by fingerprint, and weight files anyone on the machine can read.
    from formats.atomic import plain_file_mode
    from formats.manifest import dataset_fingerprint, read_manifest

    export = Path(result.export_dir)
    tok, base_tok = (transformers.AutoTokenizer.from_pretrained(d) for d in (export, model_dir))
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red cat"}]
    assert tok.chat_template and tok.apply_chat_template(chat) == base_tok.apply_chat_template(chat)
    card = (export / "README.md").read_text()
    assert card.startswith("---\nbase_model: " + str(model_dir.resolve()))
    assert dataset_fingerprint(read_manifest(data_dir)) in card and "max_steps: 2" in card
    for weights in export.glob("*.safetensors"):
        assert weights.stat().st_mode & 0o777 == plain_file_mode(), weights


def test_activation_checkpointing_gives_the_same_gradients(tiny):
    from trainer.weights import load_pretrained

    _, model_dir, _ = tiny
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 10, 24, 40, 48], dtype=torch.int32)
    grads = []
    for flag in (False, True):
        model = load_pretrained(model_dir)
        model.activation_checkpointing = flag
        model.train()
        model(ids, cu_seqlens=cu, max_seqlen=16).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_eval_loss_every_n_steps(tiny):
    """data.eval is scored every train.eval_every steps over every eval row once; it falls as training proceeds."""
    root, model_dir, data_dir = tiny
    eval_dir = pack_rows(model_dir, root / "eval", n_records=40, seq_length=128, seed=5)
    result = train(_config(root, model_dir, data_dir, "eval", "train.max_steps=20", "train.eval_every=10",
                           f"data.eval={eval_dir}", "checkpoint.export=false", "data.micro_batch_size=2"))
    assert [step for step, _ in result.eval_losses] == [10, 20]
    assert result.eval_losses[1][1] < result.eval_losses[0][1]
    logged = [json.loads(line) for line in (root / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [m["eval_loss"] for m in logged if "eval_loss" in m] == [loss for _, loss in result.eval_losses]


def test_save_format_dcp_plus_hf_exports_at_every_checkpoint(tiny):
    from trainer.weights import load_pretrained

    root, model_dir, data_dir = tiny
    train(_config(root, model_dir, data_dir, "fmt", "train.max_steps=9", "checkpoint.every_steps=3",
                  "checkpoint.keep=2", "checkpoint.save_format=dcp+hf", "checkpoint.export=false"))
    exports = root / "fmt" / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["step-00000006", "step-00000009"]  # newest `keep`
    ids = torch.arange(1, 21).unsqueeze(0)
    with torch.no_grad():
        six, nine = (load_pretrained(exports / name)(ids) for name in ("step-00000006", "step-00000009"))
    assert not torch.allclose(six, nine)  # each export holds the weights of its own step
