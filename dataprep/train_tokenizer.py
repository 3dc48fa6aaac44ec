"""Train a small byte-level BPE tokenizer with ChatML special tokens on conversation records.

The demo and the end-to-end tests need a real tokenizer that ships with no third-party files and needs
no download; a few thousand merges learned from the repo's own example data are enough for a tiny model
to learn from. The output directory looks like a Hugging Face tokenizer (tokenizer.json +
tokenizer_config.json with a ChatML chat_template), so every loader and template path is exercised.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2/2.5/3 use it, written for this project: a system turn only when the messages have one.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _texts(records: Iterable[dict]) -> Iterator[str]:
    for record in records:
        for message in record.get("messages", []):
            yield message["content"]


def train_chatml_tokenizer(records: Iterable[dict], out_dir: str | Path, vocab_size: int = 2048) -> Path:
    """Learn a byte-level BPE from the messages' contents and write an HF-style tokenizer directory.

    Returns the directory. Written to a temporary directory first and renamed, so a half-written
    tokenizer never sits where a later step would load it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(records), trainer=trainer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 32768,
        "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(tok)): {"content": tok, "special": True} for tok in SPECIAL_TOKENS
        },
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
