"""Hugging Face safetensors in and out of `trainer.model.Transformer`.

Loading is designed for "build on meta, shard, materialise, load":

    config = ModelConfig.from_pretrained(src, num_hidden_layers=4)
    with torch.device("meta"):
        model = Transformer(config)
    for block in model.model.layers: fully_shard(block, mesh=mesh)   # optional (FSDP2)
    fully_shard(model, mesh=mesh)
    materialize(model, "cuda")                                       # storage only, no values
    load_hf_weights(model, src)

Strategy under FSDP2 (chosen over `set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`):
every rank opens the safetensors files itself (memory-mapped, shard by shard) and reads only the rows of
each tensor that its DTensor shard owns (`safe_open(...).get_slice`). No rank ever holds a full copy of the
model, no collective runs during loading, and the same code path serves the non-distributed case (a plain
tensor is simply "the whole slice"). The price is that every node needs the files on a local or shared disk,
which is already how HF checkpoints are used.

Export gathers each parameter with `DTensor.full_tensor()` (a collective every rank joins), but only rank 0
keeps it, one safetensors shard at a time, and writes into a temporary directory renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from formats.atomic import plain_file_mode, publish_dir
from formats.tokenizer_id import TOKENIZER_FILES
from trainer.distributed import is_dtensor
from trainer.model import Transformer
from trainer.model_config import ModelConfig
from trainer.quantize import quantized_owners

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Wrappers that insert a path component without changing the weight (activation checkpointing, torch.compile).
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

NameMap = Callable[[str], "str | None"]


class WeightsError(ValueError):
    """A checkpoint does not fit the model (missing, unexpected or mis-shaped tensors) or cannot be read."""


@dataclass
class LoadReport:
    loaded: int = 0
    files: list[str] = field(default_factory=list)
    # Checkpoint tensors deliberately not loaded, by reason (e.g. layers beyond a num_hidden_layers override).
    skipped: dict[str, int] = field(default_factory=dict)


def hf_name(name: str) -> str:
    """The checkpoint key for a module path, ignoring wrapper modules that do not change weights."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def checkpoint_index(model_dir: str | Path) -> dict[str, Path]:
    """Map every tensor key of an HF checkpoint directory to the safetensors file holding it."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        absent = sorted({str(p) for p in files.values() if not p.is_file()})
        if absent:
            raise WeightsError(f"{index} names shard files that do not exist: {', '.join(absent)}")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    present = sorted(p.name for p in model_dir.glob("*.bin")) if model_dir.is_dir() else []
    hint = f" (found {', '.join(present)}: convert it to safetensors first)" if present else ""
    raise WeightsError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def materialize(model: nn.Module, device: str | torch.device) -> None:
    """Give a meta-device model real (uninitialised) storage, keeping tied embeddings tied.

    Works before or after FSDP2 `fully_shard` (then each rank allocates only its shards). Values are garbage
    until `load_hf_weights` or `Transformer.init_weights` fills them.
    """
    model.to_empty(device=device)
    if isinstance(model, Transformer) and model.config.tie_word_embeddings:
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            model.tie_weights()


def _fmt_names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _reshard_fsdp(model: nn.Module) -> None:
    """Put FSDP2 modules back in their sharded state.

    After a forward without backward, FSDP2 may leave modules (the root by default) unsharded: their registered
    parameters are then temporary full copies, possibly in the mixed-precision dtype. Loading into or exporting
    from those would touch the wrong tensors, so both start from the sharded fp32 master parameters.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _targets(model: nn.Module, name_map: NameMap | None) -> dict[str, torch.Tensor]:
    _reshard_fsdp(model)
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():  # deduplicated: a tied lm_head is not listed
        key = hf_name(name)
        if name_map is not None:
            key = name_map(key)
        if key is not None:
            out[key] = param
    return out


def check_checkpoint_keys(
    model_dir: Path, files: dict[str, Path], *, used: set[str], missing: list[str], n_layers: int | None,
    tied_head: str | None, layer_re: re.Pattern, strict: bool, what: str,
) -> LoadReport:
    """Compare a checkpoint's keys with what the model takes: a key the model does not use is skipped (and
    counted) when it is a layer beyond a reduced `num_hidden_layers`, the duplicate head of a tied checkpoint
    or a saved rotary buffer; any other, and any `missing` parameter, is a problem: an error naming them with
    `strict`, else a warning. One rule for the native and the HF backend's loader."""
    report = LoadReport()
    unexpected: list[str] = []
    for key in files:
        if key in used:
            continue
        m = layer_re.match(key)
        if m and n_layers is not None and int(m.group(1)) >= n_layers:
            reason = "layer_beyond_num_hidden_layers"
        elif key == tied_head:
            reason = "tied_lm_head"
        elif key.endswith("rotary_emb.inv_freq"):  # old checkpoints saved this buffer; it is recomputed
            reason = "rotary_inv_freq"
        else:
            unexpected.append(key)
            continue
        report.skipped[reason] = report.skipped.get(reason, 0) + 1
    problems = []
    if missing:
        problems.append(f"missing from checkpoint ({len(missing)}): {_fmt_names(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected in checkpoint ({len(unexpected)}): {_fmt_names(sorted(unexpected))}")
    if problems and strict:
        raise WeightsError(f"{model_dir}: checkpoint does not match {what}; " + "; ".join(problems))
    for p in problems:
        log.warning("%s: %s", model_dir, p)
    return report


@torch.no_grad()
def load_hf_weights(
    model: nn.Module,
    model_dir: str | Path,
    *,
    strict: bool = True,
    name_map: NameMap | None = None,
    show_progress: bool = True,
) -> LoadReport:
    """Copy checkpoint tensors into the model's (possibly FSDP-sharded) parameters, file by file.

    Casts to each parameter's dtype. With `strict`, any model parameter without a checkpoint tensor, or any
    checkpoint tensor the model has no place for, is an error naming them; layers beyond a reduced
    `num_hidden_layers` and a duplicate `lm_head.weight` of a tied checkpoint are skipped and reported.
    `name_map` turns a model parameter's HF-style name into its checkpoint key, or None for parameters that
    do not come from the checkpoint (e.g. LoRA adapters).
    """
    model_dir = Path(model_dir)
    files = checkpoint_index(model_dir)
    targets = _targets(model, name_map)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))

    report = check_checkpoint_keys(
        model_dir, files, used=set(targets), missing=[k for k in targets if k not in files], n_layers=n_layers,
        tied_head="lm_head.weight" if tied else None, layer_re=_LAYER_RE, strict=strict, what="the model")

    by_file: dict[Path, list[str]] = {}
    for key, path in files.items():
        if key in targets:
            by_file.setdefault(path, []).append(key)
    owners = quantized_owners(model)
    for path in tqdm(sorted(by_file), desc="loading weights", unit="file", disable=not show_progress):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in by_file[path]:
                _load_one(f, key, targets[key], path, owners.get(id(targets[key])))
                report.loaded += 1
        report.files.append(path.name)
    if report.skipped:
        log.info("%s: skipped checkpoint tensors %s", model_dir, report.skipped)
    return report


def _load_one(f, key: str, param: torch.Tensor, path: Path, owner: nn.Module | None = None) -> None:
    """One checkpoint tensor into `param`; `owner` is the `QuantizedLinear` whose stored rows `param` is, if any."""
    sl = f.get_slice(key)
    shape = tuple(sl.get_shape())
    want = tuple(owner.shape if owner is not None else param.shape)
    if want != shape:
        raise WeightsError(f"{path}: tensor {key} has shape {shape}, the model expects {want}")
    if param.device.type == "meta":
        raise WeightsError(f"parameter {key} is on the meta device: call materialize(model, device) first")
    from trainer.quantize import is_quantized, load_quantized

    if owner is not None or is_quantized(param):  # quantized base: quantize on the fly, keep this rank's rows
        full = f.get_tensor(key)
        if not bool(torch.isfinite(full).all()):  # the 4-bit scales would hide it: refuse as for other weights
            raise WeightsError(f"{path}: tensor {key} holds NaN or Inf; refusing to quantize it")
        if owner is not None:
            owner.load(full)
        else:
            load_quantized(param, full)
        return
    if is_dtensor(param):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = param.to_local()
        local_shape, offset = compute_local_shape_and_global_offset(shape, param.device_mesh, param.placements)
        if local.numel() == 0:
            return
        index = tuple(slice(o, o + n) for o, n in zip(offset, local_shape, strict=True))
        local.copy_(sl[index] if shape else f.get_tensor(key))
    else:
        param.copy_(f.get_tensor(key))


def load_pretrained(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Transformer:
    """Single-process convenience: config + model + weights, without a full random init first."""
    config = ModelConfig.from_pretrained(model_dir, **overrides)
    with torch.device("meta"):
        model = Transformer(config)
    model.to(dtype)
    materialize(model, device)
    load_hf_weights(model, model_dir, show_progress=False)
    return model


# ----------------------------------------------------------------------------------------------- export


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Put a finished temporary directory where `out_dir` is, replacing an old one.

    formats.atomic.publish_dir: the tree is fsynced, the old directory is moved aside before the rename and
    deleted after it, so a crash at any moment leaves the old complete directory or the new one.
    """
    publish_dir(tmp, out_dir)


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '10KiB' or a byte count -> bytes (decimal units as HF uses, binary for *iB)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r} (e.g. 5GB, 500MB, 1073741824)")
    unit = m.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]] if unit != "B" else 0
    return int(float(m.group(1)) * base**power)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` with the file mode a plain open() gives: safetensors creates its files
    0600, which makes a shared export unreadable to the rest of a team or a serving user."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, plain_file_mode())


def copy_tokenizer_files(src: str | Path, dst: str | Path, *, required: bool = False) -> list[str]:
    """Copy the tokenizer files (and chat template files) of `src` into `dst`, so an export loads with
    `AutoTokenizer` on its own; returns the names copied. `required`: no tokenizer file in `src` is an error."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)  # contents only: a read-only cache blob stays read-only there
            copied.append(name)
    if required and not copied:
        raise WeightsError(f"{src}: no tokenizer files found ({', '.join(TOKENIZER_FILES)})")
    return copied


def export_hf(
    model: nn.Module,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    name_map: NameMap | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write an HF checkpoint directory that `AutoModelForCausalLM.from_pretrained` loads.

    Works for the native `Transformer` and the HF backend's model (whose `to_checkpoint_tensors` writes fused
    tensors back in the checkpoint's layout). Under torch.distributed every rank must call this (parameters are
    gathered collectively); only rank 0 writes. `config.json` is the model's config with overrides applied; `generation_config.json` is copied
    from `source_dir` when present (else derived from the config); tokenizer files are copied from
    `tokenizer_dir` (default: `source_dir`). `dtype` casts on write (default: the parameters' dtype).
    `extra_files` (name -> text, e.g. the model card) are written inside the same atomic rename.
    The directory appears atomically: everything goes to a temporary sibling renamed at the end.
    """
    out_dir = Path(out_dir)
    rank = _rank()
    limit = parse_size(max_shard_size)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    if rank == 0:
        if out_dir.exists() and not overwrite:
            raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
        tmp.mkdir(parents=True)
    try:
        weight_map, total = _write_shards(model, tmp, limit, dtype, name_map, rank)
        if rank == 0:
            saved_dtype = dtype or next(model.parameters()).dtype
            _write_metadata(model.config, tmp, weight_map, total, saved_dtype, source_dir, tokenizer_dir)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
            replace_dir(tmp, out_dir)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out_dir


def _write_shards(
    model: nn.Module, tmp: Path, limit: int, dtype: torch.dtype | None, name_map: NameMap | None, rank: int
) -> tuple[dict[str, str], int]:
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    shard_names: list[list[str]] = []
    total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            write_safetensors(shard, tmp / f"part-{len(shard_names):05d}.safetensors", metadata={"format": "pt"})
            shard_names.append(list(shard))
        shard, shard_bytes = {}, 0

    # A model whose tensors are laid out differently from its checkpoint (the HF backend's fused MoE experts)
    # says how to write each one back.
    to_checkpoint = getattr(model, "to_checkpoint_tensors", None)
    with torch.no_grad():
        for key, param in _targets(model, name_map).items():
            full = param.full_tensor() if is_dtensor(param) else param  # collective on every rank
            if rank != 0:
                continue
            t = full.detach().to(device="cpu", dtype=dtype or full.dtype).contiguous().clone()
            for name, piece in to_checkpoint(key, t) if to_checkpoint is not None else [(key, t)]:
                if shard and shard_bytes + piece.nbytes > limit:
                    flush()
                shard[name] = piece
                shard_bytes += piece.nbytes
                total += piece.nbytes
        if rank == 0:
            flush()
    if rank != 0:
        return {}, 0
    weight_map: dict[str, str] = {}
    n = len(shard_names)
    for i, names in enumerate(shard_names):
        final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / f"part-{i:05d}.safetensors", tmp / final)
        weight_map.update(dict.fromkeys(names, final))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return weight_map, total


def _write_metadata(
    config: ModelConfig,
    tmp: Path,
    weight_map: dict[str, str],
    total: int,
    dtype: torch.dtype,
    source_dir: str | Path | None,
    tokenizer_dir: str | Path | None,
) -> None:
    hf = dict(config.hf_config)
    dtype_name = next((k for k, v in _DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))
    hf["dtype"] = dtype_name
    if "torch_dtype" in hf:
        hf["torch_dtype"] = dtype_name
    hf["num_hidden_layers"] = config.num_hidden_layers
    hf["tie_word_embeddings"] = config.tie_word_embeddings
    (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    gen_src = Path(source_dir) / "generation_config.json" if source_dir else None
    if gen_src is not None and gen_src.is_file():
        shutil.copy2(gen_src, tmp / "generation_config.json")
    else:
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")

    tok_dir = Path(tokenizer_dir) if tokenizer_dir else (Path(source_dir) if source_dir else None)
    copied = copy_tokenizer_files(tok_dir, tmp, required=bool(tokenizer_dir)) if tok_dir is not None else []
    log.info("exported %d tensors (%.1f MB) in %d file(s); tokenizer files: %s",
             len(weight_map), total / 1e6, len(set(weight_map.values())), copied or "none")
