"""LoReFT's position and layer settings, torch-free so the config can check them (see `trainer.reft`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
