"""load_tokenizer on the three file layouts, special tokens from tokenizer_config.json, and the fingerprint."""

from __future__ import annotations

import json
import pickle

import pytest

from dataprep.errors import DataError
from dataprep.tokenizer import load_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Give three tips for staying healthy: eat well, sleep, exercise.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 12345 and unicode: café, naïve, 早上好.",
] * 20


def _train_bpe(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture()
def bpe_dirs(tmp_path):
    """The same tiny byte-level BPE saved as tokenizer.json and as vocab.json + merges.txt."""
    tok = _train_bpe()
    full = tmp_path / "full"
    files = tmp_path / "files"
    full.mkdir()
    files.mkdir()
    tok.save(str(full / "tokenizer.json"))
    tok.model.save(str(files))
    config = {"eos_token": {"content": "<|endoftext|>", "special": True, "__type": "AddedToken"}, "bos_token": None}
    for d in (full, files):
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    return full, files


def test_vocab_merges_equals_tokenizer_json(bpe_dirs):
    full, files = bpe_dirs
    a, b = load_tokenizer(full), load_tokenizer(files)
    texts = ["The lazy fox, 12345 times!", "  spaced\n\ttabs", "café 早上好 🤗", "x<|endoftext|>y"]
    assert a.encode_batch(texts) == b.encode_batch(texts)
    assert [b.decode(ids) for ids in b.encode_batch(texts)] == texts
    for tok in (a, b):
        assert tok.eos_id == tok.token_to_id("<|endoftext|>") and tok.eos_id is not None
        assert tok.bos_id is None  # explicitly null in the config
        assert tok.pad_id == tok.eos_id  # pad falls back to eos
        assert tok.special_ids["eos"] == tok.eos_id
        assert tok.encode("x<|endoftext|>")[-1] == tok.eos_id  # special strings in text become their id
        assert not tok.continuation_sensitive
    assert b.vocab_size == a.vocab_size
    # a merges.txt or vocab.json path also works
    assert load_tokenizer(files / "merges.txt").encode("fox") == a.encode("fox")


def test_fingerprint_tracks_what_changes_token_ids(bpe_dirs, tmp_path):
    full, files = bpe_dirs
    fp = load_tokenizer(files).fingerprint
    assert fp.startswith("tok1:") and fp == load_tokenizer(files).fingerprint
    assert fp != load_tokenizer(full).fingerprint
    merges = files / "merges.txt"
    lines = merges.read_text().splitlines()
    merges.write_text("\n".join(lines[:-1]) + "\n")  # drop the last merge
    fp2 = load_tokenizer(files).fingerprint
    assert fp2 != fp
    cfg = json.loads((files / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (files / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(files)
    assert tok.fingerprint != fp2 and tok.chat_template == "{{ messages }}"


def test_pickle_reloads_from_files(bpe_dirs):
    tok = load_tokenizer(bpe_dirs[0])
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("quick brown") == tok.encode("quick brown") and again.fingerprint == tok.fingerprint


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    _train_bpe().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(DataError, match="not in the vocabulary"):
        load_tokenizer(tmp_path)


def test_real_tokenizers_special_tokens(shared_data):
    root = shared_data / "tokenizers"
    qwen = load_tokenizer(root / "qwen2_5")
    assert (qwen.bos_id, qwen.eos_id, qwen.pad_id) == (None, 151645, 151643)
    assert qwen.special_ids["<|im_start|>"] == 151644 and qwen.chat_template
    assert qwen.encode("Hello world!") == [9707, 1879, 0]
    llama3 = load_tokenizer(root / "llama3_instruct" / "tokenizer.json")
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128009, 128009)
    assert llama3.encode("Hello world!") == [9906, 1917, 0]
    assert llama3.encode("Hello world!", add_special_tokens=True) == [128000, 9906, 1917, 0]
    llama2 = load_tokenizer(root / "llama2")
    assert (llama2.bos_id, llama2.eos_id, llama2.pad_id, llama2.vocab_size) == (1, 2, 2, 32000)
    assert llama2.chat_template is None and llama2.continuation_sensitive
    assert len({qwen.fingerprint, llama3.fingerprint, llama2.fingerprint}) == 3
