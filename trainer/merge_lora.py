"""Fold a PEFT adapter (LoRA, VeRA, LoKr, and this project's MoRA) into its base checkpoint: HF safetensors
out, one tensor at a time. VeRA: W + (lambda_b B)(lambda_d A) with the saved shared projections; LoKr:
W + (alpha / r) kron(W1, W2); MoRA: W + the MoRA map of the identity (see trainer.peft_methods).

Streaming keeps memory at one base tensor plus the adapter: each base shard file is read, the adapted weights
are replaced by W + s B A (DoRA: m / ||W + s B A||_row * (W + s B A)), and the shard is written under the same
file name, so the index and shard layout of the base are kept. The math runs in fp32 and is cast back to each
tensor's stored dtype. Modules PEFT trained in full (`modules_to_save`) replace the base tensors.

An adapter trained on a quantized base records it (`quantized_base.json`, trainer.quantize.BASE_RECORD); by default
the merge then folds it into that base as the run saw it (the checkpoint quantized and dequantized again, tensor by
tensor), so the merged model computes what the trained one did. `base_as_trained=False` merges into the
checkpoint's full-precision values instead, as peft's `merge_and_unload` on the unquantized base would.

Tied embeddings follow what `PeftModel.from_pretrained` computes, so the merge and the adapter agree:
- an embedding LoRA changes the input lookup only, so the merged checkpoint unties the pair (writes
  `lm_head.weight` = the old embedding and `tie_word_embeddings: false`);
- a fully trained embedding (`modules_to_save`) with `ensure_weight_tying: true` (what the trainer writes for a
  tied model) is both embedding and head: the pair stays tied, the trained matrix written once;
- without that flag PEFT keeps the head on the base weights (or on an `lm_head.weight` the adapter carries),
  so the merge unties and writes that head.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.adapters import CONFIG_FILE, PREFIX, WEIGHTS_FILE
from trainer.peft_targets import pattern_value
from trainer.weights import (
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    WeightsError,
    checkpoint_index,
    copy_tokenizer_files,
    replace_dir,
    write_safetensors,
)

log = logging.getLogger(__name__)


@dataclass
class MergeReport:
    output_dir: str = ""
    merged_modules: int = 0
    replaced_tensors: int = 0  # modules_to_save
    files: list[str] = field(default_factory=list)
    untied_embeddings: bool = False
    dtype: str = ""
    base: str = "as is"  # which base values the adapter was folded into (see `merge_lora`)


@dataclass
class _Adapter:
    kind: str  # "linear" | "embedding" | "delta" (VeRA, LoKr: `delta` computes the whole update)
    a: torch.Tensor | None
    b: torch.Tensor | None
    scaling: float
    magnitude: torch.Tensor | None = None
    delta: Callable[[tuple[int, ...]], torch.Tensor] | None = None  # the weight's shape -> its update (fp32)


MERGEABLE = ("LORA", "VERA", "LOKR", "MORA")


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, float(config["lora_alpha"])))
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, _Adapter], dict[str, torch.Tensor]]:
    """(config, module name -> adapter, full replacement tensors by checkpoint key) from a PEFT directory."""
    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{cfg_path}: not valid JSON ({exc})") from None
    if config.get("peft_type") == "LOREFT":
        raise WeightsError(f"{cfg_path}: a LoReFT adapter edits hidden states at chosen token positions, not "
                           "weights, so it cannot be merged into the base model; load it as an adapter instead "
                           "(trainer generate/predict --adapter)")
    if config.get("peft_type") == "PREFIX_TUNING":
        raise WeightsError(f"{cfg_path}: a prefix-tuning adapter adds learned keys and values to every attention "
                           "layer, not a weight change, so it cannot be merged into the base model; load it as an "
                           "adapter instead (trainer generate/predict --adapter, or peft)")
    if config.get("peft_type") not in MERGEABLE:
        raise WeightsError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not one of {', '.join(MERGEABLE)}")
    if config.get("fan_in_fan_out") or config.get("lora_bias") or config.get("bias", "none") != "none":
        raise WeightsError(f"{cfg_path}: fan_in_fan_out / LoRA biases are not supported by merge-lora")
    tensors = load_file(w_path)
    if config["peft_type"] != "LORA":
        return _read_vera_lokr(config, tensors, w_path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    suffixes = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise WeightsError(f"{w_path}: key {key} does not start with {PREFIX!r}")
        name = key[len(PREFIX):]
        for suffix in suffixes:
            if name.endswith("." + suffix):
                parts.setdefault(name[: -len(suffix) - 1], {})[suffix] = t.float()
                break
        else:
            # PEFT saves a targeted embedding's base weights too (`save_embedding_layers`), under base_layer.
            full[name.replace(".base_layer.", ".")] = t
    adapters = {}
    for module, p in parts.items():
        if "lora_A.weight" in p and "lora_B.weight" in p:
            a, b = p["lora_A.weight"], p["lora_B.weight"]
            adapters[module] = _Adapter("linear", a, b, _scaling(config, module, a.shape[0]),
                                        p.get("lora_magnitude_vector"))
        elif "lora_embedding_A" in p and "lora_embedding_B" in p:
            if "lora_magnitude_vector" in p:
                raise WeightsError(f"{w_path}: DoRA on the embedding {module} is not supported by merge-lora")
            a, b = p["lora_embedding_A"], p["lora_embedding_B"]
            adapters[module] = _Adapter("embedding", a, b, _scaling(config, module, a.shape[0]))
        else:
            raise WeightsError(f"{w_path}: module {module} has an incomplete adapter ({', '.join(sorted(p))})")
    return config, adapters, full


def _read_vera_lokr(config: dict, tensors: dict[str, torch.Tensor], w_path: Path
                    ) -> tuple[dict, dict[str, _Adapter], dict[str, torch.Tensor]]:
    """VeRA: delta = (lambda_b B[:out]) (lambda_d A[:, :in]) with the shared A, B saved in the file (PEFT's
    save_projection). LoKr: delta = (alpha / r) kron(W1, W2), W1 / W2 whole or as products of their factors."""
    if config["peft_type"] == "MORA":
        return _read_mora(config, tensors, w_path)
    vera = config["peft_type"] == "VERA"
    shared = {k: tensors.pop(f"base_model.{k}", None) for k in ("vera_A", "vera_B")} if vera else {}
    if vera and any(v is None for v in shared.values()):
        raise WeightsError(f"{w_path}: a VeRA adapter without base_model.vera_A / vera_B (save_projection: false) "
                           "cannot be merged")
    marks = (".vera_lambda_b", ".vera_lambda_d") if vera else (
        ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise WeightsError(f"{w_path}: key {key} does not start with {PREFIX!r}")
        name = key[len(PREFIX):]
        mark = next((m for m in marks if name.endswith(m)), None)
        if mark is None:
            full[name.replace(".base_layer.", ".")] = t
        else:
            parts.setdefault(name[: -len(mark)], {})[mark[1:]] = t.float()
    adapters = {}
    for module, p in parts.items():
        if vera:
            if set(p) != {"vera_lambda_b", "vera_lambda_d"}:
                raise WeightsError(f"{w_path}: module {module} has an incomplete VeRA adapter ({', '.join(sorted(p))})")

            def delta(shape, p=p):
                a, b = shared["vera_A"].float()[:, : shape[1]], shared["vera_B"].float()[: shape[0]]
                return (p["vera_lambda_b"][:, None] * b) @ (p["vera_lambda_d"][:, None] * a)
            adapters[module] = _Adapter("delta", None, None, 1.0, delta=delta)
            continue
        w1 = p.get("lokr_w1")
        if w1 is None and {"lokr_w1_a", "lokr_w1_b"} <= set(p):
            w1 = p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p.get("lokr_w2")
        if w2 is None and {"lokr_w2_a", "lokr_w2_b"} <= set(p):
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w1 is None or w2 is None:
            raise WeightsError(f"{w_path}: module {module} has an incomplete LoKr adapter ({', '.join(sorted(p))})")
        rank = int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["alpha"]))

        def delta(shape, w1=w1, w2=w2, scale=alpha / rank):
            return (torch.kron(w1, w2) * scale).reshape(shape)
        adapters[module] = _Adapter("delta", None, None, 1.0, delta=delta)
    return config, adapters, full


def _read_mora(config: dict, tensors: dict[str, torch.Tensor], w_path: Path
               ) -> tuple[dict, dict[str, _Adapter], dict[str, torch.Tensor]]:
    """This project's MoRA adapter: M per module under <module>.lora_A.weight; delta = the MoRA map of I."""
    from trainer.peft_methods import mora_delta

    adapters: dict[str, _Adapter] = {}
    full: dict[str, torch.Tensor] = {}
    mora_type = int(config.get("mora_type", 6))
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise WeightsError(f"{w_path}: key {key} does not start with {PREFIX!r}")
        name = key[len(PREFIX):]
        if not name.endswith(".lora_A.weight"):
            full[name] = t
            continue

        def delta(shape, m=t):
            return mora_delta(m.float(), shape[1], shape[0], mora_type)
        adapters[name[: -len(".lora_A.weight")]] = _Adapter("delta", None, None, 1.0, delta=delta)
    return config, adapters, full


@torch.no_grad()
def merged_weight(weight: torch.Tensor, adapter: _Adapter) -> torch.Tensor:
    """The base weight with the adapter folded in, computed in fp32, returned in the weight's dtype."""
    w = weight.float()
    if adapter.kind == "delta":
        delta = adapter.delta(tuple(w.shape))
    elif adapter.kind == "embedding":  # A: [r, vocab], B: [dim, r]; delta [vocab, dim]
        delta = (adapter.b @ adapter.a).t() * adapter.scaling
    else:
        delta = (adapter.b @ adapter.a) * adapter.scaling
    if delta.shape != w.shape:
        raise WeightsError(f"adapter delta has shape {tuple(delta.shape)}, the base weight {tuple(w.shape)}")
    merged = w + delta
    if adapter.magnitude is not None:
        merged = merged * (adapter.magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
    return merged.to(weight.dtype)


def recorded_base_values(adapter_dir: Path, as_trained: bool | None
                         ) -> tuple[Callable[[str, torch.Tensor], torch.Tensor] | None, str]:
    """(base values, how a summary names them) for `base_as_trained` (merge_lora, generate.load_model): the
    quantized base the adapter's record names, or None for the checkpoint's own values."""
    from trainer.quantize import BASE_RECORD, read_base_record, recorded_base

    path = adapter_dir / BASE_RECORD
    if as_trained is False:
        return None, "as is (asked for)" if path.is_file() else "as is"
    if not path.is_file():
        if as_trained:
            raise WeightsError(f"{path}: not found; merging into the base as trained needs the quantized base this "
                               "file records (an adapter trained on a full-precision base has none: merge as is)")
        return None, "as is"
    try:
        record = read_base_record(path)
        values = recorded_base(record, str(path))
    except ValueError as exc:
        raise WeightsError(str(exc)) from None
    note = (f"as trained ({record['weight_quantize_algo']}, {len(record['quantized'])} tensors quantized as "
            f"{record['dtype']} and dequantized)")
    return values, note


def merge_lora(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False,
               show_progress: bool = True,
               base_values: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
               base_as_trained: bool | None = None) -> MergeReport:
    """Write base + adapter as an HF checkpoint directory (atomically: a temp sibling renamed at the end).

    `base_values` (checkpoint key, tensor -> tensor) gives the values the adapter was trained on where they are
    not the checkpoint's: a run on a quantized base merges into the dequantized base it saw (see
    `trainer.quantize.dequantized_base`), so the merged model computes what the trained one did. Without it,
    `base_as_trained` decides from the adapter's own record of a quantized base: None = use it when there is
    one, True = use it and fail without one, False = ignore it (the checkpoint's values as they are)."""
    from tqdm import tqdm

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
    config, adapters, replacements = read_adapter(adapter_dir)
    base_note = "as trained (given by the caller)"
    if base_values is None:
        base_values, base_note = recorded_base_values(Path(adapter_dir), base_as_trained)
    files = checkpoint_index(base_dir)
    hf_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    tied = bool(hf_config.get("tie_word_embeddings", False))
    keys = set(files)
    if any(k not in keys for k in replacements):
        replacements = _in_checkpoint_layout(base_dir, replacements, list(files))
    head_key, embed_key = "lm_head.weight", "model.embed_tokens.weight"
    shared = tied and head_key not in keys  # one stored matrix serves as embedding and head
    missing = sorted(m for m in adapters if f"{m}.weight" not in keys and not (shared and m == "lm_head"))
    missing += sorted(k for k in replacements if k not in keys and not (shared and k == head_key))
    if missing:
        raise WeightsError(f"{adapter_dir}: adapter modules/tensors not in the base checkpoint {base_dir}: "
                           f"{', '.join(missing[:10])}")
    head_source = None  # what the head becomes when it is not the (possibly merged) old embedding
    untie = False
    if shared:
        embed_new = replacements.get(embed_key)
        head_source = replacements.pop(head_key, None)
        if head_source is None and embed_new is not None and config.get("ensure_weight_tying"):
            head_source = embed_new
        same = embed_new is not None and head_source is not None and torch.equal(head_source, embed_new)
        untie = ("model.embed_tokens" in adapters or "lm_head" in adapters
                 or (embed_new is not None and not same) or (embed_new is None and head_source is not None))
    report = MergeReport(output_dir=str(out_dir), untied_embeddings=untie, base=base_note)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        by_file: dict[Path, list[str]] = {}
        for key, path in files.items():
            by_file.setdefault(path, []).append(key)
        weight_map: dict[str, str] = {}
        dtypes = set()
        for path in tqdm(sorted(by_file), desc="merging", unit="file", disable=not show_progress):
            out: dict[str, torch.Tensor] = {}
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata()
                for key in by_file[path]:
                    t = f.get_tensor(key)
                    dtypes.add(t.dtype)
                    if base_values is not None:
                        t = base_values(key, t)
                    module = key[: -len(".weight")] if key.endswith(".weight") else None
                    if untie and key == embed_key:
                        head = t.clone() if head_source is None else head_source.to(t.dtype)
                        if "lm_head" in adapters:
                            head = merged_weight(head, adapters["lm_head"])
                            report.merged_modules += 1
                        out[head_key] = head.contiguous()
                    if key in replacements:
                        t = replacements[key].to(t.dtype)
                        report.replaced_tensors += 1
                    if module in adapters:
                        t = merged_weight(t, adapters[module])
                        report.merged_modules += 1
                    out[key] = t.contiguous()
            write_safetensors(out, tmp / path.name, metadata=metadata or {"format": "pt"})
            weight_map.update(dict.fromkeys(out, path.name))
            report.files.append(path.name)
        if (base_dir / INDEX_FILE).is_file():
            index = json.loads((base_dir / INDEX_FILE).read_text(encoding="utf-8"))
            index["weight_map"] = dict(sorted(weight_map.items()))
            index.setdefault("metadata", {})["total_size"] = _tensor_bytes(tmp, set(weight_map.values()))
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        elif not (tmp / SINGLE_FILE).is_file():
            raise WeightsError(f"{base_dir}: expected {SINGLE_FILE}")
        if untie:
            hf_config["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if (base_dir / "generation_config.json").is_file():
            shutil.copy2(base_dir / "generation_config.json", tmp / "generation_config.json")
        # The tokenizer the adapter was trained with travels with it (sftkit exports carry it); else the base's.
        adapter_has_tokenizer = any((Path(adapter_dir) / name).is_file() for name in TOKENIZER_FILES)
        copy_tokenizer_files(adapter_dir if adapter_has_tokenizer else base_dir, tmp)
        if report.merged_modules != len(adapters):
            raise WeightsError(f"merged {report.merged_modules} of {len(adapters)} adapted modules")
        report.dtype = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %d LoRA modules into %s (base %s)", report.merged_modules, out_dir, report.base)
    return report


def _in_checkpoint_layout(base_dir: Path, tensors: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """Fully trained tensors named as transformers holds them in memory (fused MoE experts, renamed modules, as
    the HF backend trains and PEFT saves them), renamed or split into the base checkpoint's tensors."""
    from trainer import hf_backend

    try:
        model = hf_backend.build_meta_model(base_dir)
    except (ImportError, ValueError) as exc:
        log.debug("no transformers layout for %s: %s", base_dir, exc)
        return tensors
    model.layout = hf_backend.plan_layout(model, keys)
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        out.update(hf_backend.to_checkpoint_tensors(model, key, t))
    return out


def _tensor_bytes(root: Path, names: set[str]) -> int:
    """Total tensor bytes of the written shards, as an index's metadata.total_size records."""
    total = 0
    for name in names:
        with safe_open(root / name, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * _DTYPE_BYTES.get(sl.get_dtype(), 4)
    return total


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
