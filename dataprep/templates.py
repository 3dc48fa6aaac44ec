"""Chat templates that render a conversation as token-level pieces tagged trainable or not.

Why pieces and not a string: the loss mask must come from token ids. A template returns a list of
`(value, trainable)` where value is a special token id (int), a text piece (str), or `FRESH` (None: the next text
is encoded as the start of a new string, like a `tokenizer(text)` call after a BOS added by post-processing).
The engine in `dataprep.tokenize` encodes each run of text between ids as ONE string (so the ids equal what the
tokenizer produces for the whole rendered string) and places the mask boundary inside a run by encoding the text
before the boundary and comparing token ids.

Built-ins: chatml (Qwen2/2.5/3), llama3, llama2, vicuna (FastChat v1.1), alpaca (Stanford), plain; `hf` renders
the tokenizer's own Jinja chat_template (see `dataprep.jinja_template`); `auto` picks one from the tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from dataprep.errors import DataError
from dataprep.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FRESH = None
Piece = tuple  # (int | str | None, bool)
Messages = list  # list[dict(role, content)]

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

BUILTIN_TEMPLATES = ("chatml", "llama3", "llama2", "vicuna", "alpaca", "plain")
TEMPLATE_CHOICES = ("auto", "hf", *BUILTIN_TEMPLATES)


@dataclass
class ChatTemplate:
    """A resolved template: `render(messages) -> pieces`. `end_of_turn` are the ids that close an assistant turn."""

    name: str
    render: Callable[[Messages], list[Piece]]
    end_of_turn: tuple[int, ...] = ()
    description: str = ""


def _need(tok: Tokenizer, content: str, template: str) -> int:
    tid = tok.special_tokens.get(content)
    if tid is None:
        tid = tok.token_to_id(content)
    if tid is None:
        raise DataError(
            f"template {template!r} needs the token {content!r}, which tokenizer {tok.name!r} does not have; "
            f"choose another --template",
            source=str(tok.source),
            reason="template_mismatch",
        )
    return tid


def _split_system(messages: Messages) -> tuple[str | None, Messages]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


# ---- chatml -----------------------------------------------------------------------------------------------------


def chatml(tok: Tokenizer, default_system: str | None = None) -> ChatTemplate:
    """`<|im_start|>role\\ncontent<|im_end|>\\n`; trains content + <|im_end|> (the "\\n" after it is scaffolding).

    `default_system` is inserted when a conversation has none, as Qwen2/2.5's own templates do.
    """
    start = _need(tok, "<|im_start|>", "chatml")
    end = _need(tok, "<|im_end|>", "chatml")

    def render(messages: Messages) -> list[Piece]:
        out: list[Piece] = []
        if messages[0]["role"] != "system" and default_system is not None:
            out += [(start, False), ("system\n" + default_system, False), (end, False), ("\n", False)]
        for m in messages:
            if m["role"] == "assistant":
                out += [(start, False), ("assistant\n", False), (m["content"], True), (end, True), ("\n", False)]
            else:
                out += [(start, False), (m["role"] + "\n" + m["content"], False), (end, False), ("\n", False)]
        return out

    return ChatTemplate("chatml", render, (end,), f"ChatML (default system: {default_system!r})")


def _default_system_from_chat_template(tok: Tokenizer) -> str | None:
    """The system prompt a ChatML chat_template inserts when a conversation has none (Qwen2/2.5 do; Qwen3 not)."""
    if not tok.chat_template or "<|im_start|>" not in tok.chat_template:
        return None
    from dataprep.jinja_template import render_chat_template

    try:
        text = render_chat_template(tok, [{"role": "user", "content": "x"}], add_generation_prompt=False)
    except Exception:  # a template we cannot render without extra variables: no default then
        return None
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head) : text.index("<|im_end|>")]
    return None


# ---- llama3 -----------------------------------------------------------------------------------------------------


def llama3(tok: Tokenizer) -> ChatTemplate:
    """Meta Llama 3 Instruct: bos, then `<|start_header_id|>role<|end_header_id|>\\n\\n` + content.strip() +
    `<|eot_id|>`. Trains content + <|eot_id|>."""
    bos = _need(tok, "<|begin_of_text|>", "llama3")
    sh = _need(tok, "<|start_header_id|>", "llama3")
    eh = _need(tok, "<|end_header_id|>", "llama3")
    eot = _need(tok, "<|eot_id|>", "llama3")

    def render(messages: Messages) -> list[Piece]:
        out: list[Piece] = [(bos, False)]
        for m in messages:
            train = m["role"] == "assistant"
            out += [(sh, False), (m["role"], False), (eh, False), ("\n\n", False)]
            out += [(m["content"].strip(), train), (eot, train)]
        return out

    return ChatTemplate("llama3", render, (eot,), "Llama 3 header/eot")


# ---- llama2 -----------------------------------------------------------------------------------------------------


def llama2(tok: Tokenizer) -> ChatTemplate:
    """Llama 2 chat as in the official HF chat_template: `<s>[INST] {<<SYS>>..<</SYS>>}user [/INST] answer </s>`
    per turn, the system prompt folded into the first user turn, contents stripped. Trains " answer " + </s>.

    Text right after `<s>` gets no sentencepiece dummy prefix ("[INST]" -> "[", "INST", "]"), which is what
    transformers' LlamaTokenizer (legacy=False, its default) produces for the chat template. Meta's original
    llama code encoded each turn with the dummy prefix ("▁[INST]"); that differs by one token per turn."""
    if tok.bos_id is None or tok.eos_id is None:
        raise DataError("template 'llama2' needs bos and eos tokens", source=str(tok.source), reason="template_mismatch")
    bos, eos = tok.bos_id, tok.eos_id

    def render(messages: Messages) -> list[Piece]:
        system, rest = _split_system(messages)
        out: list[Piece] = []
        for i, m in enumerate(rest):
            content = m["content"]
            if m["role"] == "user":
                if i == 0 and system is not None:
                    content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content
                out += [(bos, False), ("[INST] " + content.strip() + " [/INST]", False)]
            else:
                out += [(" " + content.strip() + " ", True), (eos, True)]
        return out

    return ChatTemplate("llama2", render, (eos,), "Llama 2 [INST] <<SYS>>")


# ---- vicuna -----------------------------------------------------------------------------------------------------


def vicuna(tok: Tokenizer) -> ChatTemplate:
    """FastChat vicuna_v1.1 (separator style "add colon two": sep " ", sep2 "</s>"):
    `SYSTEM USER: u ASSISTANT: a</s>USER: ...`. The default system prompt is FastChat's. Trains " a" + </s>."""
    if tok.eos_id is None:
        raise DataError("template 'vicuna' needs an eos token", source=str(tok.source), reason="template_mismatch")
    bos, eos = tok.bos_id, tok.eos_id

    def render(messages: Messages) -> list[Piece]:
        system, rest = _split_system(messages)
        out: list[Piece] = [(bos, False), (FRESH, False)] if bos is not None else []
        text = (VICUNA_SYSTEM if system is None else system) + " "
        pending = True
        for m in rest:
            if m["role"] == "user":
                text += "USER: " + m["content"] + " "
                pending = True
            else:
                out += [(text + "ASSISTANT:", False), (" " + m["content"], True), (eos, True)]
                text, pending = "", False
        if pending:  # a conversation that ends with a user turn keeps it as (untrained) context
            out.append((text, False))
        return out

    return ChatTemplate("vicuna", render, (eos,), "FastChat vicuna_v1.1")


# ---- alpaca -----------------------------------------------------------------------------------------------------


def alpaca(tok: Tokenizer) -> ChatTemplate:
    """Stanford Alpaca's no-input prompt; the record's user content (instruction, plus "\\n\\n" + input when the
    converter merged one) fills {instruction}. As in Stanford's train.py the response follows "### Response:"
    directly and ends with eos. A system message replaces the preamble. Later turns repeat the
    Instruction/Response blocks."""
    if tok.eos_id is None:
        raise DataError("template 'alpaca' needs an eos token", source=str(tok.source), reason="template_mismatch")
    bos, eos = tok.bos_id, tok.eos_id

    def render(messages: Messages) -> list[Piece]:
        system, rest = _split_system(messages)
        out: list[Piece] = [(bos, False), (FRESH, False)] if bos is not None else []
        text = (ALPACA_PREAMBLE if system is None else system) + "\n\n"
        pending = True
        for m in rest:
            if m["role"] == "user":
                text += "### Instruction:\n" + m["content"] + "\n\n### Response:"
                pending = True
            else:
                out += [(text, False), (m["content"], True), (eos, True)]
                text, pending = "\n\n", False
        if pending:
            out.append((text, False))
        return out

    return ChatTemplate("alpaca", render, (eos,), "Stanford Alpaca")


# ---- plain ------------------------------------------------------------------------------------------------------


def plain(tok: Tokenizer) -> ChatTemplate:
    """No template: [bos] prompt response eos, prompt and response tokenized separately (PaddleNLP src/tgt style).
    A system message is prepended to the first prompt with "\\n\\n"; each assistant turn ends with eos."""
    if tok.eos_id is None:
        raise DataError("template 'plain' needs an eos token", source=str(tok.source), reason="template_mismatch")
    bos, eos = tok.bos_id, tok.eos_id

    def render(messages: Messages) -> list[Piece]:
        system, rest = _split_system(messages)
        out: list[Piece] = [(bos, False)] if bos is not None else []
        for i, m in enumerate(rest):
            content = m["content"]
            if i == 0 and system is not None:
                content = system + "\n\n" + content
            train = m["role"] == "assistant"
            out += [(FRESH, False), (content, train)]
            if train:
                out.append((eos, True))
        return out

    return ChatTemplate("plain", render, (eos,), "prompt + response + eos")


# ---- resolution -------------------------------------------------------------------------------------------------


def detect_template(tok: Tokenizer) -> str:
    """`auto`: the built-in that matches the tokenizer's chat_template (faster, verified equal in tests), the
    tokenizer's own template (`hf`) when it is of another family, else a built-in picked from special tokens."""
    ct = tok.chat_template or ""
    if ct:
        if "<|im_start|>" in ct and "<|im_end|>" in ct:
            return "chatml"
        if "<|start_header_id|>" in ct and "<|eot_id|>" in ct:
            return "llama3"
        if "[INST]" in ct and "<<SYS>>" in ct:
            return "llama2"
        return "hf"
    specials = tok.special_tokens
    if "<|im_start|>" in specials and "<|im_end|>" in specials:
        return "chatml"
    if "<|start_header_id|>" in specials and "<|eot_id|>" in specials:
        return "llama3"
    if tok.kind == "sentencepiece" and tok.bos_id is not None and tok.eos_id is not None:
        return "llama2"
    return "plain"


_PROBES = (
    [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
     {"role": "assistant", "content": "Hello."}],
)


def renders_like_chat_template(template: ChatTemplate, tok: Tokenizer) -> bool:
    """Does a built-in render the same text as the tokenizer's own chat_template on probe conversations?
    (Catches family variants such as Llama 3.1's date header, which the plain llama3 built-in does not add.)"""
    from dataprep.jinja_template import render_chat_template

    by_id = {i: c for c, i in tok.special_tokens.items()}
    for probe in _PROBES:
        try:
            want = render_chat_template(tok, probe)
        except Exception as e:  # a template that needs variables we do not pass: trust the family match
            log.warning("could not render the tokenizer's chat_template to check %s: %s", template.name, e)
            return True
        got = "".join(v if isinstance(v, str) else by_id.get(v, "") for v, _ in template.render(probe) if v is not None)
        if got != want:
            return False
    return True


def get_template(name: str, tok: Tokenizer) -> ChatTemplate:
    """Resolve a template name for a tokenizer (`auto` and `hf` included).

    `auto` uses the built-in of the tokenizer's family when it renders exactly like the tokenizer's own
    chat_template (checked on probe conversations), otherwise the chat_template itself (`hf`)."""
    if name == "auto":
        name = detect_template(tok)
        if name in BUILTIN_TEMPLATES and tok.chat_template:
            candidate = get_template(name, tok)
            if renders_like_chat_template(candidate, tok):
                log.info("template auto -> %s for tokenizer %s", name, tok.name)
                return candidate
            log.info("template auto: built-in %s differs from %s's chat_template; using hf", name, tok.name)
            name = "hf"
        log.info("template auto -> %s for tokenizer %s", name, tok.name)
    if name == "hf":
        from dataprep.jinja_template import hf_template

        return hf_template(tok)
    if name == "chatml":
        return chatml(tok, _default_system_from_chat_template(tok))
    builders = {"llama3": llama3, "llama2": llama2, "vicuna": vicuna, "alpaca": alpaca, "plain": plain}
    if name not in builders:
        raise DataError(
            f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_CHOICES)}", reason="bad_template"
        )
    return builders[name](tok)
