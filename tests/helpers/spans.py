"""What a tokenized sample trains, as text: the helper template tests compare against the assistant parts."""

from __future__ import annotations

import numpy as np

from formats.schema import IGNORE_INDEX


def trained_spans(tok, sample) -> list[str]:
    """Decoded runs of target positions (position i is a target when labels[i-1] != IGNORE_INDEX)."""
    target = np.zeros(len(sample.labels), dtype=bool)
    target[1:] = sample.labels[:-1] != IGNORE_INDEX
    out, cur = [], []
    for i, t in enumerate(target):
        if t:
            cur.append(int(sample.input_ids[i]))
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out
