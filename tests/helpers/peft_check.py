"""The check several adapter tests end with: merge-lora's output equals the base with the PEFT adapter applied
(through transformers + peft), and both differ from the base alone."""

from __future__ import annotations

from pathlib import Path

import torch


def assert_merge_equals_peft(model_dir: Path, export: Path, merged_dir: Path, **merge_options) -> None:
    """`merge_options`: merge_lora's keyword options (e.g. base_as_trained=False: peft loads the adapter on the
    checkpoint's full-precision base, so an adapter trained on a quantized one is compared merged as is)."""
    import peft
    import transformers

    from trainer.merge_lora import merge_lora

    merge_lora(model_dir, export, merged_dir, show_progress=False, **merge_options)
    load = transformers.AutoModelForCausalLM.from_pretrained
    tuned = peft.PeftModel.from_pretrained(load(model_dir, dtype=torch.float32), export).eval()
    merged = load(merged_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, merged.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(load(model_dir, dtype=torch.float32)(input_ids=ids).logits, want, atol=1e-3)
