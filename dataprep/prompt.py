"""Generation prompts rendered by the same template logic `dataprep pack` trains with.

Why here and not in the trainer: the trainer works on token ids only; whatever renders a prompt for inference
must agree token for token with what the model saw in training, so it reuses the template (`get_template`) and
the tokenization engine of `dataprep.tokenize`.

- Built-in templates: render the conversation followed by an assistant turn and keep the pieces before that
  turn's first trained piece (the assistant header, e.g. `<|im_start|>assistant\\n`), tokenized by the engine.
- `hf`: the tokenizer's own chat_template with `add_generation_prompt=True`, as transformers'
  `apply_chat_template` renders it, special tokens split out and text tokenized by the engine.

Stop ids are the template's end-of-turn ids plus the tokenizer's eos.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from dataprep.errors import DataError
from dataprep.templates import ChatTemplate, Piece, get_template
from dataprep.tokenizer import Tokenizer

_PLACEHOLDER = "x"  # content of the assistant turn rendered only to find where it starts


@dataclass
class PromptRenderer:
    """A tokenizer + resolved template that turns prompt messages into generation-prompt ids."""

    tokenizer: Tokenizer
    template: ChatTemplate

    @property
    def stop_ids(self) -> tuple[int, ...]:
        ids = list(self.template.end_of_turn)
        if self.tokenizer.eos_id is not None and self.tokenizer.eos_id not in ids:
            ids.append(self.tokenizer.eos_id)
        return tuple(ids)

    def pieces(self, messages: list[dict], tools: list[dict] | None = None) -> list[Piece]:
        """The generation prompt as template pieces (ids and text), none of them trainable."""
        if not messages:
            raise DataError("a prompt needs at least one message", reason="empty_prompt")
        if messages[-1].get("role") == "assistant":
            raise DataError("the prompt ends with an assistant turn; generation continues after a user turn",
                            reason="prompt_ends_with_assistant")
        if self.template.name == "hf":
            return _hf_prompt_pieces(self.tokenizer, messages, tools)
        rendered = self.template.render([*messages, {"role": "assistant", "content": _PLACEHOLDER}])
        start = _last_trained_group(rendered)
        if start is None:
            raise DataError(f"template {self.template.name!r} marks no part of an assistant turn as trained",
                            reason="template_mismatch")
        return [(value, False) for value, _ in rendered[:start]]

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the generation prompt, encoded exactly as `dataprep pack` encodes the same text."""
        from dataprep.tokenize import TokenizeOptions, _Encoder

        pieces = self.pieces(messages, tools)
        fixed = dataclasses.replace(self.template, render=lambda _messages: pieces)
        (ids, _spans), = _Encoder(self.tokenizer, fixed, TokenizeOptions(template=self.template.name)).encode_many(
            [messages])
        return ids

    def encode_many(self, conversations: list[list[dict]]) -> list[list[int]]:
        return [self.encode(m) for m in conversations]


def prompt_renderer(tokenizer: Tokenizer, template: str = "auto") -> PromptRenderer:
    """Resolve `template` (auto / hf / a built-in name) for `tokenizer`, the same way `dataprep pack` does."""
    return PromptRenderer(tokenizer, get_template(template, tokenizer))


def split_reference(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(prompt messages, reference answer): the last assistant turn, when the conversation ends with one, is the
    reference and everything before it the prompt."""
    if messages and messages[-1].get("role") == "assistant":
        return messages[:-1], messages[-1].get("content")
    return messages, None


def _last_trained_group(pieces: list[Piece]) -> int | None:
    start, prev = None, False
    for i, (_, train) in enumerate(pieces):
        if train and not prev:
            start = i
        prev = train
    return start


def _hf_prompt_pieces(tok: Tokenizer, messages: list[dict], tools: list[dict] | None) -> list[Piece]:
    from dataprep.jinja_template import render_chat_template

    extra: dict[str, Any] = {"tools": tools} if tools else {}
    text = render_chat_template(tok, messages, add_generation_prompt=True, **extra)
    specials = sorted(tok.special_tokens, key=len, reverse=True)
    if not specials:
        return [(text, False)]
    pattern = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")
    out: list[Piece] = []
    for k, part in enumerate(pattern.split(text)):
        if k % 2:
            out.append((tok.special_tokens[part], False))
        elif part:
            out.append((part, False))
    return out
