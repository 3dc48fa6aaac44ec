"""Process group, device mesh, tensor parallelism and FSDP2 sharding.

One code path for every launch: `trainer run` alone is a world of one (no process group, no FSDP
wrapping, nothing to pay for); under `torchrun` the env vars say the rank and world size, and the
`parallel.*` keys lay the ranks out on a named device mesh:

    dp_replicate x dp_shard x cp x tp = world size      (tp innermost: a tp group is adjacent ranks, one node)

Context parallelism (`trainer.context_parallel`): the cp ranks of one data-parallel group read the same rows,
each a slice of their positions. FSDP2 shards over dp_shard and cp flattened into one dimension (`dp_shard_cp`,
as torchtitan does) rather than over dp_shard plus an all-reduce over cp: the parameters are then sharded
over more ranks (less memory each), FSDP2's reduce-scatter sums the cp ranks' partial gradients with no extra
collective, and the checkpoint is sharded like a dp run of dp_shard x cp ranks, so it resumes on any mesh.

Only the dimensions larger than 1 are in the mesh (plus dp_shard when dp_replicate needs it for HSDP, or cp
to flatten with).
Tensor parallelism (`trainer.tensor_parallel`) is applied first, then every transformer block and the root
are `fully_shard`-ed on the data-parallel part of the mesh (2-D `dp_replicate x dp_shard`: HSDP). Ranks of
one tp group hold one model replica between them, so they read the same rows and count the same tokens:
data partition, token counts and loss normalisation use the data-parallel rank and size (`DistInfo.dp_*`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from trainer.config import ParallelSection

from trainer.mesh import MeshError, MeshShape, resolve_mesh_shape  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object | None  # torch.distributed.device_mesh.DeviceMesh (named dims) when world_size > 1
    shape: MeshShape = field(default_factory=MeshShape)
    dp_rank: int = 0  # this rank's index among the data-parallel ranks (which rows it reads)
    dp_mesh: object | None = None  # the mesh FSDP2 shards over; None when there is one data-parallel rank
    tp_mesh: object | None = None  # the tensor-parallel sub-mesh; None when parallel.tp is 1
    cp_mesh: object | None = None  # the context-parallel sub-mesh; None when parallel.cp is 1
    sequence_parallel: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        return self.shape.dp

    @property
    def fsdp(self) -> bool:
        """Whether parameters are FSDP2-sharded (there is more than one data-parallel rank)."""
        return self.dp_mesh is not None

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_mesh is not None

    @property
    def context_parallel(self) -> bool:
        return self.cp_mesh is not None

    @property
    def grad_average_size(self) -> int:
        """Ranks FSDP2 averages gradients over (the data-parallel ranks times the context-parallel ones)."""
        return self.shape.dp * self.shape.cp


def init_distributed(backend: str = "auto", timeout_s: float = 600.0,
                     parallel: ParallelSection | None = None) -> DistInfo:
    """Read torchrun's environment; start the process group and mesh only when there is more than one rank.

    The mesh shape is checked against the world size before the process group starts, so a config that does
    not fit fails on every rank with the same message instead of hanging in a collective."""
    from trainer.config import ParallelSection

    parallel = parallel or ParallelSection()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    shape = resolve_mesh_shape(parallel, world_size, device.type)
    if world_size == 1:
        return DistInfo(0, 1, 0, device, None, shape, sequence_parallel=parallel.sequence_parallel)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    names = [name for name, _ in shape.dims()]
    mesh = init_device_mesh(device.type, tuple(size for _, size in shape.dims()), mesh_dim_names=tuple(names))
    dp_mesh = None
    shard_dim = "dp_shard"
    if shape.cp > 1:  # FSDP2 shards over dp_shard x cp as one dimension (see the module docstring)
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        shard_dim = "dp_shard_cp"
    if shape.dp_replicate > 1:
        dp_mesh = mesh["dp_replicate", shard_dim]  # HSDP: replicate over dim 0, shard over dim 1
    elif shape.dp_shard > 1 or shape.cp > 1:
        dp_mesh = mesh if names == ["dp_shard"] else mesh[shard_dim]
    dp_rank = 0
    if "dp_shard" in names:
        dp_rank = mesh.get_local_rank("dp_shard")
        if "dp_replicate" in names:
            dp_rank += mesh.get_local_rank("dp_replicate") * shape.dp_shard
    tp_mesh = None
    if shape.tp > 1:
        tp_mesh = mesh if names == ["tp"] else mesh["tp"]
    cp_mesh = mesh["cp"] if shape.cp > 1 else None
    log.info("rank %d/%d on %s (backend %s), mesh %s, data-parallel rank %d/%d", rank, world_size, device,
             backend, dict(shape.dims()), dp_rank, shape.dp)
    return DistInfo(rank, world_size, local_rank, device, mesh, shape, dp_rank, dp_mesh, tp_mesh,
                    cp_mesh=cp_mesh, sequence_parallel=parallel.sequence_parallel)


def shard_model(
    model: nn.Module,
    blocks: list[nn.Module],
    info: DistInfo,
    *,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool,
    cpu_offload: bool = False,
) -> nn.Module:
    """Tensor parallelism first (when parallel.tp > 1), then FSDP2: shard each block, then the root.

    FSDP2 averages gradients over the data-parallel ranks; the loop multiplies its loss by the data-parallel
    size to undo that (see `loop.train_step`). Setting FSDP's divide factor to 1 instead would need
    PREMUL_SUM, which gloo does not have. `cpu_offload` keeps the sharded parameters, their gradients and so
    the optimizer state in host memory (FSDP2's CPUOffloadPolicy), copying each block's shard to the device
    for its forward/backward.
    """
    if cpu_offload and (not info.fsdp or info.device.type == "cpu"):
        # FSDP2's offload pins host memory for copies to an accelerator; without one (or without FSDP, in one
        # process) the parameters already live where the offload would put them.
        log.warning("parallel.cpu_offload ignored: it needs FSDP2 on an accelerator (device %s, %d "
                    "data-parallel ranks)", info.device.type, info.dp_size)
        cpu_offload = False
    if info.tensor_parallel:
        from trainer.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, info.tp_mesh, sequence_parallel=info.sequence_parallel)
    if not info.fsdp:
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    kw = {"mesh": info.dp_mesh, "reshard_after_forward": reshard_after_forward, "mp_policy": mp,
          "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def all_reduce_sum(value: float | int | torch.Tensor, info: DistInfo, *, data_parallel: bool = False,
                   context_parallel: bool = False) -> float:
    """Sum a number over ranks (identity for a world of one).

    `data_parallel`: over the data-parallel ranks only, for what every rank of a tensor-parallel group holds
    the same copy of (the batch's token count, its loss sum): summing over the whole world would count it tp
    times. `context_parallel` (with `data_parallel`): over the cp ranks too, for what each holds a part of (the
    loss sum of its slice of the rows), where the rows' token count is the same copy on every cp rank."""
    if not info.distributed:
        return float(value)
    tensor = torch.as_tensor(value, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    tensor = tensor.detach().clone()
    if not data_parallel or (info.shape.tp == 1 and (info.shape.cp == 1 or context_parallel)):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    else:
        for name in ("dp_shard", "dp_replicate", *(("cp",) if context_parallel else ())):
            if info.mesh is not None and name in (info.mesh.mesh_dim_names or ()) and info.mesh[name].size() > 1:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=info.mesh.get_group(name))
    return float(tensor.item())


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, keeping only this rank's rows when it is an FSDP2 shard."""
    if is_dtensor(param):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = param.to_local()
        shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
        if local.numel() == 0:
            return
        index = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
        local.copy_(full[index])
    else:
        param.copy_(full)


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)
