"""Training and inference agree on the template: fine-tune a tiny model until it has memorised a few dozen
real conversations (multi-turn, system prompts, Chinese and English; the repo's own examples/data), then
`trainer predict` must reproduce at least 90% of the training answers exactly, and so must transformers'
`generate` on the export, prompted with the tokenizer's own `apply_chat_template(add_generation_prompt=True)`.

The same run's DCP checkpoint, loaded by `trainer predict --model RUN_DIR`, must predict exactly what the export
predicts; a short LoRA run checks the same for an adapter checkpoint against base + adapter export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.dataprep import main as dataprep_cli
from cli.trainer import main as trainer_cli
from trainer.config import load_config
from trainer.loop import train

REPO = Path(__file__).resolve().parents[1]
DATA = [REPO / "examples" / "data" / "src_tgt_example.jsonl", REPO / "examples" / "data" / "alpaca_example.json"]
N_ALPACA = 16


def _invoke(cli, args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    root = tmp_path_factory.mktemp("memorise")
    alpaca = json.loads(DATA[1].read_text(encoding="utf-8"))[:N_ALPACA]
    (root / "alpaca.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
    conv = root / "conv.jsonl"
    _invoke(dataprep_cli, ["convert", DATA[0], root / "alpaca.json", "-o", conv])
    records = [json.loads(line) for line in conv.read_text(encoding="utf-8").splitlines()]
    assert any(len(r["messages"]) > 3 for r in records) and any(r["messages"][0]["role"] == "system" for r in records)
    assert any("你好" in m["content"] for r in records for m in r["messages"])
    model = root / "model"
    _invoke(trainer_cli, ["tiny-model", conv, "-o", model, "--vocab-size", "600", "--layers", "2",
                          "--hidden-size", "64", "--heads", "4"])
    packed = root / "packed"
    _invoke(dataprep_cli, ["pack", conv, "-o", packed, "--tokenizer", model, "--seq-length", "256"])
    run_dir = root / "run"
    config = load_config(None, [
        f"model.path={model}", f"data.train=[{packed}]", f"logging.output_dir={run_dir}",
        "logging.progress_bar=false", "logging.log_every=50", "train.lr=1e-2", "train.warmup_steps=5",
        "train.max_steps=100", "train.schedule=cosine", "train.seed=3", "data.micro_batch_size=4",
        "checkpoint.every_steps=100", "train.max_grad_norm=1.0",
    ])
    result = train(config)
    return root, conv, records, model, run_dir, result


def _predict(root: Path, conv: Path, name: str, *model_args) -> list[dict]:
    out = root / f"{name}.jsonl"
    res = _invoke(trainer_cli, ["predict", *model_args, "--data", conv, "-o", out, "--max-new-tokens", "48",
                                "--batch-size", "8", "--metrics", "em,bleu,rougeL", "--json"])
    summary = json.loads(res.stdout)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return summary, rows


def test_predict_reproduces_memorised_answers(memorised):
    root, conv, records, _, run_dir, result = memorised
    assert result.losses[-1] < 0.05, result.losses[-10:]
    summary, rows = _predict(root, conv, "export", "--model", run_dir / "export")
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    exact = [r["prediction"] == r["reference"] for r in rows]
    assert sum(exact) >= 0.9 * len(rows), [(r["reference"], r["prediction"]) for r in rows if r["prediction"] != r["reference"]]
    assert summary["metrics"]["em"] >= 0.9 and summary["metrics"]["rougeL"] >= 0.9
    assert summary["records"] == len(records) and summary["template"] == "chatml"
    assert all(r["stop_reason"] == "stop" for r, ok in zip(rows, exact, strict=True) if ok)
    # the DCP checkpoint of the same run predicts exactly what its export predicts
    _, from_ckpt = _predict(root, conv, "ckpt", "--model", run_dir)
    assert [r["prediction"] for r in from_ckpt] == [r["prediction"] for r in rows]


def test_transformers_generate_on_the_export_reproduces_them_too(memorised):
    transformers = pytest.importorskip("transformers")
    _, _, records, _, run_dir, _ = memorised
    export = run_dir / "export"
    tok = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    hits = 0
    for rec in records:
        prompt, reference = rec["messages"][:-1], rec["messages"][-1]["content"]
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                 do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                                 pad_token_id=tok.pad_token_id)
        hits += tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == reference
    assert hits >= 0.9 * len(records)


def test_lora_checkpoint_predicts_what_base_plus_adapter_export_predicts(memorised):
    root, conv, _, model, _, _ = memorised
    packed = root / "packed"
    run_dir = root / "lora"
    train(load_config(None, [
        f"model.path={model}", f"data.train=[{packed}]", f"logging.output_dir={run_dir}",
        "logging.progress_bar=false", "train.lr=1e-2", "train.max_steps=6", "data.micro_batch_size=4",
        "checkpoint.every_steps=6", "peft.pet_type=lora", "peft.lora_b_init=normal",
        "peft.target_modules=.*q_proj|.*v_proj|.*down_proj",
    ]))
    args = ["--data", conv, "--max-new-tokens", "12", "--take", "8", "--json"]
    a = _invoke(trainer_cli, ["predict", "--model", model, "--adapter", run_dir / "export", *args,
                              "-o", root / "lora_export.jsonl"])
    b = _invoke(trainer_cli, ["predict", "--model", run_dir / "checkpoints" / "step-00000006", *args,
                              "-o", root / "lora_ckpt.jsonl"])
    base = _invoke(trainer_cli, ["predict", "--model", model, *args, "-o", root / "lora_base.jsonl"])
    assert json.loads(a.stdout)["kind"] == "hf+adapter" and json.loads(b.stdout)["kind"] == "checkpoint"
    preds = [[json.loads(line)["prediction"] for line in (root / f"lora_{n}.jsonl").read_text().splitlines()]
             for n in ("export", "ckpt", "base")]
    assert preds[0] == preds[1]
    assert preds[0] != preds[2]  # the adapter changed the answers: the comparison above is not vacuous
    del base
