"""The tokenizer fingerprint has one rule (formats.tokenizer_id) that the packer and the trainer both apply,
and it identifies a tokenizer by meaning: the same tokenizer re-saved matches, a changed one does not."""

from __future__ import annotations

import json
import shutil

import pytest

from dataprep.tokenizer import load_tokenizer
from formats.tokenizer_id import tokenizer_fingerprint


@pytest.mark.parametrize("name", ["llama2", "llama3_instruct", "qwen2_5"])
def test_the_trainer_side_rule_equals_what_the_packer_records(shared_data, name):
    directory = shared_data / "tokenizers" / name
    assert tokenizer_fingerprint(directory) == load_tokenizer(directory).fingerprint


@pytest.mark.parametrize("name", ["llama3_instruct", "qwen2_5"])
def test_save_pretrained_round_trip_keeps_the_fingerprint(shared_data, tmp_path, name):
    transformers = pytest.importorskip("transformers")
    src = shared_data / "tokenizers" / name
    resaved = tmp_path / "resaved"
    transformers.AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(resaved))
    # transformers rewrites the files (merges as pairs, the template moved to chat_template.jinja, other keys)
    assert (resaved / "chat_template.jinja").is_file()
    assert (resaved / "tokenizer.json").read_bytes() != (src / "tokenizer.json").read_bytes()
    assert tokenizer_fingerprint(resaved) == tokenizer_fingerprint(src)


def test_a_changed_vocabulary_special_token_or_template_changes_it(shared_data, tmp_path):
    src = shared_data / "tokenizers" / "qwen2_5"
    base = tokenizer_fingerprint(src)

    def variant(name, edit_tokenizer=None, edit_config=None):
        d = tmp_path / name
        shutil.copytree(src, d)
        if edit_tokenizer:
            data = json.loads((d / "tokenizer.json").read_text())
            edit_tokenizer(data)
            (d / "tokenizer.json").write_text(json.dumps(data))
        if edit_config:
            cfg = json.loads((d / "tokenizer_config.json").read_text())
            edit_config(cfg)
            (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        return tokenizer_fingerprint(d)

    def swap_two_ids(data):
        vocab = data["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]

    assert variant("same", edit_tokenizer=lambda d: d.update(version="9.9")) == base  # no meaning
    assert variant("decoder", edit_tokenizer=lambda d: d.update(decoder=None)) == base  # packing never decodes
    assert variant("vocab", edit_tokenizer=swap_two_ids) != base
    assert variant("merges", edit_tokenizer=lambda d: d["model"]["merges"].pop()) != base
    assert variant("eos", edit_config=lambda c: c.update(eos_token="<|endoftext|>")) != base
    assert variant("template", edit_config=lambda c: c.update(chat_template=c["chat_template"] + " ")) != base
    (tmp_path / "weights").mkdir()
    assert tokenizer_fingerprint(tmp_path / "weights") is None  # a model directory without a tokenizer
