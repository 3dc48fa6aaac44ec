"""The project's own tokenizer (demo and end-to-end tests) behaves like a Hugging Face ChatML tokenizer."""

import json

import pytest

from dataprep.train_tokenizer import SPECIAL_TOKENS, train_chatml_tokenizer

RECORDS = [
    {"id": str(i), "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. 你好"}]}
    for i in range(200)
]


def test_trained_tokenizer_round_trips_and_has_chatml(tmp_path):
    from tokenizers import Tokenizer

    out = train_chatml_tokenizer(RECORDS, tmp_path / "tok", vocab_size=400)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "<|im_start|>user\nWhat is 7 plus 7? 你好<|im_end|>"
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    for special in SPECIAL_TOKENS:  # each special token is one id, never split into bytes
        assert tok.encode(special).ids == [tok.token_to_id(special)]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in config["chat_template"]
    assert not list(tmp_path.glob(".tok.tmp-*"))  # the temporary directory was renamed into place


def test_chat_template_renders_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = train_chatml_tokenizer(RECORDS, tmp_path / "tok", vocab_size=400)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}]
    assert hf.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    )
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
