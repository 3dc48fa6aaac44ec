"""Packed-row attention backends side by side: our model's forward+backward tokens/s with sdpa (mask), varlen
(flash) and flex on the same packed batch, plus MFU on GPU.

    python benchmarks/attention_backends.py            # Llama-3-8B-shaped, 4 layers, bf16, seq 4096 (GPU)
    python benchmarks/attention_backends.py --quick    # tiny model on CPU (sdpa only), checks the script runs

FLOPs are counted honestly for packed rows: matmul FLOPs are 6 * (params - input embedding) * tokens (a lookup
is not a matmul; lm_head is), and attention FLOPs count only the causal pairs inside each document
(12 * layers * heads * head_dim * sum(len^2) / 2), not T^2. No optimizer step is timed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
import torch.nn.functional as F

from trainer import attention
from trainer.model import Transformer
from trainer.model_config import ModelConfig

log = logging.getLogger("bench")

LLAMA3_8B_4L = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
}
TINY = {
    "model_type": "qwen3", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def packed_batch(batch: int, seqlen: int, vocab: int, device: torch.device, seed: int = 0):
    """Rows filled with documents of random lengths (64..seqlen/2), the tail as its own segment."""
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    pos = []
    for _ in range(batch):
        left = seqlen
        row_pos = []
        while left > 0:
            n = min(left, int(torch.randint(64, max(65, seqlen // 2), (1,), generator=g)))
            lengths.append(n)
            row_pos.append(torch.arange(n))
            left -= n
        pos.append(torch.cat(row_pos))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=g)
    return ids.to(device), torch.stack(pos).to(device), cu.to(device), max(lengths), lengths


def step_flops(cfg: ModelConfig, n_matmul_params: int, tokens: int, lengths: list[int]) -> float:
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * sum(n * n for n in lengths) / 2
    return 6 * n_matmul_params * tokens + attn


def run(backend: str, model: Transformer, batch, steps: int, warmup: int) -> float:
    ids, pos, cu, max_len, _ = batch
    model.config.attn_backend = backend
    labels = torch.roll(ids, -1, dims=1)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        logits = model(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=max_len)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    hf = TINY if (args.quick or not cuda) else LLAMA3_8B_4L
    seqlen = 256 if args.quick else args.seq_length
    steps, warmup = (2, 1) if args.quick else (args.steps, 3)
    cfg = ModelConfig.from_hf(hf)
    with torch.device(device):
        model = Transformer(cfg)
    model.init_weights()
    model.to(dtype)
    if args.compile:
        for i, block in enumerate(model.model.layers):
            model.model.layers[i] = torch.compile(block)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = n_params - (0 if cfg.tie_word_embeddings else model.model.embed_tokens.weight.numel())
    batch = packed_batch(args.batch, seqlen, cfg.vocab_size, device)
    tokens = args.batch * seqlen
    flops = step_flops(cfg, n_matmul, tokens, batch[4])

    backends = ["sdpa"] + ([b for b in ("varlen", "flex") if _usable(b, device, dtype)] if cuda else [])
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if cuda and k in torch.cuda.get_device_name()), None)
    rows = []
    for b in backends:
        sec = run(b, model, batch, steps, warmup)
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        rows.append({"backend": b, "step_s": sec, "tokens_per_s": tokens / sec,
                     "mfu": (flops / sec / peak) if peak else None, "peak_mem_gib": mem})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    base = rows[0]["tokens_per_s"]
    print(f"\nmodel {hf['model_type']} {cfg.num_hidden_layers}L h{cfg.hidden_size}, {n_params / 1e9:.2f}B params, "
          f"{dtype}, batch {args.batch} x seq {seqlen}, {len(batch[4])} segments, device {device}, "
          f"compile={args.compile}\n")
    print("| backend | step s | tokens/s | vs sdpa | MFU | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['backend']} | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / base:.2f}x | {mfu} | {r['peak_mem_gib']:.1f} |")
    print("BENCH_JSON " + json.dumps({"bench": "attention_backends", "quick": args.quick, "compile": args.compile, "rows": rows}))


def _usable(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    try:
        attention.resolve_backend(backend, device, dtype)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
