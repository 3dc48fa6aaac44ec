"""LoRA by module surgery: wrap the targeted `nn.Linear` / `nn.Embedding` children, freeze the base, init adapters.

The model code never learns about LoRA: `apply_lora` swaps children for wrappers that hold the original module
as `base_layer` next to the adapters, on the meta-device model before FSDP2 shards it, so FSDP sees the adapters
as ordinary (trainable) parameters of the block and the frozen base weights cost no gradient or optimizer state.
Parameter names follow PEFT's (`q_proj.base_layer.weight`, `q_proj.lora_A`, ...) so the mapping to a PEFT adapter
file (`...q_proj.lora_A.weight`) and back to the HF checkpoint (`...q_proj.weight`) is a string rewrite.

Precision: every parameter, base and adapter, is stored in fp32 (the trainer keeps fp32 master weights). With
bf16 compute the adapter matmuls run in bf16 like the base ones: under FSDP2 the MixedPrecisionPolicy casts a
block's parameters, adapters included, to bf16 for compute and reduces gradients in fp32; in one process the
forward runs under autocast, to the same effect. The optimizer always updates the fp32 adapters. DoRA's weight
norm is computed in fp32 with autocast off, since a bf16 row norm of W + sBA would swamp the small update.

Init is deterministic in `train.seed` and the module name (not in the world size): every adapter is generated
whole on the CPU and each rank keeps its own rows, so 1 and N processes start from identical adapters.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import PeftSection
from trainer.peft_methods import (
    ADAPTER_MODULES,
    LokrLinear,
    MoraLinear,
    VeraLinear,
    adapter_generator,
    init_vera_lokr,
)
from trainer.peft_targets import (  # noqa: F401 - translate_targets re-exported
    pattern_value,
    target_matcher,
    translate_targets,
    translated_patterns,
)
from trainer.quantize import QuantizedLinear

log = logging.getLogger(__name__)

ADAPTER_MARK = ".lora_"
# Every adapter parameter's name holds one of these (LoRA, VeRA, LoKr, LoReFT's `layers.N.reft.` interventions,
# prefix tuning's `layers.N.prefix.` keys / values); anything else is a base parameter.
ADAPTER_MARKS = (ADAPTER_MARK, ".vera_", ".lokr_", ".reft.", ".prefix.")


def is_adapter_param(name: str) -> bool:
    return any(mark in name for mark in ADAPTER_MARKS)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoraLinear(nn.Module):
    """y = base(x) + B A dropout(x) * scaling; with DoRA the result is rescaled per output row by m / ||W + s B A||.

    MoSLoRA (`mixer`, Wu et al. 2024): a trainable r x r mixer M between the two, y = base(x) + s B M A x, which
    fuses the r rank-one subspaces of plain LoRA. B (M A) is again a rank-r LoRA, so the export folds M into A.
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float, use_dora: bool,
                 mixer: bool = False) -> None:
        super().__init__()
        self.base_layer = base
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **kw))
        self.lora_magnitude_vector = nn.Parameter(torch.empty(base.out_features, **kw)) if use_dora else None
        self.lora_AB = nn.Parameter(torch.empty(rank, rank, **kw)) if mixer else None  # PaddleNLP's name
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.scaling = rank, scaling
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        a, b = self.lora_A, self.lora_B
        xd = self.lora_dropout(x).to(a.dtype)
        h = F.linear(xd, a)
        if self.lora_AB is not None:
            h = F.linear(h, self.lora_AB)
        lora = F.linear(h, b) * self.scaling
        if self.lora_magnitude_vector is None:
            return result + lora.to(result.dtype)
        weight = self.base_layer.weight
        # DoRA paper, section 4.3: the norm is treated as a constant (no gradient through it).
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            norm = torch.linalg.norm(weight.float() + self.scaling * (b.float() @ a.float()), dim=1)
        scale = (self.lora_magnitude_vector.float() / norm).to(lora.dtype)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_out = (result - bias if bias is not None else result).to(lora.dtype)
        else:  # PEFT applies the dropped-out input to the base branch of the DoRA term as well
            base_out = F.linear(xd, weight.to(a.dtype))
        return result + ((scale - 1) * base_out + scale * lora).to(result.dtype)


class LoraEmbedding(nn.Module):
    """y = base(x) + (A^T[x] B^T) * scaling, PEFT's embedding LoRA (A: [r, vocab], B: [dim, r], no dropout)."""

    def __init__(self, base: nn.Embedding, rank: int, scaling: float) -> None:
        super().__init__()
        self.base_layer = base
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_embedding_A = nn.Parameter(torch.empty(rank, base.num_embeddings, **kw))
        self.lora_embedding_B = nn.Parameter(torch.empty(base.embedding_dim, rank, **kw))
        self.lora_magnitude_vector = None
        self.rank, self.scaling = rank, scaling

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        after_a = F.embedding(x, self.lora_embedding_A.t())
        return result + ((after_a @ self.lora_embedding_B.t()) * self.scaling).to(result.dtype)


LORA_MODULES = (LoraLinear, LoraEmbedding, *ADAPTER_MODULES)  # every adapter wrapper


@dataclass
class LoraReport:
    targets: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)


def base_name(name: str) -> str:
    """A wrapped parameter's name as the HF checkpoint spells it (`q_proj.base_layer.weight` -> `q_proj.weight`)."""
    return name.replace(".base_layer.", ".")


def checkpoint_name_map(name: str) -> str | None:
    """`load_hf_weights` name_map: adapters do not come from the checkpoint, wrapped bases do under their HF key."""
    return None if is_adapter_param(name) else base_name(name)


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from trainer.weights import hf_name

    return [(hf_name(n), m) for n, m in model.named_modules() if isinstance(m, LORA_MODULES)]


def apply_lora(model: nn.Module, cfg: PeftSection) -> list[str]:
    """Replace every targeted Linear/Embedding with its adapter wrapper (LoRA, VeRA or LoKr as pet_type says);
    returns the wrapped module names."""
    from trainer.weights import hf_name

    matches, reading = target_matcher(cfg.target_modules)
    rank_pattern, alpha_pattern = translated_patterns(cfg.rank_pattern), translated_patterns(cfg.alpha_pattern)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    wrapped = []
    for name, module in candidates:
        key = hf_name(name)
        if not matches(key, isinstance(module, nn.Linear)):
            continue
        rank = int(pattern_value(rank_pattern, key, cfg.lora_rank))
        scaling = lora_scaling(pattern_value(alpha_pattern, key, cfg.lora_alpha), rank, cfg.use_rslora)
        if cfg.pet_type in ("vera", "lokr"):
            if not isinstance(module, nn.Linear) or (key == "lm_head" and tied):
                raise ValueError(f"peft.target_modules: {cfg.pet_type} adapts untied Linear modules only ({key}); "
                                 "narrow target_modules")
            wrapper: nn.Module = (VeraLinear(module, cfg.vera_rank, cfg.lora_dropout) if cfg.pet_type == "vera"
                                  else LokrLinear(module, cfg.lokr_rank, cfg.lokr_alpha, cfg.lokr_decompose_factor))
        elif isinstance(module, nn.Embedding):
            if cfg.lora_use_mixer or cfg.use_mora:
                raise ValueError(f"peft.lora_use_mixer: MoSLoRA on embeddings is not supported ({key}); narrow "
                                 "target_modules")
            if cfg.use_dora:
                raise ValueError(f"peft.use_dora: DoRA on embeddings is not supported ({key}); narrow target_modules")
            if cfg.pissa:
                raise ValueError(f"peft.pissa: PiSSA on embeddings is not supported ({key}); narrow target_modules")
            wrapper = LoraEmbedding(module, rank, scaling)
        else:
            if key == "lm_head" and tied:
                raise ValueError("peft.target_modules matches lm_head, but it is tied to embed_tokens in this "
                                 "checkpoint; target embed_tokens instead")
            if cfg.use_mora:
                wrapper = MoraLinear(module, cfg.lora_rank, cfg.lora_dropout, cfg.mora_type)
            else:
                wrapper = LoraLinear(module, rank, scaling, cfg.lora_dropout, cfg.use_dora,
                                     cfg.lora_use_mixer)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
        wrapped.append(key)
    if not wrapped:
        examples = ", ".join(hf_name(n) for n, _ in candidates[:6])
        raise ValueError(f"peft.target_modules {cfg.target_modules!r} (read as {reading}) matches no Linear or "
                         f"Embedding module (names look like: {examples}, ...)")
    return wrapped


def apply_freeze(model: nn.Module, cfg: PeftSection) -> None:
    """Set requires_grad: LoRA freezes every base parameter; freeze_include adds, freeze_exclude (wins) removes."""
    lora = cfg.pet_type is not None
    matched_include: set[str] = set()
    matched_exclude: set[str] = set()
    # modules_to_save (PEFT's name) are freeze_exclude globs over the named modules' parameters.
    saved = {f"{m}.*": m for m in cfg.modules_to_save} | {f"*.{m}.*": m for m in cfg.modules_to_save}
    excludes = [*cfg.freeze_exclude, *saved]
    for name, param in model.named_parameters():
        key = base_name(name)
        frozen = lora and not is_adapter_param(name)
        for glob in cfg.freeze_include:
            if fnmatch.fnmatchcase(key, glob):
                frozen = True
                matched_include.add(glob)
        for glob in excludes:
            if fnmatch.fnmatchcase(key, glob):
                frozen = False
                matched_exclude.add(saved.get(glob, glob))
        if not frozen and ".base_layer." in name:
            raise ValueError(f"peft.freeze_exclude: {key} is the base weight of a LoRA-adapted module; train it "
                             "either by its adapter or in full (drop it from target_modules), not both")
        param.requires_grad_(not frozen)
    for kind, globs, matched in (("freeze_include", cfg.freeze_include, matched_include),
                                 ("freeze_exclude", cfg.freeze_exclude, matched_exclude),
                                 ("modules_to_save", cfg.modules_to_save, matched_exclude)):
        unused = [g for g in globs if g not in matched]
        if unused:
            raise ValueError(f"peft.{kind}: {', '.join(unused)} match(es) no parameter")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("peft.freeze_include froze every parameter: nothing left to train")


def count_parameters(model: nn.Module, shards: int = 1) -> LoraReport:
    """Trainable and total parameter counts (tied weights counted once). A DTensor's numel() is the whole
    tensor's already, so `shards` stays 1 for FSDP2 / tensor-parallel models; it scales plain local shards."""
    report = LoraReport()
    # A quantized frozen Linear stores bytes (codes and scales) in its weight; it stands for in x out weights.
    stands_for = {id(m.weight): m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear)}
    for param in model.parameters():
        n = stands_for[id(param)] if id(param) in stands_for else param.numel() * shards
        report.total_params += n
        if param.requires_grad:
            report.trainable_params += n
    return report


# ------------------------------------------------------------------------------------------------- init


_generator = adapter_generator  # one seeding rule for every adapter method (defined beside VeRA / LoKr)


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU in fp32 (a collective for FSDP2 DTensors: every rank must call it)."""
    full = param.full_tensor() if hasattr(param, "full_tensor") else param
    return full.detach().to("cpu", torch.float32)


def _assign(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, keeping only this rank's rows when it is an FSDP2 shard."""
    from trainer.distributed import assign_full

    assign_full(param, full)


def _fill(kind: str, shape: tuple[int, ...], rank: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.float32)
    if kind == "zeros":
        return t.zero_()
    if kind == "normal":
        return t.normal_(0.0, 1.0 / rank, generator=gen)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)  # nn.Linear's and PEFT's default for A
    return t


@torch.no_grad()
def init_adapters(model: nn.Module, cfg: PeftSection, seed: int) -> None:
    """Initialise every adapter after the base weights are loaded (PiSSA and DoRA read them).

    PiSSA replaces the base weight by its residual W - s B0 A0 and keeps (A0, B0) on the module (CPU, fp32)
    so the export can convert the result to a plain LoRA on the original weights.
    """
    from trainer.weights import _reshard_fsdp

    _reshard_fsdp(model)  # work on the sharded fp32 parameters, never on a left-over unsharded copy
    if cfg.pet_type == "loreft":
        from trainer.reft import init_reft

        init_reft(model, seed)
        return
    if cfg.pet_type == "prefix_tuning":
        from trainer.prefix import init_prefix

        init_prefix(model, seed)
        return
    if cfg.pet_type in ("vera", "lokr"):
        init_vera_lokr(lora_modules(model), cfg, seed)
        return
    for name, module in lora_modules(model):
        gen = _generator(seed, name)
        r = module.rank
        if isinstance(module, MoraLinear):  # MoRA: M = 0, so the model starts as the base
            _assign(module.lora_A, torch.zeros(module.lora_A.shape))
            continue
        if isinstance(module, LoraEmbedding):
            _assign(module.lora_embedding_A, torch.zeros(module.lora_embedding_A.shape))
            _assign(module.lora_embedding_B, torch.empty(module.lora_embedding_B.shape).normal_(generator=gen))
            continue
        if cfg.pissa:
            weight = _full(module.base_layer.weight)
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            sr = s[:r] / module.scaling
            a = torch.diag(sr.sqrt()) @ vh[:r]
            b = u[:, :r] @ torch.diag(sr.sqrt())
            _assign(module.base_layer.weight, (weight - module.scaling * b @ a).to(module.base_layer.weight.dtype))
            module.pissa_init = (a.clone(), b.clone())
        else:
            a = _fill(cfg.lora_a_init, tuple(module.lora_A.shape), r, gen)
            b = _fill(cfg.lora_b_init, tuple(module.lora_B.shape), r, gen)
        _assign(module.lora_A, a)
        _assign(module.lora_B, b)
        if module.lora_AB is not None:  # MoSLoRA's mixer: kaiming-uniform, as the paper's default
            _assign(module.lora_AB, _fill("kaiming", tuple(module.lora_AB.shape), r, gen))
        if module.lora_magnitude_vector is not None:
            weight = _full(module.base_layer.weight)
            _assign(module.lora_magnitude_vector, torch.linalg.norm(weight + module.scaling * b @ a, dim=1))


def install_neftune(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """NEFTune: uniform noise of magnitude alpha / sqrt(T * hidden) on the input embeddings, training only.

    T is the packed row length (as transformers' NEFTune uses the padded sequence length). The noise draws from
    torch's global RNG, which checkpoints save and restore, so a resumed run draws the same noise.
    """
    embed = model.get_submodule("model.embed_tokens")

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        mag = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.empty_like(output).uniform_(-mag, mag)

    return embed.register_forward_hook(hook)


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep every frozen parameter in `dtype` (e.g. bf16), leaving trainable ones (adapters) in fp32.

    Frozen weights never meet the optimizer, so an fp32 copy of them buys nothing when compute runs in bf16: this
    halves the base model's memory under LoRA. Call it on the meta model, after freezing and before sharding, so
    FSDP2 and `materialize` allocate the narrow dtype directly. Tied parameters stay tied. Returns how many
    parameters changed dtype.
    """
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.requires_grad or param.dtype == dtype:
                continue
            if id(param) not in replaced:
                replaced[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
            module._parameters[name] = replaced[id(param)]
    return len(replaced)


def setup_peft(model: nn.Module, cfg: PeftSection) -> list[str]:
    """Surgery + freezing on the (meta) model, before sharding; returns the wrapped module names."""
    if cfg.pet_type == "loreft":  # interventions on layer outputs, not module wrappers
        from trainer.reft import apply_reft

        wrapped = apply_reft(model, cfg)
    elif cfg.pet_type == "prefix_tuning":  # learned keys / values in every layer's attention
        from trainer.prefix import apply_prefix

        wrapped = apply_prefix(model, cfg)
    else:
        wrapped = apply_lora(model, cfg) if cfg.pet_type is not None else []
    if cfg.pet_type is not None or cfg.freeze_include or cfg.freeze_exclude or cfg.modules_to_save:
        apply_freeze(model, cfg)
    return wrapped


def load_lora_model(model_dir: str, cfg: PeftSection, seed: int, *, device: str | torch.device = "cpu",
                    **overrides) -> nn.Module:
    """One process, no FSDP: the base checkpoint with adapters applied and initialised as a training run would."""
    from trainer.model import Transformer
    from trainer.model_config import ModelConfig
    from trainer.weights import load_hf_weights, materialize

    config = ModelConfig.from_pretrained(model_dir, **overrides)
    with torch.device("meta"):
        model = Transformer(config)
    setup_peft(model, cfg)
    if cfg.weight_quantize_algo is not None:
        from trainer.quantize import quantize_frozen_base

        quantize_frozen_base(model, cfg, torch.float32)
    materialize(model, device)
    load_hf_weights(model, model_dir, name_map=checkpoint_name_map if cfg.pet_type is not None else None,
                    show_progress=False)
    if cfg.pet_type is not None:
        init_adapters(model, cfg, seed)
    return model
