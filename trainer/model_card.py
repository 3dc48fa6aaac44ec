"""The README.md (Hugging Face model card) written into every export and adapter directory.

An export is copied, uploaded and served far from the run that made it; the card is what still says where it
came from: the base model, the method, the step, each training dataset with the fingerprint its manifest gives
(so "which data was this?" has an exact answer: `dataprep inspect DIR --json` prints the same fingerprint),
the tokenizer fingerprint and chat template the data was packed with, and the whole resolved training config.
The front matter uses the hub's model card keys (`base_model`, `library_name`, `tags`) so the hub shows it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from formats.errors import FormatError
from formats.manifest import dataset_fingerprint, read_manifest
from trainer.config import TrainConfig

CARD_FILE = "README.md"
# The data's chat template is the tokenizer's own when the data was packed with `--template hf`.
TOKENIZER_TEMPLATE = "hf"


def dataset_rows(paths: Sequence[str]) -> list[dict[str, Any]]:
    """What the card says of each training dataset (read from its manifest; an unreadable one is said so)."""
    rows = []
    for path in paths:
        try:
            m = read_manifest(path)
        except (FormatError, OSError) as exc:
            rows.append({"path": str(path), "error": str(exc)})
            continue
        rows.append({
            "path": str(Path(path).resolve()),
            "fingerprint": dataset_fingerprint(m),
            "rows": m.get("num_rows"),
            "tokens": m.get("num_tokens"),
            "trainable_tokens": m.get("num_trainable"),
            "seq_length": m.get("seq_length"),
            "template": m.get("template"),
            "tokenizer": (m.get("tokenizer") or {}).get("fingerprint"),
        })
    return rows


def model_card(config: TrainConfig, *, base_model: str, step: int, kind: str) -> str:
    """The card's text. `kind` is `adapter` (a PEFT directory) or `full` (HF weights)."""
    adapter = kind == "adapter"
    method = config.peft.pet_type or "full fine-tuning"
    # LoReFT and MoRA adapters are in this project's own format (peft has neither method): sftkit loads them
    own_format = adapter and (config.peft.pet_type == "loreft" or config.peft.use_mora)
    data = dataset_rows(config.data.train)
    front = {
        "base_model": base_model,
        "library_name": "sftkit" if own_format else "peft" if adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["sftkit", "sft", method.replace(" ", "-")],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# Fine-tuned from {base_model}",
        "",
        f"Supervised fine-tuning with sftkit (`trainer run`), method: {method}; this directory holds the "
        f"{'adapter (sftkit format)' if own_format else 'PEFT adapter' if adapter else 'full model weights'} after "
        f"optimizer step {step}.",
        "",
        "## Training data",
        "",
        "| dataset | fingerprint | rows | tokens | trained tokens | seq length | template | tokenizer |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for row in data:
        if "error" in row:
            lines.append(f"| {row['path']} | unreadable: {row['error']} | | | | | | |")
            continue
        lines.append(
            f"| {row['path']} | `{row['fingerprint']}` | {row['rows']} | {row['tokens']} | {row['trainable_tokens']} "
            f"| {row['seq_length']} | {row['template']} | `{row['tokenizer']}` |"
        )
    templates = {row.get("template") for row in data if "error" not in row}
    lines.append("")
    if templates - {TOKENIZER_TEMPLATE, None}:
        lines += [
            f"The data was rendered with sftkit's `{', '.join(sorted(str(t) for t in templates))}` template, not the "
            "tokenizer's own chat template: prompt the model in that format (`trainer generate` does), or check that "
            "the tokenizer's `chat_template` renders conversations the same way before relying on it.",
            "",
        ]
    else:
        lines += ["The data was rendered with the tokenizer's own chat template (included here).", ""]
    usage = (
        [
            "peft cannot load this adapter; sftkit can:",
            "",
            "```bash",
            f"trainer generate --model {base_model} --adapter PATH/TO/THIS/DIR --prompt 'Hello'",
            "```",
        ]
        if own_format
        else [
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIR")',
            f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({json.dumps(base_model)}), "
            '"PATH/TO/THIS/DIR")',
            "```",
        ]
        if adapter
        else [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIR")',
            'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/DIR")',
            "```",
        ]
    )
    lines += ["## Use", "", *usage, "", "## Training config (resolved)", "", "```yaml",
              yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
