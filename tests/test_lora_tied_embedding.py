"""LoRA with a trained tied embedding (issue 14, item 13): the PEFT adapter and the merged checkpoint must give,
through transformers / peft, the model that was trained, so they regenerate the training answers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.tiny_run import WORDS, make_tokenizer_and_model

pytestmark = pytest.mark.slow

N_RECORDS = 12
SEQ = 64


def _records() -> list[dict]:
    """Twelve questions with fixed, distinct answers: memorised in a few dozen steps by the tiny model."""
    return [{"id": f"q{i}", "messages": [
        {"role": "user", "content": f"Say {WORDS[i]}"},
        {"role": "assistant", "content": f"{WORDS[(i + 3) % len(WORDS)]} {WORDS[(i * 5 + 1) % len(WORDS)]}"},
    ]} for i in range(N_RECORDS)]


def _samples(model_dir):
    from dataprep.tokenize import TokenizeOptions, tokenize_conversations
    from dataprep.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    return list(tokenize_conversations(_records(), tokenizer, TokenizeOptions(template="chatml", max_length=SEQ)))


def _pack_one_per_row(model_dir, out_dir, samples):
    import numpy as np

    from dataprep.tokenizer import load_tokenizer
    from formats.writer import DatasetWriter

    tokenizer = load_tokenizer(model_dir)
    with DatasetWriter(out_dir, SEQ, tokenizer.pad_id, overwrite=True) as writer:
        for s in samples:
            ids = np.full(SEQ, tokenizer.pad_id, dtype=np.int32)
            labels = np.full(SEQ, -100, dtype=np.int32)
            ids[:len(s.input_ids)], labels[:len(s.labels)] = s.input_ids, s.labels
            writer.write_row(ids, labels, [len(s.input_ids)], [s.id])
        writer.finish(tokenizer={"fingerprint": tokenizer.fingerprint}, template="chatml")
    return out_dir


def _answers_regenerated(model, samples) -> int:
    """How many answers greedy decoding from the prompt reproduces exactly (teacher-free, as a user would)."""
    hits = 0
    for s in samples:
        trained = [i for i, y in enumerate(s.labels.tolist()) if y != -100]
        start, end = trained[0] + 1, trained[-1] + 2  # answer tokens are input_ids[start:end]
        prompt = torch.tensor(s.input_ids[:start], dtype=torch.long)[None]
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=end - start,
                             do_sample=False, pad_token_id=0)
        hits += out[0, start:].tolist() == s.input_ids[start:end].tolist()
    return hits


def test_trained_tied_embedding_survives_adapter_and_merge(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from trainer.config import load_config
    from trainer.loop import train

    model_dir = make_tokenizer_and_model(tmp_path)
    assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"]
    samples = _samples(model_dir)
    data_dir = _pack_one_per_row(model_dir, tmp_path / "data", samples)
    result = train(load_config(None, [
        f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={tmp_path / 'run'}",
        "logging.progress_bar=false", "train.lr=1e-2", "train.max_steps=60", "train.seed=0", "train.warmup_steps=5",
        "train.schedule=constant", f"data.micro_batch_size={N_RECORDS}", "peft.pet_type=lora", "peft.lora_rank=8",
        "peft.target_modules=.*proj", "peft.freeze_exclude=[model.embed_tokens.weight]", "peft.export_merged=true",
    ]))
    assert result.losses[-1] < 0.05, result.losses[-5:]
    export, merged_dir = tmp_path / "run" / "export", tmp_path / "run" / "export-merged"

    config = json.loads((export / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True and config["modules_to_save"] == ["model.embed_tokens"]
    tensors = load_file(export / "adapter_model.safetensors")
    head, embed = tensors["base_model.model.lm_head.weight"], tensors["base_model.model.model.embed_tokens.weight"]
    assert torch.equal(head, embed)
    merged_config = json.loads((merged_dir / "config.json").read_text())
    assert merged_config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(merged_dir / "model.safetensors")

    load = transformers.AutoModelForCausalLM.from_pretrained
    tuned = peft.PeftModel.from_pretrained(load(model_dir, dtype=torch.float32), export).eval()
    merged = load(merged_dir, dtype=torch.float32).eval()
    plain = load(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(samples[0].input_ids, dtype=torch.long)[None]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert _answers_regenerated(tuned, samples) == N_RECORDS
        assert _answers_regenerated(merged, samples) == N_RECORDS
        assert _answers_regenerated(plain, samples) == 0  # the base model knew none of it


def test_adapter_and_merge_of_a_trained_tied_embedding_give_our_model(tmp_path):
    """Fast and exact: our model with a changed tied embedding (= its head) against peft and the merged checkpoint."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tiny_checkpoints import save_hf_checkpoint

    from trainer.adapters import save_adapter
    from trainer.config import PeftSection
    from trainer.lora import load_lora_model
    from trainer.merge_lora import merge_lora

    save_hf_checkpoint("qwen2_bias_tied", tmp_path / "base")
    cfg = PeftSection(pet_type="lora", target_modules=".*q_proj", lora_b_init="normal",
                      freeze_exclude=["model.embed_tokens.weight"])
    ours = load_lora_model(str(tmp_path / "base"), cfg, seed=0).eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    with torch.no_grad():
        ours.model.embed_tokens.weight.add_(torch.randn(ours.model.embed_tokens.weight.shape) * 0.5)
    save_adapter(ours, tmp_path / "adapter", cfg)
    merge_lora(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", show_progress=False)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    load = transformers.AutoModelForCausalLM.from_pretrained
    tuned = peft.PeftModel.from_pretrained(load(tmp_path / "base", dtype=torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        want = ours(ids)
        torch.testing.assert_close(tuned.eval()(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(load(tmp_path / "merged", dtype=torch.float32)(input_ids=ids).logits, want,
                                   atol=1e-4, rtol=1e-4)


def test_merge_follows_peft_tying_semantics(tmp_path):
    """merge-lora of a tied base: an embedding LoRA unties (input lookup only); a modules_to_save embedding ties
    with ensure_weight_tying and unties without it, exactly as PeftModel.from_pretrained computes."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tiny_checkpoints import save_hf_checkpoint

    from trainer.merge_lora import merge_lora

    base_dir = tmp_path / "base"
    save_hf_checkpoint("qwen2_bias_tied", base_dir)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    cases = {
        "embed_lora": ({"target_modules": ["embed_tokens", "q_proj"]}, False),
        "tied_save": ({"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"],
                       "ensure_weight_tying": True}, True),
    }
    for name, (kwargs, expect_tied) in cases.items():
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        pm = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **kwargs))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n:
                    p.add_(torch.randn_like(p) * 0.3)
        pm.save_pretrained(tmp_path / name)
        with torch.no_grad():
            want = pm(input_ids=ids).logits
        report = merge_lora(base_dir, tmp_path / name, tmp_path / f"{name}-merged", show_progress=False)
        assert report.untied_embeddings is (not expect_tied), name
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-merged", dtype=torch.float32)
        assert merged.config.tie_word_embeddings is expect_tied
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4, msg=name)
