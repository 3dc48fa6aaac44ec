"""A second model backend: any `transformers` causal LM, built on the meta device and trained like ours.

`model.backend: auto|native|hf`. `auto` keeps the native decoder (`trainer.model`) for the families it covers
(llama, mistral, qwen2, qwen3) and uses this backend for every other `AutoModelForCausalLM` config (Gemma 2/3,
Phi-3/4, Qwen2/3-MoE, Mixtral, OLMo, GLM, ...). Remote code is never run (`trust_remote_code=False`).

How it fits the trainer:
- `HFCausalLM` is the root module. It registers the HF model's body (`model.`) and head (`lm_head`) as its own
  children, so parameter names are the checkpoint's, LoRA surgery and FSDP2 work as on the native model, and
  the loss is computed inside the root's forward (the chunked loss reads the unsharded head; see trainer.loss).
- Packed rows: transformers builds the attention mask from `position_ids` when no attention mask is given
  (`masking_utils.find_packed_sequence_indices`: a new document starts wherever the position does not grow by
  one), for sdpa, eager and flex attention and for sliding-window layers alike, and flash-attention-2 reads the
  same restarts as varlen boundaries. Our rows restart `position_ids` at every document, so no token attends
  across documents (tested: each document's logits in a packed row equal the document alone).
- Weights: the checkpoint is streamed per tensor into each rank's FSDP2 shard, as `trainer.weights` does. Models
  whose in-memory layout differs from the checkpoint's (transformers 5 fuses MoE experts into 3-D
  `experts.gate_up_proj` / `experts.down_proj`) get transformers' own conversion rules applied (renamings, and
  `MergeModulelist` + `Concatenate` of per-expert tensors); one fused tensor is built at a time. Export writes
  the checkpoint's layout back (per-expert tensors), so other tools read it as they read the base.
- Non-persistent buffers (rotary frequencies, Gemma's embedding scale) have no values on the meta device; after
  materialising, they are computed by the model's own `_init_weights`, as `from_pretrained` does.

MoE and LoRA: `peft.target_modules` matches `nn.Linear` modules only (attention projections, dense MLPs, shared
experts). Fused expert weights are 3-D parameters of an experts module, not Linear layers, so a target regex
never adapts them: experts stay frozen under LoRA unless `peft.freeze_exclude` names them (e.g.
`'*.experts.*'`), which trains them in full (exported as PEFT `modules_to_save`). The router's auxiliary
load-balancing loss is not added (transformers adds it only with `output_router_logits`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from trainer.distributed import assign_full
from trainer.loss import LossConfig, head_loss
from trainer.model_config import SUPPORTED_MODEL_TYPES, ModelConfig, read_config_json
from trainer.quantize import quantized_owners
from trainer.weights import (
    LoadReport,
    NameMap,
    WeightsError,
    _load_one,
    _targets,
    check_checkpoint_keys,
    checkpoint_index,
)

log = logging.getLogger(__name__)
_ANY_LAYER_RE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.")  # a decoder layer under any model prefix

Backend = Literal["auto", "native", "hf"]
# auto: transformers picks (sdpa where the model supports it, else eager).
_ATTN_IMPL: dict[str, str | None] = {"auto": None, "sdpa": "sdpa", "flex": "flex_attention", "varlen": "flash_attention_2"}


def resolve_backend(requested: str, model_dir: str | Path) -> Literal["native", "hf"]:
    """`auto` -> native for the families `trainer.model` implements, hf for every other model_type."""
    if requested in ("native", "hf"):
        return requested  # type: ignore[return-value]
    if requested != "auto":
        raise ValueError(f"model.backend must be auto, native or hf, got {requested!r}")
    model_type = read_config_json(model_dir).get("model_type")
    return "native" if model_type in SUPPORTED_MODEL_TYPES else "hf"


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is an optional dependency of the trainer
        raise ImportError("model.backend hf needs the `transformers` package (pip install transformers)") from None
    return transformers


def load_hf_config(model_dir: str | Path, overrides: dict[str, Any] | None = None):
    """The checkpoint's transformers config with `model.overrides` applied (layer_types trimmed to the depth)."""
    transformers = _transformers()
    overrides = dict(overrides or {})
    raw = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    layers = overrides.get("num_hidden_layers")
    if layers is not None and isinstance(raw.get("layer_types"), list) and "layer_types" not in overrides:
        overrides["layer_types"] = raw["layer_types"][: int(layers)]
    return transformers.AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False, **overrides)


def describe(hf_config, tied: bool, attn_backend: str) -> ModelConfig:
    """A ModelConfig with the generic fields the trainer reads (sizes for FLOPs and logs, tying, the raw dict
    written on export); the native-only switches keep their defaults and are never used by this backend."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    raw = json.loads(hf_config.to_json_string(use_diff=False))
    return ModelConfig(
        vocab_size=int(text.vocab_size),
        hidden_size=hidden,
        intermediate_size=int(getattr(text, "intermediate_size", 0) or 0),
        num_hidden_layers=int(text.num_hidden_layers),
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
        model_type=str(hf_config.model_type),
        tie_word_embeddings=tied,
        attn_backend=attn_backend if attn_backend in ("auto", "sdpa", "flex", "varlen") else "auto",
        hf_config=raw,
    )


def _loss_config(hf_config) -> LossConfig:
    """The head's post-processing that transformers' CausalLM forwards apply to the logits."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    scale = 1.0
    if getattr(text, "logit_scale", None) is not None:  # Cohere
        scale *= float(text.logit_scale)
    if getattr(text, "logits_scaling", None) not in (None, 1.0):  # Granite divides
        scale /= float(text.logits_scaling)
    return LossConfig(softcap=getattr(text, "final_logit_softcapping", None), logit_scale=scale)


@dataclass
class _Fused:
    """A model tensor built from several checkpoint tensors: stack each source's experts, then concatenate."""

    sources: list[list[str]]  # per source pattern: checkpoint keys in expert order
    stack_dim: int | None
    cat_dim: int | None


@dataclass
class Layout:
    """How model tensors map to checkpoint tensors (renamed or fused); identity for everything not listed."""

    renamed: dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key
    fused: dict[str, _Fused] = field(default_factory=dict)  # model key -> its sources


class HFCausalLM(nn.Module):
    """Root module around a transformers `XxxForCausalLM`: same parameter names, loss in forward."""

    is_hf_backend = True

    def __init__(self, hf_model: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.loss_config = _loss_config(hf_model.config)
        self._hf = [hf_model]  # a list, so the wrapper does not register it (and its names stay the checkpoint's)
        self.body_name = hf_model.base_model_prefix
        head = hf_model.get_output_embeddings()
        self.head_name = next(n for n, m in hf_model.named_children() if m is head)
        self.add_module(self.body_name, getattr(hf_model, self.body_name))
        self.add_module(self.head_name, head)
        self.layout = Layout()
        self.tie_weights()

    @property
    def hf_model(self) -> nn.Module:
        return self._hf[0]

    @property
    def body(self) -> nn.Module:
        return getattr(self, self.body_name)

    @property
    def head(self) -> nn.Module:
        return getattr(self, self.head_name)

    def tie_weights(self) -> None:
        """Share the input embedding with the head when the checkpoint ties them (again after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.head.weight = self.hf_model.get_input_embeddings().weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V], or the summed loss given pre-shifted `labels` (as `trainer.model.Transformer`)."""
        b, t = input_ids.shape
        if position_ids is None:
            if cu_seqlens is not None:
                from trainer.model import positions_from_cu_seqlens

                position_ids = positions_from_cu_seqlens(cu_seqlens, b, t)
            else:
                position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        out = self.body(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if labels is not None:
            return head_loss(hidden, self.head, labels, self.loss_config)
        return self._logits(hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        cfg = self.loss_config
        if cfg.logit_scale != 1.0:
            logits = logits * cfg.logit_scale
        if cfg.softcap is not None:
            logits = torch.tanh(logits / cfg.softcap) * cfg.softcap
        return logits

    # ---- generation: the interface trainer.generate drives (as trainer.model.Transformer's) ----

    def new_cache(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> HFGenerationCache:
        return HFGenerationCache(self.hf_model.config, batch, max_len, device)

    def forward_cached(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: HFGenerationCache,
                       logit_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for the next tokens given the cache (transformers' own cache and masking: sliding windows,
        softcapping and per-family quirks stay transformers'); `logit_index` [B] keeps one position per row."""
        out = self.body(input_ids=input_ids, position_ids=positions, attention_mask=cache.attention_mask(),
                        past_key_values=cache.past, use_cache=True)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if logit_index is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), logit_index][:, None]
        return self._logits(hidden)

    def to_checkpoint_tensors(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Export hook of `trainer.weights.export_hf`: this model tensor in the checkpoint's layout."""
        return to_checkpoint_tensors(self, key, tensor)


def build_meta_model(model_dir: str | Path, overrides: dict[str, Any] | None = None,
                     attn_backend: str = "auto") -> HFCausalLM:
    """The transformers model of `model_dir`'s config on the meta device (no memory, no init cost)."""
    transformers = _transformers()
    if attn_backend not in _ATTN_IMPL:
        raise ValueError(f"model.attn_backend must be one of {', '.join(_ATTN_IMPL)}, got {attn_backend!r}")
    hf_config = load_hf_config(model_dir, overrides)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(
            hf_config, trust_remote_code=False, attn_implementation=_ATTN_IMPL[attn_backend], dtype=torch.float32
        )
    head, embed = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    if head is None or embed is None:
        raise ValueError(f"{model_dir}: {type(hf_model).__name__} has no input embedding / LM head to train")
    tied = head.weight is embed.weight
    return HFCausalLM(hf_model, describe(hf_config, tied, attn_backend))


def decoder_blocks(model: HFCausalLM) -> list[nn.Module]:
    """The decoder layers, the unit FSDP2 shards: modules of the classes transformers never splits
    (`_no_split_modules`), else the longest ModuleList of the body."""
    names = set(getattr(model.hf_model, "_no_split_modules", None) or [])
    blocks = [m for m in model.body.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.body.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model.hf_model).__name__}: found no decoder layers to shard")
    return list(max(lists, key=len))


def materialize(model: HFCausalLM, device: str | torch.device) -> None:
    """Real storage for every parameter and buffer, then the buffers' values from the model's own init."""
    model.to_empty(device=device)
    model.tie_weights()
    hf = model.hf_model
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "_non_persistent_buffers_set", None):
                hf._init_weights(module)


def enable_activation_checkpointing(model: HFCausalLM) -> None:
    """transformers' own per-layer checkpointing (non-reentrant, so it composes with FSDP2 and frozen inputs)."""
    model.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ------------------------------------------------------------------------------------------------ layout


def _conversions(model: HFCausalLM) -> list:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # pragma: no cover - transformers 4.x stores checkpoints in the model's own layout
        return []
    return get_model_conversion_mapping(model.hf_model, add_legacy=False)


def _pattern_regex(pattern: str) -> re.Pattern:
    """transformers' glob-ish source pattern (`mlp.experts.*.gate_proj.weight`) -> regex with (prefix, expert)."""
    body = re.escape(pattern.lstrip(".")).replace(r"\*", r"(\d+)")
    return re.compile(r"^(.*?\.)?" + body + r"$")


def plan_layout(model: HFCausalLM, checkpoint_keys: list[str]) -> Layout:
    """Match checkpoint keys to model keys with transformers' conversion rules for this model."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming

    layout = Layout()
    renamings, converters = [], []
    for rule in _conversions(model):
        if isinstance(rule, WeightRenaming):
            renamings.append((re.compile(rule._original_source_patterns[0]), rule._original_target_patterns[0]))
        elif isinstance(rule, WeightConverter):
            converters.append(rule)
    renamed_of: dict[str, str] = {}
    for key in checkpoint_keys:
        new = key
        for regex, target in renamings:
            new = regex.sub(target, new)
        renamed_of[key] = new
    claimed: set[str] = set()
    for rule in converters:
        ops = list(rule.operations)
        kinds = [type(op) for op in ops]
        if kinds not in ([MergeModulelist], [MergeModulelist, Concatenate]):
            continue  # checked below: its targets then show up as missing, with their names
        sources = [_pattern_regex(p) for p in rule._original_source_patterns]
        target = rule._original_target_patterns[0].lstrip(".")
        groups: dict[str, list[dict[int, str]]] = {}
        for key, new in renamed_of.items():
            for i, regex in enumerate(sources):
                m = regex.match(new)
                if m:
                    prefix = m.group(1) or ""
                    groups.setdefault(prefix + target, [{} for _ in sources])[i][int(m.group(2))] = key
                    claimed.add(key)
                    break
        for model_key, per_source in groups.items():
            lists = [[d[e] for e in sorted(d)] for d in per_source]
            layout.fused[model_key] = _Fused(lists, ops[0].dim, ops[1].dim if len(ops) > 1 else None)
    for key, new in renamed_of.items():
        if key not in claimed and new != key:
            layout.renamed[new] = key
    return layout


def _fused_tensor(spec: _Fused, files: dict[str, Path], handles: dict[Path, Any]) -> torch.Tensor:
    def get(key: str) -> torch.Tensor:
        path = files[key]
        if path not in handles:
            handles[path] = safe_open(path, framework="pt", device="cpu")
        return handles[path].get_tensor(key)

    parts = [torch.stack([get(k) for k in keys], dim=spec.stack_dim or 0) for keys in spec.sources]
    return torch.cat(parts, dim=spec.cat_dim) if spec.cat_dim is not None else parts[0]


@torch.no_grad()
def load_weights(model: HFCausalLM, model_dir: str | Path, *, strict: bool = True, name_map: NameMap | None = None,
                 show_progress: bool = True) -> LoadReport:
    """Stream the checkpoint into the (possibly FSDP-sharded) parameters; fused tensors one at a time."""
    model_dir = Path(model_dir)
    files = checkpoint_index(model_dir)
    targets = _targets(model, name_map)
    layout = plan_layout(model, list(files))
    model.layout = layout
    source_of = {k: layout.renamed.get(k, k) for k in targets if k not in layout.fused}
    fused_sources = {k for spec in layout.fused.values() for keys in spec.sources for k in keys}
    n_layers = model.config.num_hidden_layers
    report = check_checkpoint_keys(
        model_dir, files, used=set(source_of.values()) | fused_sources,
        missing=[k for k, src in source_of.items() if src not in files], n_layers=n_layers,
        tied_head=f"{model.head_name}.weight" if model.config.tie_word_embeddings else None,
        layer_re=_ANY_LAYER_RE, strict=strict, what=f"the {type(model.hf_model).__name__} model")

    by_file: dict[Path, list[str]] = {}
    for key, src in source_of.items():
        if src in files:
            by_file.setdefault(files[src], []).append(key)
    owners = quantized_owners(model)
    for path in tqdm(sorted(by_file), desc="loading weights", unit="file", disable=not show_progress):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in by_file[path]:
                _load_one(f, source_of[key], targets[key], path, owners.get(id(targets[key])))
                report.loaded += 1
        report.files.append(path.name)
    handles: dict[Path, Any] = {}
    for key, spec in layout.fused.items():
        if key not in targets:
            continue
        full = _fused_tensor(spec, files, handles)
        if tuple(full.shape) != tuple(targets[key].shape):
            raise WeightsError(f"{model_dir}: fused tensor {key} has shape {tuple(full.shape)}, the model expects "
                               f"{tuple(targets[key].shape)}")
        assign_full(targets[key], full)
        report.loaded += 1
    if report.skipped:
        log.info("%s: skipped checkpoint tensors %s", model_dir, report.skipped)
    return report


def to_checkpoint_tensors(model: HFCausalLM, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A model tensor as the checkpoint stores it: its original name, or split back into per-expert tensors."""
    spec = model.layout.fused.get(key)
    if spec is None:
        return [(model.layout.renamed.get(key, key), tensor)]
    parts = tensor.chunk(len(spec.sources), dim=spec.cat_dim) if spec.cat_dim is not None else (tensor,)
    out = []
    for keys, part in zip(spec.sources, parts, strict=True):
        for name, piece in zip(keys, part.unbind(spec.stack_dim or 0), strict=True):
            out.append((name, piece.contiguous()))
    return out


class HFGenerationCache:
    """The decode state of an `HFCausalLM`: transformers' DynamicCache (built from the model config, so sliding
    and full layers are handled as transformers handles them) plus which cache slots hold real tokens, so a batch
    may be padded: padded prompt slots are masked out of every later attention, as `generate` does."""

    def __init__(self, hf_config: Any, batch: int, max_len: int, device: torch.device | str) -> None:
        from transformers import DynamicCache

        self.past = DynamicCache(config=hf_config)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.max_len = max_len

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """The next T tokens of every row (`valid` [B, T]: False for padding)."""
        t = positions.shape[1]
        if self.valid.shape[1] + t > self.max_len:
            raise ValueError(f"KV cache full: {self.valid.shape[1]} + {t} tokens > {self.max_len} slots")
        step = valid if valid is not None else torch.ones_like(positions, dtype=torch.bool)
        self.valid = torch.cat([self.valid, step.to(self.valid.device, torch.bool)], dim=1)

    def attention_mask(self) -> torch.Tensor:
        return self.valid.long()


def load_pretrained(model_dir: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> HFCausalLM:
    """Single-process load (generation, tests): meta build, materialise, stream the weights in."""
    model = build_meta_model(model_dir)
    model.to(dtype)
    materialize(model, device)
    load_weights(model, model_dir, show_progress=False)
    return model


def is_hf_backend(model: nn.Module) -> bool:
    return bool(getattr(model, "is_hf_backend", False))


__all__ = [
    "HFCausalLM",
    "HFGenerationCache",
    "Layout",
    "build_meta_model",
    "decoder_blocks",
    "is_hf_backend",
    "load_pretrained",
    "load_weights",
    "materialize",
    "plan_layout",
    "resolve_backend",
    "to_checkpoint_tensors",
]
