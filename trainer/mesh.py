"""The device mesh's shape: how the `parallel.*` keys lay out the ranks, checked against the world size.

Pure arithmetic, no torch: `trainer run` (through `trainer.distributed`) and `trainer plan` (which must start
fast and never needs a process group) share it, so the plan describes the mesh the run would build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import ParallelSection


class MeshError(ValueError):
    """The parallel.* keys do not fit the world size or the device; the message names the keys and values."""


@dataclass(frozen=True)
class MeshShape:
    """How many ranks each mesh dimension has (all 1 for a world of one)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def dp(self) -> int:
        """Ranks that read different rows (the data-parallel size)."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    def dims(self) -> list[tuple[str, int]]:
        """The mesh's (name, size) pairs, outermost first: the dimensions > 1, and dp_shard for HSDP and cp."""
        out = []
        if self.dp_replicate > 1:
            out.append(("dp_replicate", self.dp_replicate))
        if self.dp_shard > 1 or self.dp_replicate > 1 or self.cp > 1:  # cp: flattened with dp_shard for FSDP2
            out.append(("dp_shard", self.dp_shard))
        if self.cp > 1:
            out.append(("cp", self.cp))
        if self.tp > 1:
            out.append(("tp", self.tp))
        return out


def resolve_mesh_shape(parallel: ParallelSection, world_size: int, device_type: str) -> MeshShape:
    """The mesh the config asks for on `world_size` ranks, or a MeshError naming the keys that do not fit."""
    if parallel.pp != 1:
        raise MeshError(f"parallel.pp = {parallel.pp}: pipeline parallelism is not supported; use parallel.tp "
                        "and parallel.dp_shard")
    if parallel.cp > 1 and parallel.tp > 1:
        raise MeshError(f"parallel.cp = {parallel.cp} with parallel.tp = {parallel.tp}: context parallelism is "
                        "not implemented together with tensor parallelism; set one of them to 1")
    return split_world(world_size, parallel.dp_replicate, parallel.dp_shard, parallel.tp, parallel.cp)


def split_world(world_size: int, dp_replicate: int = 1, dp_shard: int = -1, tp: int = 1, cp: int = 1) -> MeshShape:
    """The mesh shape of `world_size` ranks for these degrees (`dp_shard` -1: the ranks left over), or a MeshError
    naming the keys whose product does not fit. The one rule for `trainer run` and `trainer plan`."""
    fixed = dp_replicate * tp * cp
    named = f"parallel.dp_replicate ({dp_replicate}) x parallel.tp ({tp}) x parallel.cp ({cp})"
    if dp_shard == -1:
        if world_size % fixed:
            raise MeshError(f"world size {world_size} is not divisible by {named} = {fixed}, so parallel.dp_shard "
                            "(-1: the rest) has no whole value; change those keys or the number of ranks")
        dp_shard = world_size // fixed
    elif dp_shard * fixed != world_size:
        raise MeshError(f"{named} x parallel.dp_shard ({dp_shard}) = {dp_shard * fixed}, but the world size "
                        f"is {world_size} (ranks started by torchrun); make the product equal it, or set "
                        "parallel.dp_shard: -1")
    return MeshShape(dp_replicate, dp_shard, cp, tp)
