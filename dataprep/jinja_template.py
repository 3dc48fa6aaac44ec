"""Template `hf`: the tokenizer's own Jinja chat_template, with an exact assistant mask derived from it.

Rendering follows what transformers does for `apply_chat_template`: a sandboxed Jinja environment with
trim_blocks/lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` filter that keeps
non-ASCII text (ensure_ascii=False) and accepts indent/separators/sort_keys, the special tokens as variables,
and `tools` passed through. The token ids of a conversation are those of the WHOLE render, so they equal
`apply_chat_template(messages, tools=..., tokenize=True)`.

Where the mask comes from:
1. If the template marks assistant output with `{% generation %}...{% endgeneration %}`, that text is trainable.
2. Otherwise, for each assistant message i, located in the whole render F:
   - its start: render messages[:i] (P, the history, which ends with a user or tool turn) and messages[:i]
     with add_generation_prompt=True (G). The assistant header is the part of G after P (the inference
     prompt's header). When P is a prefix of F, training starts after the part of the header F also has
     there; when it is not (Qwen3 drops the reasoning of turns before the last user query, so history
     renders differently inside the whole), the header is searched for in F after the previous turn (the
     longest prefix of it that holds a special token: message text cannot contain one by then).
   - its end: when messages[:i+1] renders as a prefix of F, the turn ends there and is trainable through its
     last end-of-turn token (eos, <|im_end|>, <|eot_id|>, <end_of_turn>, ...); text after it (ChatML's "\\n")
     is scaffolding. Templates that render history differently from the last turn (Qwen3 drops earlier
     reasoning and shows an empty think block on the last turn; DeepSeek-R1 strips reasoning) break that
     prefix property; the turn then ends at the first end-of-turn token after its start.
   - a check: the answer text (after any `</think>`) must lie inside the trained span, else the record
     gets an error instead of a wrong mask.
Either way the result is text pieces tagged trainable; the template's own special-token strings become their
ids, and the engine turns the pieces into token ids (the mask boundary found by comparing token ids).

Special-token strings inside message text (a user pasting "<|im_end|>") are swapped for private-use
placeholders before rendering and put back as text afterwards, so under `content_specials="text"` they stay
text (see `chat_types.ContentSpecials`).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

from dataprep.chat_types import ChatTemplate, ContentSpecials, Messages, Piece, Tools, trained
from dataprep.errors import DataError
from dataprep.tokenizer import Tokenizer

GEN_OPEN = "\ue000"
GEN_CLOSE = "\ue001"
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "</s>")


def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
           sort_keys: bool = False) -> str:
    """transformers' `tojson` filter (json.dumps keeping non-ASCII text); built-in templates use it too."""
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
    env.filters["tojson"] = tojson
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

    if any("reasoning_content" in m for m in messages):
        # as transformers does: templates that read the reasoning as `thinking` (gpt-oss) see it there too
        messages = [{"thinking": m["reasoning_content"], **m} if "reasoning_content" in m else m for m in messages]
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


def _structural_tokens(source: str, specials: list[str]) -> set[str]:
    """Special tokens a chat_template tests or cuts message text by (`'</think>' in content`,
    `content.split('</think>')`, `.startswith('<tool_response>')`, ...)."""
    out = set()
    for s in specials:
        q = re.escape(s)
        if re.search(r"(split|startswith|endswith|replace|strip|find|index)\(\s*['\"]" + q + r"['\"]", source) or \
                re.search(r"['\"]" + q + r"['\"]\s+(not\s+)?in\b", source):
            out.add(s)
    return out


_CALL_PROBE_NAME = "probe_function_name"


def _call_probe(content: Any) -> list[dict]:
    return [{"role": "user", "content": "q"},
            {"role": "assistant", "content": content,
             "tool_calls": [{"type": "function", "function": {"name": _CALL_PROBE_NAME, "arguments": "{}"}}]},
            {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]


def _wants_null_call_content(tok: Tokenizer) -> bool:
    """Does the chat_template render tool calls only for a null content (and not for "")?"""
    def renders_call(content: Any) -> bool:
        try:
            return _CALL_PROBE_NAME in render_chat_template(tok, _call_probe(content))
        except Exception:  # a template that cannot take the probe: keep the record's form
            return False

    return not renders_call("") and renders_call(None)


def _null_call_content(messages: Messages) -> Messages:
    return [{**m, "content": None} if m["role"] == "assistant" and m.get("tool_calls") and not m["content"] else m
            for m in messages]


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _answer_text(m: dict) -> str:
    content = m.get("content") or ""
    return content.split("</think>")[-1].strip()


def hf_template(tok: Tokenizer, content_specials: ContentSpecials = "text") -> ChatTemplate:
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
    # content placeholders: special token k <-> one private-use character of plane 15. Tokens the template itself
    # looks for inside message text (content.split('</think>'), '<tool_response>' in content, ...) stay as they
    # are, or the template's own logic would change.
    structural = _structural_tokens(tok.chat_template, specials)
    protect_map = ({s: chr(0xF0000 + k) for k, s in enumerate(specials) if s not in structural}
                   if content_specials == "text" else {})
    protect_re = re.compile("|".join(re.escape(s) for s in sorted(protect_map, key=len, reverse=True))) \
        if protect_map else None
    restore_map = {v: k for k, v in protect_map.items()}
    restore_re = re.compile("[" + "".join(restore_map) + "]") if restore_map else None

    def protect(value: Any) -> Any:
        if isinstance(value, str):
            return protect_re.sub(lambda mt: protect_map[mt.group(0)], value) if protect_re.search(value) else value
        if isinstance(value, dict):
            return {k: protect(v) for k, v in value.items()}
        if isinstance(value, list):
            return [protect(v) for v in value]
        return value

    def restore(text: str) -> str:
        return restore_re.sub(lambda mt: restore_map[mt.group(0)], text) if restore_re is not None else text

    def to_pieces(spans: list[tuple[str, bool]]) -> list[Piece]:
        out: list[Piece] = []
        for text, train in spans:
            for value, flag in _split_specials(text, train, tok, pattern):
                out.append((restore(value), flag) if isinstance(value, str) and restore_re is not None else (value, flag))
        return out

    def render_text(messages: Messages, tools: Tools | None, add_generation_prompt: bool = False) -> str:
        return render_chat_template(tok, messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def render_generation(messages: Messages, tools: Tools | None) -> list[Piece]:
        text = render_text(messages, tools)
        spans: list[tuple[str, bool]] = []
        pos = 0
        # {% generation %} blocks follow the assistant messages in order; a turn marked train: false is not trained
        assistant = iter([trained(m) for m in messages if m["role"] == "assistant"])
        while True:
            a = text.find(GEN_OPEN, pos)
            if a < 0:
                spans.append((text[pos:], False))
                break
            b = text.find(GEN_CLOSE, a)
            spans += [(text[pos:a], False), (text[a + 1 : b], next(assistant, True))]
            pos = b + 1
        return to_pieces(spans)

    def find_header(full: str, header: str, pos: int) -> int:
        """Where the text after the longest prefix of `header` that still contains a special token occurs
        first at or after `pos` (-1: none). Message text cannot fake it: its special-token strings are
        placeholders by then (content_specials="text"), or the caller accepted them as tokens."""
        first = pattern.search(header) if pattern is not None and header else None
        if first is None:
            return -1
        for n in range(len(header), first.end() - 1, -1):
            k = full.find(header[:n], pos)
            if k >= 0:
                return k + n
        return -1

    def fail(i: int, why: str) -> DataError:
        return DataError(
            f"cannot derive the assistant mask of turn {i} from the tokenizer's chat_template ({why}); "
            "use a built-in --template",
            source=str(tok.source), reason="template_mask_unknown",
        )

    def render_turns(messages: Messages, tools: Tools | None) -> list[Piece]:
        full = render_text(messages, tools)
        spans: list[tuple[str, bool]] = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            pre = render_text(messages[:i], tools) if i else ""
            gen = render_text(messages[:i], tools, add_generation_prompt=True) if i else ""
            header = gen[len(pre):] if gen.startswith(pre) else ""
            if full.startswith(pre) and len(pre) >= pos:
                start = len(pre) + _common_prefix_len(header, full[len(pre):])
            else:
                # the history renders differently inside the whole conversation (Qwen3 drops reasoning of
                # turns before the last user query): find this turn's header after the previous turn
                start = find_header(full, header, pos)
                if start < 0:
                    raise fail(i, "the conversation before it does not render as a prefix of the whole, and its "
                                  "assistant header has no special token to find it by")
            upto = render_text(messages[: i + 1], tools)
            if full.startswith(upto) and len(upto) >= start:
                turn = full[start : len(upto)]
                cut = max((turn.rfind(s) + len(s) for s in eot_strings if s in turn), default=len(turn))
                end, resume = start + cut, len(upto)
            else:
                found = [k for k in (full.find(s, start) for s in eot_strings) if k >= 0]
                if not found:
                    raise fail(i, "no end-of-turn token after it")
                k = min(found)
                end = k + next(len(s) for s in eot_strings if full.startswith(s, k))
                resume = end
            answer = _answer_text(m)
            if answer and restore(answer) not in restore(full[start:end]):
                raise fail(i, "its answer text is not where the turn was located")
            for call in m.get("tool_calls") or ():
                name = (call.get("function") or call).get("name", "")
                if name not in full[start:end]:
                    raise DataError(
                        f"the chat_template of tokenizer {tok.name!r} does not render the tool calls of turn {i} "
                        "(they would be lost); use --template qwen3 / chatml or a template that renders them",
                        source=str(tok.source), reason="template_drops_tool_calls",
                    )
            spans += [(full[pos:start], False), (full[start:end], trained(m))]
            pos = resume if resume >= end else end
            if resume > end:
                spans.append((full[end:resume], False))
        spans.append((full[pos:], False))
        return to_pieces(spans)

    def check(messages: Messages) -> None:
        for m in messages:
            text = m.get("content") or ""
            if GEN_OPEN in text or GEN_CLOSE in text:
                raise DataError("message contains reserved characters U+E000/U+E001", reason="reserved_chars")

    src = tok.chat_template
    renders_tools = "tool" in src

    def render(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        check(messages)
        if not renders_tools and (tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)):
            raise DataError(
                f"the chat_template of tokenizer {tok.name!r} has no format for tools or tool calls (it would drop "
                "them); use a tokenizer whose template has one, or --template qwen3 / chatml",
                reason="template_cannot_render_tools",
            )
        if protect_map:
            messages, tools = protect(messages), protect(tools)
        if null_call_content:
            messages = _null_call_content(messages)
        return render_generation(messages, tools) if has_generation else render_turns(messages, tools)

    def prompt(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        check(messages)
        if protect_map:
            messages, tools = protect(messages), protect(tools)
        if null_call_content:
            messages = _null_call_content(messages)
        text = render_text(messages, tools, add_generation_prompt=True).replace(GEN_OPEN, "").replace(GEN_CLOSE, "")
        return to_pieces([(text, False)])

    # The record writes "" as the content of a call-only assistant turn (most templates concatenate content);
    # a template that renders calls only when the content is null (DeepSeek-V3's) gets null instead.
    null_call_content = renders_tools and _wants_null_call_content(tok)
    how = "{% generation %} blocks" if has_generation else "the rendered turns"
    return ChatTemplate("hf", render, eot_ids, f"tokenizer chat_template, mask from {how}", prompt,
                        renders_reasoning=any(k in src for k in ("reasoning_content", "</think>", "thinking")),
                        renders_tools=renders_tools)
