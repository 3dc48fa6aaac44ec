"""Built-in and `hf` templates against transformers' apply_chat_template on the real tokenizers in ../shared/data.

References (test-only):
- Llama 3 Instruct and Qwen2.5: PreTrainedTokenizerFast(tokenizer_file=...) with the chat_template from their
  tokenizer_config.json.
- Llama 2: ../shared has only tokenizer.model and no tokenizer_config.json. transformers 5 needs protobuf to read a
  .model file, which is not installed, so the reference is transformers' LlamaTokenizer built from the
  sentencepiece vocabulary (merges from transformers' own generate_merges) with the official Llama-2-chat
  chat_template string (meta-llama/Llama-2-7b-chat-hf). That BPE rebuild differs from sentencepiece on runs of
  two or more spaces (sentencepiece, which we wrap, keeps the last space with the next word), so the
  conversations compared with it avoid double spaces; `test_llama2_sentencepiece_exact` checks those against
  sentencepiece itself.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from dataprep.templates import get_template
from dataprep.tokenize import IGNORE, TokenizeOptions, TokenizeStats, tokenize_conversations
from dataprep.tokenizer import load_tokenizer

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly."}
TURNS = [
    {"role": "user", "content": "Give three tips for staying healthy."},
    {"role": "assistant", "content": "1. Eat vegetables.\n2. Sleep eight hours.\n3. Walk daily."},
    {"role": "user", "content": "Translate to Chinese: good morning"},
    {"role": "assistant", "content": "早上好！ (zǎoshang hǎo)"},
    {"role": "user", "content": "What is 17 * 23? Show the steps, please."},
    {"role": "assistant", "content": "17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391."},
]
CONVERSATIONS = {"with_system": [SYSTEM, *TURNS], "without_system": TURNS, "single_turn": TURNS[:2]}

# (tokenizer dir, built-in template, how the end of an assistant turn decodes, content transform)
CASES = {
    "llama2": ("llama2", " </s>", str.strip),
    "llama3_instruct": ("llama3", "<|eot_id|>", str.strip),
    "qwen2_5": ("chatml", "<|im_end|>", lambda s: s),
}


@pytest.fixture(scope="module")
def tok_dirs(shared_data, tmp_path_factory):
    """Tokenizer directories; Llama 2 gets a tokenizer_config.json with the official chat template (for `hf`)."""
    root = shared_data / "tokenizers"
    llama2 = tmp_path_factory.mktemp("llama2")
    shutil.copy(root / "llama2" / "tokenizer.model", llama2)
    (llama2 / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                    "chat_template": LLAMA2_CHAT_TEMPLATE})
    )
    return {"llama2": llama2, "llama3_instruct": root / "llama3_instruct", "qwen2_5": root / "qwen2_5"}


_REFS: dict = {}
_TOKS: dict = {}


def load(path):
    """Each real tokenizer is loaded once per module (loading the 9 MB tokenizer.json takes ~0.5 s)."""
    if path not in _TOKS:
        _TOKS[path] = load_tokenizer(path)
    return _TOKS[path]


def reference(name, tok_dirs):
    if name in _REFS:
        return _REFS[name]
    warnings.filterwarnings("ignore")
    if name == "llama2":
        import sentencepiece as spm
        from transformers import LlamaTokenizer
        from transformers.tokenization_utils_base import generate_merges

        sp = spm.SentencePieceProcessor(model_file=str(tok_dirs["llama2"] / "tokenizer.model"))
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        ref = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab))
        ref.chat_template = LLAMA2_CHAT_TEMPLATE
    else:
        from transformers import PreTrainedTokenizerFast

        cfg = json.loads((tok_dirs[name] / "tokenizer_config.json").read_text())
        ref = PreTrainedTokenizerFast(tokenizer_file=str(tok_dirs[name] / "tokenizer.json"),
                                      bos_token=cfg.get("bos_token"), eos_token=cfg["eos_token"])
        ref.chat_template = cfg["chat_template"]
    _REFS[name] = ref
    return ref


def ref_ids(ref, messages, **kwargs):
    out = ref.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def tokenize_one(tok, messages, **options):
    stats = TokenizeStats()
    samples = list(tokenize_conversations([{"id": "r0", "messages": messages}], tok, TokenizeOptions(**options), stats))
    assert len(samples) == 1, stats.as_dict()
    return samples[0]


def trained_spans(tok, sample):
    """Decoded text of each maximal run of target tokens (labels are pre-shifted: target = position + 1)."""
    targets = np.nonzero(sample.labels != IGNORE)[0] + 1
    assert (sample.labels[targets - 1] == sample.input_ids[targets]).all()
    spans, start = [], None
    for k, p in enumerate(targets):
        if start is None:
            start = p
        if k + 1 == len(targets) or targets[k + 1] != p + 1:
            spans.append(tok.decode(sample.input_ids[start : p + 1].tolist()))
            start = None
    return spans


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("which", ["builtin", "hf"])
def test_ids_and_mask_match_transformers(tok_dirs, name, conv, which):
    builtin, end, norm = CASES[name]
    tok = load(tok_dirs[name])
    messages = CONVERSATIONS[conv]
    sample = tokenize_one(tok, messages, template=builtin if which == "builtin" else "hf")
    assert sample.input_ids.dtype == np.int32 and sample.labels.dtype == np.int32
    assert sample.input_ids.tolist() == ref_ids(reference(name, tok_dirs), messages)
    assert sample.labels[-1] == IGNORE
    expected = [norm(m["content"]) + end for m in messages if m["role"] == "assistant"]
    spans = trained_spans(tok, sample)
    if name == "llama2":  # the decoder drops the leading space of each decoded span ("▁Eat" -> "Eat")
        spans = [s.lstrip(" ") for s in spans]
    assert spans == expected


def test_qwen25_default_system_prompt(tok_dirs):
    """Qwen2.5's template inserts "You are Qwen, ..." when there is no system message; chatml does the same for
    a tokenizer whose chat_template does so, and the inserted system prompt is never trained."""
    tok = load_tokenizer(tok_dirs["qwen2_5"])
    sample = tokenize_one(tok, TURNS[:2], template="chatml")
    text = tok.decode(sample.input_ids.tolist())
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    # a tokenizer without chat_template gets plain ChatML without a default system
    cfg_less = load_tokenizer(tok_dirs["qwen2_5"] / "tokenizer.json")
    cfg_less.chat_template = None
    plain = list(tokenize_conversations([{"id": "x", "messages": TURNS[:2]}], cfg_less,
                                        TokenizeOptions(template="chatml")))[0]
    assert cfg_less.decode(plain.input_ids.tolist()).startswith("<|im_start|>user\n")


def test_auto_picks_matching_builtin(tok_dirs, shared_data):
    picks = {}
    for name in CASES:
        picks[name] = get_template("auto", load_tokenizer(tok_dirs[name])).name
    assert picks == {"llama2": "llama2", "llama3_instruct": "llama3", "qwen2_5": "chatml"}
    # the bare sentencepiece model (no config) is still recognised as Llama 2
    assert get_template("auto", load_tokenizer(shared_data / "tokenizers" / "llama2")).name == "llama2"


def test_token_straddling_header_and_content_is_trained(tok_dirs):
    """ChatML content starting with "\\n" merges with the header's "\\n" into one "\\n\\n" token; the ids still
    equal transformers', and that token is trained (it carries content)."""
    tok = load_tokenizer(tok_dirs["qwen2_5"])
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nIndented answer."}]
    sample = tokenize_one(tok, messages, template="chatml")
    assert sample.input_ids.tolist() == ref_ids(reference("qwen2_5", tok_dirs), messages)
    assert trained_spans(tok, sample) == ["\n\nIndented answer.<|im_end|>"]


def test_generation_blocks_match_transformers_assistant_mask(tok_dirs, tmp_path):
    """A chat_template with {% generation %} blocks: targets equal transformers' return_assistant_tokens_mask."""
    src = tok_dirs["qwen2_5"]
    template = (
        "{% for message in messages %}{{ '<|im_start|>' + message.role + '\\n' }}"
        "{% if message.role == 'assistant' %}{% generation %}{{ message.content + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message.content + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    )
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    shutil.copy(src / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|im_end|>")
    ref.chat_template = template
    out = ref.apply_chat_template(TURNS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    sample = tokenize_one(tok, TURNS, template="hf")
    assert sample.input_ids.tolist() == list(out["input_ids"])
    target = np.zeros(len(sample.labels), dtype=bool)
    target[1:] = sample.labels[:-1] != IGNORE
    assert target.tolist() == [bool(m) for m in out["assistant_masks"]]


def test_llama2_sentencepiece_exact(shared_data):
    """Our Llama 2 encode equals sentencepiece on every real Alpaca-GPT4 output (double spaces, code, unicode),
    and decode inverts it."""
    import sentencepiece as spm

    model = shared_data / "tokenizers" / "llama2" / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = load_tokenizer(model)
    records = json.loads((shared_data / "alpaca" / "alpaca_gpt4_en_demo_1k.json").read_text())
    texts = [r["output"] for r in records[:300]] + ["  two  spaces", "tab\tand\nnewline", "emoji 🤗 中文"]
    assert tok.encode_batch(texts) == [sp.encode(t) for t in texts]
    assert [tok.decode(tok.encode(t)) for t in texts] == texts
    # after a special token there is no dummy prefix (transformers' LlamaTokenizer, legacy=False)
    assert tok.encode("<s>Hi") == [tok.bos_id, *tok.encode_batch(["Hi"], continued=True)[0]]
    assert tok.encode("Hi") != tok.encode_batch(["Hi"], continued=True)[0]


def _llama2_ref(tok_dirs):
    """The Llama 2 reference as `tokenizer(text)` with add_bos_token=True (the rebuilt tokenizer has no
    post-processor, so bos is prepended here)."""
    ref = reference("llama2", tok_dirs)

    def call(text, add_special_tokens=True):
        ids = ref(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([ref.bos_token_id] if add_special_tokens else []) + ids}

    return call


def test_vicuna_alpaca_plain_on_llama2(tok_dirs):
    """vicuna/alpaca/plain equal transformers' tokenization of the strings FastChat / Stanford Alpaca / PaddleNLP
    build (bos added by the tokenizer, "</s>" as text), and train exactly the responses + </s>."""
    tok = load_tokenizer(tok_dirs["llama2"])
    ref = _llama2_ref(tok_dirs)
    conv = [SYSTEM, *TURNS[:4]]
    a1, a2 = TURNS[1]["content"], TURNS[3]["content"]
    u1, u2 = TURNS[0]["content"], TURNS[2]["content"]

    vicuna_text = f"{SYSTEM['content']} USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT: {a2}</s>"
    sample = tokenize_one(tok, conv, template="vicuna")
    assert sample.input_ids.tolist() == ref(vicuna_text)["input_ids"]
    assert trained_spans(tok, sample) == [a1 + "</s>", a2 + "</s>"]
    fastchat_default = tokenize_one(tok, TURNS[:2], template="vicuna")
    assert tok.decode(fastchat_default.input_ids.tolist()).startswith(
        "<s> A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,"
    )

    alpaca_text = (f"{SYSTEM['content']}\n\n### Instruction:\n{u1}\n\n### Response:{a1}</s>"
                   f"\n\n### Instruction:\n{u2}\n\n### Response:{a2}</s>")
    sample = tokenize_one(tok, conv, template="alpaca")
    assert sample.input_ids.tolist() == ref(alpaca_text)["input_ids"]
    assert [s.lstrip(" ") for s in trained_spans(tok, sample)] == [a1 + "</s>", a2 + "</s>"]

    sample = tokenize_one(tok, TURNS[:2], template="plain")
    want = ref(u1)["input_ids"] + ref(a1, add_special_tokens=False)["input_ids"] + [tok.eos_id]
    assert sample.input_ids.tolist() == want
    assert trained_spans(tok, sample) == [a1 + "</s>"]


def test_plain_on_qwen_has_no_bos(tok_dirs):
    tok = load_tokenizer(tok_dirs["qwen2_5"])
    sample = tokenize_one(tok, TURNS[:2], template="plain")
    u, a = TURNS[0]["content"], TURNS[1]["content"]
    assert sample.input_ids.tolist() == tok.encode(u) + tok.encode(a) + [tok.eos_id]
    assert trained_spans(tok, sample) == [a + "<|im_end|>"]


def test_template_needing_missing_tokens_is_a_clear_error(tok_dirs):
    from dataprep.errors import DataError

    with pytest.raises(DataError, match="<\\|im_start\\|>"):
        get_template("chatml", load_tokenizer(tok_dirs["llama2"]))
    with pytest.raises(DataError, match="unknown template"):
        get_template("nope", load_tokenizer(tok_dirs["llama2"]))


def test_auto_falls_back_to_hf_when_builtin_differs(shared_data, tmp_path):
    """A Llama-3.1-style template (date header in an always-present system turn) is not the plain llama3
    built-in; auto notices on probe conversations and renders the tokenizer's own template."""
    src = shared_data / "tokenizers" / "llama3_instruct"
    (tmp_path / "tokenizer.json").symlink_to(src / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
        "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n\\n' + sys"
        " + '<|eot_id|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
        " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert get_template("auto", tok).name == "hf"
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>")
    ref.chat_template = cfg["chat_template"]
    sample = tokenize_one(tok, TURNS, template="auto")
    assert sample.input_ids.tolist() == ref_ids(ref, TURNS)
    assert trained_spans(tok, sample) == [m["content"] + "<|eot_id|>" for m in TURNS if m["role"] == "assistant"]


REASONING_CONV = [
    SYSTEM,
    {"role": "user", "content": "What is 17 * 23?"},
    {"role": "assistant", "content": "391.", "reasoning_content": "17 * 20 = 340 and 17 * 3 = 51."},
    {"role": "user", "content": "Add 9."},
    {"role": "assistant", "content": "<think>\n391 + 9 = 400.\n</think>\n\n400."},
]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("which", ["builtin", "hf"])
def test_reasoning_in_last_and_earlier_turns(tok_dirs, name, which):
    """These templates have no place for reasoning_content: it goes inline as <think>...</think> before the
    content (not lost, counted); the ids then equal apply_chat_template of that inline form."""
    from dataprep.input_formats import assistant_message

    builtin, end, norm = CASES[name]
    tok = load(tok_dirs[name])
    ref = reference(name, tok_dirs)
    # the converter's normal form: the inline block of the last turn becomes reasoning_content too
    messages = [assistant_message(m["content"]) | ({"reasoning_content": m["reasoning_content"]}
                if "reasoning_content" in m else {}) if m["role"] == "assistant" else m for m in REASONING_CONV]
    assert all("reasoning_content" in m for m in messages if m["role"] == "assistant")
    inline = [{"role": m["role"], "content": f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}"}
              if "reasoning_content" in m else m for m in messages]
    stats = TokenizeStats()
    (sample,) = tokenize_conversations([{"id": "r", "messages": messages}], tok,
                                       TokenizeOptions(template=builtin if which == "builtin" else "hf"), stats)
    assert stats.reasoning_inlined == 2
    assert sample.input_ids.tolist() == ref_ids(ref, inline)
    spans = trained_spans(tok, sample)
    assert len(spans) == 2
    for span, m in zip(spans, [m for m in inline if m["role"] == "assistant"], strict=True):
        assert span.endswith(norm(m["content"]) + end) or span.endswith(norm(m["content"]) + end.strip())


@pytest.mark.parametrize("name", ["llama2", "llama3_instruct"])
@pytest.mark.parametrize("which", ["builtin", "hf"])
def test_templates_without_tool_format_refuse_tool_records(tok_dirs, name, which):
    from dataprep.errors import DataError

    tok = load(tok_dirs[name])
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                     "function": {"name": "w", "arguments": {}}}]},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    template = CASES[name][0] if which == "builtin" else "hf"
    with pytest.raises(DataError, match="no format for tools") as e:
        list(tokenize_conversations([{"id": "t", "messages": messages}], tok, TokenizeOptions(template=template)))
    assert e.value.reason == "template_cannot_render_tools"


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_builtin_prompt_is_the_generation_prompt(tok_dirs, name, conv):
    """ChatTemplate.prompt (what generation feeds the model) renders like add_generation_prompt=True."""
    from dataprep.jinja_template import render_chat_template
    from dataprep.templates import pieces_text

    tok = load(tok_dirs[name])
    template = get_template(CASES[name][0], tok)
    history = CONVERSATIONS[conv][:-1]
    want = render_chat_template(tok, history, add_generation_prompt=True)
    assert pieces_text(template.prompt(history), tok) == want
    assert not any(flag for _, flag in template.prompt(history))
