"""Expected memory per rank of a training run, before any GPU is booked: `trainer plan`.

The model is written from what the trainer does, not from rules of thumb, so that each term can be checked:

- Parameters: every tensor of the decoder (from config.json, through `ModelConfig`), stored as the trainer
  stores it: trainable ones (and LoRA / VeRA / LoKr / MoRA adapters) in fp32, which doubles as the optimizer's
  master copy; frozen ones in `model.frozen_dtype`, or quantized for QLoRA's decoder Linear weights
  (`peft.weight_quantize_algo`: NF4 / FP4 at 4 bits plus one int8 scale per block and one scale per
  double-quantization group; int8 / int4 weight-only plus an fp32 scale and zero point per row / group). `peft.target_modules`, `freeze_include` /
  `freeze_exclude` / `modules_to_save` are matched with the trainer's own matchers.
- Gradients: fp32, trainable parameters only. Optimizer state: AdamW's two fp32 moments (8 bytes per trainable
  parameter), or 2 bytes with `adamw_8bit`. None of this exists for frozen weights.
- Activations: the tensors autograd keeps from forward to backward, counted per token and per block from the
  block's code (`trainer.model`): the residual inputs, RMSNorm's fp32 internals, the rotated q and k, v, the
  attention output, the MLP's gate / activation / up / product. Which of them are kept depends on what trains:
  a frozen Linear does not keep its input, a frozen norm does not keep its normalised input, so LoRA on the
  attention keeps less than full fine-tuning. With activation checkpointing only each block's input is kept;
  the block being recomputed in backward counts at the end-of-backward moment, beside the gradients.
- Loss: the chunked loss (`trainer.loss`) holds the gradient of the trained hidden states and, when the head
  trains, its fp32 weight gradient from the forward on; while it runs, one [loss_chunk_tokens x vocab] fp32 logits
  chunk and each chunk's head-gradient product. `model.loss: full` holds [tokens x vocab] fp32 log-probabilities.
  The loss's work and the first block's backward never overlap, so the larger of the two is one working set.
- Attention: flash-style kernels (varlen, flex, CPU flash) keep q, k, v, the output and logsumexp; CPU SDPA with
  grouped kv heads takes its math path and keeps each document's [heads x L x L] probabilities. Context
  parallelism (`trainer.context_parallel`), allgather: the [T/cp, T] mask and every layer's gathered K/V of the
  whole row; ring: q, k, v, the fp32 output and logsumexp, K/V blocks and their fp32 gradients in flight (two of
  each) and, while a block runs, on CPU its [T/cp x T/cp] fp32 mask and K/V expanded to every head, elsewhere
  its fp32 scores (three such at once in backward) of a chunk of queries (at most
  `context_parallel.MATH_CHUNK_BYTES`).
- Compute copies: with bf16 compute one process runs under autocast, which keeps a bf16 copy of every fp32
  weight a matmul reads until its backward (one block's with activation checkpointing, for frozen weights);
  under FSDP2 the all-gathered compute-dtype blocks (two at a time with reshard_after_forward, all of them
  without) and the root's embeddings and head, for the whole forward/backward.

The peak is the larger of two moments of a step: the end of the forward (activations and loss buffers alive,
no gradients yet) and the end of the backward / optimizer step (all gradients, no activations but the block checkpointing recomputes). Parameters and
optimizer state are there at both.

Sharding: FSDP2 divides parameters, gradients and optimizer state by `dp_shard` (`dp_replicate` replicates);
`tp` divides the block weights (colwise q/k/v/gate/up, rowwise o/down; adapters with their base) and, with
sequence parallelism, the per-token activations except the all-gathered norm outputs the colwise projections
read; `cp` divides every per-token activation. Embeddings and the head are not tensor-parallel here.

What is not modelled: the CUDA context and allocator caching/fragmentation (expect 0.5-2 GiB more per GPU than
the total), NCCL buffers, the data loader, and the hf backend's exact module internals (its MoE and non-Llama
blocks are estimated from config.json keys and said to be).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from trainer.config import PeftSection, TrainConfig
from trainer.mesh import MeshError, split_world
from trainer.model_config import SUPPORTED_MODEL_TYPES, DecoderDims, ModelConfig, read_config_json

GiB = 2**30
Phase = Literal["always", "forward", "backward"]
ROWWISE = ("o_proj", "down_proj")  # tensor parallel: these split their input dimension, the others their output
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


class PlanError(ValueError):
    """The plan cannot be made as asked (a mesh that does not fit the world size, a model it cannot read)."""


# ------------------------------------------------------------------------------------------------- the mesh


@dataclass(frozen=True)
class Mesh:
    world_size: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    cp: int = 1

    @classmethod
    def resolve(cls, world_size: int, dp_replicate: int = 1, dp_shard: int = -1, tp: int = 1, cp: int = 1) -> Mesh:
        """The mesh `parallel.*` describes for `world_size` ranks; dp_shard -1 takes the ranks left over."""
        for name, value in (("world size", world_size), ("dp_replicate", dp_replicate), ("tp", tp), ("cp", cp)):
            if value < 1:
                raise PlanError(f"{name} must be >= 1, got {value}")
        if dp_shard != -1 and dp_shard < 1:
            raise PlanError(f"dp_shard must be >= 1 or -1 (the rest of the world), got {dp_shard}")
        try:  # the trainer's own rule, so the plan is of the mesh `trainer run` would build
            shape = split_world(world_size, dp_replicate, dp_shard, tp, cp)
        except MeshError as exc:
            raise PlanError(str(exc)) from None
        return cls(world_size, shape.dp_replicate, shape.dp_shard, shape.tp, shape.cp)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class ModelShape(DecoderDims):
    """What the memory model needs from config.json (`ModelConfig` for the native families)."""

    model_type: str
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0  # MoE (hf backend): routed experts per MoE layer
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: int = 0
    approximate: bool = False  # True when the blocks are estimated from config.json keys (hf backend)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, overrides: dict[str, Any] | None = None) -> ModelShape:
        path = Path(model_dir) / "config.json"
        raw = read_config_json(model_dir)
        overrides = dict(overrides or {})
        if raw.get("model_type") in SUPPORTED_MODEL_TYPES:
            own = {k: v for k, v in overrides.items() if k != "attn_backend"}
            try:
                mc = ModelConfig.from_hf(raw, **own)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
            return cls.from_model_config(mc)
        return cls._estimated(path, {**raw, **overrides})

    @classmethod
    def from_model_config(cls, mc: ModelConfig) -> ModelShape:
        dims = {f.name: getattr(mc, f.name) for f in fields(DecoderDims)}
        return cls(**dims, model_type=mc.model_type, tie_word_embeddings=mc.tie_word_embeddings,
                   qkv_bias=mc.qkv_bias, o_proj_bias=mc.o_proj_bias, mlp_bias=mc.mlp_bias,
                   qk_norm=mc.qk_norm)

    @classmethod
    def _estimated(cls, path: Path, raw: dict[str, Any]) -> ModelShape:
        """A transformers model outside the native families: Llama-like blocks from the usual keys, MoE if any."""
        text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw  # multimodal wrappers
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
                   if k not in text]
        if missing:
            raise ValueError(f"{path}: config.json lacks {', '.join(missing)}")
        heads = int(text["num_attention_heads"])
        layers = int(text["num_hidden_layers"])
        experts = int(text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts") or 0)
        moe_layers = 0
        if experts:
            step = int(text.get("decoder_sparse_step") or 1)
            dense = set(text.get("mlp_only_layers") or []) | set(range(int(text.get("first_k_dense_replace") or 0)))
            moe_layers = sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)
        shared = int(text.get("shared_expert_intermediate_size") or 0)
        if not shared and text.get("n_shared_experts"):
            shared = int(text["n_shared_experts"]) * int(text.get("moe_intermediate_size") or 0)
        return cls(
            model_type=str(raw.get("model_type")), vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text.get("intermediate_size") or 4 * int(text["hidden_size"])),
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            qkv_bias=bool(text.get("attention_bias", False)), o_proj_bias=bool(text.get("attention_bias", False)),
            num_experts=experts, experts_per_token=int(text.get("num_experts_per_tok") or 0) if experts else 0,
            moe_intermediate_size=int(text.get("moe_intermediate_size") or text.get("intermediate_size") or 0)
            if experts else 0,
            shared_expert_intermediate_size=shared if experts else 0, moe_layers=moe_layers, approximate=True,
        )

    def is_moe_layer(self, i: int) -> bool:
        """Estimated layouts: the MoE layers are taken to be the last `moe_layers` ones (dense ones come first)."""
        return self.num_experts > 0 and i >= self.num_hidden_layers - self.moe_layers


@dataclass
class Tensor:
    """One parameter of the model as the trainer holds it (names are the HF checkpoint's)."""

    name: str
    shape: tuple[int, ...]
    module: str  # the module holding it (its HF name), what target_modules matches
    kind: Literal["linear", "embedding", "norm", "bias", "experts", "router"]
    layer: int | None = None  # decoder layer index, None for embeddings / final norm / head

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def model_tensors(s: ModelShape) -> list[Tensor]:
    """Every parameter of the decoder, tied head counted once (it is the embedding's tensor)."""
    h, d, inter = s.hidden_size, s.head_dim, s.intermediate_size
    q, kv = s.num_attention_heads * d, s.num_key_value_heads * d
    out = [Tensor("model.embed_tokens.weight", (s.vocab_size, h), "model.embed_tokens", "embedding")]
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}"
        out.append(Tensor(f"{p}.input_layernorm.weight", (h,), f"{p}.input_layernorm", "norm", i))
        for name, o, n_in, bias in (("q_proj", q, h, s.qkv_bias), ("k_proj", kv, h, s.qkv_bias),
                                    ("v_proj", kv, h, s.qkv_bias), ("o_proj", h, q, s.o_proj_bias)):
            mod = f"{p}.self_attn.{name}"
            out.append(Tensor(f"{mod}.weight", (o, n_in), mod, "linear", i))
            if bias:
                out.append(Tensor(f"{mod}.bias", (o,), mod, "bias", i))
        if s.qk_norm:
            for name in ("q_norm", "k_norm"):
                out.append(Tensor(f"{p}.self_attn.{name}.weight", (d,), f"{p}.self_attn.{name}", "norm", i))
        out.append(Tensor(f"{p}.post_attention_layernorm.weight", (h,), f"{p}.post_attention_layernorm", "norm", i))
        if s.is_moe_layer(i):
            e, mi = s.num_experts, s.moe_intermediate_size
            out.append(Tensor(f"{p}.mlp.gate.weight", (e, h), f"{p}.mlp.gate", "router", i))
            out.append(Tensor(f"{p}.mlp.experts.gate_up_proj", (e, 2 * mi, h), f"{p}.mlp.experts", "experts", i))
            out.append(Tensor(f"{p}.mlp.experts.down_proj", (e, h, mi), f"{p}.mlp.experts", "experts", i))
            if s.shared_expert_intermediate_size:
                si = s.shared_expert_intermediate_size
                for name, shape in (("gate_proj", (si, h)), ("up_proj", (si, h)), ("down_proj", (h, si))):
                    mod = f"{p}.mlp.shared_expert.{name}"
                    out.append(Tensor(f"{mod}.weight", shape, mod, "linear", i))
            continue
        for name, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            mod = f"{p}.mlp.{name}"
            out.append(Tensor(f"{mod}.weight", shape, mod, "linear", i))
            if s.mlp_bias:
                out.append(Tensor(f"{mod}.bias", (shape[0],), mod, "bias", i))
    out.append(Tensor("model.norm.weight", (h,), "model.norm", "norm"))
    if not s.tie_word_embeddings:
        out.append(Tensor("lm_head.weight", (s.vocab_size, h), "lm_head", "linear"))
    return out


# ---------------------------------------------------------------------------------------- what trains


@dataclass
class Adapter:
    module: str
    numel: int
    sharded_numel: int  # the part tensor parallelism splits (the factor on the base's split dimension)


@dataclass
class Inventory:
    """Which tensors train, which stay frozen and how they are stored; the adapters the PEFT config adds."""

    tensors: list[Tensor]
    trainable: set[str]
    adapters: list[Adapter]
    quantized: set[str]  # frozen weights stored quantized (peft.weight_quantize_algo)
    adapted: set[str]  # modules wrapped by an adapter


def _adapter_numel(cfg: Any, t: Tensor, tied: bool) -> tuple[int, int]:
    """(parameters, of which split by tensor parallelism) the PEFT method adds to module `t`."""
    from trainer.peft_methods import factorization, mora_rank

    out_f, in_f = t.shape
    r = cfg.lora_rank
    rowwise = t.module.endswith(ROWWISE)
    if cfg.pet_type == "vera":
        return out_f + cfg.vera_rank, (0 if rowwise else out_f)
    if cfg.pet_type == "lokr":
        out_l, out_k = factorization(out_f, cfg.lokr_decompose_factor)
        in_m, in_n = factorization(in_f, cfg.lokr_decompose_factor)
        w2 = (out_k + in_n) * cfg.lokr_rank if cfg.lokr_rank < max(out_k, in_n) / 2 else out_k * in_n
        return out_l * in_m + w2, 0
    if t.kind == "embedding":
        return r * (t.shape[0] + t.shape[1]), 0
    if cfg.use_mora:
        side = mora_rank(in_f, out_f, r, cfg.mora_type)
        return side * side, 0
    n = r * (in_f + out_f) + (out_f if cfg.use_dora else 0) + (r * r if cfg.lora_use_mixer else 0)
    split = r * in_f if rowwise else r * out_f + (out_f if cfg.use_dora else 0)
    return n, split


def inventory(shape: ModelShape, config: TrainConfig) -> Inventory:
    """Trainable / frozen / adapted, by the same rules as `trainer.lora.setup_peft` and `trainer.quantize`."""
    from trainer.peft_targets import target_matcher

    p = config.peft
    tensors = model_tensors(shape)
    adapters: list[Adapter] = []
    adapted: set[str] = set()
    if p.pet_type == "loreft":  # one intervention (R, W [r, hidden], b [r]) per chosen layer, not per module
        from trainer.reft_positions import parse_layers

        for i in parse_layers(p.reft_layers, shape.num_hidden_layers):
            adapters.append(Adapter(f"model.layers.{i}.reft", p.reft_rank * (2 * shape.hidden_size + 1), 0))
    elif p.pet_type == "prefix_tuning":  # trainer.prefix: keys / values per layer, or the MLP that makes them all
        token_dim, n = shape.num_key_value_heads * shape.head_dim, p.num_virtual_tokens
        out = shape.num_hidden_layers * 2 * token_dim
        if p.prefix_projection:
            hidden = p.encoder_hidden_size or token_dim
            adapters.append(Adapter("model.prefix", n * token_dim + (token_dim + 1) * hidden + (hidden + 1) * out, 0))
        else:
            adapters += [Adapter(f"model.layers.{i}.prefix", 2 * n * token_dim, 0)
                         for i in range(shape.num_hidden_layers)]
    elif p.pet_type is not None:
        matches, reading = target_matcher(p.target_modules)
        seen: set[str] = set()
        for t in tensors:
            if t.kind not in ("linear", "embedding") or t.module in seen or not t.name.endswith(".weight"):
                continue
            seen.add(t.module)
            if not matches(t.module, t.kind == "linear"):
                continue
            if t.kind == "embedding" and p.pet_type in ("vera", "lokr"):
                raise PlanError(f"peft.target_modules: {p.pet_type} adapts Linear modules only ({t.module})")
            n, split = _adapter_numel(p, t, shape.tie_word_embeddings)
            adapters.append(Adapter(t.module, n, split))
            adapted.add(t.module)
        if shape.tie_word_embeddings and matches("lm_head", True):
            raise PlanError("peft.target_modules matches lm_head, but it is tied to embed_tokens in this checkpoint; "
                            "target embed_tokens instead")
        if not adapters:
            raise PlanError(f"peft.target_modules {p.target_modules!r} (read as {reading}) matches no Linear or "
                            "Embedding module")
    saved = [f"{m}.*" for m in p.modules_to_save] + [f"*.{m}.*" for m in p.modules_to_save]
    trainable: set[str] = set()
    for t in tensors:
        frozen = p.pet_type is not None
        if any(fnmatch.fnmatchcase(t.name, g) for g in p.freeze_include):
            frozen = True
        if any(fnmatch.fnmatchcase(t.name, g) for g in [*p.freeze_exclude, *saved]):
            frozen = False
        if not frozen:
            trainable.add(t.name)
    quantized = {t.name for t in tensors if t.kind == "linear" and t.layer is not None and t.name not in trainable
                 and _quantizable(p, t)} if p.weight_quantize_algo is not None else set()
    return Inventory(tensors, trainable, adapters, quantized, adapted)


def _quantizable(p: PeftSection, t: Tensor) -> bool:
    """trainer.quantize's rule of which frozen Linear weights its algorithm stores quantized."""
    algo, cols = p.weight_quantize_algo, t.shape[-1]
    if algo == "nf4":
        return t.numel % (p.qlora_weight_blocksize * p.qlora_weight_double_quant_block_size) == 0
    if algo == "weight_only_int8":
        return True
    group = _group(p, cols)
    return cols % group == 0 and cols % 2 == 0


def _group(p: PeftSection, cols: int) -> int:
    group = p.qlora_weight_blocksize if p.weight_quantize_algo == "fp4" else p.weight_only_int4_group_size
    return cols if group == -1 else group


def quantized_bytes(p: PeftSection, numel: float, cols: int, frozen_bytes: int) -> float:
    """Bytes of `numel` weights (rows of `cols`) as trainer.quantize stores `p.weight_quantize_algo`: the codes
    plus their scales. NF4 double-quantizes its block scales to int8 (plus an fp32 scale per group); FP4's
    stored rows hold one uint8 absmax per block (its second-level statistics are a few whole-tensor values,
    not parameters); int8 keeps an fp32 scale and an int8 zero point per row; int4 a scale in the frozen
    dtype and an int8 zero point per group."""
    algo = p.weight_quantize_algo
    if algo == "fp4":
        return numel / 2 + numel / p.qlora_weight_blocksize
    if algo == "weight_only_int8":
        return numel + numel / cols * 5
    if algo == "weight_only_int4":
        return numel / 2 + numel / _group(p, cols) * (frozen_bytes + 1)
    bs, dq = p.qlora_weight_blocksize, p.qlora_weight_double_quant_block_size
    return numel / 2 + numel / bs + numel / (bs * dq) * frozen_bytes + 17 * frozen_bytes


# ------------------------------------------------------------------------------------------------- the plan


@dataclass
class Component:
    name: str
    bytes: int
    phase: Phase  # always | forward (end of forward: activations alive) | backward (end of backward, the step)
    note: str = ""


@dataclass
class MemoryPlan:
    model: dict[str, Any]
    mesh: Mesh
    seq_length: int
    micro_batch_size: int
    compute_dtype: str
    device: str
    components: list[Component] = field(default_factory=list)
    params_total: int = 0
    params_trainable: int = 0

    def phase_bytes(self, phase: Phase) -> int:
        return sum(c.bytes for c in self.components if c.phase == phase)

    @property
    def peak_phase(self) -> Phase:
        return "forward" if self.phase_bytes("forward") >= self.phase_bytes("backward") else "backward"

    @property
    def total(self) -> int:
        """Peak bytes per rank: what is always there plus the larger of the two moments."""
        return self.phase_bytes("always") + max(self.phase_bytes("forward"), self.phase_bytes("backward"))

    def component(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "mesh": asdict(self.mesh), "seq_length": self.seq_length,
            "micro_batch_size": self.micro_batch_size, "compute_dtype": self.compute_dtype, "device": self.device,
            "params_total": self.params_total, "params_trainable": self.params_trainable,
            "components": [asdict(c) for c in self.components],
            "always_bytes": self.phase_bytes("always"), "forward_bytes": self.phase_bytes("forward"),
            "backward_bytes": self.phase_bytes("backward"), "peak_phase": self.peak_phase,
            "total_bytes": self.total, "total_gib": self.total / GiB,
        }

    def table(self) -> str:
        m = self.mesh
        lines = [
            f"memory plan per rank: {self.model['model_type']}, {_count(self.params_total)} parameters "
            f"({self.params_trainable:,} trainable), {self.model['layers']} layers, vocab {self.model['vocab']:,}"
            + (" [blocks estimated from config.json]" if self.model.get("approximate") else ""),
            f"rows of {self.seq_length:,} tokens x micro batch {self.micro_batch_size}; {self.compute_dtype} compute "
            f"on {self.device}; mesh world {m.world_size} = dp_replicate {m.dp_replicate} x dp_shard {m.dp_shard} "
            f"x tp {m.tp} x cp {m.cp}",
            "",
            f"{'component':<26}{'per rank':>12}  {'when':<10} note",
        ]
        for c in self.components:
            lines.append(f"{c.name:<26}{_gib(c.bytes):>12}  {c.phase:<10} {c.note}")
        lines += [
            "",
            f"{'always':<26}{_gib(self.phase_bytes('always')):>12}",
            f"{'+ end of forward':<26}{_gib(self.phase_bytes('forward')):>12}",
            f"{'+ end of backward/step':<26}{_gib(self.phase_bytes('backward')):>12}",
            f"{'peak (' + self.peak_phase + ')':<26}{_gib(self.total):>12}  "
            "(+ CUDA context and allocator cache, not modelled)",
        ]
        return "\n".join(lines)


def _gib(n: int) -> str:
    if n < GiB:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / GiB:.2f} GiB" if n < 100 * GiB else f"{n / GiB:.0f} GiB"



def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


_BYTES = {"fp32": 4, "bf16": 2}


def plan_memory(
    config: TrainConfig,
    *,
    seq_length: int,
    mesh: Mesh | None = None,
    device: Literal["cuda", "cpu"] = "cuda",
    trained_fraction: float = 1.0,
    shape: ModelShape | None = None,
    doc_length: float | None = None,
) -> MemoryPlan:
    """The expected peak memory per rank of `config` for rows of `seq_length` tokens on `mesh`.

    `device` resolves `model.dtype: auto` and the attention backend as the trainer would there.
    `trained_fraction`: the share of a row's positions with a label (the chunked loss's head runs on those only);
    1.0 is the bound, a packed dataset's manifest gives the real share. `doc_length`: the mean document length
    (default: the row length, the bound), which sizes CPU attention's per-document probabilities.
    """
    if seq_length < 1:
        raise PlanError(f"sequence length must be >= 1, got {seq_length}")
    mesh = mesh or Mesh()
    if shape is None:
        from formats.hub import resolve as resolve_hub  # a hub id names its snapshot in the local cache

        shape = ModelShape.from_model_dir(resolve_hub(config.model.path, "model"), config.model.overrides)
    inv = inventory(shape, config)
    mc, pc = config.model, config.parallel
    compute = {"auto": "bf16" if device == "cuda" else "fp32"}.get(mc.dtype, mc.dtype)
    frozen = compute if mc.frozen_dtype == "auto" else mc.frozen_dtype
    if frozen == "bf16" and compute == "fp32":
        raise PlanError(f"model.frozen_dtype {mc.frozen_dtype} needs bf16 compute: set model.dtype: bf16 as well")
    a, fb = _BYTES[compute], _BYTES[frozen]
    # FSDP2 shards over dp_shard x cp flattened (trainer.distributed), so both divide the parameters.
    dp, tp, cp = mesh.dp_shard * mesh.cp, mesh.tp, mesh.cp
    fsdp = mesh.distributed

    def tp_div(t: Tensor) -> int:  # tensor-parallel ranks a tensor is split over
        return tp if t.layer is not None and t.kind in ("linear", "experts", "bias") and t.module.endswith(
            (*ROWWISE, *COLWISE, "experts")) and not (t.kind == "bias" and t.module.endswith(ROWWISE)) else 1

    trainable_b = frozen_b = 0.0
    trainable_n = frozen_n = 0
    largest_trainable = 0.0
    for t in inv.tensors:
        local = t.numel / tp_div(t) / dp
        if t.name in inv.trainable:
            trainable_b += local * 4
            trainable_n += t.numel
            largest_trainable = max(largest_trainable, local * 4)
        else:
            frozen_b += (quantized_bytes(config.peft, local, t.shape[-1], fb) if t.name in inv.quantized
                         else local * fb)
            frozen_n += t.numel
    adapter_n = sum(ad.numel for ad in inv.adapters)
    adapter_local = sum((ad.numel - ad.sharded_numel) + ad.sharded_numel / tp for ad in inv.adapters) / dp
    adapter_b = adapter_local * 4
    if inv.adapters:
        largest_trainable = max(largest_trainable, max(ad.numel for ad in inv.adapters) * 4 / dp)
    train_local_b = trainable_b + adapter_b  # fp32 trainable bytes on this rank
    opt_per_param = 2 if config.train.optimizer == "adamw_8bit" else 8

    comps: list[Component] = []
    base_note = f"frozen in {frozen}" + (f", {len(inv.quantized)} Linear weights {config.peft.weight_quantize_algo}"
                                           if inv.quantized else "")
    if trainable_n:
        base_note = f"{trainable_n:,} trainable in fp32 (the master copy); " + base_note
    comps.append(Component("parameters", int(trainable_b + frozen_b), "always", base_note))
    if inv.adapters:
        comps.append(Component("adapters", int(adapter_b), "always",
                               f"{config.peft.pet_type} on {len(inv.adapters)} modules, {adapter_n:,} params, fp32"))
    if config.peft.pet_type == "vera":
        linear = {t.module: t.shape for t in inv.tensors if t.module in inv.adapted and t.kind == "linear"}
        side = max(s[1] for s in linear.values()) + max(s[0] for s in linear.values())
        comps.append(Component("VeRA projections", config.peft.vera_rank * side * 4, "always",
                               "shared frozen A and B, one fp32 copy per rank"))
    opt_name = "AdamW 8-bit" if opt_per_param == 2 else "AdamW fp32"
    comps.append(Component("optimizer state", int(train_local_b / 4 * opt_per_param), "always",
                           f"{opt_name}: {opt_per_param} bytes per trainable parameter"))

    # ---- activations: bytes per token of one block, by what autograd keeps (see trainer.model)
    s = shape
    h_, q_, kv_, inter = s.hidden_size, s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim, \
        s.intermediate_size
    autocast = compute == "bf16" and not fsdp

    def trains(name: str) -> bool:
        return name in inv.trainable

    def keeps_input(module: str) -> bool:
        # Autograd keeps a Linear's input only for its weight's gradient (or its adapter's): frozen ones keep none.
        return trains(f"{module}.weight") or module in inv.adapted

    def norm_bytes(norm_weight: str, width: int, consumers: list[str], grad_in: bool = True) -> float:
        """RMSNorm (fp32 inside): what its backward needs, and the output its consumers keep.

        `grad_in`: whether its input requires grad (not in the first block when the embeddings are frozen)."""
        keep_out = [c for c in consumers if keeps_input(c)]
        b = 0.0
        if grad_in:
            if a != 4:
                b += 4 * width  # x.float(), kept by pow and by the product with rsqrt (fp32: it is x itself)
            if trains(norm_weight):
                b += a * width  # the normalised x in the compute dtype, for the weight's gradient
        if keep_out:
            # fp32: one output the consumers share. autocast: an fp32 weight times a bf16 input is fp32, and each
            # Linear keeps its own bf16 cast of it. FSDP2 bf16: one bf16 output.
            b += (2 * len(keep_out) if autocast else a) * width
        return b

    def lora_bytes(module: str) -> float:
        """An adapter keeps its input (counted with whoever made it) and its rank-r intermediate."""
        if module not in inv.adapted or config.peft.pet_type != "lora" or config.peft.use_mora:
            return 0.0
        return a * config.peft.lora_rank * (2 if config.peft.lora_use_mixer else 1)

    nh = s.num_attention_heads
    backend = mc.attn_backend if mc.attn_backend != "auto" else ("varlen" if device == "cuda" and a == 2 else
                                                                 "flex" if device == "cuda" else "sdpa")
    ring = cp > 1 and pc.cp_attention == "ring"
    if cp > 1:  # trainer.context_parallel: masked sdpa over the gathered keys, or the ring's own blocks
        backend = "ring" if ring else "sdpa"
    doc = min(float(doc_length or seq_length), seq_length) if cp == 1 else float(seq_length)
    # fp32 q/k norm weights under autocast promote q, k and RoPE's output to fp32; attention casts them back
    qk_bytes = 4 + 2 if (s.qk_norm and autocast) else a
    if ring:  # the ring's autograd function keeps its inputs, its fp32 output and the logsumexp
        attn_kept = qk_bytes * (q_ + kv_) + a * kv_ + 4 * q_ + 4 * nh
        attn_note = "; ring attention: q, k, v, fp32 output and logsumexp"
    elif device == "cpu" and backend == "sdpa" and nh != s.num_key_value_heads:
        # CPU SDPA with grouped kv heads takes the math path, per document: scaled q, the repeated scaled k and
        # v, the [heads x L x L] probabilities (per token: heads x the document length) and the causal mask.
        attn_kept = a * 3 * q_ + a * nh * doc + doc
        attn_note = f"; CPU math attention: heads x document length ({doc:,.0f}) per token"
    else:  # flash-style kernels (varlen, flex, CPU flash): q, k, v, the output and logsumexp
        attn_kept = qk_bytes * (q_ + kv_) + a * (kv_ + q_) + 4 * nh
        attn_note = ""

    def block_bytes(i: int) -> float:
        """Bytes per token kept by decoder layer `i` from its forward to its backward (see trainer.model)."""
        p = f"model.layers.{i}"
        attn = [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
        o = f"{p}.self_attn.o_proj"
        grad_in = i > 0 or trains("model.embed_tokens.weight") or "model.embed_tokens" in inv.adapted
        # the block input and the mid-block residual, kept by the norms' pow
        b = a * h_ * (2 if grad_in else 1)
        b += norm_bytes(f"{p}.input_layernorm.weight", h_, attn, grad_in)
        mlp_in = [f"{p}.mlp.{n}" for n in ("gate_proj", "up_proj")] if not s.is_moe_layer(i) else [f"{p}.mlp.gate"]
        b += norm_bytes(f"{p}.post_attention_layernorm.weight", h_, mlp_in)
        b += sum(lora_bytes(m) for m in (*attn, o))
        # RoPE's products with cos/sin keep nothing per token (cos/sin need no gradient); what attention keeps
        # is `attn_kept` (below).
        if s.qk_norm:
            for width, name in ((q_, "q_norm"), (kv_, "k_norm")):
                b += norm_bytes(f"{p}.self_attn.{name}.weight", width, [])
                if a == 4:
                    b += 4 * width  # the norm's input (x.float() is the projection output itself)
        b += attn_kept
        if keeps_input(o):
            b += a * q_  # the heads' outputs concatenated: o_proj's input
        if s.is_moe_layer(i):
            k, mi = s.experts_per_token, s.moe_intermediate_size
            b += 4 * s.num_experts + k * (a * (h_ + 4 * mi))  # router logits; each routed copy of the token
            if s.shared_expert_intermediate_size:
                b += a * 4 * s.shared_expert_intermediate_size
            return b
        g, u, dn = (f"{p}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj"))
        b += sum(lora_bytes(m) for m in (g, u, dn))
        b += a * inter * 3  # gate output (silu's input), silu output and up output (the product's inputs)
        if keeps_input(dn):
            b += a * inter  # the product, down_proj's input
        return b

    tokens = seq_length * config.data.micro_batch_size / cp  # per rank
    layers = s.num_hidden_layers
    per_block = [block_bytes(i) for i in range(layers)]
    # tensor parallelism with sequence parallelism: everything but the gathered colwise inputs is split
    gathered = 2 * a * h_ if tp > 1 else 0.0
    split = [(b - gathered) / tp + gathered for b in per_block]
    head = "model.embed_tokens.weight" if s.tie_word_embeddings else "lm_head.weight"
    head_trains = trains(head)
    # the last block's output (kept by the final norm's pow) and the norm; the chunked loss keeps no hidden state
    final_norm = a * h_ + norm_bytes("model.norm.weight", h_, []) + (a * h_ if mc.loss == "full" and head_trains else 0)
    if mc.activation_checkpointing:
        act = tokens * (a * h_ * layers + final_norm / tp)
        act_note = f"checkpointing: the {layers} block inputs (a block recomputed: {max(split):,.0f} B/token)"
    else:
        act = tokens * (sum(split) + final_norm / tp)
        act_note = f"{sum(per_block) / layers:,.0f} bytes/token/block kept for backward"
    # per-forward tables: RoPE cos/sin, and the sdpa backend's block-diagonal mask
    rows = config.data.micro_batch_size
    act += 2 * tokens * s.head_dim * a
    if backend == "sdpa":
        act += rows * (seq_length / cp) * seq_length  # [B, T/cp, T] bool, kept by the checkpointed blocks too
        act_note += "; sdpa mask B x T x T" + attn_note
    if cp > 1 and not ring:  # every layer's gathered K and V of the whole row, kept by attention for backward
        act += (1 if mc.activation_checkpointing else layers) * rows * (seq_length - seq_length / cp) * 2 * kv_ * a
        act_note += f"; cp {cp}: K/V gathered to the whole row"
    comps.append(Component("activations", int(act), "forward", act_note))

    # ---- the loss
    v = s.vocab_size
    trained = max(1.0, tokens * trained_fraction)
    if mc.loss == "chunked":
        chunk = min(mc.loss_chunk_tokens, trained)
        held = trained * h_ * a * 2  # the trained hidden states' gradient: computed in forward, scaled in backward
        held += v * h_ * 4 if head_trains else 0  # the head's fp32 weight gradient, computed in forward
        work = chunk * v * 4 + (chunk * v * a if a != 4 else 0) + trained * h_ * a
        if head_trains:
            work += v * h_ * (4 + (a if a != 4 else 0))  # each chunk's g^T h, before it is added to the gradient
        if not fsdp and a != (4 if head_trains else fb):
            work += v * h_ * a  # autocast: the head weight cast to the compute dtype for the chunks' matmuls
        loss_note = f"chunked: {int(chunk):,} of {int(trained):,} trained tokens x vocab at a time"
    else:
        held = tokens * v * 4  # fp32 log-probabilities, kept for backward
        work = tokens * v * 4 * 2  # the logits and log-softmax in forward; their gradients in backward
        loss_note = "full: [tokens x vocab] fp32 log-probabilities kept for backward"
    comps.append(Component("loss", int(held), "forward", loss_note))

    # ---- compute-dtype copies of the weights
    copies = 0.0
    copies_note = ""
    block_numel = [sum(t.numel / tp_div(t) for t in inv.tensors if t.layer == i) for i in range(layers)]
    root_numel = sum(t.numel for t in inv.tensors if t.layer is None)
    if fsdp:
        live_blocks = 2 * max(block_numel) if pc.reshard_after_forward else sum(block_numel)
        gathered_nf4 = 0.5 if inv.quantized else 1.0
        copies = (live_blocks * gathered_nf4 + root_numel) * a
        copies_note = ("FSDP2: 2 gathered blocks + root" if pc.reshard_after_forward
                       else "FSDP2: every gathered block + root (reshard_after_forward false)")
    elif autocast:
        # (the head's cast is the loss's, above; embeddings are looked up, not cast)
        fp32_linear = [t for t in inv.tensors if t.kind == "linear" and t.name != head and t.name not in inv.quantized
                       and (t.name in inv.trainable or frozen == "fp32")]
        if mc.activation_checkpointing:
            kept = sum(t.numel for t in fp32_linear if t.name in inv.trainable) + max(
                [sum(t.numel for t in fp32_linear if t.layer == i) for i in range(layers)] or [0])
        else:
            kept = sum(t.numel for t in fp32_linear)
        copies = kept * 2
        copies_note = "autocast: bf16 copies of fp32 weights until their backward"
    if copies:
        comps.append(Component("compute copies", int(copies), "forward", copies_note))
    if fsdp and copies:  # FSDP2 keeps the root gathered, and gathers each block again, through the backward
        comps.append(Component("compute copies (bwd)", int(copies), "backward", "the same, until the backward ends"))

    # ---- gradients and the working sets of backward and of the optimizer step
    comps.append(Component("gradients", int(train_local_b), "backward", "fp32, trainable parameters only"))
    step_work = 2 * largest_trainable  # AdamW's per-tensor temporaries (sqrt of the second moment, its quotient)
    if s.tie_word_embeddings and head_trains:
        step_work = max(step_work, v * h_ * 4)  # the embedding's gradient, added into the tied head's
    if fsdp:
        block_grads = [sum(t.numel / tp_div(t) for t in inv.tensors if t.layer == i and t.name in inv.trainable)
                       + sum(ad.numel for ad in inv.adapters if ad.module.startswith(f"model.layers.{i}."))
                       for i in range(layers)]
        step_work += max(block_grads) * 4  # one block's unsharded fp32 gradients before the reduce-scatter
    comps.append(Component("step working set", int(step_work), "backward",
                           "optimizer temporaries (largest tensor), gradient accumulation"))
    bwd = tokens * (2 * h_ + 2 * max(inter, q_ + 2 * kv_)) * a / tp  # one block's gradient temporaries
    if ring:  # one block's kernel work, and K/V blocks and their gradients in flight (fp32)
        block = seq_length / cp
        if device == "cpu":  # CPU flash: the block's additive mask and K/V expanded to every query head
            bwd += rows * block * block * 4 + 2 * tokens * nh * s.head_dim * 4
        else:  # math: scores, probabilities and their gradient of one chunk of queries
            from trainer.context_parallel import MATH_CHUNK_BYTES

            bwd += 3 * min(rows * nh * block * block * 4, MATH_CHUNK_BYTES)
        bwd += 2 * tokens * 2 * kv_ * (a + 4)  # K/V (compute dtype) and their fp32 gradients, two blocks each
    if inv.quantized:  # QLoRA: one weight dequantized at a time for its matmul
        bwd += max(t.numel for t in inv.tensors if t.name in inv.quantized) / tp * a
    # The loss's forward and the first block's backward do not overlap: the larger of the two.
    comps.append(Component("working set", int(max(work, bwd)), "forward",
                           "the larger of the loss's chunk work and one block's activation gradients"))
    if mc.activation_checkpointing:
        # A block is recomputed beside the other blocks' inputs and, for the first block, every later block's
        # gradients (counted in the backward moment).
        comps.append(Component("recomputed block", int(tokens * (max(split) + a * h_ * layers) + bwd), "backward",
                               "one block's activations and gradients, the block inputs, beside the gradients"))

    total_params = sum(t.numel for t in inv.tensors) + adapter_n
    info = {"model_type": s.model_type, "params_b": total_params / 1e9, "layers": layers, "vocab": v,
            "hidden": h_, "heads": s.num_attention_heads, "kv_heads": s.num_key_value_heads,
            "intermediate": inter, "tied": s.tie_word_embeddings, "experts": s.num_experts,
            "approximate": s.approximate, "attn_backend": backend,
            "activation_checkpointing": mc.activation_checkpointing}
    return MemoryPlan(info, mesh, seq_length, config.data.micro_batch_size, compute, device, comps,
                      total_params, trainable_n + adapter_n)


def mesh_from_config(config: TrainConfig, world_size: int | None = None, *, dp_replicate: int | None = None,
                     dp_shard: int | None = None, tp: int | None = None, cp: int | None = None) -> Mesh:
    """The mesh of `parallel.*` (keys that older configs lack default to pure FSDP), overridden by arguments."""
    par = config.parallel

    def pick(value: int | None, key: str, default: int) -> int:
        return int(value) if value is not None else int(getattr(par, key, default) or default)

    return Mesh.resolve(
        int(world_size) if world_size is not None else 1,
        dp_replicate=pick(dp_replicate, "dp_replicate", 1),
        dp_shard=int(dp_shard) if dp_shard is not None else int(getattr(par, "dp_shard", -1)),
        tp=pick(tp, "tp", 1),
        cp=pick(cp, "cp", 1),
    )


def dataset_facts(path: str | Path) -> tuple[int, float | None, float | None]:
    """(seq_length, trained share of positions, mean document length) from a packed dataset's manifest."""
    from formats.manifest import read_manifest

    manifest = read_manifest(Path(path))
    seq, rows = int(manifest["seq_length"]), int(manifest["num_rows"])
    docs = int(manifest["num_docs"])
    share = int(manifest["num_trainable"]) / (rows * seq) if rows else None
    return seq, share, (int(manifest["num_tokens"]) / docs if docs else None)
