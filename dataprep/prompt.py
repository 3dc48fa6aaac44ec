"""Generation prompts rendered by the same template logic `dataprep pack` trains with.

Why here and not in the trainer: the trainer works on token ids only; whatever renders a prompt for inference
must agree token for token with what the model saw in training, so it reuses the template (`get_template`) and
the tokenization engine of `dataprep.tokenize`.

The pieces come from the template's own `prompt()` (the conversation plus the assistant header, which for `hf` is
the tokenizer's chat_template with `add_generation_prompt=True`); they are tokenized by the engine of
`dataprep.tokenize`, so the ids are what `pack` produces for the same text.

Stop ids are the template's end-of-turn ids plus the tokenizer's eos.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dataprep.errors import DataError
from dataprep.templates import ChatTemplate, Piece, get_template
from dataprep.tokenizer import Tokenizer


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
        return self.template.prompt(messages, tools) if tools else self.template.prompt(messages)

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the generation prompt, encoded exactly as `dataprep pack` encodes the same text."""
        from dataprep.tokenize import TokenizeOptions, _Encoder

        pieces = self.pieces(messages, tools)
        fixed = dataclasses.replace(self.template, render=lambda _messages, _tools=None: pieces)
        (ids, _spans), = _Encoder(self.tokenizer, fixed, TokenizeOptions(template=self.template.name)).encode_many(
            [(messages, tools)])
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
