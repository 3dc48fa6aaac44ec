"""HF safetensors loading (single, sharded, reduced depth, FSDP2 shards) and export back to HF format."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import save_hf_checkpoint

from trainer.model import Transformer
from trainer.model_config import ModelConfig
from trainer.weights import (
    INDEX_FILE,
    WeightsError,
    export_hf,
    load_hf_weights,
    load_pretrained,
    materialize,
    parse_size,
)

transformers = pytest.importorskip("transformers")


def _ids(shape=(2, 16), seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def _hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(ids).logits


def test_sharded_index_checkpoint_loads(tmp_path):
    hf = save_hf_checkpoint("llama", tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    ours = load_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_load_into_meta_model_reports_files_and_casts_dtype(tmp_path):
    hf = save_hf_checkpoint("qwen2_bias_tied", tmp_path)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_pretrained(tmp_path))
    model.to(torch.bfloat16)
    with pytest.raises(WeightsError, match="materialize"):
        load_hf_weights(model, tmp_path, show_progress=False)
    materialize(model, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = load_hf_weights(model, tmp_path, show_progress=False)
    assert report.files == ["model.safetensors"] and report.loaded == len(list(model.parameters()))
    ref = hf.state_dict()["model.layers.1.self_attn.k_proj.bias"]
    got = model.model.layers[1].self_attn.k_proj.bias
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref.to(torch.bfloat16))


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_keys_are_named(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    _rewrite(tmp_path, lambda t: (t.pop("model.layers.1.mlp.up_proj.weight"), t.update(extra=torch.zeros(2))))
    with pytest.raises(WeightsError) as err:
        load_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing from checkpoint (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected in checkpoint (1): extra" in msg
    assert str(tmp_path) in msg
    # Non-strict: loads what fits, leaves the rest to the caller (e.g. adapters initialised separately).
    cfg = ModelConfig.from_pretrained(tmp_path)
    model = Transformer(cfg)
    report = load_hf_weights(model, tmp_path, strict=False, show_progress=False)
    assert report.loaded == len(list(model.parameters())) - 1


def test_shape_mismatch_is_named(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(WeightsError, match=r"model\.norm\.weight has shape \(65,\), the model expects \(64,\)"):
        load_pretrained(tmp_path)


def test_missing_checkpoint_is_explained(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match="pytorch_model.bin: convert it to safetensors"):
        load_hf_weights(torch.nn.Linear(1, 1), tmp_path)


def test_name_map_lets_extra_parameters_skip_the_checkpoint(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    model = Transformer(ModelConfig.from_pretrained(tmp_path))
    model.model.layers[0].self_attn.extra_scale = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(WeightsError, match="extra_scale"):
        load_hf_weights(model, tmp_path, show_progress=False)
    load_hf_weights(model, tmp_path, show_progress=False, name_map=lambda n: None if "extra_scale" in n else n)


@pytest.mark.parametrize("family", ["llama3_rope_tied", "qwen3_qknorm"])
def test_export_reloads_in_transformers_with_same_logits(tmp_path, family):
    src = tmp_path / "src"
    save_hf_checkpoint(family, src)
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "tokenizer_config.json").write_text("{}")
    ours = load_pretrained(src).eval()
    ids = _ids()
    with torch.no_grad():
        expected = ours(ids)
    out = export_hf(ours, tmp_path / "out", source_dir=src, max_shard_size="60KB")
    files = sorted(p.name for p in out.iterdir())
    assert INDEX_FILE in files and "tokenizer.json" in files and "tokenizer_config.json" in files
    assert "generation_config.json" in files and "config.json" in files
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    torch.testing.assert_close(_hf_logits(out, ids), expected, atol=1e-4, rtol=0)
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert ("lm_head.weight" in weight_map) != ours.config.tie_word_embeddings


def test_export_reduced_depth_bf16_single_file(tmp_path):
    src = tmp_path / "src"
    save_hf_checkpoint("qwen3_qknorm", src)
    ours = load_pretrained(src, num_hidden_layers=1)
    out = export_hf(ours, tmp_path / "out", dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["dtype"] == "bfloat16"
    tensors = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert not any(k.startswith("model.layers.1.") for k in tensors)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert len(hf.model.layers) == 1
    ids = _ids((1, 8))
    ours_bf16 = load_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours_bf16(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_export_refuses_to_clobber_unless_asked(tmp_path):
    src = tmp_path / "src"
    save_hf_checkpoint("llama", src)
    ours = load_pretrained(src)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_hf(ours, tmp_path / "out")
    export_hf(ours, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("10KiB") == 10240
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse"):
        parse_size("lots")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_fsdp2_two_ranks_load_shards_and_export(tmp_path):
    import dist_weights_worker

    src, out, res = tmp_path / "src", tmp_path / "out", tmp_path / "res"
    res.mkdir()
    save_hf_checkpoint("qwen2_bias_tied", src)
    torch.multiprocessing.spawn(
        dist_weights_worker.run, args=(2, _free_port(), str(src), str(out), str(res)), nprocs=2
    )
    ref = load_pretrained(src).eval()
    with torch.no_grad():
        expected = ref(torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0)))
    for rank in range(2):
        got = torch.load(res / f"rank{rank}.pt")
        assert got["tied"] and got["local_rows"] == 128  # half the 256-row embedding per rank
        torch.testing.assert_close(got["logits"], expected, atol=5e-2, rtol=0)  # bf16 compute
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map  # exported after a forward: FSDP resharded, tie seen again
    exported = load_pretrained(out).state_dict()
    for key, value in ref.state_dict().items():
        assert torch.equal(exported[key], value), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp2_nccl_single_gpu_load_and_export(tmp_path):
    import dist_weights_worker

    src, out, res = tmp_path / "src", tmp_path / "out", tmp_path / "res"
    res.mkdir()
    save_hf_checkpoint("llama3_rope_tied", src)
    torch.multiprocessing.spawn(
        dist_weights_worker.run, args=(1, _free_port(), str(src), str(out), str(res), "cuda"), nprocs=1
    )
    ref = load_pretrained(src).eval()
    with torch.no_grad():
        expected = ref(torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0)))
    got = torch.load(res / "rank0.pt")
    assert got["tied"] and got["local_rows"] == 256
    torch.testing.assert_close(got["logits"], expected, atol=5e-2, rtol=0)  # bf16 compute
    exported = load_pretrained(out).state_dict()
    for key, value in ref.state_dict().items():
        assert torch.equal(exported[key], value), key


def test_wrapped_blocks_keep_hf_names_for_load_and_export(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    src = tmp_path / "src"
    save_hf_checkpoint("llama", src)
    model = Transformer(ModelConfig.from_pretrained(src))
    for i, block in enumerate(model.model.layers):
        model.model.layers[i] = checkpoint_wrapper(block)
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    load_hf_weights(model, src, show_progress=False)
    out = export_hf(model, tmp_path / "out")
    assert load_file(out / "model.safetensors").keys() == load_file(src / "model.safetensors").keys()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _hf_logits(src, ids), atol=1e-4, rtol=0)
