"""Generation prompts: the same ids as transformers' apply_chat_template(add_generation_prompt=True), a prefix of
what `pack` trains on, and end to end (tokenizer + template + model) the same tokens as transformers' generate,
with and without a system prompt."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import FAMILIES, make_hf_model

from dataprep.errors import DataError
from dataprep.prompt import prompt_renderer, split_reference
from dataprep.tokenize import TokenizeOptions, tokenize_conversations
from dataprep.tokenizer import load_tokenizer
from tests.helpers.tiny_run import records
from trainer.generate import SamplingConfig, generate, load_model

transformers = pytest.importorskip("transformers")

SYSTEM = [{"role": "system", "content": "你是一个乐于助人的助手。Answer briefly."}]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    SYSTEM + [{"role": "user", "content": "写一首关于月亮的诗"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "\nand 3+3?"}],
    SYSTEM + [{"role": "user", "content": "red cat"}, {"role": "assistant", "content": "blue dog"},
              {"role": "user", "content": "one two"}],
]


def _hf_ids(hf_tok, messages) -> list[int]:
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _trained_prefix_ok(tok, renderer, messages) -> bool:
    """The prompt ids are exactly the ids `pack` gives the same conversation before the answer."""
    full = list(tokenize_conversations(
        [{"id": "r", "messages": [*messages, {"role": "assistant", "content": "Sure, here it is."}]}], tok,
        TokenizeOptions(template=renderer.template.name)))[0]
    ids = renderer.encode(messages)
    n = len(ids)
    # position n-1 (the end of the assistant header) predicts the answer's first token; the one before does not
    return full.input_ids[:n].tolist() == ids and full.labels[n - 2] == -100 and full.labels[n - 1] != -100


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from dataprep.train_tokenizer import train_chatml_tokenizer

    recs = records(300, seed=1) + [{"messages": m} for m in CONVERSATIONS]
    return train_chatml_tokenizer(recs, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=400)


@pytest.mark.parametrize("name", ["qwen2_5", "llama3_instruct"])
@pytest.mark.parametrize("template", ["auto", "hf"])
def test_prompt_ids_equal_apply_chat_template_on_real_tokenizers(shared_data, name, template):
    d = shared_data / "tokenizers" / name
    tok = load_tokenizer(d)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    renderer = prompt_renderer(tok, template)
    for messages in CONVERSATIONS:
        assert renderer.encode(messages) == _hf_ids(hf_tok, messages)
        assert _trained_prefix_ok(tok, renderer, messages)
    assert renderer.stop_ids == (tok.eos_id,)  # <|im_end|> / <|eot_id|>: end of turn and eos are one token here


def test_hf_prompt_with_tools_equals_apply_chat_template(shared_data):
    d = shared_data / "tokenizers" / "qwen2_5"
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "北京天气怎么样？"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    want = hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    got = prompt_renderer(load_tokenizer(d), "hf").encode(messages, tools)
    assert got == want and len(got) > len(prompt_renderer(load_tokenizer(d), "hf").encode(messages))


@pytest.mark.parametrize("template", ["llama2", "vicuna", "alpaca", "plain"])
def test_builtin_prompts_are_the_trained_prefix_sentencepiece(shared_data, template):
    tok = load_tokenizer(shared_data / "tokenizers" / "llama2" / "tokenizer.model")
    renderer = prompt_renderer(tok, template)
    for messages in CONVERSATIONS:
        assert _trained_prefix_ok(tok, renderer, messages)
    assert tok.eos_id in renderer.stop_ids


@pytest.mark.parametrize("template", ["auto", "hf", "chatml", "plain"])
def test_tiny_tokenizer_prompts(tiny_tokenizer, template):
    tok = load_tokenizer(tiny_tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer)
    renderer = prompt_renderer(tok, template)
    for messages in CONVERSATIONS:
        assert _trained_prefix_ok(tok, renderer, messages)
        if template != "plain":
            assert renderer.encode(messages) == _hf_ids(hf_tok, messages)


def test_bad_prompts_and_reference_split(tiny_tokenizer):
    renderer = prompt_renderer(load_tokenizer(tiny_tokenizer), "chatml")
    with pytest.raises(DataError, match="ends with an assistant turn"):
        renderer.encode(CONVERSATIONS[2][:2])
    with pytest.raises(DataError, match="at least one message"):
        renderer.encode([])
    prompt, ref = split_reference(CONVERSATIONS[2][:2])
    assert prompt == CONVERSATIONS[2][:1] and ref == "4"
    assert split_reference(CONVERSATIONS[0]) == (CONVERSATIONS[0], None)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rendered_generation_matches_transformers_with_and_without_system(tiny_tokenizer, family, tmp_path):
    """Tokenizer + template + model end to end, against transformers' tokenizer and generate."""
    import shutil

    tok = load_tokenizer(tiny_tokenizer)
    hf = make_hf_model(family, seed=3, vocab_size=tok.vocab_size)
    hf.save_pretrained(tmp_path)
    for f in tiny_tokenizer.iterdir():
        shutil.copy(f, tmp_path / f.name)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    renderer = prompt_renderer(tok, "auto")
    stop = list(renderer.stop_ids)
    loaded = load_model(tmp_path)
    prompts = [renderer.encode(m) for m in CONVERSATIONS]
    assert any(len(set(p)) != len(p) for p in prompts)
    got = generate(loaded.model, prompts, SamplingConfig(max_new_tokens=12, stop_ids=renderer.stop_ids,
                                                         pad_id=tok.pad_id))
    for messages, g in zip(CONVERSATIONS, got, strict=True):
        ids = torch.tensor([_hf_ids(hf_tok, messages)])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                              do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_id)
        ref = out[0, ids.shape[1]:].tolist()
        cut = next((i + 1 for i, t in enumerate(ref) if t in stop), len(ref))
        assert g.tokens == ref[:cut]
