"""Training throughput on CPU: our trainer on packed rows vs Hugging Face `Trainer` padding-free vs our padded baseline.

Same random-init Qwen3-shaped model (built here, tokenizer learned from the data), same real data (Alpaca-GPT4
records resampled with replacement and converted to conversations), same number of optimizer steps, about the
same tokens per step, same lr schedule and optimizer settings, same torch thread count:

- ours:   `trainer.loop.train` on rows packed with BFD (`dataprep pack --algorithm bfd`), one row per step;
- hf:     `transformers.Trainer` on the same tokenized samples (unshifted labels, -100 on prompt tokens) with
          `DataCollatorWithFlattening` (padding-free: one flattened row + position_ids, no attention mask),
          `attn_implementation="sdpa"`, fp32, `per_device_train_batch_size` chosen so tokens/step match ours;
- padded: `trainer.loop.train` on one sample per row padded to seq_length (`--algorithm none`), with as many
          rows per step as HF has samples per step, so real (non-pad) tokens per step are comparable.

Each trainer runs in its own child process (so peak RSS is its own and no allocator state is shared); the first
`--warmup` steps are excluded from timing. Before training, each HF child checks whether the model, called as the
Trainer calls it, keeps flattened documents apart (logits of a document inside the flattened row vs alone); a
run that does not is labelled as attending across documents.

Usage: python benchmarks/bench_train.py [--quick] [--steps 20] [--warmup 3] [--seq-length 1024] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from child_runs import child_main, run_child  # noqa: E402

WORK = REPO / "benchmarks" / "_work"
SHARED = REPO.parent / "shared" / "data"
DATA = SHARED / "alpaca" / "alpaca_gpt4_en_demo_1k.json"
TEMPLATE = "chatml"
LR = 3e-4
BETAS = (0.9, 0.95)
SEED = 1234
LABELS = {
    "ours": "ours: trainer.loop.train, BFD-packed rows",
    "hf": "HF Trainer + DataCollatorWithFlattening (sdpa)",
    "padded": "ours, padded baseline (one sample per row)",
}


# ----------------------------------------------------------------------------------------------- preparation
def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"hidden": 64, "intermediate": 192, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16,
                "vocab": 1024, "records": 300}
    return {"hidden": 256, "intermediate": 768, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 64,
            "vocab": 4096, "records": 3000}


def prepare(work: Path, quick: bool, seq_length: int) -> dict[str, Any]:
    """Tokenizer, model, resampled records, both packed datasets and the HF samples; cached in `work`."""
    from cli.tiny_model import build_tiny_model
    from dataprep.convert import ConvertOptions, ConvertStats, iter_conversations
    from dataprep.pipeline import PackOptions, pack_dataset
    from dataprep.tokenize import TokenizeOptions, TokenizeStats, tokenize_conversations
    from dataprep.tokenizer import load_tokenizer
    from trainer.tiny_model import TinyShape

    size = _sizes(quick)
    work.mkdir(parents=True, exist_ok=True)
    base = list(iter_conversations([str(DATA)], ConvertOptions(), ConvertStats()))
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        shape = TinyShape(hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                          num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                          num_key_value_heads=size["kv_heads"], head_dim=size["head_dim"],
                          max_position_embeddings=max(4096, seq_length))
        build_tiny_model(base, model_dir, vocab_size=size["vocab"], shape=shape, tokenizer_dir=work / "tokenizer")
    records_path = work / "records.jsonl"
    if not records_path.is_file():
        picks = np.random.default_rng(SEED).integers(0, len(base), size=size["records"])
        tmp = records_path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for k, i in enumerate(picks.tolist()):
                f.write(json.dumps({"id": f"s{k}-{base[i]['id']}", "messages": base[i]["messages"]}) + "\n")
        tmp.replace(records_path)
    packed = {}
    for name, algorithm in (("bfd", "bfd"), ("padded", "none")):
        out = work / f"packed-{name}-{seq_length}"
        options = PackOptions(seq_length=seq_length, algorithm=algorithm, template=TEMPLATE)
        try:
            packed[name] = pack_dataset([str(records_path)], out, model_dir, options)
        except FileExistsError:  # made by an older version of the packer: rebuild it
            options.overwrite = True
            packed[name] = pack_dataset([str(records_path)], out, model_dir, options)
        packed[name]["path"] = str(out)
    samples_path = work / f"hf-samples-{seq_length}.npz"
    if not samples_path.is_file():
        tok = load_tokenizer(model_dir)
        records = iter_conversations([str(records_path)], ConvertOptions(), ConvertStats())
        samples = list(tokenize_conversations(records, tok, TokenizeOptions(template=TEMPLATE, max_length=seq_length),
                                              TokenizeStats()))
        lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
        np.savez(samples_path, lengths=lengths,
                 input_ids=np.concatenate([s.input_ids for s in samples]),
                 labels=np.concatenate([s.labels for s in samples]))
    return {"model": str(model_dir), "packed": packed, "samples": str(samples_path), "size": size}


def _dataset_stats(path: str) -> dict[str, float]:
    from formats.reader import open_dataset

    ds = open_dataset(path)
    rows = len(ds)
    nonpad = trained = 0
    for row in ds.iter_rows(0, rows):
        nonpad += int(np.sum(row.doc_lengths))
        trained += int(np.count_nonzero(row.labels != -100))
    return {"rows": rows, "seq_length": ds.seq_length, "nonpad_per_row": nonpad / rows, "trained_per_row": trained / rows}


# ----------------------------------------------------------------------------------------------- children
def _peak_rss_mib() -> float:
    """This process's peak RSS. ru_maxrss is not used: Linux carries the parent's high-water mark across fork+exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(times: list[float], per_step: list[tuple[int, int]], warmup: int) -> dict[str, float]:
    """Throughput over steps warmup+1..N: from the end of the last warm-up step to the end of the last step."""
    n = len(times)
    if n <= warmup:
        raise RuntimeError(f"only {n} steps timed, need more than --warmup {warmup}")
    elapsed = times[-1] - times[warmup - 1] if warmup > 0 else times[-1] - times[0]
    first = warmup if warmup > 0 else 1
    steps = per_step[first:n]
    trained = sum(s[0] for s in steps)
    nonpad = sum(s[1] for s in steps)
    durations = [b - a for a, b in zip(times[first - 1 : n - 1], times[first:n], strict=True)]
    return {
        "timed_steps": len(steps),
        "elapsed_s": elapsed,
        "trained_tokens_per_s": trained / elapsed,
        "nonpad_tokens_per_s": nonpad / elapsed,
        "step_s_mean": elapsed / len(steps),
        "step_s_median": statistics.median(durations),
        "trained_tokens_per_step": trained / len(steps),
        "nonpad_tokens_per_step": nonpad / len(steps),
        # Less sensitive to bursts of load from other processes than the mean (which is the headline number).
        "trained_tokens_per_s_at_median_step": trained / len(steps) / statistics.median(durations),
    }


def child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from formats.reader import open_dataset
    from trainer.config import load_config
    from trainer.dataset import PackedIterableDataset
    from trainer.loop import train

    mbs, steps = spec["micro_batch_size"], spec["steps"]
    config = load_config(None, [
        f"model.path={spec['model']}", "model.dtype=fp32", "model.attn_backend=sdpa",
        f"data.train=[{spec['data']}]", f"data.micro_batch_size={mbs}", "data.num_workers=0",
        f"train.lr={LR}", f"train.betas=[{BETAS[0]}, {BETAS[1]}]", "train.schedule=cosine",
        f"train.warmup_steps={spec['lr_warmup']}", f"train.max_steps={steps}", f"train.seed={SEED}",
        "train.max_grad_norm=1.0", "checkpoint.export=false", "checkpoint.every_steps=0", "checkpoint.resume=none",
        f"logging.output_dir={spec['out']}", "logging.progress_bar=false", "logging.log_every=1",
    ])
    times: list[float] = []
    records: list[dict] = []

    def on_step(record: dict) -> None:
        times.append(time.perf_counter())
        records.append(record)

    result = train(config, on_step=on_step)
    # Replay the loader's (deterministic) order to count each step's non-pad tokens; its trainable counts must
    # equal what the trainer logged, which checks the replay.
    replay = PackedIterableDataset(spec["data"], global_batch_size=mbs, micro_batch_size=mbs, seed=SEED,
                                   shuffle=True, remainder="drop", epochs=None, rank=0, world_size=1)
    ds = open_dataset(spec["data"])
    per_step = []
    for _, batch in zip(range(steps), replay, strict=False):
        nonpad = sum(int(np.sum(ds.row(int(r)).doc_lengths)) for r in batch["sample_row"].tolist())
        per_step.append((int(batch["num_trainable"]), nonpad))
    logged = [int(r["trainable_tokens"]) for r in records]
    if logged != [s[0] for s in per_step]:
        raise RuntimeError(f"loader replay disagrees with the trainer's logged tokens: {logged} vs {per_step}")
    out = _timed(times, per_step, spec["warmup"])
    out.update({"final_loss": result.final_loss, "losses": result.losses, "peak_rss_mib": _peak_rss_mib(),
                "rows_per_step": mbs, "threads": torch.get_num_threads()})
    return out


def _hf_cross_document_check(model, input_ids: np.ndarray, lengths: np.ndarray) -> float:
    """Max |logit difference| of the second document inside a flattened pair vs the document alone.

    Called exactly as the Trainer calls the model (train mode; input_ids + position_ids, no attention mask,
    no use_cache argument), so it sees what training sees.
    """
    import torch

    a, b = int(lengths[0]), int(lengths[1])
    ids = torch.from_numpy(input_ids[: a + b].astype(np.int64))[None]
    pos = torch.cat([torch.arange(a), torch.arange(b)])[None]
    model.train()
    with torch.no_grad():
        flat = model(input_ids=ids, position_ids=pos).logits[0, a:]
        alone = model(input_ids=ids[:, a:], use_cache=False).logits[0]
    return float((flat - alone).abs().max())


def child_hf(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorWithFlattening,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    data = np.load(spec["samples"])
    lengths, ids_all, labels_all = data["lengths"], data["input_ids"], data["labels"]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    samples = []
    for i in range(len(lengths)):
        ids = ids_all[offsets[i] : offsets[i + 1]].astype(np.int64)
        shifted = labels_all[offsets[i] : offsets[i + 1]]
        # HF shifts labels inside the loss: label[i] = token i where token i is a target, i.e. our pre-shifted
        # label moved one to the right.
        labels = np.full_like(ids, -100)
        labels[1:] = shifted[:-1]
        samples.append({"input_ids": ids.tolist(), "labels": labels.tolist()})

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    # transformers 5.x derives the packed-sequence mask from position_ids only when there is no KV cache; with the
    # checkpoint's use_cache=True the model makes a DynamicCache even in train mode. The Trainer sets
    # config.use_cache = TrainingArguments.use_cache (False) at init; check the model both before and after.
    cross_diff_untouched = _hf_cross_document_check(model, ids_all, lengths)

    base = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    per_batch: list[tuple[int, int]] = []

    def collate(features: list[dict]) -> dict:
        batch = base(features)
        per_batch.append((int((batch["labels"] != -100).sum()), int(batch["input_ids"].numel())))
        return batch

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=spec["lr_warmup"], weight_decay=0.0, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, eval_strategy="no",
        save_strategy="no", report_to="none", dataloader_num_workers=0, dataloader_pin_memory=False,
        remove_unused_columns=False, use_cpu=True, seed=SEED, disable_tqdm=True, bf16=False, fp16=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collate, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout would bury the table
    cross_diff = _hf_cross_document_check(trainer.model, ids_all, lengths)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    out = _timed(times, per_batch[: len(times)], spec["warmup"])
    out.update({"final_loss": losses[-1] if losses else None, "losses": losses, "peak_rss_mib": _peak_rss_mib(),
                "samples_per_step": spec["batch_size"], "threads": torch.get_num_threads(),
                "cross_document_max_logit_diff": cross_diff, "cross_document_attention": cross_diff > 1e-3,
                "cross_document_max_logit_diff_outside_trainer": cross_diff_untouched,
                "use_cache": bool(model.config.use_cache), "transformers": transformers.__version__})
    return out


# ----------------------------------------------------------------------------------------------- report
def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps: checks that the script works")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per trainer (default 40; quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="first steps excluded from timing (default 5; quick 1)")
    ap.add_argument("--seq-length", type=int, default=None, help="packed row length (default 1024; quick 256)")
    ap.add_argument("--rows-per-step", type=int, default=1, help="packed rows per optimizer step for ours")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, the same for all")
    ap.add_argument("--only", default="ours,hf,padded", help="comma-separated trainers to run, in this order")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child, args.spec, args.threads, {"ours": child_ours, "padded": child_ours, "hf": child_hf})
        return
    if not DATA.is_file():
        print(f"skipped: {DATA} not found (the benchmark needs ../shared/data next to the repository)")
        print("BENCH_JSON " + json.dumps({"bench": "train", "skipped": f"{DATA} not found"}))
        return
    steps = args.steps or (5 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    seq = args.seq_length or (256 if args.quick else 1024)
    work = WORK / ("train-quick" if args.quick else "train")
    t0 = time.perf_counter()
    prep = prepare(work, args.quick, seq)
    bfd = _dataset_stats(prep["packed"]["bfd"]["path"])
    lengths = np.load(prep["samples"])["lengths"]
    mean_len = float(lengths.mean())
    rows = args.rows_per_step
    # Samples per step for HF and the padded baseline: as many as fill the tokens of ours' packed rows.
    per_step = max(1, round(rows * bfd["nonpad_per_row"] / mean_len))
    print(f"prepared in {time.perf_counter() - t0:.1f} s: {len(lengths)} samples (mean {mean_len:.0f} tokens), "
          f"{bfd['rows']} BFD rows of {seq} ({bfd['nonpad_per_row']:.0f} non-pad tokens per row); "
          f"HF and padded get {per_step} samples per step", flush=True)
    lr_warmup = max(1, steps // 10)
    common = {"model": prep["model"], "steps": steps, "warmup": warmup, "lr_warmup": lr_warmup}
    specs = {
        "ours": dict(common, data=prep["packed"]["bfd"]["path"], micro_batch_size=rows, out=str(work / "run-ours")),
        "hf": dict(common, samples=prep["samples"], batch_size=per_step, out=str(work / "run-hf")),
        "padded": dict(common, data=prep["packed"]["padded"]["path"], micro_batch_size=per_step,
                       out=str(work / "run-padded")),
    }
    results = {}
    for name in args.only.split(","):
        t = time.perf_counter()
        results[name] = run_child(__file__, name, specs[name], args.threads)
        print(f"{name}: {time.perf_counter() - t:.1f} s wall", flush=True)

    labels = dict(LABELS)
    if results.get("hf", {}).get("cross_document_attention"):
        labels["hf"] += " -- ATTENDS ACROSS DOCUMENTS (packed position_ids ignored)"
    print(f"\nTraining on CPU ({args.threads} torch threads), {steps} optimizer steps each, first {warmup} not timed; "
          f"model hidden {prep['size']['hidden']}, {prep['size']['layers']} layers, vocab {prep['size']['vocab']}; "
          f"seq_length {seq}{'  [--quick]' if args.quick else ''}\n")
    print("| trainer | trained tok/s | non-pad tok/s | step s (mean / median) | trained tok/s at median step "
          "| trained tok/step | non-pad tok/step | final loss | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {labels[name]} | {r['error']} | | | | | | | |")
            continue
        print(f"| {labels[name]} | {_fmt(r['trained_tokens_per_s'])} | {_fmt(r['nonpad_tokens_per_s'])} "
              f"| {r['step_s_mean']:.3f} / {r['step_s_median']:.3f} | {_fmt(r['trained_tokens_per_s_at_median_step'])} "
              f"| {_fmt(r['trained_tokens_per_step'])} "
              f"| {_fmt(r['nonpad_tokens_per_step'])} | {_fmt(r['final_loss'], '.4f')} | {_fmt(r['peak_rss_mib'])} |")

    def tps(name: str) -> float | None:
        return results.get(name, {}).get("trained_tokens_per_s")

    def ratio(peer: str) -> float | None:
        return tps("ours") / tps(peer) if tps("ours") and tps(peer) else None

    ratio_hf, ratio_padded = ratio("hf"), ratio("padded")
    print(f"\nours / HF: {_fmt(ratio_hf, '.2f')}x (target >= 1.2x); ours / padded: {_fmt(ratio_padded, '.2f')}x "
          "(target >= 2x), in trained tokens/s.")
    r = results.get("hf", {})
    if "cross_document_attention" in r:
        print(f"HF packed-row check, a document inside a flattened row vs alone, max |logit diff|: "
              f"{r['cross_document_max_logit_diff']:.2e} as the Trainer runs it (config.use_cache={r['use_cache']}) -> "
              f"{'ATTENDS ACROSS documents' if r['cross_document_attention'] else 'documents kept apart'}; "
              f"{r['cross_document_max_logit_diff_outside_trainer']:.2e} calling the loaded model directly "
              "(checkpoint's use_cache=True: transformers skips the packed mask when it makes a KV cache).")
    med = {k: v.get("trained_tokens_per_s_at_median_step") for k, v in results.items()}
    if med.get("ours") and med.get("hf") and med.get("padded"):
        print(f"At the median step time: ours / HF {med['ours'] / med['hf']:.2f}x, ours / padded "
              f"{med['ours'] / med['padded']:.2f}x (less sensitive to bursts of load from other processes).")
    print("Headline numbers: trained tokens over wall-clock of the timed steps. On a shared machine treat them as "
          "indicative only; step times there can swing by 10x with other processes' load.")
    summary = {
        "bench": "train", "quick": args.quick, "threads": args.threads, "steps": steps, "warmup": warmup,
        "seq_length": seq, "model": prep["size"], "samples_per_step": per_step, "rows_per_step": rows,
        "ours_trained_tokens_per_s": tps("ours"), "hf_trained_tokens_per_s": tps("hf"),
        "padded_trained_tokens_per_s": tps("padded"), "ratio_vs_hf": ratio_hf, "ratio_vs_padded": ratio_padded,
        "hf_cross_document_attention": results.get("hf", {}).get("cross_document_attention"),
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in results.items()},
    }
    print("BENCH_JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
