"""LoRA vs full fine-tuning in our trainer: tokens/s and peak memory on the same model and the same packed rows.

    python benchmarks/bench_lora.py            # Qwen3-shaped 8 layers x 512 wide, 1024-token rows, 12 steps
    python benchmarks/bench_lora.py --quick    # tiny sizes: checks the script runs
    python benchmarks/bench_lora.py --preset qwen3-8b --modes lora,qlora   # GPU: Qwen3-8B shape, 36 layers

Setup, identical for every column: one random-init Qwen3-shaped checkpoint (built here with a tokenizer learned
from synthetic instruction records), one dataset packed by `dataprep pack` (BFD), `trainer.loop.train` with the
same optimizer steps, micro-batch, lr schedule, seed and thread count. Only the `peft` section differs:

- full:  every parameter trains (AdamW state for all of them);
- lora:  rank-16 adapters on every projection (q k v o gate up down), base frozen;
- dora:  the same adapters with DoRA's magnitude vectors;
- qlora: the lora column on an NF4 base (peft.weight_quantize_algo nf4; the tiny --quick model's weights need
         a double-quantization block of 4 instead of QLoRA's 256 to be quantized at all);
- moslora, mora: LoRA with MoSLoRA's r x r mixer / MoRA's square matrix (same lora_rank);
- vera:  VeRA with rank 256 shared projections; lokr: LoKr rank 16 (same targets);
- qlora_fp4, lora_int8, lora_int4: the lora column on an FP4 (bitsandbytes) / int8 / int4 weight-only (torchao,
         group 128) base;
- loreft: LoReFT rank 16 at every layer, positions f7+l7 (the base frozen, no per-module adapters);
- prefix, prefix_proj: prefix tuning with 20 virtual tokens per layer, learned directly / through peft's
         reparametrisation MLP (prefix_projection, encoder_hidden_size = kv heads x head_dim).

Each column runs in its own child process, so peak memory is its own: on CUDA `torch.cuda.max_memory_allocated`,
on CPU the process's peak RSS (VmHWM), which includes the Python/torch baseline every column pays alike. Throughput
is the trained tokens over the steps after `--warmup`, timed with each step's own tokens/s record.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "benchmarks" / "_work" / "lora"
WORDS = ("red green blue cat dog bird one two three sun moon star tree river stone cloud fast slow big small "
         "open close north south east west").split()
LORA = ["peft.pet_type=lora", "peft.lora_rank=16", "peft.lora_alpha=32", "peft.target_modules=.*proj"]
MODES = {
    "full": [],
    "lora": LORA,
    "dora": [*LORA, "peft.use_dora=true"],
    "qlora": [*LORA, "peft.weight_quantize_algo=nf4"],
    "moslora": [*LORA, "peft.lora_use_mixer=true"],
    "mora": ["peft.pet_type=lora", "peft.lora_rank=16", "peft.target_modules=.*proj", "peft.use_mora=true"],
    "vera": ["peft.pet_type=vera", "peft.vera_rank=256", "peft.target_modules=.*proj"],
    "lokr": ["peft.pet_type=lokr", "peft.lokr_rank=16", "peft.lokr_alpha=32", "peft.target_modules=.*proj"],
    "qlora_fp4": [*LORA, "peft.weight_quantize_algo=fp4"],
    "lora_int8": [*LORA, "peft.weight_quantize_algo=weight_only_int8"],
    "lora_int4": [*LORA, "peft.weight_quantize_algo=weight_only_int4"],
    "loreft": ["peft.pet_type=loreft", "peft.reft_rank=16"],
    "prefix": ["peft.pet_type=prefix_tuning", "peft.num_virtual_tokens=20"],
    "prefix_proj": ["peft.pet_type=prefix_tuning", "peft.num_virtual_tokens=20", "peft.prefix_projection=true"],
}
QUICK_EXTRA = {"qlora": ["peft.qlora_weight_double_quant_block_size=4"],
               "lora_int4": ["peft.weight_only_int4_group_size=32"]}


PRESETS = {
    # The Qwen3-8B decoder (36 layers x 4096, GQA 32/8 heads of 128, MLP 12288) over this script's small
    # vocabulary: what QLoRA is for (an NF4 base of ~4.5 GB instead of 16 GB in bf16). Needs a GPU and ~70 GB
    # of disk/RAM for the fp32 checkpoint this script builds.
    "qwen3-8b": {"hidden": 4096, "intermediate": 12288, "layers": 36, "heads": 32, "kv_heads": 8, "head_dim": 128,
                 "vocab": 4096, "records": 3000, "seq_length": 2048, "steps": 8, "warmup": 3, "micro_batch": 1},
}


def _sizes(quick: bool, preset: str | None = None) -> dict[str, Any]:
    if preset:
        return dict(PRESETS[preset])
    if quick:
        return {"hidden": 64, "intermediate": 192, "layers": 2, "heads": 4, "head_dim": 16, "vocab": 400,
                "records": 400, "seq_length": 128, "steps": 5, "warmup": 2, "micro_batch": 2}
    return {"hidden": 512, "intermediate": 1536, "layers": 8, "heads": 8, "head_dim": 64, "vocab": 4096,
            "records": 6000, "seq_length": 1024, "steps": 12, "warmup": 3, "micro_batch": 2}


def _records(n: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size=int(rng.integers(4, 60)))]
        text = " ".join(words)
        out.append({"id": f"r{i}", "messages": [{"role": "user", "content": f"Repeat backwards: {text}"},
                                                 {"role": "assistant", "content": " ".join(reversed(words))}]})
    return out


def prepare(work: Path, sizes: dict[str, Any]) -> tuple[Path, Path]:
    from cli.tiny_model import build_tiny_model
    from trainer.tiny_model import TinyShape

    work.mkdir(parents=True, exist_ok=True)
    records = _records(sizes["records"])
    conv = work / "conv.jsonl"
    conv.write_text("".join(json.dumps(r) + "\n" for r in records))
    shape = TinyShape(hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"],
                      num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
                      num_key_value_heads=sizes.get("kv_heads", sizes["heads"] // 2), head_dim=sizes["head_dim"])
    model = build_tiny_model(records, work / "model", vocab_size=sizes["vocab"], shape=shape,
                             tokenizer_dir=work / "tokenizer")
    data = work / "data"
    cmd = [sys.executable, "-m", "cli.dataprep", "pack", str(conv), "-o", str(data), "--tokenizer", str(model),
           "--seq-length", str(sizes["seq_length"]), "--template", "chatml", "--overwrite"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"dataprep pack failed:\n{proc.stderr[-3000:]}")
    return model, data


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from trainer.config import load_config
    from trainer.loop import train

    sets = [f"model.path={spec['model']}", f"data.train=[{spec['data']}]", f"logging.output_dir={spec['out']}",
            "logging.progress_bar=false", f"train.max_steps={spec['steps']}", "train.lr=1e-4",
            f"data.micro_batch_size={spec['micro_batch']}", "checkpoint.export=false", "checkpoint.resume=none",
            "train.seed=1234", *MODES[spec["mode"]], *(QUICK_EXTRA.get(spec["mode"], []) if spec["quick"] else [])]
    config = load_config(None, sets)
    records: list[dict] = []
    result = train(config, on_step=records.append)
    timed = records[spec["warmup"]:]
    tokens = sum(r["trainable_tokens"] for r in timed)
    seconds = sum(r["trainable_tokens"] / r["tokens_per_s"] for r in timed if r["tokens_per_s"] > 0)
    cuda = torch.cuda.is_available()
    return {
        "tokens_per_s": tokens / seconds if seconds else None,
        "step_s_median": statistics.median(r["trainable_tokens"] / r["tokens_per_s"] for r in timed),
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib(),
        "memory_kind": "cuda max allocated" if cuda else "peak RSS",
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "final_loss": result.final_loss,
    }


def run_child(mode: str, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    spec = {**spec, "mode": mode, "out": str(WORK / f"run-{mode}")}
    spec_path = WORK / f"spec-{mode}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path), "--threads", str(threads)],
                          env=env, cwd=REPO, check=False)
    out = spec_path.with_suffix(".result.json")
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"child {mode} exited with {proc.returncode}"}
    return json.loads(out.read_text())


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that the script runs")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch threads per child")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a named model shape instead of the default sizes")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated columns (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        spec_path = Path(args.child)
        spec_path.with_suffix(".result.json").write_text(json.dumps(child(json.loads(spec_path.read_text()))))
        return

    sizes = _sizes(args.quick, args.preset)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(MODES)})")
    model, data = prepare(WORK / (args.preset or ("quick" if args.quick else "full")), sizes)
    spec = {"model": str(model), "data": str(data), "quick": args.quick,
            **{k: sizes[k] for k in ("steps", "warmup", "micro_batch")}}
    results = {mode: run_child(mode, spec, args.threads) for mode in modes}

    print(f"\n### PEFT methods vs full fine-tuning ({args.preset or ('--quick' if args.quick else 'full size')}: {sizes['layers']} layers x "
          f"{sizes['hidden']} wide, rows of {sizes['seq_length']} tokens, micro-batch {sizes['micro_batch']}, "
          f"{sizes['steps']} steps, {args.threads} threads)\n")
    ref = "full" if "full" in results else modes[0]
    print(f"| mode | trainable params | % of total | tokens/s | vs {ref} | peak memory MiB | vs {ref} | final loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    full = results.get(ref, {})  # the reference column: full, else the first mode
    summary: dict[str, Any] = {"bench": "lora", "quick": args.quick, "sizes": sizes, "threads": args.threads}
    for mode, r in results.items():
        if "error" in r:
            print(f"| {mode} | {r['error']} | | | | | | |")
            summary[mode] = r
            continue
        tps_ratio = r["tokens_per_s"] / full["tokens_per_s"] if full.get("tokens_per_s") else None
        mem_ratio = r["peak_memory_mib"] / full["peak_memory_mib"] if full.get("peak_memory_mib") else None
        pct = 100.0 * r["trainable_params"] / max(r["total_params"], 1)
        print(f"| {mode} | {r['trainable_params']:,} | {pct:.2f} | {_fmt(r['tokens_per_s'])} | {_fmt(tps_ratio, '.2f')}x "
              f"| {_fmt(r['peak_memory_mib'])} | {_fmt(mem_ratio, '.2f')}x | {_fmt(r['final_loss'], '.4f')} |")
        summary[mode] = {**r, "tokens_per_s_vs_full": tps_ratio, "peak_memory_vs_full": mem_ratio}
    kind = next((r["memory_kind"] for r in results.values() if "memory_kind" in r), "")
    print(f"\nPeak memory is {kind}.")
    print("BENCH_JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
