"""Context parallelism on CPU: peak tensor memory and step time per rank, allgather vs ring vs one process.

    .venv/bin/python benchmarks/context_parallel_check.py                  # 8k-token rows, cp 2
    .venv/bin/python benchmarks/context_parallel_check.py --seq 16384 --doc 2048

Not a bench_*.py: no peer runs context parallelism on CPU (PyTorch's `context_parallel` is CUDA-only), so this
sets sftkit's two cp attentions beside its own one-process run. One forward + backward of a Qwen-shaped decoder
on one packed row (documents of `--doc` tokens; 0 = one document per row), fp32, gloo ranks on this machine's
cores: the times say what the ring's P2P and its block math cost here, not what NCCL would. The peak is the CPU
allocator's (tests.helpers.memory_check.measure_peak_bytes) during the step, parameters included.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=32, qk_norm=True)


def _inputs(seq: int, doc: int):
    import torch

    from trainer.model import positions_from_cu_seqlens

    lengths = [seq] if doc <= 0 else [doc] * (seq // doc) + ([seq % doc] if seq % doc else [])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, seq), generator=g)
    return ids, ids.roll(-1, 1), positions_from_cu_seqlens(cu, 1, seq), cu


def _step(model, ids, labels, pos, cu) -> None:
    loss = model(ids, pos, cu, None, labels=labels)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _worker(rank: int, world: int, port: int, mode: str, seq: int, doc: int, repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from tests.helpers.memory_check import measure_peak_bytes
    from trainer.context_parallel import ContextParallel, local_slice
    from trainer.model import Transformer
    from trainer.model_config import ModelConfig

    torch.set_num_threads(1 if world > 1 else 2)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = Transformer(ModelConfig(**SHAPE))
    model.init_weights(torch.Generator().manual_seed(1))
    ids, labels, pos, cu = _inputs(seq, doc)
    if world > 1:
        cp = ContextParallel(dist.group.WORLD, rank, world, mode, mode == "ring")
        model.context_parallel = cp
        b = local_slice({"input_ids": ids, "labels": labels, "position_ids": pos}, cp)
        ids, labels, pos = b["input_ids"], b["labels"], b["position_ids"]
    _step(model, ids, labels, pos, cu)  # warm-up
    times = []
    for _ in range(repeats):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        _step(model, ids, labels, pos, cu)
        times.append(time.perf_counter() - t0)
    _, peak = measure_peak_bytes(lambda: _step(model, ids, labels, pos, cu))
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": sorted(times)[len(times) // 2], "peak_bytes": peak}))
    if world > 1:
        dist.destroy_process_group()


def run(mode: str, world: int, seq: int, doc: int, repeats: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r.json")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(world, port, mode, seq, doc, repeats, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192, help="row length")
    ap.add_argument("--doc", type=int, default=0, help="document length in the row (0: one document)")
    ap.add_argument("--cp", type=int, default=2, help="context-parallel ranks")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    args = ap.parse_args()

    rows = {"one process": run("none", 1, args.seq, args.doc, args.repeats)}
    for mode in ("allgather", "ring"):
        rows[f"cp {args.cp} {mode}"] = run(mode, args.cp, args.seq, args.doc, args.repeats)
    base = rows["one process"]
    print(f"seq {args.seq}, documents of {args.doc or args.seq} tokens, {SHAPE['num_hidden_layers']} layers x "
          f"{SHAPE['hidden_size']}, {SHAPE['num_attention_heads']}/{SHAPE['num_key_value_heads']} heads, fp32, CPU")
    print("| run | step s | peak MiB (rank 0) | peak vs one process |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.2f} | {r['peak_bytes'] / 2**20:,.0f} | "
              f"{r['peak_bytes'] / base['peak_bytes']:.2f}x |")
    print("BENCH_JSON " + json.dumps({"seq": args.seq, "doc": args.doc, "cp": args.cp, **rows}))


if __name__ == "__main__":
    main()
