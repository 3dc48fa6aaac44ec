"""Property test: the `qwen3` and `chatml` built-ins render exactly what the real Qwen3 / Qwen2.5 chat templates
render (our Jinja renderer, itself checked against transformers in test_chat_templates_modern), for random
conversations with system prompts, tools, tool calls (object and string arguments), runs of tool results,
reasoning (field or inline <think>) on any turn, and contents with newlines and think tags at the edges.
A sample of them is checked token for token against transformers too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataprep.jinja_template import render_chat_template
from dataprep.templates import get_template, pieces_text
from dataprep.tokenizer import load_tokenizer

DATA = Path(__file__).parent / "data" / "chat_templates"
TEXT = st.lists(st.sampled_from(["a", "b c", "\n", "\n\n", " ", "中文", "<think>", "</think>", "{\"x\": 1}", "7"]),
                max_size=6).map("".join)
NONEMPTY = TEXT.filter(lambda t: t.strip() != "")
ARGS = st.one_of(st.just({}), st.fixed_dictionaries({"city": TEXT}), st.just("{\"city\": \"Rome\"}"))
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@st.composite
def conversations(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(NONEMPTY)})
        for _ in range(draw(st.integers(0, 2))):  # tool-call rounds before the answer
            calls = [{"type": "function", "function": {"name": "get_weather", "arguments": draw(ARGS)}}
                     for _ in range(draw(st.integers(1, 2)))]
            call = {"role": "assistant", "content": draw(TEXT), "tool_calls": calls}
            if draw(st.booleans()):
                call["reasoning_content"] = draw(TEXT)
            msgs.append(call)
            msgs += [{"role": "tool", "content": draw(TEXT)} for _ in calls]
        answer = {"role": "assistant", "content": draw(NONEMPTY)}
        kind = draw(st.sampled_from(["none", "field", "inline"]))
        if kind == "field":
            answer["reasoning_content"] = draw(TEXT)
        elif kind == "inline":
            answer["content"] = "<think>\n" + draw(TEXT) + "\n</think>\n\n" + answer["content"]
        msgs.append(answer)
    tools = [TOOL] if draw(st.booleans()) else None
    return msgs, tools


def _qwen3_dir(shared_data, tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer

    d = tmp_path_factory.mktemp("q3p")
    tok = Tokenizer.from_file(str(shared_data / "tokenizers" / "qwen2_5" / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_bytes((DATA / "qwen3_tokenizer_config.json").read_bytes())
    return d


@pytest.fixture(scope="module")
def qwen3_tok(shared_data, tmp_path_factory):
    return load_tokenizer(_qwen3_dir(shared_data, tmp_path_factory))


@pytest.fixture(scope="module")
def qwen25_tok(shared_data):
    return load_tokenizer(shared_data / "tokenizers" / "qwen2_5")


def _assert_builtin_renders_like_the_template(name: str, tok, leave_out: tuple[str, ...] = ()) -> None:
    """Built-in `name` renders random conversations, and their generation prompts, as `tok`'s chat_template does;
    `leave_out` drops message keys the real template has no place for."""
    template = get_template(name, tok)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(conversations())
    def check(conv):
        messages, tools = conv
        messages = [{k: v for k, v in m.items() if k not in leave_out} for m in messages]
        want = render_chat_template(tok, messages, tools=tools)
        assert pieces_text(template.render(messages, tools), tok) == want
        prompt_msgs = messages[:-1]
        want = render_chat_template(tok, prompt_msgs, add_generation_prompt=True, tools=tools)
        assert pieces_text(template.prompt(prompt_msgs, tools), tok) == want

    check()


def test_qwen3_builtin_renders_like_the_real_template(qwen3_tok):
    _assert_builtin_renders_like_the_template("qwen3", qwen3_tok)


def test_chatml_builtin_renders_like_qwen2_5(qwen25_tok):
    # Qwen2.5's template has no place for reasoning: compare without it
    _assert_builtin_renders_like_the_template("chatml", qwen25_tok, leave_out=("reasoning_content",))


def test_sample_token_for_token_against_transformers(qwen3_tok):
    from transformers import PreTrainedTokenizerFast

    from dataprep.tokenize import TokenizeOptions, tokenize_conversations

    d = qwen3_tok.source.parent
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    ref = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), eos_token=cfg["eos_token"],
                                  pad_token=cfg["pad_token"])
    ref.chat_template = cfg["chat_template"]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(conversations())
    def check(conv):
        messages, tools = conv
        record = {"id": "p", "messages": messages, **({"tools": tools} if tools else {})}
        for template in ("qwen3", "hf"):
            (s,) = tokenize_conversations([record], qwen3_tok, TokenizeOptions(template=template))
            out = ref.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False)
            assert s.input_ids.tolist() == list(out["input_ids"] if hasattr(out, "keys") else out)
        # expand: one sample per assistant turn, each the conversation up to it as transformers renders it
        samples = list(tokenize_conversations([record], qwen3_tok, TokenizeOptions(template="qwen3", multi_turn="expand")))
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(samples) == len(turns)
        for s, i in zip(samples, turns, strict=True):
            out = ref.apply_chat_template(messages[: i + 1], tools=tools, tokenize=True, return_dict=False)
            assert s.input_ids.tolist() == list(out["input_ids"] if hasattr(out, "keys") else out)

    check()
