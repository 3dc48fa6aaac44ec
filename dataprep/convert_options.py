"""What a conversion is asked to do and what it counts: the types convert, convert_parallel and pack share.

Kept in their own module, below both `convert` and `convert_parallel`, so neither has to import the other
(the worker pool is started by `convert`, and reads these options).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dataprep import input_formats as fmts
from dataprep import output_styles
from dataprep.convert_batch import ON_UNKNOWN_FIELD, OnUnknownField
from dataprep.rejects import ON_ERROR, OnError


@dataclass
class ConvertOptions:
    """What to read and how. `progress=None` shows a bar only on a terminal and for large inputs."""

    input_format: str = "auto"
    system: str | None = None
    on_error: OnError = "fail"
    on_unknown_field: OnUnknownField = "keep"
    take: int | None = None
    shuffle: bool = False
    seed: int = 0
    output_style: str = output_styles.MESSAGES
    overwrite: bool = False
    rejects: str | None = None
    progress: bool | None = None
    num_proc: int = 1

    def __post_init__(self) -> None:
        self.input_format = fmts.canonical_format_name(self.input_format)
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if self.on_unknown_field not in ON_UNKNOWN_FIELD:
            raise ValueError(f"on_unknown_field must be one of {', '.join(ON_UNKNOWN_FIELD)}, got {self.on_unknown_field!r}")
        if self.take is not None and self.take < 1:
            raise ValueError(f"take must be at least 1, got {self.take}")
        output_styles.get_style(self.output_style)
        if self.num_proc < 0:
            raise ValueError(f"num_proc must be 0 (one per CPU) or more, got {self.num_proc}")
        if self.num_proc == 0:
            self.num_proc = os.cpu_count() or 1


@dataclass
class ConvertStats:
    """Counts for the end-of-run summary; every record read is either output or skipped under a reason.

    One self-instruct task with k instances is one record in and up to k records out.
    `unknown_fields` counts, by name, the input fields no reader maps (kept under "extra", or the
    record refused with on_unknown_field="fail"); message-level names are prefixed ("messages.weight").
    """

    files: int = 0
    records_in: int = 0
    records_out: int = 0
    skipped: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    unknown_fields: Counter = field(default_factory=Counter)
    bytes_in: int = 0
    take_reached: bool = False
    seconds: float = 0.0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        rate = self.records_in / self.seconds if self.seconds > 0 else 0.0
        return {
            "inputs": self.files,
            "input_formats": dict(self.formats),
            "records_in": self.records_in,
            "records_out": self.records_out,
            "skipped_total": self.skipped_total,
            "skipped": dict(self.skipped),
            "unknown_fields": dict(self.unknown_fields),
            "stopped_at_take": self.take_reached,
            "input_mb": round(self.bytes_in / 1e6, 3),
            "seconds": round(self.seconds, 3),
            "records_per_second": round(rate, 1),
        }
