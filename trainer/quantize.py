"""Quantized frozen bases (QLoRA and weight-only int): the frozen Linear weights of the decoder stored in 4 or 8
bits, adapters in fp32. `peft.weight_quantize_algo` takes PaddleNLP's values; the library per algorithm is the
one whose quantizer runs on CPU (the tests) and CUDA alike in this project's environment:

- nf4: torchao's `NF4Tensor` (QLoRA's 4-bit NormalFloat with double quantization: one absmax per block of
  `qlora_weight_blocksize` weights, those absmaxes themselves quantized to int8 per `double_quant_block_size`).
  Plain torch ops, and it implements FSDP2's all-gather extension (`fsdp_pre_all_gather`): FSDP2 shards and
  gathers the packed 4-bit data itself.
- fp4: bitsandbytes' `quantize_4bit(quant_type="fp4", compress_statistics=True)` (QLoRA's FP4 variant, block 64,
  double quantization of the absmaxes in groups of 256). torchao has no QLoRA-style FP4 (its MX / NVFP4 formats
  are other codes); bitsandbytes 0.50 quantizes and dequantizes 4-bit on CPU as well as CUDA.
- weight_only_int8: torchao's `Int8Tensor.from_hp(granularity=PerRow())` (torchao's int8 weight-only: one
  symmetric fp32 scale per output row).
- weight_only_int4: torchao's `IntxUnpackedToInt8Tensor.from_hp(target_dtype=torch.int4)`, symmetric, one scale
  per `weight_only_int4_group_size` weights of a row (torchao's group 128 by default; -1 = per row, PaddleNLP's
  per-channel weight_only_int4). torchao's packed int4 weight-only tensors need CUDA kernels (mslk / tinygemm)
  and its CPU int4 tensor keeps one int8 per value, so the two 4-bit values per byte are packed here (a nibble
  shift; no library does it for a plain tensor) and unpacked before torchao's own dequantization.

The fp4 / int8 / int4 library tensors cannot be sharded by FSDP2, so their parts (codes, scales, zero points) are
stored as one plain frozen uint8 parameter per weight, one row of bytes per output row (`QuantizedLinear`):
FSDP2 shards and all-gathers it along the rows as bytes (it never casts an integer parameter to the mixed
precision dtype, so the fp32 scales inside arrive intact), and the forward rebuilds the library's tensor and calls
its dequantization. FP4's whole-tensor statistics (absmax mean, the second-level scales) are small and replicated.

Flow, fitted into the trainer's meta build (see `trainer.loop.build_model`):
1. `quantize_frozen_base` (meta model, after freezing, before sharding) turns each eligible frozen Linear weight
   into a meta `NF4Tensor` (nf4) or replaces the Linear by a meta `QuantizedLinear` (the others); FSDP2 then
   shards it like any parameter and `materialize` gives each rank storage for its own shard only.
2. `load_hf_weights` streams the checkpoint tensor by tensor; for a quantized parameter it quantizes that one
   tensor on the parameter's device and keeps this rank's rows. One full-precision tensor exists at a time,
   never the whole model: quantizing the whole tensor (not only this rank's rows) is what makes the result
   independent of the world size, because NF4's and FP4's double quantization use statistics of all the
   tensor's block scales.

Eligible, on the native and the hf backend alike: every frozen `nn.Linear` weight inside the decoder layers
(fused MoE expert tensors are not Linear modules and stay as they are) whose shape divides the algorithm's unit
(nf4: size a multiple of blocksize x double_quant_block_size; fp4: rows a multiple of blocksize; int4: rows a
multiple of the group size; int8: all). Embeddings, the LM head, norms and biases stay in `model.frozen_dtype`;
tensors that do not divide are left unquantized and reported. The frozen base is never in a checkpoint: a resumed
run quantizes it again, to the same bits.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from trainer.config import PeftSection, QuantAlgo
from trainer.distributed import assign_full

log = logging.getLogger(__name__)

LIBRARY: dict[str, str] = {"nf4": "torchao", "fp4": "bitsandbytes", "weight_only_int8": "torchao",
                           "weight_only_int4": "torchao"}
# Beside an adapter trained on a quantized base (trainer.adapters.save_adapter): what `roundtrip` needs to rebuild
# that base from the checkpoint, so `trainer merge-adapter` can merge into it without the run's config.
BASE_RECORD = "quantized_base.json"
_RECORD_SIZES = ("qlora_weight_blocksize", "qlora_weight_double_quant_block_size", "weight_only_int4_group_size")
_RECORD_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class QuantReport:
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # eligible by kind, not by size
    dtype: torch.dtype = torch.float32  # the dtype of the values quantized


def _quiet_torchao() -> None:
    # torchao logs a warning for each CUDA kernel library it cannot load (every CPU-only machine): not news.
    logging.getLogger("torchao").setLevel(max(logging.getLogger("torchao").level, logging.ERROR))


def _nf4_class():
    _quiet_torchao()
    try:
        from torchao.quantization import NF4Tensor
    except ImportError as exc:  # pragma: no cover - torchao is a dependency
        raise ImportError("peft.weight_quantize_algo nf4 needs torchao (pip install torchao)") from exc
    return NF4Tensor


def _library(algo: str):
    """The library module an algorithm needs, or an ImportError saying what to install."""
    try:
        if LIBRARY[algo] == "bitsandbytes":
            import bitsandbytes.functional as lib
        else:
            _quiet_torchao()
            import torchao.quantization as lib
    except ImportError as exc:
        raise ImportError(f"peft.weight_quantize_algo {algo} needs {LIBRARY[algo]} (pip install {LIBRARY[algo]})"
                          ) from exc
    return lib


def is_quantized(t: torch.Tensor) -> bool:
    """True for an NF4 weight (or its FSDP2 local shard). `QuantizedLinear` weights are found by their module."""
    # By name: importing torchao for every loaded tensor of an unquantized run would cost seconds for nothing.
    return type(getattr(t, "_local_tensor", t)).__name__ == "NF4Tensor"


# ------------------------------------------------------------------- fp4 / int8 / int4: library tensors <-> rows


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized: the algorithm, its unit along a row, and the dtype of the values it holds."""

    algo: QuantAlgo
    group: int  # fp4: weights per absmax block; int4: weights per scale; int8: the row length (per-row scale)
    dtype: torch.dtype


def _quantize_parts(spec: QuantSpec, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The library's quantization of the whole 2-D `w`: (per-row parts, each [rows, k]; whole-tensor extras)."""
    lib = _library(spec.algo)
    w = w.to(spec.dtype).contiguous()
    rows, cols = w.shape
    if spec.algo == "fp4":
        packed, state = lib.quantize_4bit(w, blocksize=spec.group, compress_statistics=True, quant_type="fp4")
        parts = {"codes": packed.reshape(rows, cols // 2), "absmax": state.absmax.reshape(rows, cols // spec.group)}
        extras = {"code": state.code, "offset": state.offset.reshape(1), "absmax2": state.state2.absmax,
                  "code2": state.state2.code, "blocksize2": torch.tensor([state.state2.blocksize])}
        return parts, extras
    if spec.algo == "weight_only_int8":
        t = lib.Int8Tensor.from_hp(w, granularity=lib.PerRow())
        return {"qdata": t.qdata, "scale": t.scale, "zero_point": t.zero_point}, {}
    t = lib.IntxUnpackedToInt8Tensor.from_hp(w, block_size=(1, spec.group), target_dtype=torch.int4)
    return {"qdata": _pack_int4(t.qdata), "scale": t.scale, "zero_point": t.zero_point}, {}


def _dequantize_parts(spec: QuantSpec, parts: dict[str, torch.Tensor], extras: dict[str, torch.Tensor]
                      ) -> torch.Tensor:
    """The library's own dequantization of the tensor `_quantize_parts` described, in `spec.dtype`."""
    lib = _library(spec.algo)
    if spec.algo == "fp4":
        codes, absmax = parts["codes"], parts["absmax"]
        rows, cols = codes.shape[0], codes.shape[1] * 2
        state2 = lib.QuantState(absmax=extras["absmax2"], code=extras["code2"],
                                blocksize=int(extras["blocksize2"]), dtype=torch.float32)
        state = lib.QuantState(absmax=absmax.reshape(-1), shape=torch.Size((rows, cols)), code=extras["code"],
                               blocksize=spec.group, quant_type="fp4", dtype=spec.dtype,
                               offset=extras["offset"].reshape(()), state2=state2)
        return lib.dequantize_4bit(codes.reshape(-1, 1), state)
    if spec.algo == "weight_only_int8":
        qdata = parts["qdata"]
        return lib.Int8Tensor(qdata, parts["scale"], [1, qdata.shape[1]], spec.dtype,
                          zero_point=parts["zero_point"]).dequantize()
    qdata = _unpack_int4(parts["qdata"])
    return lib.IntxUnpackedToInt8Tensor(qdata=qdata, scale=parts["scale"], zero_point=parts["zero_point"],
                                    target_dtype=torch.int4, block_size=(1, spec.group),
                                    dtype=spec.dtype, activation_quantization=None
                                    ).dequantize()


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [rows, cols] -> two's-complement nibbles, two per byte: [rows, cols / 2] uint8."""
    u = q.to(torch.uint8) & 0xF
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack_int4`: the int8 values torchao's int4 tensor holds."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int8)
    return torch.where(nibbles > 7, nibbles - 16, nibbles)


@functools.lru_cache(maxsize=256)
def _row_layout(spec: QuantSpec, cols: int) -> tuple[tuple[str, torch.dtype, int], ...]:
    """(part, dtype, columns) in the order a stored row holds them, read off the library's own output for one row:
    the meta model needs the byte width before any weight is read."""
    parts, _ = _quantize_parts(spec, torch.linspace(-1, 1, cols).reshape(1, cols))
    return tuple((name, t.dtype, t.shape[1]) for name, t in parts.items())


def _to_rows(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.contiguous().view(torch.uint8) for t in parts.values()], dim=1)


def _from_rows(layout: tuple[tuple[str, torch.dtype, int], ...], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    parts, at = {}, 0
    for name, dtype, k in layout:
        width = k * dtype.itemsize
        parts[name] = rows[:, at:at + width].contiguous().view(dtype)
        at += width
    return parts


class _DequantLinear(torch.autograd.Function):
    """x W^T with W dequantized from its stored rows for the forward and again for the backward, so no
    full-precision copy of W is kept between them (what torchao's NF4 linear does too)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        ctx.module = module
        ctx.save_for_backward(rows)
        return x @ module.dequantize(rows).to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return grad @ ctx.module.dequantize(rows).to(grad.dtype), None, None


class QuantizedLinear(nn.Module):
    """A frozen Linear whose weight is stored as the library's quantized parts, one row of bytes per output row.

    `weight` is that uint8 [out_features, row bytes] parameter (so FSDP2 shards it by rows, and it keeps the
    checkpoint name `...weight`); `bias`, if any, stays as it was.
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = linear.in_features, linear.out_features, spec
        self.layout = _row_layout(spec, linear.in_features)
        width = sum(k * dtype.itemsize for _, dtype, k in self.layout)
        self.weight = nn.Parameter(torch.empty(linear.out_features, width, dtype=torch.uint8,
                                               device=linear.weight.device), requires_grad=False)
        self.bias = linear.bias
        self.extras: dict[str, torch.Tensor] = {}  # fp4's whole-tensor statistics, set when the weight is loaded

    @property
    def shape(self) -> torch.Size:
        """The shape of the full-precision weight it stands for (the checkpoint tensor's)."""
        return torch.Size((self.out_features, self.in_features))

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight's values (in `spec.dtype`) from its stored rows: the whole, gathered weight."""
        rows = self.weight if rows is None else rows
        if hasattr(rows, "full_tensor"):
            rows = rows.full_tensor()
        return _dequantize_parts(self.spec, _from_rows(self.layout, rows), self.extras)

    @torch.no_grad()
    def load(self, full: torch.Tensor) -> None:
        """Quantize one whole checkpoint tensor on this module's device and keep this rank's rows."""
        device = getattr(self.weight, "device", None)
        parts, extras = _quantize_parts(self.spec, full.to(device=device))
        assign_full(self.weight, _to_rows(parts))
        self.extras = extras

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # what autocast does to F.linear
            x = x.to(torch.get_autocast_dtype(x.device.type))
        out = _DequantLinear.apply(x, self.weight, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, algo={self.spec.algo}"


def _spec(cfg: PeftSection, cols: int, dtype: torch.dtype) -> QuantSpec | None:
    """The spec for a Linear with `cols` inputs, or None when its rows do not divide the algorithm's unit."""
    algo = cfg.weight_quantize_algo
    if algo == "weight_only_int8":
        return QuantSpec(algo, cols, dtype)
    group = cfg.qlora_weight_blocksize if algo == "fp4" else cfg.weight_only_int4_group_size
    group = cols if group == -1 else group
    if cols % group or cols % 2:
        return None
    return QuantSpec(algo, group, dtype)


def quantize_frozen_base(model: nn.Module, cfg: PeftSection, dtype: torch.dtype) -> QuantReport:
    """Quantize the eligible frozen Linear weights of the (meta) model, to hold `dtype` values.

    Call after `setup_peft` and `store_frozen_in`, before sharding (the native `Transformer` or the hf backend's
    `HFCausalLM`). NF4 under torch.distributed: a quantized tensor must split evenly into whole
    double-quantization blocks per rank; otherwise this raises, naming it. The report is kept as
    `model.quant_report` (the export merges into the dequantized base it names).
    """
    report = QuantReport(dtype=dtype)
    algo = cfg.weight_quantize_algo
    if algo is None:
        return report
    if algo == "nf4":
        _quantize_nf4(model, cfg, dtype, report)
    else:
        _library(algo)
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or ".layers." not in f".{name}" or module.weight.requires_grad:
                continue
            key = name.replace(".base_layer", "")
            spec = _spec(cfg, module.in_features, dtype)
            if spec is None:
                report.skipped.append(key)
                continue
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, QuantizedLinear(module, spec))
            report.quantized.append(key)
    if report.skipped:
        log.warning("weight_quantize_algo %s: %d frozen Linear weights left in %s (shape does not divide its "
                    "block or group): %s", algo, len(report.skipped), str(dtype).removeprefix("torch."),
                    ", ".join(report.skipped[:6]) + (" ..." if len(report.skipped) > 6 else ""))
    log.info("weight_quantize_algo %s (%s): %d Linear weights quantized", algo, LIBRARY[algo], len(report.quantized))
    model.quant_report = report
    return report


def _quantize_nf4(model: nn.Module, cfg: PeftSection, dtype: torch.dtype, report: QuantReport) -> None:
    nf4 = _nf4_class()
    block, scaler_block = cfg.qlora_weight_blocksize, cfg.qlora_weight_double_quant_block_size
    unit = block * scaler_block
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".layers." not in f".{name}" or module.weight.requires_grad:
            continue
        key = name.replace(".base_layer", "")
        weight = module.weight
        if weight.numel() % unit:
            report.skipped.append(key)
            continue
        rows = weight.shape[0]
        if world > 1 and (rows % world or (weight.numel() // world) % unit):
            raise ValueError(f"peft.weight_quantize_algo: {key} ({tuple(weight.shape)}) does not split into whole "
                             f"blocks of {unit} weights over {world} ranks; lower qlora_weight_double_quant_block_size")
        with torch.no_grad():
            q = nf4.from_tensor(weight.detach().to(dtype), block, scaler_block)
        module.weight = nn.Parameter(q, requires_grad=False)
        report.quantized.append(key)


def quantized_owners(model: nn.Module) -> dict[int, QuantizedLinear]:
    """id(weight parameter) -> its `QuantizedLinear`, for the loaders (call once the parameters are final)."""
    return {id(m.weight): m for m in model.modules() if isinstance(m, QuantizedLinear)}


def stored_bytes(model: nn.Module) -> tuple[int, int]:
    """(weights, bytes) of the quantized base on this rank: what the quantization saves, per weight."""
    numel = stored = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            numel += m.in_features * m.out_features
            stored += m.weight.numel() + sum(t.numel() * t.element_size() for t in m.extras.values())
    for p in model.parameters():
        if is_quantized(p):
            numel += p.numel()
            stored += sum(t.numel() * t.element_size() for t in (p.quantized_data, p.quantized_scalers,
                                                                 p.quantization_factor))
    return numel, stored


def roundtrip(cfg: PeftSection, full: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values the trainer's quantized base holds for checkpoint tensor `full` (quantized as `dtype`),
    in `full`'s dtype: what an export merges the adapter into."""
    algo = cfg.weight_quantize_algo
    if algo == "nf4":
        q = _nf4_class().from_tensor(full.to(dtype).contiguous(), cfg.qlora_weight_blocksize,
                                     cfg.qlora_weight_double_quant_block_size)
        return q.get_original_weight().to(full.dtype)
    spec = _spec(cfg, full.shape[1], dtype)
    if spec is None:
        raise ValueError(f"weight_quantize_algo {algo}: a {tuple(full.shape)} tensor is not quantized")
    return _dequantize_parts(spec, *_quantize_parts(spec, full)).to(full.dtype)


def base_record(model: nn.Module, cfg: PeftSection) -> dict[str, Any] | None:
    """The quantized base this model trains on, as `BASE_RECORD` holds it (the algorithm, its block / group
    sizes, the dtype of the values quantized, the checkpoint keys quantized); None when it quantized nothing."""
    report = getattr(model, "quant_report", None)
    if report is None or not report.quantized:
        return None
    return {"weight_quantize_algo": cfg.weight_quantize_algo, "library": LIBRARY[cfg.weight_quantize_algo],
            **{k: getattr(cfg, k) for k in _RECORD_SIZES}, "dtype": str(report.dtype).removeprefix("torch."),
            "quantized": sorted(f"{k.removeprefix('hf_model.')}.weight" for k in report.quantized)}


def recorded_base(record: dict[str, Any], where: str) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """For `merge_lora(base_values=...)`: checkpoint key, tensor -> the values the recorded quantized base holds
    (the tensor itself for those it left unquantized). `where` names the record in errors."""
    algo = record.get("weight_quantize_algo")
    if algo not in get_args(QuantAlgo):
        raise ValueError(f"{where}: weight_quantize_algo {algo!r} is not one of {', '.join(get_args(QuantAlgo))}")
    sizes = {k: record.get(k) for k in _RECORD_SIZES}
    bad = [k for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1)]
    if bad:
        raise ValueError(f"{where}: {bad[0]} = {sizes[bad[0]]!r} is not a block / group size")
    if record.get("dtype") not in _RECORD_DTYPES:
        raise ValueError(f"{where}: dtype {record.get('dtype')!r} is not one of {', '.join(_RECORD_DTYPES)}")
    keys = record.get("quantized")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{where}: quantized must be the list of checkpoint keys the run quantized")
    cfg = PeftSection(pet_type="lora", weight_quantize_algo=algo, **sizes)
    dtype, keys = getattr(torch, record["dtype"]), set(keys)

    def values(key: str, tensor: torch.Tensor) -> torch.Tensor:
        return roundtrip(cfg, tensor, dtype) if key in keys else tensor

    return values


def read_base_record(path: str | Path) -> dict[str, Any]:
    """A `BASE_RECORD` file's object (`recorded_base` checks its fields); ValueError naming the file."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return record


def dequantized_base(model: nn.Module, cfg: PeftSection) -> Callable[[str, torch.Tensor], torch.Tensor] | None:
    """`recorded_base` of this model's own quantized base; None when the run quantized nothing."""
    record = base_record(model, cfg)
    return None if record is None else recorded_base(record, "the run's quantized base")


@torch.no_grad()
def quantize_like(target: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` quantized exactly as the NF4 `target` is laid out (same dtype, block sizes, device)."""
    return _nf4_class().from_tensor(full.to(device=target.device, dtype=target.dtype).contiguous(),
                                    target.block_size, target.scaler_block_size)


@torch.no_grad()
def load_quantized(param: torch.Tensor, full: torch.Tensor) -> None:
    """Quantize one checkpoint tensor into an NF4 parameter, keeping only this rank's rows under FSDP2.

    The inner tensors of the (possibly sharded) NF4 parameter are written in place, so FSDP2's references to
    them stay valid; the scale mean and the code table, which FSDP2 does not shard, are set on the object.
    """
    local = getattr(param, "_local_tensor", param)
    whole = quantize_like(local, full)
    if local is not param:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
        if shape[0] == 0:
            return
        chunks = torch.split(whole, shape[0], dim=0)  # splits the 4-bit data and its scales by rows
        whole = chunks[offset[0] // shape[0]]
    for attr in ("quantized_data", "quantized_scalers", "quantization_factor"):
        getattr(local, attr).copy_(getattr(whole, attr))
    local.scaler_mean = whole.scaler_mean
    local.nf4 = whole.nf4


def dequantized(param: torch.Tensor) -> torch.Tensor:
    """The full-precision values an NF4 parameter stands for (gathered under FSDP2: a collective)."""
    full = param.full_tensor() if hasattr(param, "full_tensor") else param
    return full.get_original_weight()
