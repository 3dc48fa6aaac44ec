"""Build a tiny end-to-end setup for trainer tests: tokenizer, Qwen3-shaped model, packed dataset.

Everything is made from records written here, so trainer tests need neither ../shared nor a download.
Rows are packed first-fit in input order: the packing algorithm is not what these tests are about.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from dataprep.tokenize import TokenizeOptions, tokenize_conversations
from dataprep.tokenizer import load_tokenizer
from formats.writer import DatasetWriter

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "one", "two", "three", "sun", "moon", "star"]


def records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size=int(rng.integers(2, 9)))]
        out.append({
            "id": f"r{i}",
            "messages": [
                {"role": "user", "content": "Repeat: " + " ".join(words)},
                {"role": "assistant", "content": " ".join(words)},
            ],
        })
    return out


def make_tokenizer_and_model(root: Path, layers: int = 2) -> Path:
    from cli.tiny_model import build_tiny_model
    from trainer.tiny_model import TinyShape

    shape = TinyShape(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16)
    return build_tiny_model(records(300, seed=1), root / "model", vocab_size=300, shape=shape,
                            tokenizer_dir=root / "tokenizer")


def pack_rows(model_dir: Path, out_dir: Path, n_records: int, seq_length: int, seed: int = 0) -> Path:
    tokenizer = load_tokenizer(model_dir)
    samples = list(tokenize_conversations(records(n_records, seed), tokenizer,
                                          TokenizeOptions(template="chatml", max_length=seq_length)))
    rows: list[list] = []
    for sample in samples:
        if not rows or sum(len(s.input_ids) for s in rows[-1]) + len(sample.input_ids) > seq_length:
            rows.append([])
        rows[-1].append(sample)
    pad = tokenizer.pad_id
    with DatasetWriter(out_dir, seq_length, pad, overwrite=True) as writer:
        for row in rows:
            ids = np.full(seq_length, pad, dtype=np.int32)
            labels = np.full(seq_length, -100, dtype=np.int32)
            at = 0
            for s in row:
                ids[at:at + len(s.input_ids)] = s.input_ids
                labels[at:at + len(s.labels)] = s.labels
                at += len(s.input_ids)
            writer.write_row(ids, labels, [len(s.input_ids) for s in row], [s.id for s in row])
        writer.finish(tokenizer={"fingerprint": tokenizer.fingerprint}, template="chatml")
    return out_dir


def tiny_setup(root: Path, n_records: int = 160, seq_length: int = 128, layers: int = 2) -> tuple[Path, Path, Path]:
    """(root, model dir, packed data dir) under `root`: what the trainer tests' module fixtures start from."""
    model_dir = make_tokenizer_and_model(root, layers=layers)
    return root, model_dir, pack_rows(model_dir, root / "data", n_records=n_records, seq_length=seq_length)


def tiny_config(model_dir: Path, data_dir: Path, out: Path, *extra: str):
    """A trainer config that runs `model_dir` on the packed rows in `data_dir` into `out`, without a progress
    bar; `extra` holds the test's own `section.key=value` overrides."""
    from trainer.config import load_config

    return load_config(None, [f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={out}",
                              "logging.progress_bar=false", *extra])


def logged_losses(out_dir: Path) -> list[float]:
    """The per-step losses a run wrote to its metrics.jsonl (eval rows left out)."""
    rows = [orjson.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def learns_and_resumes_exactly(root: Path, model_dir: Path, method: list[str], lr: float) -> list[float]:
    """Train 12 steps straight and 6 + 6 resumed (checkpoint at 6) on two rows seen in turn, unshuffled, so each
    row's loss can be followed (the tiny model's frozen random tied head bounds how far an adapter moves it);
    asserts both rows' losses fall and the resumed run logs the straight run's losses exactly. Returns them.
    Runs go to root/straight and root/resumed; `method` holds the peft.* overrides."""
    from trainer.config import load_config
    from trainer.loop import train

    data_dir = pack_rows(model_dir, root / "two-rows", n_records=8, seq_length=96)

    def run(name: str, *extra: str):
        return train(load_config(None, [
            f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={root / name}",
            "logging.progress_bar=false", "logging.plot=false", f"train.lr={lr}", "train.seed=7",
            "data.shuffle=false", "train.schedule=constant", "train.deterministic=true", "data.micro_batch_size=2",
            *method, *extra]))

    losses = run("straight", "train.max_steps=12").losses
    assert losses[-2] < losses[0] - 0.1 and losses[-1] < losses[1] - 0.1, losses
    run("resumed", "train.max_steps=6", "checkpoint.every_steps=6")
    run("resumed", "train.max_steps=12", "checkpoint.every_steps=6")
    assert logged_losses(root / "resumed") == logged_losses(root / "straight") == losses
    return losses
