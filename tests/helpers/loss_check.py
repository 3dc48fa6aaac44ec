"""One training step's loss against transformers: the check the native and hf backends' loss tests share."""

from __future__ import annotations

import torch
from torch import nn


def assert_step_loss_matches(ref: nn.Module, ours: nn.Module, ids: torch.Tensor, prompt: int = 6,
                             ) -> dict[str, nn.Parameter]:
    """Backpropagate transformers' mean loss (`ref`) and ours on `ids`, the first `prompt` tokens untrained, and
    assert the losses agree. Ours takes pre-shifted labels and returns the summed loss, so it is divided by the
    trained-token count here. Returns ref's parameters by name: each test compares the gradients its own way."""
    hf_labels = ids.clone()
    hf_labels[:, :prompt] = -100
    labels = torch.full_like(hf_labels, -100)
    labels[:, :-1] = hf_labels[:, 1:]
    n = int((labels != -100).sum())
    ref_loss = ref(ids, labels=hf_labels).loss
    ref_loss.backward()
    loss = ours(ids, labels=labels) / n
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    return dict(ref.named_parameters())
