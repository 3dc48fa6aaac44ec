"""tokenize_conversations: pre-shifted labels, mask_history, train_on_prompt, overlong policies, empty records,
streaming and num_proc. Runs on a tiny ChatML BPE built in tmp_path, so it needs no ../shared data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dataprep.errors import DataError
from dataprep.tokenize import IGNORE, TokenizeOptions, TokenizeStats, tokenize_conversations
from dataprep.tokenizer import load_tokenizer
from tests.helpers.spans import trained_spans

CORPUS = [
    "system user assistant You are helpful. Question number one about cats and dogs.",
    "Answer: cats sleep a lot; dogs like walks. The end of the answer.",
    "Another question about the weather today? It is sunny and warm.",
] * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    t.add_special_tokens([AddedToken(s, special=True, normalized=False)
                          for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    d = tmp_path_factory.mktemp("chatml_tok")
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return load_tokenizer(d)


def conv(n_turns: int, system: bool = True, words: int = 3) -> list[dict]:
    msgs = [{"role": "system", "content": "You are helpful."}] if system else []
    for i in range(n_turns):
        msgs.append({"role": "user", "content": f"Question {i} about cats" + " and dogs" * words})
        msgs.append({"role": "assistant", "content": f"Answer {i}: cats sleep" + " a lot" * words})
    return msgs


def run(tok, records, **options):
    stats = TokenizeStats()
    samples = list(tokenize_conversations(records, tok, TokenizeOptions(template="chatml", **options), stats))
    return samples, stats


def answers(msgs):
    return [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]


def test_labels_are_pre_shifted_and_mask_assistant_only(tok):
    msgs = conv(2)
    (s,), stats = run(tok, [{"id": "a", "messages": msgs}])
    ids, labels = s.input_ids, s.labels
    assert ids.dtype == np.int32 and labels.dtype == np.int32 and len(ids) == len(labels)
    assert labels[-1] == IGNORE
    keep = labels != IGNORE
    assert (labels[:-1][keep[:-1]] == ids[1:][keep[:-1]]).all()
    assert trained_spans(tok, s) == answers(msgs)
    text = tok.decode(ids.tolist())
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    assert stats.as_dict() == {"records": 1, "samples": 1, "tokens": len(ids), "trainable_tokens": int(keep.sum()),
                               "split_records": 0, "expanded_records": 0, "special_token_text": 0,
                               "reasoning_inlined": 0, "dropped": {}, "truncated": {}}


def test_mask_history_trains_only_last_turn(tok):
    msgs = conv(3)
    (s,), _ = run(tok, [{"id": "a", "messages": msgs}], mask_history=True)
    (full,), _ = run(tok, [{"id": "a", "messages": msgs}])
    assert s.input_ids.tolist() == full.input_ids.tolist()
    assert trained_spans(tok, s) == answers(msgs)[-1:]


def test_train_on_prompt_trains_every_position(tok):
    (s,), _ = run(tok, [{"id": "a", "messages": conv(2)}], train_on_prompt=True)
    assert s.labels[:-1].tolist() == s.input_ids[1:].tolist() and s.labels[-1] == IGNORE


def test_overlong_drop_counts(tok):
    short, long = conv(1, words=1), conv(6, words=6)
    samples, stats = run(tok, [{"id": "s", "messages": short}, {"id": "l", "messages": long}], max_length=60)
    assert [s.id for s in samples] == ["s"]
    assert stats.dropped == {"too_long": 1} and stats.records == 2 and stats.samples == 1


def test_overlong_truncate_drops_oldest_turns_keeps_system(tok):
    msgs = conv(5, words=4)
    (full,), _ = run(tok, [{"id": "a", "messages": msgs}])
    max_len = len(full.input_ids) - 10
    (s,), stats = run(tok, [{"id": "a", "messages": msgs}], max_length=max_len, overlong="truncate")
    assert len(s.input_ids) <= max_len
    # the result is exactly the conversation without its oldest turn: system kept, whole pairs removed
    (expect,), _ = run(tok, [{"id": "a", "messages": msgs[:1] + msgs[3:]}])
    assert s.input_ids.tolist() == expect.input_ids.tolist() and s.labels.tolist() == expect.labels.tolist()
    assert tok.decode(s.input_ids.tolist()).startswith("<|im_start|>system\nYou are helpful.<|im_end|>")
    assert stats.truncated == {"dropped_turns": 1} and stats.dropped == {}


def long_answer(words: int) -> list[dict]:
    return [{"role": "user", "content": "Question about cats"},
            {"role": "assistant", "content": "Answer: cats sleep" + " a lot" * words}]


def test_overlong_truncate_single_turn_cut_at_end(tok):
    msgs = long_answer(40)
    (full,), _ = run(tok, [{"id": "a", "messages": msgs}])
    (s,), stats = run(tok, [{"id": "a", "messages": msgs}], max_length=40, overlong="truncate")
    assert len(s.input_ids) == 40 and s.input_ids.tolist() == full.input_ids[:40].tolist()
    assert s.labels[:-1].tolist() == full.labels[:39].tolist() and s.labels[-1] == IGNORE
    assert stats.truncated == {"cut_tail": 1}


def test_record_that_becomes_empty_is_dropped_and_counted(tok):
    long_system = [{"role": "system", "content": "You are helpful. " * 40}, *conv(1, system=False)]
    samples, stats = run(tok, [{"id": "a", "messages": long_system}], max_length=30, overlong="truncate")
    assert samples == [] and stats.dropped == {"no_target_after_truncation": 1}
    assert stats.truncated == {"cut_tail": 1}


def test_overlong_split_makes_pieces_of_whole_turns(tok):
    msgs = conv(6, words=3)
    (one_turn,), _ = run(tok, [{"id": "a", "messages": msgs[:3]}])
    max_len = 2 * len(one_turn.input_ids)  # room for about two turns per piece
    samples, stats = run(tok, [{"id": "a", "messages": msgs}], max_length=max_len, overlong="split")
    assert len(samples) >= 3 and [s.id for s in samples] == [f"a#{k}" for k in range(len(samples))]
    assert all(len(s.input_ids) <= max_len for s in samples)
    system = "<|im_start|>system\nYou are helpful.<|im_end|>"
    assert all(tok.decode(s.input_ids.tolist()).startswith(system) for s in samples)
    assert [t for s in samples for t in trained_spans(tok, s)] == answers(msgs)
    assert stats.split_records == 1 and stats.samples == len(samples)


def test_split_with_one_turn_too_long_cuts_that_turn(tok):
    msgs = conv(1, words=2) + long_answer(200)
    (first,), _ = run(tok, [{"id": "a", "messages": msgs[:3]}])
    max_len = len(first.input_ids) + 5
    samples, stats = run(tok, [{"id": "a", "messages": msgs}], max_length=max_len, overlong="split")
    assert [s.id for s in samples] == ["a#0", "a#1"] and len(samples[1].input_ids) == max_len
    assert samples[0].input_ids.tolist() == first.input_ids.tolist()
    assert stats.truncated == {"cut_tail": 1} and stats.split_records == 1


def test_empty_and_bad_records(tok):
    records = [
        {"id": "empty", "messages": []},
        {"id": "noans", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "ok", "messages": conv(1)},
    ]
    samples, stats = run(tok, records)
    assert [s.id for s in samples] == ["ok"]
    assert stats.dropped == {"empty": 1, "no_assistant": 1} and stats.records == 3
    with pytest.raises(DataError, match="record 1"):
        run(tok, [{"id": "x", "messages": conv(1)}, {"id": "y", "messages": [{"role": "bot", "content": "?"}]}])
    # missing ids fall back to the record index
    (s,), _ = run(tok, [{"messages": conv(1)}])
    assert s.id == "0"


def test_streams_in_chunks(tok):
    seen = []

    def records():
        for i in range(100):
            seen.append(i)
            yield {"id": str(i), "messages": conv(1)}

    it = tokenize_conversations(records(), tok, TokenizeOptions(template="chatml", chunk_size=8))
    first = next(it)
    # one chunk is encoded in a thread while the next is read and rendered: two chunks in flight, no more
    assert first.id == "0" and len(seen) == 16


def test_num_proc_matches_single_process(tok):
    records = [{"id": str(i), "messages": conv(1 + i % 4, system=i % 2 == 0, words=i % 7)} for i in range(60)]
    opts = {"max_length": 80, "overlong": "split"}
    one, s1 = run(tok, records, **opts, chunk_size=7)
    two, s2 = run(tok, records, **opts, chunk_size=7, num_proc=2)
    assert [s.id for s in one] == [s.id for s in two]
    assert all((a.input_ids == b.input_ids).all() and (a.labels == b.labels).all() for a, b in zip(one, two, strict=True))
    assert s1.as_dict() == s2.as_dict()


def test_options_are_validated():
    with pytest.raises(ValueError, match="overlong"):
        TokenizeOptions(overlong="cut")
    with pytest.raises(ValueError, match="max_length"):
        TokenizeOptions(max_length=1)


def test_split_with_mask_history_trains_only_the_records_last_turn(tok):
    msgs = conv(6, words=3)
    (one_turn,), _ = run(tok, [{"id": "a", "messages": msgs[:3]}])
    max_len = 2 * len(one_turn.input_ids)
    samples, stats = run(tok, [{"id": "a", "messages": msgs}], max_length=max_len, overlong="split",
                         mask_history=True)
    assert len(samples) == 1 and samples[0].id.startswith("a#")
    assert trained_spans(tok, samples[0]) == answers(msgs)[-1:]
    assert stats.dropped["split_piece_no_target"] >= 2 and stats.split_records == 1


def test_empty_answer_still_trains_end_of_turn(tok):
    (s,), _ = run(tok, [{"id": "a", "messages": [{"role": "user", "content": ""},
                                                  {"role": "assistant", "content": ""}]}])
    assert trained_spans(tok, s) == ["<|im_end|>"]  # an empty answer still trains its end-of-turn token
