"""Chat templates that render a conversation as token-level pieces tagged trainable or not.

Why pieces and not a string: the loss mask must come from token ids. A template returns a list of
`(value, trainable)` where value is a special token id (int), a text piece (str), or `FRESH` (None: the next text
is encoded as the start of a new string, like a `tokenizer(text)` call after a BOS added by post-processing).
The engine in `dataprep.tokenize` encodes each run of text between ids as ONE string (so the ids equal what the
tokenizer produces for the whole rendered string) and places the mask boundary inside a run by encoding the text
before the boundary and comparing token ids.

Built-ins: chatml (Qwen2/2.5, tools included), qwen3 and qwen3-nothink (Qwen3's thinking template, tools
included), llama3, llama2, vicuna (FastChat v1.1), alpaca (Stanford), plain; `hf` renders the tokenizer's own
Jinja chat_template (see `dataprep.jinja_template`); `auto` picks one from the tokenizer. The types (pieces,
ChatTemplate) live in `dataprep.chat_types`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dataprep import chat_types as ct
from dataprep.chat_types import (
    BUILTIN_TEMPLATES,
    FRESH,
    TEMPLATE_CHOICES,
    ChatTemplate,
    Messages,
    Piece,
    Tools,
    trained,
)
from dataprep.errors import DataError
from dataprep.jinja_template import hf_template, render_chat_template, tojson
from dataprep.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["BUILTIN_TEMPLATES", "FRESH", "TEMPLATE_CHOICES", "ChatTemplate", "Piece", "get_template"]

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

# Qwen's tool-use system text (the same in Qwen2.5 and Qwen3 chat templates), around the tools list.
QWEN_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
QWEN_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call>"
)


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


def _refuse_tools(name: str, messages: Messages, tools: Tools | None) -> None:
    """Templates with no tool-call format must not drop calls silently."""
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise DataError(
            f"template {name!r} has no format for tools or tool calls; use --template hf with a tokenizer whose "
            "chat_template has one, or --template qwen3 / chatml",
            reason="template_cannot_render_tools",
        )


def _untrained(pieces: list[Piece]) -> list[Piece]:
    return [(v, False) for v, _ in pieces]


def _qwen_call(call: dict[str, Any], string_arguments_as_is: bool) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments")
    text = args if string_arguments_as_is and isinstance(args, str) else tojson(args)
    return '<tool_call>\n{"name": "' + fn["name"] + '", "arguments": ' + text + "}\n</tool_call>"


def _qwen_system(messages: Messages, tools: Tools | None, default_system: str | None) -> tuple[str | None, int]:
    """The system block's text (None: no system block) and how many messages it consumed."""
    first_system = bool(messages) and messages[0]["role"] == "system"
    system = messages[0]["content"] if first_system else default_system
    if tools:
        head = (system + "\n\n") if system is not None else ""
        body = head + QWEN_TOOLS_HEAD + "".join("\n" + tojson(t) for t in tools) + QWEN_TOOLS_TAIL
        return body, int(first_system)
    return system, int(first_system)


def _qwen_tool_results(messages: Messages, i: int, start: int, end: int) -> list[Piece]:
    """Consecutive tool turns share one user block of <tool_response> entries (Qwen2.5 and Qwen3)."""
    out: list[Piece] = []
    if i == 0 or messages[i - 1]["role"] != "tool":
        out += [(start, False), ("user", False)]
    out.append(("\n<tool_response>\n" + messages[i]["content"] + "\n</tool_response>", False))
    if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
        out += [(end, False), ("\n", False)]
    return out


def _qwen_render(messages: Messages, tools: Tools | None, default_system: str | None, start: int, end: int,
                 assistant: Callable[[int, dict[str, Any]], tuple[str, str]]) -> list[Piece]:
    """The turn structure Qwen2.5's and Qwen3's templates share, so a fix to it reaches both: the system block
    (with the tools), runs of tool results grouped in one user block, other turns as untrained blocks.
    `assistant(i, message)` gives an assistant turn's (header, body), the part the two templates differ in;
    the body and its <|im_end|> are trained when the message is."""
    out: list[Piece] = []
    system, skip = _qwen_system(messages, tools, default_system)
    if system is not None:
        out += [(start, False), ("system\n" + system, False), (end, False), ("\n", False)]
    for i, m in enumerate(messages):
        if i < skip:
            continue
        role = m["role"]
        if role == "tool":
            out += _qwen_tool_results(messages, i, start, end)
        elif role == "assistant":
            header, body = assistant(i, m)
            train = trained(m)
            out += [(start, False), (header, False), (body, train), (end, train), ("\n", False)]
        else:
            out += [(start, False), (role + "\n" + m["content"], False), (end, False), ("\n", False)]
    return out


# ---- chatml (Qwen2 / Qwen2.5) -----------------------------------------------------------------------------------


def chatml(tok: Tokenizer, default_system: str | None = None) -> ChatTemplate:
    """`<|im_start|>role\\ncontent<|im_end|>\\n`, with tools, tool calls and tool results as Qwen2.5's template
    renders them; trains the assistant content (and calls) + <|im_end|> (the "\\n" after it is scaffolding).

    `default_system` is inserted when a conversation has none, as Qwen2/2.5's own templates do.
    """
    start = _need(tok, "<|im_start|>", "chatml")
    end = _need(tok, "<|im_end|>", "chatml")

    def assistant(i: int, m: dict[str, Any]) -> tuple[str, str]:
        if m.get("tool_calls"):
            body = ("\n" + m["content"] if m["content"] else "") + "".join(
                "\n" + _qwen_call(c, False) for c in m["tool_calls"])
            return "assistant\n", body[1:]
        return "assistant\n", m["content"]

    def render(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        return _qwen_render(messages, tools, default_system, start, end, assistant)

    def prompt(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        return _untrained(render(messages, tools)) + [(start, False), ("assistant\n", False)]

    return ChatTemplate("chatml", render, (end,), f"ChatML (default system: {default_system!r})", prompt,
                        renders_reasoning=False, renders_tools=True)


def _default_system_from_chat_template(tok: Tokenizer) -> str | None:
    """The system prompt a ChatML chat_template inserts when a conversation has none (Qwen2/2.5 do; Qwen3 not)."""
    if not tok.chat_template or "<|im_start|>" not in tok.chat_template:
        return None
    try:
        text = render_chat_template(tok, [{"role": "user", "content": "x"}], add_generation_prompt=False)
    except Exception:  # a template we cannot render without extra variables: no default then
        return None
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head) : text.index("<|im_end|>")]
    return None


# ---- qwen3 ------------------------------------------------------------------------------------------------------


def _qwen3_reasoning(m: dict[str, Any]) -> tuple[str, str]:
    """(reasoning, content) as Qwen3's template derives them: `reasoning_content` when given, else a
    `<think>` block split off the content."""
    content = m["content"]
    if m.get("reasoning_content") is not None:
        return m["reasoning_content"], content
    if "</think>" in content:
        return content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n"), \
            content.split("</think>")[-1].lstrip("\n")
    return "", content


def _last_query_index(messages: Messages) -> int:
    """The last user turn that is not a wrapped tool response; assistant turns after it keep their reasoning."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        c = m["content"]
        if m["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            return i
    return len(messages) - 1


def qwen3(tok: Tokenizer, thinking: bool = True) -> ChatTemplate:
    """Qwen3's own chat template, rendered piece by piece: no default system prompt; tools in the system turn;
    an assistant turn after the last user query shows `<think>\\nreasoning\\n</think>\\n\\n` (the last one
    always, even empty), earlier turns show the answer only (their reasoning is dropped, as the template does);
    tool calls as `<tool_call>` JSON (string arguments as given); tool results grouped in a user turn.
    Trains what follows `<|im_start|>assistant\\n`, through `<|im_end|>`.

    `thinking=False` (template `qwen3-nothink`) is the template with enable_thinking=false: the inference
    prompt ends with an empty think block, so a last turn without reasoning does not train that block."""
    start = _need(tok, "<|im_start|>", "qwen3")
    end = _need(tok, "<|im_end|>", "qwen3")
    empty_think = "<think>\n\n</think>\n\n"

    def render(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        last_query = _last_query_index(messages)
        n = len(messages)

        def assistant(i: int, m: dict[str, Any]) -> tuple[str, str]:
            reasoning, content = _qwen3_reasoning(m)
            if i > last_query and (i == n - 1 or reasoning):
                body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
            else:
                body = content
            for k, call in enumerate(m.get("tool_calls") or ()):
                if k or content:
                    body += "\n"
                body += _qwen_call(call, True)
            header = "assistant\n"
            if not thinking and i == n - 1 and body.startswith(empty_think):
                header, body = header + empty_think, body[len(empty_think):]
            return header, body

        return _qwen_render(messages, tools, None, start, end, assistant)

    def prompt(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        header = "assistant\n" if thinking else "assistant\n" + empty_think
        return _untrained(render(messages, tools)) + [(start, False), (header, False)]

    name = "qwen3" if thinking else "qwen3-nothink"
    return ChatTemplate(name, render, (end,), f"Qwen3 (thinking={'on' if thinking else 'off'})", prompt,
                        renders_reasoning=True, renders_tools=True)


# ---- llama3 -----------------------------------------------------------------------------------------------------


def llama3(tok: Tokenizer) -> ChatTemplate:
    """Meta Llama 3 Instruct: bos, then `<|start_header_id|>role<|end_header_id|>\\n\\n` + content.strip() +
    `<|eot_id|>`. Trains content + <|eot_id|>. No tool format (Llama 3.0's template has none)."""
    bos = _need(tok, "<|begin_of_text|>", "llama3")
    sh = _need(tok, "<|start_header_id|>", "llama3")
    eh = _need(tok, "<|end_header_id|>", "llama3")
    eot = _need(tok, "<|eot_id|>", "llama3")

    def render(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        _refuse_tools("llama3", messages, tools)
        out: list[Piece] = [(bos, False)]
        for m in messages:
            train = trained(m)
            out += [(sh, False), (m["role"], False), (eh, False), ("\n\n", False)]
            out += [(m["content"].strip(), train), (eot, train)]
        return out

    def prompt(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        return _untrained(render(messages, tools)) + [(sh, False), ("assistant", False), (eh, False), ("\n\n", False)]

    return ChatTemplate("llama3", render, (eot,), "Llama 3 header/eot", prompt)


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

    def render(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        _refuse_tools("llama2", messages, tools)
        system, rest = _split_system(messages)
        out: list[Piece] = []
        for i, m in enumerate(rest):
            content = m["content"]
            if m["role"] == "user":
                if i == 0 and system is not None:
                    content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content
                out += [(bos, False), ("[INST] " + content.strip() + " [/INST]", False)]
            else:
                train = trained(m)
                out += [(" " + content.strip() + " ", train), (eos, train)]
        return out

    def prompt(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        return _untrained(render(messages, tools))

    return ChatTemplate("llama2", render, (eos,), "Llama 2 [INST] <<SYS>>", prompt)


# ---- vicuna -----------------------------------------------------------------------------------------------------


def _text_turns(tok: Tokenizer, name: str, description: str, *, default_system: str, system_sep: str,
                user: tuple[str, str], assistant_lead: str, answer_lead: str, between: str,
                prompt_tail: str) -> ChatTemplate:
    """A plain-text conversation format (no special tokens but bos/eos): the system text (or the format's
    default), then per user turn `user[0] + content + user[1]`, per assistant turn the text so far +
    `assistant_lead` untrained and `answer_lead + content` + eos trained, `between` starting the next text.
    A generation prompt ends with `prompt_tail`."""
    if tok.eos_id is None:
        raise DataError(f"template '{name}' needs an eos token", source=str(tok.source), reason="template_mismatch")
    bos, eos = tok.bos_id, tok.eos_id

    def render(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        _refuse_tools(name, messages, tools)
        system, rest = _split_system(messages)
        out: list[Piece] = [(bos, False), (FRESH, False)] if bos is not None else []
        text = (default_system if system is None else system) + system_sep
        pending = True
        for m in rest:
            if m["role"] == "user":
                text += user[0] + m["content"] + user[1]
                pending = True
            else:
                train = trained(m)
                out += [(text + assistant_lead, False), (answer_lead + m["content"], train), (eos, train)]
                text, pending = between, False
        if pending:  # a conversation that ends with a user turn keeps it as (untrained) context
            out.append((text, False))
        return out

    def prompt(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        return _untrained(render(messages, tools)) + ([(prompt_tail, False)] if prompt_tail else [])

    return ChatTemplate(name, render, (eos,), description, prompt)


def vicuna(tok: Tokenizer) -> ChatTemplate:
    """FastChat vicuna_v1.1 (separator style "add colon two": sep " ", sep2 "</s>"):
    `SYSTEM USER: u ASSISTANT: a</s>USER: ...`. The default system prompt is FastChat's. Trains " a" + </s>."""
    return _text_turns(tok, "vicuna", "FastChat vicuna_v1.1", default_system=VICUNA_SYSTEM, system_sep=" ",
                       user=("USER: ", " "), assistant_lead="ASSISTANT:", answer_lead=" ", between="",
                       prompt_tail="ASSISTANT:")


# ---- alpaca -----------------------------------------------------------------------------------------------------


def alpaca(tok: Tokenizer) -> ChatTemplate:
    """Stanford Alpaca's no-input prompt; the record's user content (instruction, plus "\\n\\n" + input when the
    converter merged one) fills {instruction}. As in Stanford's train.py the response follows "### Response:"
    directly and ends with eos. A system message replaces the preamble. Later turns repeat the
    Instruction/Response blocks."""
    return _text_turns(tok, "alpaca", "Stanford Alpaca", default_system=ALPACA_PREAMBLE, system_sep="\n\n",
                       user=("### Instruction:\n", "\n\n### Response:"), assistant_lead="", answer_lead="",
                       between="\n\n", prompt_tail="")


# ---- plain ------------------------------------------------------------------------------------------------------


def plain(tok: Tokenizer) -> ChatTemplate:
    """No template: [bos] prompt response eos, prompt and response tokenized separately (PaddleNLP src/tgt style).
    A system message is prepended to the first prompt with "\\n\\n"; each assistant turn ends with eos."""
    if tok.eos_id is None:
        raise DataError("template 'plain' needs an eos token", source=str(tok.source), reason="template_mismatch")
    bos, eos = tok.bos_id, tok.eos_id

    def render(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        _refuse_tools("plain", messages, tools)
        system, rest = _split_system(messages)
        out: list[Piece] = [(bos, False)] if bos is not None else []
        for i, m in enumerate(rest):
            content = m["content"]
            if i == 0 and system is not None:
                content = system + "\n\n" + content
            if m["role"] == "assistant":
                train = trained(m)
                out += [(FRESH, False), (content, train), (eos, train)]
            else:
                out += [(FRESH, False), (content, False)]
        return out

    def prompt(messages: Messages, tools: Tools | None = None) -> list[Piece]:
        return _untrained(render(messages, tools)) + [(FRESH, False)]

    return ChatTemplate("plain", render, (eos,), "prompt + response + eos", prompt)


# ---- resolution -------------------------------------------------------------------------------------------------


def detect_template(tok: Tokenizer) -> str:
    """`auto`: the built-in that matches the tokenizer's chat_template (faster, verified equal in tests), the
    tokenizer's own template (`hf`) when it is of another family, else a built-in picked from special tokens."""
    ct_src = tok.chat_template or ""
    if ct_src:
        if "<|im_start|>" in ct_src and "<|im_end|>" in ct_src:
            return "qwen3" if ("reasoning_content" in ct_src or "</think>" in ct_src) else "chatml"
        if "<|start_header_id|>" in ct_src and "<|eot_id|>" in ct_src:
            return "llama3"
        if "[INST]" in ct_src and "<<SYS>>" in ct_src:
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


_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather, °C",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
_PROBES: tuple[tuple[list[dict[str, Any]], list | None], ...] = (
    ([{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
      {"role": "assistant", "content": "Hello."}], None),
)
_TOOL_PROBES: tuple[tuple[list[dict[str, Any]], list | None], ...] = (
    ([{"role": "user", "content": "Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
          {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
      {"role": "tool", "content": "18"}, {"role": "tool", "content": "24"},
      {"role": "assistant", "content": "18 and 24."}, {"role": "user", "content": "Thanks"},
      {"role": "assistant", "content": "Sure.", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": {}}}]},
      {"role": "tool", "content": "x"}, {"role": "assistant", "content": "Done."}], [_WEATHER]),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     [_WEATHER]),
)
_REASONING_PROBES: tuple[tuple[list[dict[str, Any]], list | None], ...] = (
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r1"},
      {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\nd"}], None),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "reasoning_content": "r",
                                          "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]},
      {"role": "tool", "content": "t"}, {"role": "assistant", "content": "e", "reasoning_content": "r3"}], None),
)


def _probes_for(tok: Tokenizer) -> list[tuple[list[dict[str, Any]], list | None]]:
    src = tok.chat_template or ""
    probes = list(_PROBES)
    if "tool" in src:
        probes += _TOOL_PROBES
    if "reasoning_content" in src or "</think>" in src:
        probes += _REASONING_PROBES
    return probes


def pieces_text(pieces: list[Piece], tok: Tokenizer) -> str:
    """The text a list of pieces stands for (special token ids as their strings)."""
    by_id = {i: c for c, i in tok.special_tokens.items()}
    return "".join(v if isinstance(v, str) else by_id.get(v, "") for v, _ in pieces if v is not None)


def renders_like_chat_template(template: ChatTemplate, tok: Tokenizer) -> bool:
    """Does a built-in render the same text as the tokenizer's own chat_template on probe conversations
    (with tools and reasoning when the chat_template mentions them)? (Catches family variants such as
    Llama 3.1's date header, which the plain llama3 built-in does not add.)"""
    for messages, tools in _probes_for(tok):
        try:
            want = render_chat_template(tok, messages, tools=tools)
        except Exception as e:  # a template that needs variables we do not pass: trust the family match
            log.warning("could not render the tokenizer's chat_template to check %s: %s", template.name, e)
            return True
        try:
            got = pieces_text(template.render(messages, tools), tok)
        except DataError:
            return False
        if got != want:
            return False
    return True


def get_template(name: str, tok: Tokenizer, content_specials: ct.ContentSpecials = "text") -> ChatTemplate:
    """Resolve a template name for a tokenizer (`auto` and `hf` included).

    `auto` uses the built-in of the tokenizer's family when it renders exactly like the tokenizer's own
    chat_template (checked on probe conversations), otherwise the chat_template itself (`hf`).
    `content_specials` matters to `hf` only (built-ins never read special tokens out of message text; the
    engine's encoding decides): see `chat_types.ContentSpecials`."""
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
        return hf_template(tok, content_specials)
    if name == "chatml":
        return chatml(tok, _default_system_from_chat_template(tok))
    if name == "qwen3-nothink":
        return qwen3(tok, thinking=False)
    builders = {"qwen3": qwen3, "llama3": llama3, "llama2": llama2, "vicuna": vicuna, "alpaca": alpaca, "plain": plain}
    if name not in builders:
        raise DataError(
            f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_CHOICES)}", reason="bad_template"
        )
    return builders[name](tok)


def inline_reasoning(m: dict[str, Any]) -> dict[str, Any]:
    """An assistant message with its reasoning put back in front of the content as `<think>...</think>`, for
    templates that have no place for `reasoning_content` (the form such models saw reasoning in)."""
    out = {k: v for k, v in m.items() if k != "reasoning_content"}
    out["content"] = "<think>\n" + m["reasoning_content"] + "\n</think>\n\n" + m["content"]
    return out

