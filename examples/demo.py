"""The end-to-end demo behind `make demo`: each step is one CLI call, exactly as a user would type it.

Run with the project's virtual environment (`.venv/bin/python examples/demo.py`); the commands are taken
from the same environment's bin directory. Everything is written under demo_out/ (re-runs overwrite it).

convert -> build a tiny model and tokenizer from the data -> pack -> verify / inspect -> train -> export,
all on the CPU in a few minutes, on data and a model the repository ships or builds itself.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Paths relative to the repo root (the commands run there), so the printed commands can be copied.
DATA = Path("examples/data")
OUT = Path("demo_out")


def step(title: str, *argv: str) -> None:
    """Print and run one command; stop the demo at the first failure with that command's exit code."""
    print(f"\n=== {title}\n$ {shlex.join(argv)}", flush=True)
    result = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=REPO)
    if result.returncode != 0:
        print(f"demo failed at: {title} (exit {result.returncode})", file=sys.stderr)
        sys.exit(result.returncode)


def main() -> None:
    (REPO / OUT).mkdir(exist_ok=True)
    conversations = OUT / "conversations.jsonl"

    # 1. Alpaca (with input, history, system, Chinese) and PaddleNLP src/tgt (multi-turn, context.system)
    #    into one canonical conversation file; the format of each file is detected from its first record.
    step(
        "convert: Alpaca + src/tgt -> conversation JSONL",
        "dataprep", "convert",
        str(DATA / "alpaca_example.json"), str(DATA / "src_tgt_example.jsonl"),
        "-o", str(conversations), "--overwrite",
    )

    # 2. The same Alpaca data as MindSpore Transformers' alpaca converter writes it, for users of that tool.
    step(
        "convert: Alpaca -> MindFormers conversations JSON",
        "dataprep", "convert",
        str(DATA / "alpaca_example.json"), "-o", str(OUT / "alpaca_mindformers.json"),
        "--output-style", "mindformers", "--overwrite",
    )

    first = (REPO / conversations).read_text(encoding="utf-8").splitlines()[0]
    print(f"\nfirst conversation record in {conversations}:\n{first}")

    # 3. No weights can be downloaded here, so build a small random Qwen3-shaped model whose ChatML BPE
    #    tokenizer is learned from the same conversations (an ordinary Hugging Face directory).
    model = OUT / "tiny-model"
    step("tiny-model: learn a tokenizer, build a random Qwen3-shaped checkpoint",
         "trainer", "tiny-model", str(conversations), "-o", str(model), "--vocab-size", "1024")

    # 4. Template (auto -> chatml from the tokenizer's chat_template), tokenize with loss masks, pack, write shards.
    packed = OUT / "packed"
    step("pack: template, tokenize, mask, pack into Arrow shards",
         "dataprep", "pack", str(conversations), "-o", str(packed), "--tokenizer", str(model),
         "--seq-length", "256", "--overwrite")
    step("verify: re-hash every shard, check every row's labels and documents", "dataprep", "verify", str(packed))
    step("inspect: manifest summary and document-length histogram", "dataprep", "inspect", str(packed))
    step("inspect: the first row with trained spans marked", "dataprep", "inspect", str(packed), "--row", "0")

    # 5. Full-parameter fine-tuning; the config is examples/finetune_tiny.yaml (`trainer config` documents every key).
    run_dir = OUT / "run"
    step("train: full-parameter fine-tuning of the tiny model, then export HF safetensors",
         "trainer", "run", "--config", "examples/finetune_tiny.yaml", "--resume", "none")

    losses = [json.loads(line) for line in (REPO / run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(m["step"], m["loss"]) for m in losses if "loss" in m]
    print("\n=== loss curve (from demo_out/run/metrics.jsonl)")
    top = max(loss for _, loss in losses)
    for step_no, loss in losses:
        print(f"step {step_no:4d}  loss {loss:7.4f}  {'#' * max(1, round(50 * loss / top))}")
    first_loss, last_loss = losses[0][1], losses[-1][1]
    print(f"\nloss fell from {first_loss:.3f} to {last_loss:.3f}; exported model: {run_dir / 'export'}; "
          f"plot: {run_dir / 'loss.png'}")
    if not last_loss < first_loss:
        print("demo failed: the loss did not fall", file=sys.stderr)
        sys.exit(1)

    # 6. See what the model learned: answers for the training conversations, scored against their references.
    step("predict: generate an answer for every conversation (the last assistant turn is the reference)",
         "trainer", "predict", "--model", str(run_dir / "export"), "--data", str(conversations),
         "-o", str(OUT / "predictions.jsonl"), "--max-new-tokens", "48", "--metrics", "em,bleu,rougeL", "--overwrite")

if __name__ == "__main__":
    main()
