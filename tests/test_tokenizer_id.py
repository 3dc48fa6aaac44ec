"""The tokenizer fingerprint has one rule (formats.tokenizer_id) that the packer and the trainer both apply."""

from __future__ import annotations

import json
import shutil

import pytest

from dataprep.tokenizer import load_tokenizer
from formats.tokenizer_id import tokenizer_files, tokenizer_fingerprint


@pytest.mark.parametrize("name", ["llama2", "llama3_instruct", "qwen2_5"])
def test_the_trainer_side_rule_equals_what_the_packer_records(shared_data, name):
    directory = shared_data / "tokenizers" / name
    assert tokenizer_fingerprint(directory) == load_tokenizer(directory).fingerprint


def test_which_files_count(shared_data, tmp_path):
    src = shared_data / "tokenizers" / "qwen2_5"
    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(src / "tokenizer.json", tok)
    assert [p.name for p in tokenizer_files(tok)] == ["tokenizer.json"]
    assert tokenizer_fingerprint(tok / "tokenizer.json") == tokenizer_fingerprint(tok)  # a file names its dir
    before = tokenizer_fingerprint(tok)
    (tok / "chat_template.jinja").write_text("{{ messages }}")
    assert tokenizer_fingerprint(tok) != before  # no config: the jinja file is the template, so it counts
    config = json.loads((src / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    assert "chat_template.jinja" not in [p.name for p in tokenizer_files(tok)]  # the config names its own
    assert tokenizer_fingerprint(tok) == load_tokenizer(tok).fingerprint
    (tok / "model.safetensors").write_bytes(b"weights are not the tokenizer")
    assert tokenizer_fingerprint(tok) == load_tokenizer(tok).fingerprint
    assert tokenizer_fingerprint(tmp_path / "empty-dir-that-is-not-there") is None
