"""Worker for the 2-process FSDP2 weights test (imported by spawned processes; no transformers import here)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def run(rank: int, world: int, port: int, src: str, out: str, result_dir: str, device: str = "cpu") -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from trainer.model import Transformer
    from trainer.model_config import ModelConfig
    from trainer.weights import export_hf, load_hf_weights, materialize

    torch.set_num_threads(1)  # two ranks on a small shared CPU: OpenMP spinning makes threads slower
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh(device, (world,))
        with torch.device("meta"):
            model = Transformer(ModelConfig.from_pretrained(src))
        # bf16 compute over fp32 masters, as on GPU: after a forward the root keeps bf16 unsharded copies,
        # which export must not write.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        materialize(model, device)
        load_hf_weights(model, src, show_progress=False)
        # Each rank holds only its rows: the local shard of the embedding is a strict part of it.
        emb = model.model.embed_tokens.weight
        local_rows = emb.to_local().shape[0]
        tied = model.lm_head.weight is emb  # checked before forward: the root keeps unsharded params after it
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(ids.to(device)).float().cpu()
        torch.save({"logits": logits, "local_rows": local_rows, "tied": tied},
                   Path(result_dir) / f"rank{rank}.pt")
        export_hf(model, out, source_dir=src, max_shard_size="40KB")
    finally:
        dist.destroy_process_group()
