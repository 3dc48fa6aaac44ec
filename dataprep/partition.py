"""Which records `dataprep pack --partition I/N` processes, so N machines together pack each record once.

Two rules, both deterministic from the inputs alone (no coordination between machines):
- by record (default): the k-th converted record of the whole input stream -- inputs in the order given,
  glob matches sorted, k counted from 0 over records that convert cleanly -- goes to partition k mod N.
  Every partition reads and converts all inputs (cheap: parsing is far faster than tokenizing) but
  tokenizes and packs only its own records, so the work that matters is split evenly even for one big file.
- by file: the j-th input source goes to partition j mod N, so each machine reads only its files. Use it
  when the input is many similar files.

Tokenization is per record, so either way every document (id, tokens, labels) comes out exactly as a
single-machine run makes it; only which documents share a row differs, since each partition packs its own.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from typing import Any

PARTITION_BY = ("record", "file")

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Partition:
    index: int
    count: int
    by: str = "record"

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"partition must be I/N with 0 <= I < N, got {self.index}/{self.count}")
        if self.by not in PARTITION_BY:
            raise ValueError(f"partition_by must be one of {PARTITION_BY}, got {self.by!r}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_partition(spec: str, by: str = "record") -> Partition:
    """'I/N' -> Partition(I, N); partitions are numbered from 0 so shell loops `seq 0 $((N-1))` fit."""
    m = _SPEC.match(spec)
    if not m:
        raise ValueError(f"partition must look like I/N (e.g. 0/4), got {spec!r}")
    return Partition(int(m.group(1)), int(m.group(2)), by)


@dataclasses.dataclass
class PartitionCounter:
    seen: int = 0
    selected: int = 0


def select_records(records: Iterable[Any], partition: Partition, counter: PartitionCounter) -> Iterator[Any]:
    """Records whose position in the stream is congruent to the partition index modulo the count."""
    index, count = partition.index, partition.count
    for k, record in enumerate(records):
        counter.seen = k + 1
        if k % count == index:
            counter.selected += 1
            yield record


def select_sources(names: list[str], partition: Partition) -> list[str]:
    return [name for j, name in enumerate(names) if j % partition.count == partition.index]
