"""The `hf` renderer's Jinja environment against transformers, and its errors. Tiny tokenizer, no ../shared."""

from __future__ import annotations

import json

import pytest

from dataprep.errors import DataError
from dataprep.jinja_template import render_chat_template
from dataprep.tokenize import TokenizeOptions, tokenize_conversations
from dataprep.tokenizer import load_tokenizer

MESSAGES = [
    {"role": "system", "content": "Réponds en français, s'il te plaît. 日本語も"},
    {"role": "user", "content": 'Quote "this" and \\ that'},
    {"role": "assistant", "content": "D'accord — voilà."},
]


def make_tok(tmp_path, template: str | None):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["hello world " * 5], trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<s>", "</s>")])
    t.save(str(tmp_path / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>", "__type": "AddedToken"}}
    if template is not None:
        cfg["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return load_tokenizer(tmp_path)


def transformers_render(tmp_path, template, messages, **kwargs):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    ref.chat_template = template
    return ref.apply_chat_template(messages, tokenize=False, **kwargs)


def test_helpers_render_like_transformers(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('bad role') }}{% endif %}"
        "{{ m.role | upper }}: {{ m.content | tojson }}|{{ m | tojson(indent=2) }}\n"
        "{% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}"
        "  {%- if add_generation_prompt %}ASSISTANT:{% endif %}{{ eos_token }}"
        "{{ strftime_now('%Y') | length }}"
    )
    tok = make_tok(tmp_path, template)
    for agp in (False, True):
        assert render_chat_template(tok, MESSAGES, add_generation_prompt=agp) == transformers_render(
            tmp_path, template, MESSAGES, add_generation_prompt=agp)


def test_raise_exception_names_the_record(tmp_path):
    template = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system here') }}" \
               "{% endif %}{{ m.content }}{{ eos_token }}{% endfor %}"
    tok = make_tok(tmp_path, template)
    records = [{"id": "fine", "messages": MESSAGES[1:]}, {"id": "bad-one", "messages": MESSAGES}]
    with pytest.raises(DataError, match="record 'bad-one'.*no system here"):
        list(tokenize_conversations(records, tok, TokenizeOptions(template="hf")))


def test_prefix_unstable_template_is_refused(tmp_path):
    """A template whose rendering of the conversation BEFORE an assistant turn is not a prefix of the whole
    (here: a marker in front of whatever message is last) gives no place to start the turn: clear error."""
    template = "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m.content }}{{ eos_token }}{% endfor %}"
    tok = make_tok(tmp_path, template)
    with pytest.raises(DataError, match="turn 2 .*does not render as a prefix of the whole"):
        list(tokenize_conversations([{"id": "a", "messages": MESSAGES}], tok, TokenizeOptions(template="hf")))


def test_hf_without_chat_template_is_a_clear_error(tmp_path):
    tok = make_tok(tmp_path, None)
    with pytest.raises(DataError, match="chat_template"):
        list(tokenize_conversations([{"id": "a", "messages": MESSAGES}], tok, TokenizeOptions(template="hf")))


def test_diff_mask_trains_assistant_up_to_eos(tmp_path):
    """Without generation blocks: the assistant text after the header, through eos, is trained; the newline
    the template writes after eos is not."""
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
                "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = make_tok(tmp_path, template)
    (s,) = tokenize_conversations([{"id": "a", "messages": MESSAGES}], tok, TokenizeOptions(template="hf"))
    assert tok.decode(s.input_ids.tolist()) == transformers_render(tmp_path, template, MESSAGES)
    targets = [int(s.input_ids[i + 1]) for i in range(len(s.labels) - 1) if s.labels[i] != -100]
    assert tok.decode(targets) == MESSAGES[2]["content"] + "</s>"
