"""The types every chat template shares: pieces, the ChatTemplate interface, and the template names.

Kept below `templates` (the built-ins and resolution) and `jinja_template` (the tokenizer's own Jinja
template), so the two never import each other's internals and there is no cycle.

A template renders a conversation as a list of pieces `(value, trainable)`: value is a special token id
(int), a text piece (str) or `FRESH` (None: the next text is encoded as the start of a new string, like a
`tokenizer(text)` call after a BOS added by post-processing). The tokenizing engine (`dataprep.tokenize`)
turns pieces into token ids and the trained positions into labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

FRESH = None
Piece = tuple  # (int | str | None, bool)
Messages = list  # list[dict]: conversation-record messages (CONTRACTS.md)
Tools = list  # list[dict]: the record's function specs

BuiltinName = Literal["chatml", "qwen3", "qwen3-nothink", "llama3", "llama2", "vicuna", "alpaca", "plain"]
TemplateName = Literal["auto", "hf", "chatml", "qwen3", "qwen3-nothink", "llama3", "llama2", "vicuna", "alpaca", "plain"]
BUILTIN_TEMPLATES: tuple[str, ...] = BuiltinName.__args__  # type: ignore[attr-defined]
TEMPLATE_CHOICES: tuple[str, ...] = TemplateName.__args__  # type: ignore[attr-defined]

# What a literal special-token string inside message text becomes (a user pasting "<|im_end|>"):
# "text" encodes it as ordinary text, so it can never end a turn in training data (the default);
# "special" makes it the control token, which is what rendering to a string and tokenizing it does
# (transformers' apply_chat_template, and so TRL).
ContentSpecials = Literal["text", "special"]
CONTENT_SPECIALS: tuple[str, ...] = ContentSpecials.__args__  # type: ignore[attr-defined]


def _no_prompt(messages: Messages, tools: Tools | None = None) -> list[Piece]:
    raise NotImplementedError("this template has no generation prompt")


@dataclass
class ChatTemplate:
    """A resolved template.

    `render(messages, tools=None) -> pieces`: the whole conversation as training sees it; an assistant
    turn is trainable unless its message says `"train": false`.
    `prompt(messages, tools=None) -> pieces`: what inference feeds the model before it answers -- the
    conversation (ending with a user or tool turn) plus the assistant header (the tokenizer's
    add_generation_prompt=True); nothing in it is trainable.
    `end_of_turn`: the ids that close an assistant turn (a generation stops at one).
    `renders_reasoning`: whether assistant `reasoning_content` has a place in the rendering; the engine
    puts it inline as `<think>...</think>` before the content for templates that have none.
    """

    name: str
    render: Callable[..., list[Piece]]
    end_of_turn: tuple[int, ...] = ()
    description: str = ""
    prompt: Callable[..., list[Piece]] = _no_prompt
    renders_reasoning: bool = False
    renders_tools: bool = False


def trained(message: dict[str, Any]) -> bool:
    """Is this message a training target: an assistant turn not marked `"train": false`."""
    return message["role"] == "assistant" and message.get("train", True) is not False
