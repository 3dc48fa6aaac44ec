"""Greedy generation speed: `trainer.generate` (static KV cache) beside `transformers.generate` on the same model.

    python benchmarks/bench_generate.py            # Llama-shaped 8 layers x 512 wide, vocab 32000, 64 new tokens
    python benchmarks/bench_generate.py --quick    # tiny sizes: checks the script runs
    python benchmarks/bench_generate.py --compile  # also our decode step under torch.compile (pays on GPU only)

Setup, identical for both columns: one random-init checkpoint written with transformers' `save_pretrained`,
loaded by each side from that directory in fp32 on CPU (bf16 on CUDA); the same random prompts (lengths drawn
between 32 and 128 tokens, fixed seed); greedy decoding of exactly `--new-tokens` tokens per prompt (no stop
token: transformers gets `min_new_tokens` = `max_new_tokens`), at batch 1 (each prompt alone) and batch 16
(left-padded together). Each measurement is the best of `--repeats` timed runs after one warm-up run, same
thread count. tokens/s counts generated tokens only. `match` is the share of prompts whose tokens are identical
on both sides (a check that both did the same work, not a speed figure).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "benchmarks" / "_work" / "generate"


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 256,
                "prompts": 4, "new_tokens": 8, "min_len": 8, "max_len": 24, "batch": 4}
    return {"hidden": 512, "intermediate": 1536, "layers": 8, "heads": 8, "kv_heads": 4, "vocab": 32000,
            "prompts": 16, "new_tokens": 64, "min_len": 32, "max_len": 128, "batch": 16}


def _checkpoint(sizes: dict[str, Any], out: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"], num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"], num_key_value_heads=sizes["kv_heads"], vocab_size=sizes["vocab"],
        max_position_embeddings=1024,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


def _best(fn, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time our decode step under torch.compile")
    args = ap.parse_args()
    import torch
    import transformers

    from trainer.generate import SamplingConfig, compiled_step, generate, load_model

    sizes = _sizes(args.quick)
    new = args.new_tokens or sizes["new_tokens"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    WORK.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpoint(sizes, WORK / ("quick" if args.quick else "full"))
    ours = load_model(ckpt, device=device, dtype=dtype).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, sizes["vocab"], (int(n),), generator=g).tolist()
               for n in torch.randint(sizes["min_len"], sizes["max_len"] + 1, (sizes["prompts"],), generator=g)]
    cfg = SamplingConfig(max_new_tokens=new)
    steps = {"ours": None}
    if args.compile:
        steps["ours+compile"] = compiled_step(ours)

    def run_ours(batch: int, step_fn):
        out = []
        for i in range(0, len(prompts), batch):
            out += [gen.tokens for gen in generate(ours, prompts[i:i + batch], cfg, step_fn=step_fn)]
        return out

    def run_hf(batch: int):
        out = []
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            with torch.no_grad():
                res = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)
            out += res[:, width:].tolist()
        return out

    rows = []
    for batch in (1, sizes["batch"]):
        hf_s, hf_tokens = _best(lambda b=batch: run_hf(b), args.repeats)
        total = len(prompts) * new
        rows.append({"impl": "transformers", "batch": batch, "seconds": hf_s, "tokens_per_s": total / hf_s,
                     "match": 1.0})
        for name, step_fn in steps.items():
            s, tokens = _best(lambda b=batch, f=step_fn: run_ours(b, f), args.repeats)
            match = sum(a == b for a, b in zip(tokens, hf_tokens, strict=True)) / len(prompts)
            rows.append({"impl": name, "batch": batch, "seconds": s, "tokens_per_s": total / s, "match": match,
                         "vs_transformers": hf_s / s})
    print(f"\n### Greedy generation ({'--quick' if args.quick else 'full size'}: {sizes['layers']} layers x "
          f"{sizes['hidden']}, vocab {sizes['vocab']}, {len(prompts)} prompts, {new} new tokens, {device}, "
          f"{torch.get_num_threads()} threads)\n")
    print("| impl | batch | tokens/s | vs transformers | identical tokens |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['vs_transformers']:.2f}x" if "vs_transformers" in r else "1.00x"
        print(f"| {r['impl']} | {r['batch']} | {r['tokens_per_s']:,.1f} | {ratio} | {r['match']:.0%} |")
    summary = {"device": device, "sizes": sizes, "new_tokens": new, "rows": rows}
    print("BENCH_JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
