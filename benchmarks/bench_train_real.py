"""Training with a real vocabulary: ours vs TRL's SFTTrainer vs HF Trainer, full and LoRA, trained tokens/s and peak memory.

    python benchmarks/bench_train_real.py            # seq 4096, Qwen2-shaped 4 x 256, Qwen's 151,936-token vocabulary
    python benchmarks/bench_train_real.py --quick    # tiny sizes and few steps: checks the script runs

What makes it "real": the Qwen2.5 tokenizer from ../shared (151,665 tokens; the model's vocabulary is Qwen's padded
151,936, as in the released checkpoints), its own chat template, Alpaca-GPT4 records, 4096-token rows. With a
vocabulary this size the LM head and the loss dominate a small model's step, which is what the chunked loss and
the untrained-position skip are for. The transformer body is small (random init) so the CPU run ends in minutes.

Columns, each in its own child process (its own peak memory), same tokens per step (one 4096-token row's worth),
same optimizer (AdamW, lr, betas, warmup, cosine), same LoRA (r 16, alpha 32, every projection), fp32 on CPU:
- ours:  `trainer.loop.train` on rows packed by `dataprep pack` (BFD), chunked loss (the default);
- trl:   `trl.SFTTrainer` with its defaults (loss `nll`, which computes only trained positions in chunks) and
         padding-free packing (`packing=True`, strategy `bfd`), on the same tokenized samples (pre-tokenized
         `input_ids` + `labels`, so the tokens are identical);
- hf:    `transformers.Trainer` + `DataCollatorWithFlattening` (padding-free), full logits.
Peak memory is the child's peak RSS (VmHWM) on CPU, `torch.cuda.max_memory_allocated` on CUDA.
Targets (issue 16): ours >= 1.5x TRL's trained tokens/s and <= 0.6x its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_train import _dataset_stats, _peak_rss_mib, _timed  # noqa: E402
from child_runs import child_main, run_child  # noqa: E402

WORK = REPO / "benchmarks" / "_work" / "train_real"
SHARED = REPO.parent / "shared" / "data"
DATA = SHARED / "alpaca" / "alpaca_gpt4_en_demo_1k.json"
TOKENIZER = SHARED / "tokenizers" / "qwen2_5"
QWEN_VOCAB = 151_936
LR, BETAS, SEED = 3e-4, (0.9, 0.95), 1234
LORA = {"r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
COLUMNS = ("ours-full", "trl-full", "hf-full", "ours-lora", "trl-lora", "hf-lora")


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"hidden": 64, "intermediate": 128, "layers": 1, "heads": 4, "kv_heads": 2, "records": 60,
                "seq_length": 512, "steps": 3, "warmup": 1}
    return {"hidden": 256, "intermediate": 768, "layers": 4, "heads": 4, "kv_heads": 2, "records": 1000,
            "seq_length": 4096, "steps": 12, "warmup": 3}


def prepare(work: Path, size: dict[str, Any]) -> dict[str, Any]:
    """Model (Qwen2-shaped, Qwen's vocabulary, the real tokenizer), packed rows, and the same samples for the peers."""
    import torch
    import transformers

    from dataprep.convert import ConvertOptions, ConvertStats, iter_conversations
    from dataprep.pipeline import PackOptions, pack_dataset
    from dataprep.tokenize import TokenizeOptions, TokenizeStats, tokenize_conversations
    from dataprep.tokenizer import load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        tok = load_tokenizer(TOKENIZER)
        torch.manual_seed(0)
        config = transformers.Qwen2Config(
            vocab_size=QWEN_VOCAB, hidden_size=size["hidden"], intermediate_size=size["intermediate"],
            num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
            num_key_value_heads=size["kv_heads"], max_position_embeddings=32768, tie_word_embeddings=False,
            eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=None)
        transformers.Qwen2ForCausalLM(config).save_pretrained(model_dir)
        for f in TOKENIZER.iterdir():
            shutil.copy2(f, model_dir / f.name)
    records = work / "records.jsonl"
    if not records.is_file():
        base = list(iter_conversations([str(DATA)], ConvertOptions(), ConvertStats()))[: size["records"]]
        records.write_text("".join(json.dumps({"id": r["id"], "messages": r["messages"]}) + "\n" for r in base))
    packed = work / f"packed-{size['seq_length']}"
    options = PackOptions(seq_length=size["seq_length"], algorithm="bfd", template="auto", overwrite=True)
    pack_dataset([str(records)], packed, model_dir, options)
    samples = work / f"samples-{size['seq_length']}.npz"
    tok = load_tokenizer(model_dir)
    convs = iter_conversations([str(records)], ConvertOptions(), ConvertStats())
    got = list(tokenize_conversations(convs, tok, TokenizeOptions(template="auto", max_length=size["seq_length"]),
                                      TokenizeStats()))
    np.savez(samples, lengths=np.array([len(s.input_ids) for s in got]),
             input_ids=np.concatenate([s.input_ids for s in got]), labels=np.concatenate([s.labels for s in got]))
    return {"model": str(model_dir), "data": str(packed), "samples": str(samples)}


def _hf_samples(path: str) -> list[dict]:
    """Our tokenized samples with HF's unshifted labels (token i is a target -> label[i] = token i)."""
    data = np.load(path)
    offsets = np.concatenate([[0], np.cumsum(data["lengths"])])
    out = []
    for i in range(len(data["lengths"])):
        ids = data["input_ids"][offsets[i]:offsets[i + 1]].astype(np.int64)
        shifted = data["labels"][offsets[i]:offsets[i + 1]]
        labels = np.full_like(ids, -100)
        labels[1:] = shifted[:-1]
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def _peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_mib()


def child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    from trainer.config import load_config
    from trainer.loop import train

    lora = spec["lora"]
    sets = [
        f"model.path={spec['model']}", f"data.train=[{spec['data']}]", "data.micro_batch_size=1",
        f"train.lr={LR}", f"train.betas=[{BETAS[0]}, {BETAS[1]}]", f"train.warmup_steps={spec['lr_warmup']}",
        f"train.max_steps={spec['steps']}", f"train.seed={SEED}", "checkpoint.export=false", "checkpoint.resume=none",
        f"logging.output_dir={spec['out']}", "logging.progress_bar=false",
    ]
    if lora:
        sets += ["peft.pet_type=lora", f"peft.lora_rank={LORA['r']}", f"peft.lora_alpha={LORA['alpha']}",
                 "peft.target_modules=.*(" + "|".join(LORA["targets"]) + ")"]
    times, per_step = [], []

    def on_step(record: dict) -> None:
        times.append(time.perf_counter())
        per_step.append((int(record["trainable_tokens"]), 0))

    result = train(load_config(None, sets), on_step=on_step)
    out = _timed(times, per_step, spec["warmup"])
    out.update({"final_loss": result.final_loss, "peak_mib": _peak_mib()})
    return out


def _clock():
    from transformers import TrainerCallback

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    return times, Clock()


def _peft_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")


def child_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list(_hf_samples(spec["samples"]))
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    times, clock = _clock()
    args = SFTConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=1, learning_rate=LR,
        lr_scheduler_type="cosine", warmup_steps=spec["lr_warmup"], adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", seed=SEED, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), bf16=False, packing=True, packing_strategy="bfd",
        max_length=spec["seq_length"], dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(spec["model"]),
                         peft_config=_peft_config() if spec["lora"] else None, callbacks=[clock])
    tokens: list[tuple[int, int]] = []
    inner = trainer.data_collator

    def collate(features):
        batch = inner(features)
        tokens.append((int((batch["labels"] != -100).sum()), int(batch["input_ids"].numel())))
        return batch

    trainer.data_collator = collate
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    out = _timed(times, tokens[: len(times)], spec["warmup"])
    out.update({"final_loss": losses[-1] if losses else None, "peak_mib": _peak_mib(), "loss_type": args.loss_type})
    return out


def child_hf(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, Trainer, TrainingArguments

    samples = _hf_samples(spec["samples"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    if spec["lora"]:
        from peft import get_peft_model

        model = get_peft_model(model, _peft_config())
    base = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    tokens: list[tuple[int, int]] = []

    def collate(features):
        batch = base(features)
        tokens.append((int((batch["labels"] != -100).sum()), int(batch["input_ids"].numel())))
        return batch

    times, clock = _clock()
    args = TrainingArguments(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["samples_per_step"],
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=spec["lr_warmup"], adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", seed=SEED,
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collate, callbacks=[clock])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    out = _timed(times, tokens[: len(times)], spec["warmup"])
    out.update({"final_loss": losses[-1] if losses else None, "peak_mib": _peak_mib()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few steps: checks that the script works")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", default=",".join(COLUMNS), help=f"comma-separated columns ({', '.join(COLUMNS)})")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child, args.spec, args.threads, {"ours": child_ours, "trl": child_trl, "hf": child_hf})
        return
    missing = [p for p in (DATA, TOKENIZER) if not p.exists()]
    if missing:
        print(f"skipped: {missing[0]} not found (the benchmark needs ../shared/data next to the repository)")
        print("BENCH_JSON " + json.dumps({"bench": "train_real", "skipped": f"{missing[0]} not found"}))
        return
    size = _sizes(args.quick)
    steps = args.steps or size["steps"]
    work = WORK / ("quick" if args.quick else "full")
    t0 = time.perf_counter()
    prep = prepare(work, size)
    stats = _dataset_stats(prep["data"])
    mean_len = float(np.load(prep["samples"])["lengths"].mean())
    per_step = max(1, round(stats["nonpad_per_row"] / mean_len))
    print(f"prepared in {time.perf_counter() - t0:.1f} s: {stats['rows']} rows of {size['seq_length']} "
          f"({stats['nonpad_per_row']:.0f} non-pad, {stats['trained_per_row']:.0f} trained tokens per row); "
          f"HF Trainer gets {per_step} samples per step", flush=True)
    common = {"model": prep["model"], "data": prep["data"], "samples": prep["samples"], "steps": steps,
              "warmup": size["warmup"], "lr_warmup": max(1, steps // 10), "seq_length": size["seq_length"],
              "samples_per_step": per_step}
    results = {}
    for name in args.only.split(","):
        t = time.perf_counter()
        results[name] = run_child(__file__, name, dict(common, lora=name.endswith("lora"), out=str(work / f"run-{name}")),
                                  args.threads)
        print(f"{name}: {time.perf_counter() - t:.1f} s wall", flush=True)

    print(f"\nCPU, {args.threads} threads, {steps} steps (first {size['warmup']} untimed), seq {size['seq_length']}, "
          f"vocab {QWEN_VOCAB}, Qwen2-shaped {size['layers']} x {size['hidden']}{'  [--quick]' if args.quick else ''}\n")
    print("| column | trained tok/s | trained tok/step | final loss | peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | {r['error']} | | | |")
        else:
            print(f"| {name} | {r['trained_tokens_per_s']:,.0f} | {r['trained_tokens_per_step']:,.0f} "
                  f"| {r['final_loss']:.4f} | {r['peak_mib']:,.0f} |")
    ratios = {}
    for mode in ("full", "lora"):
        ours, trl = results.get(f"ours-{mode}", {}), results.get(f"trl-{mode}", {})
        if "trained_tokens_per_s" in ours and "trained_tokens_per_s" in trl:
            ratios[mode] = {"speed_vs_trl": ours["trained_tokens_per_s"] / trl["trained_tokens_per_s"],
                            "memory_vs_trl": ours["peak_mib"] / trl["peak_mib"]}
            print(f"{mode}: ours / TRL {ratios[mode]['speed_vs_trl']:.2f}x trained tokens/s (target >= 1.5x), "
                  f"{ratios[mode]['memory_vs_trl']:.2f}x peak memory (target <= 0.6x)")
    print("BENCH_JSON " + json.dumps({"bench": "train_real", "quick": args.quick, "steps": steps, "size": size,
                                     "ratios": ratios, "results": results}))


if __name__ == "__main__":
    main()
