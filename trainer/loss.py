"""Summed token cross-entropy over pre-shifted labels.

Labels in packed rows are already shifted (labels[i] is what position i must predict), so there is no
shift here. The sum, not the mean, is returned: the loop divides by the trainable tokens of the whole
global batch, which makes gradient accumulation and world size leave the update unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from formats.schema import IGNORE_INDEX


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(label) over positions whose label is not -100, computed in fp32."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
