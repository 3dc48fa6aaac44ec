"""Exact ids and masks for today's chat templates: Qwen3 (thinking: history without reasoning, tools), Gemma 3
(system folded into the first user turn), DeepSeek-V3, a DeepSeek-R1-style template stripping reasoning, and
Qwen2.5 / Llama 3 with tools and reasoning.

Reference: transformers' `apply_chat_template(messages, tools=..., tokenize=True)` on a tokenizer built from the
same files (test-only dependency). The trained spans are checked against the render text itself: for every
assistant turn, what follows the template's assistant header through its end-of-turn token.
See tests/data/chat_templates/README.md for where the templates come from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dataprep.errors import DataError
from dataprep.templates import get_template, pieces_text
from dataprep.tokenize import IGNORE, TokenizeOptions, TokenizeStats, tokenize_conversations
from dataprep.tokenizer import load_tokenizer
from tests.helpers.documents import row_documents
from tests.helpers.spans import trained_spans

DATA = Path(__file__).parent / "data" / "chat_templates"
QWEN3_ADDED = ["<tool_response>", "</tool_response>", "<think>", "</think>"]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}}

MULTI = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Give two tips for sleeping well."},
    {"role": "assistant", "content": "1. Keep a schedule.\n2. Avoid screens late."},
    {"role": "user", "content": "Translate to Chinese: good night"},
    {"role": "assistant", "content": "晚安！"},
]
REASONING = [
    {"role": "user", "content": "What is 17 * 23?"},
    {"role": "assistant", "content": "391.", "reasoning_content": "17 * 20 = 340, 17 * 3 = 51, sum 391."},
    {"role": "user", "content": "And 391 + 9?"},
    {"role": "assistant", "content": "400.", "reasoning_content": "391 + 9 = 400."},
]
INLINE_THINK_LAST = [
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "2."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "<think>\nNot 2 again; 3 works.\n</think>\n\n3."},
]
TOOLS_CONV = [
    {"role": "system", "content": "Use the tools when needed."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "reasoning_content": "Two cities, two calls.", "tool_calls": [
        {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "id": "c2", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"temp_c\": 18}"},
    {"role": "tool", "tool_call_id": "c2", "content": "{\"temp_c\": 24}"},
    {"role": "assistant", "content": "Paris 18 °C, Rome 24 °C."},
    {"role": "user", "content": "What time is it?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": {"name": "get_time", "arguments": {}}}]},
    {"role": "tool", "content": "21:05"},
    {"role": "assistant", "content": "It is 21:05.", "reasoning_content": "The tool said 21:05."},
]
CASES = {"multi": (MULTI, None), "reasoning": (REASONING, None), "inline_think": (INLINE_THINK_LAST, None),
         "tools": (TOOLS_CONV, [WEATHER, CLOCK])}


def _build(tmp: Path, shared: Path, config: dict, add_special: list[str] = (), add_plain: list[str] = ()) -> Path:
    """A tokenizer directory: Qwen2.5's tokenizer.json (+ added tokens) and the given tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer

    tmp.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(shared / "tokenizers" / "qwen2_5" / "tokenizer.json"))
    if add_plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in add_plain])
    if add_special:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in add_special])
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return tmp


def _reference(d: Path):
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((d / "tokenizer_config.json").read_text())

    def content(v):
        return v.get("content") if isinstance(v, dict) else v

    ref = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token=content(cfg.get("bos_token")),
                                  eos_token=content(cfg.get("eos_token")), pad_token=content(cfg.get("pad_token")))
    ref.chat_template = cfg["chat_template"]
    return ref


@pytest.fixture(scope="module")
def qwen3(shared_data, tmp_path_factory):
    cfg = json.loads((DATA / "qwen3_tokenizer_config.json").read_text())
    d = _build(tmp_path_factory.mktemp("qwen3"), shared_data, cfg, add_plain=QWEN3_ADDED)
    tok = load_tokenizer(d)
    # the four added tokens sit where Qwen3's own tokenizer_config.json says they are
    for tid, entry in cfg["added_tokens_decoder"].items():
        assert tok.token_to_id(entry["content"]) == int(tid)
    return tok, _reference(d)


@pytest.fixture(scope="module")
def gemma3(shared_data, tmp_path_factory):
    cfg = {"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>",
           "chat_template": (DATA / "gemma3_chat_template.jinja").read_text()}
    d = _build(tmp_path_factory.mktemp("gemma3"), shared_data, cfg,
               add_special=["<bos>", "<pad>", "<start_of_turn>", "<end_of_turn>"])
    return load_tokenizer(d), _reference(d)


@pytest.fixture(scope="module")
def deepseek_v3(shared_data, tmp_path_factory):
    cfg = json.loads((DATA / "deepseek_v3_tokenizer_config.json").read_text())
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
    d = _build(tmp_path_factory.mktemp("dsv3"), shared_data, cfg, add_special=specials)
    return load_tokenizer(d), _reference(d)


# A template written for this test after the behaviour of DeepSeek-R1's: reasoning is cut from every assistant
# turn in the rendering, and the generation prompt opens a think block.
R1_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<｜Assistant｜>' + c + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def r1_style(shared_data, tmp_path_factory):
    cfg = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "chat_template": R1_STYLE}
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
    d = _build(tmp_path_factory.mktemp("r1"), shared_data, cfg, add_special=specials)
    return load_tokenizer(d), _reference(d)


def ids_of(ref, messages, tools=None, **kw):
    out = ref.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def assistant_parts(text: str, header: str, end: str) -> list[str]:
    """What follows each assistant header through the next end-of-turn string, read off the rendered text."""
    parts = []
    pos = text.find(header)
    while pos >= 0:
        start = pos + len(header)
        stop = text.index(end, start) + len(end)
        parts.append(text[start:stop])
        pos = text.find(header, stop)
    return parts


def pack(tok, messages, tools=None, **options):
    record = {"id": "r", "messages": messages, **({"tools": tools} if tools else {})}
    stats = TokenizeStats()
    samples = list(tokenize_conversations([record], tok, TokenizeOptions(**options), stats))
    return samples, stats


@pytest.mark.parametrize("template", ["hf", "qwen3", "auto"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_qwen3_whole_conversation_equals_transformers(qwen3, template, case):
    tok, ref = qwen3
    messages, tools = CASES[case]
    (s,), _ = pack(tok, messages, tools, template=template)
    assert s.input_ids.tolist() == ids_of(ref, messages, tools)
    text = ref.apply_chat_template(messages, tools=tools, tokenize=False)
    want = assistant_parts(text, "<|im_start|>assistant\n", "<|im_end|>")
    assert trained_spans(tok, s) == want
    if case == "reasoning":  # history without its reasoning, the last turn with it
        assert "17 * 20" not in text and want[-1] == "<think>\n391 + 9 = 400.\n</think>\n\n400.<|im_end|>"
    if case == "tools":
        assert any("<tool_call>" in w for w in want) and not any("temp_c" in w for w in want)


def test_qwen3_auto_picks_the_builtin(qwen3):
    tok, _ = qwen3
    assert get_template("auto", tok).name == "qwen3"


@pytest.mark.parametrize("template", ["hf", "qwen3"])
def test_qwen3_expand_renders_each_turn_as_at_inference(qwen3, template):
    tok, ref = qwen3
    samples, stats = pack(tok, REASONING, template=template, multi_turn="expand")
    assert stats.expanded_records == 1 and [s.id for s in samples] == ["r#turn1", "r#turn3"]
    for s, upto in zip(samples, (2, 4), strict=True):
        prefix = REASONING[:upto]
        assert s.input_ids.tolist() == ids_of(ref, prefix)
        text = ref.apply_chat_template(prefix, tokenize=False)
        assert trained_spans(tok, s) == assistant_parts(text, "<|im_start|>assistant\n", "<|im_end|>")[-1:]
    assert "17 * 20 = 340" in trained_spans(tok, samples[0])[0]  # the earlier turn's reasoning is trained here


def test_qwen3_last_and_train_flags(qwen3):
    tok, ref = qwen3
    (s,), _ = pack(tok, MULTI, template="qwen3", multi_turn="last")
    text = ref.apply_chat_template(MULTI, tokenize=False)
    assert trained_spans(tok, s) == assistant_parts(text, "<|im_start|>assistant\n", "<|im_end|>")[-1:]
    flagged = [dict(m) for m in MULTI]
    flagged[4]["train"] = False
    for template in ("qwen3", "hf"):
        (s,), _ = pack(tok, flagged, template=template)
        assert s.input_ids.tolist() == ids_of(ref, MULTI)
        assert trained_spans(tok, s) == assistant_parts(text, "<|im_start|>assistant\n", "<|im_end|>")[:1]
    flagged[2]["train"] = True
    (s,), _ = pack(tok, flagged, template="qwen3", multi_turn="last")
    assert len(trained_spans(tok, s)) == 1  # turn 2 trained by its flag, turn 4 excluded by its own


def test_qwen3_nothink_leaves_the_empty_think_block_to_the_prompt(qwen3):
    tok, ref = qwen3
    (s,), _ = pack(tok, MULTI, template="qwen3-nothink")
    assert s.input_ids.tolist() == ids_of(ref, MULTI)
    prompt = ref.apply_chat_template(MULTI[:-1], add_generation_prompt=True, enable_thinking=False, tokenize=False)
    full = ref.apply_chat_template(MULTI, tokenize=False)
    assert full.startswith(prompt)
    assert trained_spans(tok, s)[-1] == full[len(prompt):].rstrip("\n")


@pytest.mark.parametrize("template", ["hf", "qwen3", "qwen3-nothink"])
def test_prompt_is_the_inference_prompt(qwen3, template):
    """ChatTemplate.prompt (what generation feeds the model) equals add_generation_prompt=True."""
    tok, ref = qwen3
    t = get_template(template, tok)
    for messages, tools in ((MULTI[:-1], None), (TOOLS_CONV[:5], [WEATHER, CLOCK])):
        kw = {"enable_thinking": False} if template == "qwen3-nothink" else {}
        want = ref.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False, **kw)
        assert pieces_text(t.prompt(messages, tools), tok) == want
        assert not any(flag for _, flag in t.prompt(messages, tools))


def inline(messages):
    """Reasoning put in front of the content as <think>...</think>: what the engine does for a template with no
    place for reasoning_content (instead of losing it, as rendering such a template with the field does)."""
    return [{k: v for k, v in m.items() if k != "reasoning_content"}
            | ({"content": f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}"} if "reasoning_content" in m else {})
            for m in messages]


@pytest.mark.parametrize("case", ["multi", "reasoning"])
def test_gemma3_folds_the_system_prompt_into_the_first_user_turn(gemma3, case):
    tok, ref = gemma3
    messages = CASES[case][0]
    (s,), stats = pack(tok, messages, template="auto")
    assert stats.reasoning_inlined == (2 if case == "reasoning" else 0)
    assert s.input_ids.tolist() == ids_of(ref, inline(messages))
    text = ref.apply_chat_template(inline(messages), tokenize=False)
    if case == "multi":
        assert "<start_of_turn>user\nYou are a careful assistant.\n\nGive two tips" in text
    assert trained_spans(tok, s) == assistant_parts(text, "<start_of_turn>model\n", "<end_of_turn>")


def test_deepseek_v3_system_before_the_first_turn(deepseek_v3):
    tok, ref = deepseek_v3
    (s,), _ = pack(tok, MULTI, template="hf")
    assert s.input_ids.tolist() == ids_of(ref, MULTI)
    text = ref.apply_chat_template(MULTI, tokenize=False)
    assert trained_spans(tok, s) == assistant_parts(text, "<｜Assistant｜>", "<｜end▁of▁sentence｜>")


def test_r1_style_template_that_strips_reasoning(r1_style):
    tok, ref = r1_style
    messages = [{**m, "content": f"<think>{m['reasoning_content']}</think>{m['content']}"}
                if "reasoning_content" in m else m for m in REASONING]
    # whole: the render has no reasoning at all, and neither has the mask
    (s,), stats = pack(tok, REASONING, template="hf")
    assert stats.reasoning_inlined == 0  # the template mentions </think>: its own rule decides
    assert s.input_ids.tolist() == ids_of(ref, REASONING) == ids_of(ref, messages)
    assert trained_spans(tok, s) == ["391.<｜end▁of▁sentence｜>", "400.<｜end▁of▁sentence｜>"]
    # the inference prompt opens a think block the history never shows; training starts after the header only
    t = get_template("hf", tok)
    assert pieces_text(t.prompt(REASONING[:3]), tok).endswith("<｜Assistant｜><think>\n")


def test_qwen2_5_tools_builtin_and_hf_equal_transformers(shared_data):
    d = shared_data / "tokenizers" / "qwen2_5"
    tok, ref = load_tokenizer(d), _reference(d)
    tools = [WEATHER, CLOCK]
    assert get_template("auto", tok).name == "chatml"
    for template in ("auto", "chatml", "hf"):
        (s,), stats = pack(tok, TOOLS_CONV, tools, template=template)
        # Qwen2.5's template has no place for reasoning: it goes inline in front of the content, counted
        assert stats.reasoning_inlined == 2
        assert s.input_ids.tolist() == ids_of(ref, inline(TOOLS_CONV), tools)
        text = ref.apply_chat_template(inline(TOOLS_CONV), tools=tools, tokenize=False)
        assert trained_spans(tok, s) == assistant_parts(text, "<|im_start|>assistant\n", "<|im_end|>")


def test_llama3_builtin_refuses_tool_calls_instead_of_dropping_them(shared_data):
    tok = load_tokenizer(shared_data / "tokenizers" / "llama3_instruct")
    with pytest.raises(DataError, match="record 'r'.*no format for tools"):
        pack(tok, TOOLS_CONV, [WEATHER], template="llama3")


@pytest.mark.parametrize("template", ["hf", "qwen3"])
def test_special_token_text_in_content_stays_text_by_default(qwen3, template):
    tok, ref = qwen3
    messages = [{"role": "user", "content": "Print the literal <|im_end|> please."},
                {"role": "assistant", "content": "Here: <|im_end|>"}]
    (safe,), stats = pack(tok, messages, template=template)
    assert stats.special_token_text == 1
    end = tok.special_tokens["<|im_end|>"]
    assert safe.input_ids.tolist().count(end) == 2  # only the two real ends of turn
    text = ref.apply_chat_template(messages, tokenize=False)
    assert tok.decode(safe.input_ids.tolist()) == text
    assert trained_spans(tok, safe) == assistant_parts(text, "<|im_start|>assistant\n", "<|im_end|><|im_end|>")
    (same,), _ = pack(tok, messages, template=template, content_specials="special")
    assert same.input_ids.tolist() == ids_of(ref, messages)  # transformers' behaviour: the literal is the token
    assert same.input_ids.tolist().count(end) == 4


def test_copy_of_real_tokenizer_dir_is_reusable(qwen3, tmp_path):
    """load_tokenizer reads the built directory like any model directory (no hidden state)."""
    tok, _ = qwen3
    shutil.copytree(tok.source.parent, tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").fingerprint == tok.fingerprint


def test_packed_documents_equal_transformers_for_tool_and_reasoning_records(qwen3, tmp_path):
    """End to end: convert-style records in, shards out; each packed document is apply_chat_template's ids and its
    labels train exactly the assistant parts of that render."""
    from dataprep.pipeline import PackOptions, pack_dataset
    from formats.reader import open_dataset

    tok, ref = qwen3
    records = [{"id": name, "messages": m, **({"tools": t} if t else {})} for name, (m, t) in CASES.items()]
    src = tmp_path / "conv.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    pack_dataset([str(src)], tmp_path / "data", tok.source.parent,
                 PackOptions(seq_length=1024, template="auto", num_proc=2))
    ds = open_dataset(tmp_path / "data", verify=True)
    seen = {}
    for i in range(len(ds)):
        for doc_id, ids, labels in row_documents(ds[i]):
            seen[doc_id] = (np.asarray(ids), np.asarray(labels))
    assert set(seen) == set(CASES)
    for name, (messages, tools) in CASES.items():
        ids, labels = seen[name]
        assert ids.tolist() == ids_of(ref, messages, tools)
        text = ref.apply_chat_template(messages, tools=tools, tokenize=False)
        target = np.zeros(len(ids), dtype=bool)
        target[1:] = labels[:-1] != IGNORE
        assert (labels[:-1][labels[:-1] != IGNORE] == ids[1:][labels[:-1] != IGNORE]).all()
        got, cur = [], []
        for t, flag in zip(ids.tolist(), target, strict=True):
            if flag:
                cur.append(t)
            elif cur:
                got.append(tok.decode(cur))
                cur = []
        got += [tok.decode(cur)] if cur else []
        assert got == assistant_parts(text, "<|im_start|>assistant\n", "<|im_end|>")


def test_pack_summary_counts_the_new_cases(qwen3, tmp_path):
    from click.testing import CliRunner

    from cli.pack import pack

    tok, _ = qwen3
    records = [{"id": "r", "messages": REASONING, "extra": {"src": "x"}},
               {"id": "s", "messages": [{"role": "user", "content": "say <|im_end|>"},
                                        {"role": "assistant", "content": "no"}], "lang": "en"}]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(pack, [str(src), "-o", str(tmp_path / "d"), "--tokenizer", str(tok.source.parent),
                                       "--seq-length", "512", "--multi-turn", "expand", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["expanded_records"] == 1 and summary["samples_out"] == 3
    assert summary["special_token_text"] == 1 and summary["unknown_fields"] == {"lang": 1}


def test_special_tokens_the_template_cuts_content_by_keep_working(shared_data, tmp_path):
    """A tokenizer that marks </think> special, with a template that cuts content at '</think>': the default
    content_specials="text" must not hide the token from the template's own logic."""
    cfg = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "chat_template": R1_STYLE}
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
    d = _build(tmp_path / "r1s", shared_data, cfg, add_special=specials)
    tok, ref = load_tokenizer(d), _reference(d)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"},
                {"role": "user", "content": "and <｜User｜> 3+3?"}, {"role": "assistant", "content": "6"}]
    (s,), stats = pack(tok, messages, template="hf")
    text = ref.apply_chat_template(messages, tokenize=False)
    assert "add" not in text  # the template cut the reasoning: it saw '</think>'
    assert tok.decode(s.input_ids.tolist()) == text
    assert stats.special_token_text == 1
    user_id = tok.special_tokens["<｜User｜>"]
    assert s.input_ids.tolist().count(user_id) == 2  # the pasted <｜User｜> stayed text
    assert trained_spans(tok, s) == ["4<｜end▁of▁sentence｜>", "6<｜end▁of▁sentence｜>"]


def test_deepseek_v3_renders_tool_calls_of_call_only_turns(deepseek_v3):
    """DeepSeek-V3's template renders calls only when the content is null; the record writes "" (what most
    templates need), so `hf` hands this template null. (transformers 5 cannot render that form: it drops the
    null content and the template then fails; with "" it renders the turn without its calls. The reference is
    therefore the template's text for the OpenAI form, tokenized by the transformers tokenizer.)"""
    from dataprep.jinja_template import render_chat_template

    tok, ref = deepseek_v3
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
             {"type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    record = [{"role": "user", "content": "Weather and time?"}, {"role": "assistant", "content": "", "tool_calls": calls},
              {"role": "tool", "content": "18"}, {"role": "tool", "content": "21:05"},
              {"role": "assistant", "content": "18 °C at 21:05."}]
    openai_form = [dict(m, content=None) if m.get("tool_calls") else m for m in record]
    (s,), _ = pack(tok, record, [WEATHER], template="hf")
    text = render_chat_template(tok, openai_form, tools=[WEATHER])
    assert "get_weather" in text and "get_time" in text
    assert s.input_ids.tolist() == ref(text, add_special_tokens=False)["input_ids"]
    spans = trained_spans(tok, s)
    assert "get_weather" in spans[0] and "get_time" in spans[0] and "18" not in spans[0]
    assert spans[-1] == "18 °C at 21:05.<｜end▁of▁sentence｜>"


def test_a_template_that_drops_tool_calls_is_refused(shared_data, tmp_path):
    template = ("{% for m in messages %}{% if m['role'] == 'tool' %}[tool]{{ m['content'] }}{% else %}"
                "[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    d = _build(tmp_path / "drop", shared_data, {"eos_token": "<|im_end|>", "chat_template": template})
    tok = load_tokenizer(d)
    with pytest.raises(DataError, match="does not render the tool calls of turn 1") as e:
        pack(tok, TOOLS_CONV[1:6], [WEATHER], template="hf")
    assert e.value.reason == "template_drops_tool_calls"
