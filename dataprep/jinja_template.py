"""Template `hf`: the tokenizer's own Jinja chat_template, with an assistant mask derived from it.

Rendering follows what transformers does for `apply_chat_template`: a sandboxed Jinja environment with
trim_blocks/lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` filter that keeps
non-ASCII text (ensure_ascii=False) and accepts indent/separators/sort_keys, and the special tokens as variables.

Where the mask comes from:
1. If the template marks assistant output with `{% generation %}...{% endgeneration %}`, that text is trainable.
2. Otherwise by prefix rendering. For each assistant message i, render messages[:i] with
   add_generation_prompt=True (everything before the assistant content: history + assistant header) and
   messages[:i+1] (history through the end of that turn). The text between the two is the assistant turn;
   it is trainable up to and including its last end-of-turn token (eos, <|im_end|>, <|eot_id|>, ...); text
   after that token (e.g. ChatML's "\\n") is scaffolding.
   Assumption: every such partial rendering is a string prefix of the full rendering. It holds for Llama 2/3,
   Qwen2/2.5 and ChatML-style templates; templates that render history turns differently from the last
   (e.g. Qwen3 dropping <think> blocks of earlier turns) break it and get a clear error asking for a built-in
   template.
Either way the result is text pieces tagged trainable; special-token strings become their ids and the engine
turns the pieces into token ids (the mask boundary found by comparing token ids, not character offsets).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

from dataprep.errors import DataError
from dataprep.templates import ChatTemplate, Piece
from dataprep.tokenizer import Tokenizer

GEN_OPEN = "\ue000"
GEN_CLOSE = "\ue001"
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "</s>")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}` wraps its output in private-use marker characters the splitter looks for."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller: Any) -> str:
            return GEN_OPEN + caller() + GEN_CLOSE

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _special_vars(tok: Tokenizer) -> dict[str, str | None]:
    def content(tid: int | None) -> str | None:
        if tid is None:
            return None
        return next((c for c, i in tok.special_tokens.items() if i == tid), None) or tok.decode([tid])

    return {
        "bos_token": content(tok.bos_id),
        "eos_token": content(tok.eos_id),
        "pad_token": content(tok.pad_id),
        "unk_token": content(tok.unk_id),
    }


def render_chat_template(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                         **kwargs: Any) -> str:
    """Render the tokenizer's chat_template to text exactly as transformers would (no tokenization)."""
    if not tok.chat_template:
        raise DataError(
            f"tokenizer {tok.name!r} has no chat_template (tokenizer_config.json); choose a built-in --template",
            source=str(tok.source), reason="no_chat_template",
        )
    from jinja2.exceptions import TemplateError

    try:
        template = _compile(tok.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **_special_vars(tok), **kwargs)
    except TemplateError as e:  # includes raise_exception(...) from the template itself
        raise DataError(f"chat_template of tokenizer {tok.name!r} failed: {e}", reason="template_error") from e


def _split_specials(text: str, train: bool, tok: Tokenizer, pattern: re.Pattern | None) -> list[Piece]:
    if not text:
        return []
    if pattern is None:
        return [(text, train)]
    out: list[Piece] = []
    for k, part in enumerate(pattern.split(text)):
        if k % 2:
            out.append((tok.special_tokens[part], train))
        elif part:
            out.append((part, train))
    return out


def hf_template(tok: Tokenizer) -> ChatTemplate:
    """The tokenizer's own chat_template as a ChatTemplate (see the module docstring for the mask)."""
    if not tok.chat_template:
        raise DataError(
            f"template 'hf' needs a chat_template in tokenizer_config.json, and tokenizer {tok.name!r} has none",
            source=str(tok.source), reason="no_chat_template",
        )
    specials = sorted(tok.special_tokens, key=len, reverse=True)
    pattern = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")") if specials else None
    eot_strings = [s for s in _END_OF_TURN if s in tok.special_tokens]
    eos = _special_vars(tok)["eos_token"]
    if eos and eos not in eot_strings:
        eot_strings.append(eos)
    eot_ids = tuple(tok.special_tokens[s] for s in eot_strings if s in tok.special_tokens)
    has_generation = bool(_GENERATION_RE.search(tok.chat_template))

    def to_pieces(spans: list[tuple[str, bool]]) -> list[Piece]:
        out: list[Piece] = []
        for text, train in spans:
            out += _split_specials(text, train, tok, pattern)
        return out

    def render_generation(messages: list[dict]) -> list[Piece]:
        text = render_chat_template(tok, messages)
        spans: list[tuple[str, bool]] = []
        pos = 0
        while True:
            a = text.find(GEN_OPEN, pos)
            if a < 0:
                spans.append((text[pos:], False))
                break
            b = text.find(GEN_CLOSE, a)
            spans += [(text[pos:a], False), (text[a + 1 : b], True)]
            pos = b + 1
        return to_pieces(spans)

    def render_diff(messages: list[dict]) -> list[Piece]:
        full = render_chat_template(tok, messages)
        spans: list[tuple[str, bool]] = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            pre = render_chat_template(tok, messages[:i], add_generation_prompt=True)
            upto = render_chat_template(tok, messages[: i + 1])
            if not (full.startswith(pre) and full.startswith(upto) and pos <= len(pre) <= len(upto)):
                raise DataError(
                    "the tokenizer's chat_template does not render conversation prefixes as prefixes of the whole "
                    "conversation, so the assistant mask cannot be derived; use a built-in --template",
                    source=str(tok.source), reason="template_not_prefix_stable",
                )
            turn = full[len(pre) : len(upto)]
            cut = max((turn.rfind(s) + len(s) for s in eot_strings if s in turn), default=len(turn))
            spans += [(full[pos : len(pre)], False), (turn[:cut], True), (turn[cut:], False)]
            pos = len(upto)
        spans.append((full[pos:], False))
        return to_pieces(spans)

    def render(messages: list[dict]) -> list[Piece]:
        for m in messages:
            if GEN_OPEN in m["content"] or GEN_CLOSE in m["content"]:
                raise DataError("message contains reserved characters U+E000/U+E001", reason="reserved_chars")
        return render_generation(messages) if has_generation else render_diff(messages)

    how = "{% generation %} blocks" if has_generation else "prefix rendering"
    return ChatTemplate("hf", render, eot_ids, f"tokenizer chat_template, mask from {how}")
