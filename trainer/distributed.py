"""Process group, device mesh and FSDP2 sharding.

One code path for every launch: `trainer run` alone is a world of one (no process group, no FSDP
wrapping, nothing to pay for); under `torchrun` the env vars say the rank and world size, and every
transformer block is `fully_shard`-ed on a 1-D data-parallel mesh, then the root module.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object | None  # torch.distributed.device_mesh.DeviceMesh when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Read torchrun's environment; start the process group and mesh only when there is more than one rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size == 1:
        return DistInfo(0, 1, 0, device, None)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    log.info("rank %d/%d on %s (backend %s)", rank, world_size, device, backend)
    return DistInfo(rank, world_size, local_rank, device, mesh)


def shard_model(
    model: nn.Module,
    blocks: list[nn.Module],
    info: DistInfo,
    *,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool,
    cpu_offload: bool = False,
) -> nn.Module:
    """FSDP2: shard each block, then the root (embeddings, final norm, head).

    FSDP2 averages gradients over the data-parallel ranks; the loop multiplies its loss by the world size to
    undo that (see `loop._train`). Setting FSDP's divide factor to 1 instead would need PREMUL_SUM, which
    gloo does not have. `cpu_offload` keeps the sharded parameters, their gradients and so the optimizer state in
    host memory (FSDP2's CPUOffloadPolicy), copying each block's shard to the device for its forward/backward.
    """
    if cpu_offload and (not info.distributed or info.device.type == "cpu"):
        # FSDP2's offload pins host memory for copies to an accelerator; without one (or without FSDP, in one
        # process) the parameters already live where the offload would put them.
        log.warning("parallel.cpu_offload ignored: it needs FSDP2 on an accelerator (device %s, world size %d)",
                    info.device.type, info.world_size)
        cpu_offload = False
    if not info.distributed:
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    kw = {"mesh": info.mesh, "reshard_after_forward": reshard_after_forward, "mp_policy": mp,
          "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def all_reduce_sum(value: float | int | torch.Tensor, info: DistInfo) -> float:
    """Sum a number over ranks (identity for a world of one)."""
    if not info.distributed:
        return float(value)
    tensor = torch.as_tensor(value, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
