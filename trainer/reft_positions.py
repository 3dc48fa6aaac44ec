"""Which layers and token positions LoReFT edits (see `trainer.reft`): the settings, which the config checks, and
the position masks, which the model builds for each batch (so the model needs nothing else of LoReFT)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_POSITIONS = re.compile(r"^(?:f(\d+))?\+?(?:l(\d+))?$")


class ReftError(ValueError):
    """A LoReFT setting or file is invalid; the message names the key or the file."""


@dataclass(frozen=True)
class ReftPositions:
    """The first `first` and the last `last` prompt tokens of every document are intervened."""

    first: int
    last: int

    @classmethod
    def parse(cls, spec: str) -> ReftPositions:
        """pyreft's / PaddleNLP's "f7+l7" (also "f3", "l5")."""
        m = _POSITIONS.match(spec.strip())
        if not spec.strip() or m is None or (m.group(1) is None and m.group(2) is None):
            raise ReftError(f"peft.reft_positions {spec!r}: expected f<k>+l<k>, f<k> or l<k> (e.g. f7+l7)")
        first, last = int(m.group(1) or 0), int(m.group(2) or 0)
        if first + last < 1:
            raise ReftError(f"peft.reft_positions {spec!r} selects no position")
        return cls(first, last)

    def __str__(self) -> str:
        return "+".join(p for p in (f"f{self.first}" if self.first else "", f"l{self.last}" if self.last else "")
                        if p)


def parse_layers(spec: str | list[int], n_layers: int | None) -> list[int]:
    """Layer indices from "all", PaddleNLP's "1;3;5" or a list; each must exist in the model (when `n_layers`
    is known; "all" then means every layer, else an empty list)."""
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(range(n_layers or 0))
        try:
            layers = [int(p) for p in re.split(r"[;,\s]+", spec.strip()) if p]
        except ValueError:
            raise ReftError(f"peft.reft_layers {spec!r}: expected 'all', a list of layer indices or '1;2;3'") from None
    else:
        layers = [int(v) for v in spec]
    top = n_layers if n_layers is not None else float("inf")
    bad = [v for v in layers if not 0 <= v < top]
    if not layers or bad or len(set(layers)) != len(layers):
        where = f" in 0..{n_layers - 1}" if n_layers is not None else " (>= 0)"
        raise ReftError(f"peft.reft_layers {spec!r}: needs distinct layer indices{where}"
                        + (f", not {bad}" if bad else ""))
    return sorted(layers)


def positions_mask(positions: ReftPositions, offset: torch.Tensor, prompt_len: torch.Tensor,
                   inside: torch.Tensor | None = None) -> torch.Tensor:
    """True where a token at `offset` in its document is among the first / last tokens of a `prompt_len` prompt."""
    mask = (offset < prompt_len) & ((offset < positions.first) | (offset >= prompt_len - positions.last))
    return mask if inside is None else mask & inside


def packed_mask(positions: ReftPositions, batch: int, seqlen: int, labels: torch.Tensor | None,
                cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The [B, T] intervention mask of a packed batch (see the module docstring for which positions)."""
    from trainer.attention import segment_ids_from_cu_seqlens

    n = batch * seqlen
    if cu_seqlens is None:
        cu = torch.arange(0, n + 1, seqlen, device=device, dtype=torch.int64)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
    seg = segment_ids_from_cu_seqlens(cu, batch, seqlen).flatten()
    starts, ends = cu[:-1], cu[1:]
    if labels is not None:
        idx = torch.arange(n, device=device)
        trained = labels.reshape(-1).to(device) != -100
        first = torch.full((starts.numel(),), n, device=device, dtype=torch.int64)
        first = first.scatter_reduce(0, seg, torch.where(trained, idx, n), reduce="amin")
        prompt_end = torch.where(first < n, first + 1, ends)
    else:
        prompt_end = ends
    idx = torch.arange(n, device=device)
    offset = idx - starts[seg]
    return positions_mask(positions, offset, (prompt_end - starts)[seg]).view(batch, seqlen)


def prompt_mask(positions: ReftPositions, position_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The prefill mask of a padded batch of prompts: `position_ids` count each row's real tokens from 0."""
    lengths = valid.sum(1, keepdim=True)
    return positions_mask(positions, position_ids, lengths, valid)
