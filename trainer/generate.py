"""Batched text generation with the native decoder and a static KV cache, on token ids only.

This module knows nothing about chat templates or tokenizers (the trainer never imports dataprep): callers hand
in prompt token ids and the ids that end a turn (the template's end-of-turn tokens and eos), and get token ids
back. `cli/generate.py` composes it with `dataprep.prompt`, which renders prompts with the same template logic
`dataprep pack` used for training.

Decoding: one prefill pass over the (left-padded) prompts fills a `KVCache`, then one token per row per step.
Logits are processed as transformers' `generate` does (repetition penalty, then temperature, top-k, top-p), so
greedy decoding gives the same tokens as `transformers.generate` on the same weights.

Loading (`load_model`) accepts what a user has after `trainer run`: a full HF export or any HF checkpoint, a
merged model, a base model plus a PEFT LoRA adapter directory (applied with our LoRA modules, not merged),
a LoRA export directory alone (its base read from `adapter_config.json`), and a run directory or one of its
DCP checkpoint directories (rebuilt from the run's `config.resolved.yaml`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from trainer.model import KVCache, Transformer

log = logging.getLogger(__name__)

StopReason = Literal["stop", "length"]
ModelKind = Literal["hf", "hf+adapter", "checkpoint"]
RESOLVED_CONFIG = "config.resolved.yaml"


@dataclass
class SamplingConfig:
    """How to pick each next token. `temperature` 0 means greedy (argmax); top_k / top_p apply only when
    sampling. `repetition_penalty` > 1 discourages every token already in the prompt or the output (CTRL's rule,
    as transformers applies it). `seed` makes sampling reproducible."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.stop_ids = tuple(int(i) for i in self.stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One row's output: the new token ids (the stop token included when one ended it) and why it ended."""

    tokens: list[int]
    stop_reason: StopReason
    prompt_tokens: int = 0

    @property
    def text_tokens(self) -> list[int]:
        """The tokens without the final stop token."""
        return self.tokens[:-1] if self.stop_reason == "stop" else self.tokens


# ------------------------------------------------------------------------------------------------ decoding


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, cfg: SamplingConfig) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to fp32 logits [B, V] (transformers' order)."""
    if seen is not None and cfg.repetition_penalty != 1.0:
        p = cfg.repetition_penalty
        penalised = torch.where(logits < 0, logits * p, logits / p)
        logits = torch.where(seen, penalised, logits)
    if cfg.greedy:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each one
        drop_sorted = before >= cfg.top_p  # the most likely token is always kept (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _choose(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    if cfg.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, L], attention_mask [B, L]) with every prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = True
    return ids.to(device), mask.to(device)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    dtype = param.dtype
    if torch.is_autocast_enabled(param.device.type):
        dtype = torch.get_autocast_dtype(param.device.type)
    return param.device, dtype


@torch.no_grad()
def generate_padded(
    model: Transformer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: SamplingConfig,
    *,
    step_fn: Callable[..., torch.Tensor] | None = None,
    stop_early: bool = True,
) -> list[Generation]:
    """Generate for a padded batch. `attention_mask` [B, L] marks real tokens; padding may be on either side
    (or both): positions count real tokens only and the first new token follows each row's last real one.

    `step_fn(ids, positions, cache)` replaces `model.forward_cached` for the one-token decode steps (e.g. a
    torch.compile'd copy); it must return logits [B, 1, V]. `stop_early=False` runs all max_new_tokens steps even
    when every row has stopped (FSDP ranks must run the same number of forwards)."""
    device, dtype = _device_dtype(model)
    input_ids = input_ids.to(device)
    valid = attention_mask.to(device).bool()
    b, width = input_ids.shape
    lengths = valid.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("every prompt needs at least one real token")
    longest = int(lengths.max()) + cfg.max_new_tokens
    if longest > model.config.max_position_embeddings:
        log.warning("prompt + max_new_tokens reaches %d positions, beyond the model's max_position_embeddings (%d)",
                    longest, model.config.max_position_embeddings)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    last = torch.where(valid, torch.arange(width, device=device), -1).amax(1)
    # the HF backend brings its own cache (transformers'); the native model uses our static one
    new_cache = getattr(model, "new_cache", None)
    prefix = getattr(model, "prefix_tokens", 0)  # prefix tuning's slots come first (trainer.prefix)
    cache = (new_cache(b, width + cfg.max_new_tokens, device, dtype) if new_cache is not None
             else KVCache(model.config, b, prefix + width + cfg.max_new_tokens, device, dtype))
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    vocab = model.config.vocab_size
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)
        rows = torch.arange(b, device=device)[:, None].expand(b, width)
        seen[rows[valid], input_ids[valid]] = True
    stop = torch.tensor(cfg.stop_ids or [-1], device=device)
    step = step_fn or model.forward_cached

    was_training = model.training
    model.eval()
    try:
        if prefix:
            from trainer.prefix import fill_cache

            fill_cache(model, cache)
        cache.begin(positions, valid)
        logits = model.forward_cached(input_ids, positions, cache, logit_index=last,
                                      **_prompt_interventions(model, positions, valid))[:, -1].float()
        next_pos = lengths.clone()
        out = torch.empty(b, cfg.max_new_tokens, dtype=torch.long, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        stopped = torch.zeros(b, dtype=torch.bool, device=device)
        n_out = torch.zeros(b, dtype=torch.long, device=device)
        for i in range(cfg.max_new_tokens):
            tok = _choose(process_logits(logits, seen, cfg), cfg, gen)
            tok = torch.where(finished, torch.full_like(tok, cfg.pad_id), tok)
            out[:, i] = tok
            n_out += (~finished).long()
            hit = torch.isin(tok, stop) & ~finished
            stopped |= hit
            finished |= hit
            if seen is not None:
                active = ~finished | hit  # rows that produced a real token this step
                seen[active.nonzero().squeeze(1), tok[active]] = True
            if i + 1 == cfg.max_new_tokens or (stop_early and bool(finished.all())):
                break
            cache.begin(next_pos[:, None])
            logits = step(tok[:, None], next_pos[:, None], cache)[:, -1].float()
            next_pos += 1
    finally:
        model.train(was_training)
    out_list, counts, stops, lens = out.tolist(), n_out.tolist(), stopped.tolist(), lengths.tolist()
    return [
        Generation(out_list[r][: counts[r]], "stop" if stops[r] else "length", int(lens[r]))
        for r in range(b)
    ]


def _prompt_interventions(model: nn.Module, positions: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """LoReFT edits the prompt's positions at prefill only (see `trainer.reft`); other models take no mask."""
    spec = getattr(model, "reft_positions", None)
    if spec is None:
        return {}
    from trainer.reft_positions import prompt_mask

    return {"intervene": prompt_mask(spec, positions, valid)}


def generate(model: Transformer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *,
             step_fn: Callable[..., torch.Tensor] | None = None, stop_early: bool = True) -> list[Generation]:
    """Generate for a batch of prompts (lists of token ids), left-padded together."""
    device, _ = _device_dtype(model)
    ids, mask = left_pad(prompts, cfg.pad_id, device)
    return generate_padded(model, ids, mask, cfg, step_fn=step_fn, stop_early=stop_early)


def compiled_step(model: Transformer) -> Callable[..., torch.Tensor]:
    """The one-token decode step under torch.compile, for `step_fn`.

    Every decode step has the same shapes ([B, 1] tokens over the whole static cache), so one compiled graph
    serves a whole generation; it pays where kernel launches dominate (small batches on a GPU). On CPU the
    compile time is rarely won back, so nothing here turns it on by default."""
    return torch.compile(model.forward_cached, dynamic=False)


@dataclass
class BatchStats:
    prompts: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    stopped: int = 0
    hit_length: int = 0
    elapsed_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar prompt length (longest first, so memory trouble shows early).

    Similar lengths waste little compute on padding; `max_batch_tokens` caps batch_size x longest prompt."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            cur = batches[-1]
            width = lengths[cur[0]]
            if len(cur) < batch_size and (max_batch_tokens is None or width * (len(cur) + 1) <= max_batch_tokens):
                cur.append(i)
                continue
        batches.append([i])
    return batches


def generate_many(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    batch_size: int = 8,
    max_batch_tokens: int | None = None,
    on_batch: Callable[[list[int], list[Generation]], None] | None = None,
    stats: BatchStats | None = None,
    step_fn: Callable[..., torch.Tensor] | None = None,
    stop_early: bool = True,
) -> list[Generation]:
    """Generate for many prompts in length-sorted batches; results come back in input order.

    `on_batch(indices, generations)` is called after each batch (progress, streaming writes)."""
    stats = stats if stats is not None else BatchStats()
    results: list[Generation | None] = [None] * len(prompts)
    start = time.perf_counter()
    for idx in length_batches([len(p) for p in prompts], batch_size, max_batch_tokens):
        gens = generate(model, [prompts[i] for i in idx], cfg, step_fn=step_fn, stop_early=stop_early)
        for i, g in zip(idx, gens, strict=True):
            results[i] = g
            stats.prompt_tokens += g.prompt_tokens
            stats.new_tokens += len(g.tokens)
            stats.stopped += g.stop_reason == "stop"
            stats.hit_length += g.stop_reason == "length"
        stats.prompts += len(idx)
        stats.batches += 1
        if on_batch is not None:
            on_batch(idx, gens)
    stats.elapsed_s += time.perf_counter() - start
    return [g for g in results if g is not None]


# ------------------------------------------------------------------------------- evaluation during training


@dataclass
class GenerationEval:
    """Evaluation by generation inside `trainer run` (eval.generate_every_n_steps), on pre-rendered prompts.

    The trainer never imports dataprep, so whoever starts the run (the CLI) renders the dev prompts with the
    training template and hands in their ids, the references, and `decode` (token ids -> text)."""

    prompts: list[list[int]]
    references: list[str]
    ids: list[str]
    decode: Callable[[list[int]], str]
    sampling: SamplingConfig
    every: int
    batch_size: int = 8
    samples: int = 3
    metrics: tuple[str, ...] = ("em", "bleu", "rougeL")

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0


@torch.no_grad()
def run_generation_eval(model: nn.Module, ev: GenerationEval, step: int) -> dict[str, object]:
    """Generate for every dev prompt and score it: one metrics.jsonl record (`gen_*` keys; the samples are text,
    which TensorBoard shows as text). Every rank calls this under FSDP2 (same prompts, same number of steps)."""
    from trainer.text_metrics import score

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    fsdp = _fsdp_root(model)
    if fsdp is not None:
        fsdp.unshard()  # forward_cached bypasses the root module's own pre-forward hook
    dtype = getattr(model, "autocast_dtype", None)
    device_type = next(model.parameters()).device.type
    stats = BatchStats()
    try:
        with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            gens = generate_many(model, ev.prompts, ev.sampling, batch_size=ev.batch_size, stats=stats,
                                 stop_early=not distributed)
    finally:
        if fsdp is not None:
            fsdp.reshard()
    predictions = [ev.decode(g.text_tokens) for g in gens]
    record: dict[str, object] = {"step": step}
    record.update({f"gen_{k}": v for k, v in score(predictions, ev.references, ev.metrics).items()})
    record["gen_stopped_frac"] = stats.stopped / max(stats.prompts, 1)
    record["gen_tokens_per_s"] = stats.tokens_per_s
    for i in range(min(ev.samples, len(predictions))):
        record[f"gen_sample_{i}"] = (f"id: {ev.ids[i]}\nprediction: {predictions[i]}\n"
                                     f"reference: {ev.references[i]}")
    return record


def _fsdp_root(model: nn.Module):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return None
    return model if isinstance(model, FSDPModule) else None


# ------------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A model ready to generate, with where its tokenizer files are and what was loaded."""

    model: Transformer
    tokenizer_dir: Path
    kind: ModelKind
    base_dir: Path
    adapter_dir: Path | None = None
    checkpoint_dir: Path | None = None
    eos_ids: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)
    base_note: str | None = None  # with an adapter: which base it is applied to (trainer.merge_lora's wording)


def _eos_ids(model_dir: Path) -> tuple[int, ...]:
    """eos ids from generation_config.json (else config.json): another stop signal besides the template's."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            except json.JSONDecodeError:
                continue
            if value is None:
                continue
            return tuple(int(v) for v in (value if isinstance(value, list) else [value]))
    return ()


def apply_adapter(model: Transformer, adapter_dir: str | Path) -> list[str]:
    """Wrap the modules a PEFT LoRA adapter directory names with our LoRA modules and load its tensors.

    Ranks and scalings come from the file (rank_pattern / alpha_pattern / rsLoRA honoured); DoRA magnitudes and
    `modules_to_save` tensors are loaded too. The base weights are untouched: nothing is merged."""
    from trainer.lora import LoraEmbedding, LoraLinear
    from trainer.merge_lora import read_adapter
    from trainer.weights import WeightsError

    adapter_dir = Path(adapter_dir)
    reft = _reft_config(adapter_dir)
    if reft is not None:
        from trainer.adapters import WEIGHTS_FILE
        from trainer.reft import apply_reft_adapter

        return apply_reft_adapter(model, adapter_dir / WEIGHTS_FILE, reft)
    prefix = _reft_config(adapter_dir, "PREFIX_TUNING")
    if prefix is not None:  # peft's format, but no module to wrap: keys / values for every layer
        from trainer.adapters import WEIGHTS_FILE
        from trainer.prefix import apply_prefix_adapter

        return apply_prefix_adapter(model, adapter_dir / WEIGHTS_FILE, prefix)
    config, adapters, full = read_adapter(adapter_dir)
    device = next(model.parameters()).device
    wrapped = []
    with torch.no_grad():
        for name, ad in sorted(adapters.items()):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise WeightsError(f"{adapter_dir}: the adapter targets {name}, which the model does not have") from None
            rank = ad.a.shape[0]
            if ad.kind == "embedding":
                if not isinstance(module, nn.Embedding):
                    raise WeightsError(f"{adapter_dir}: {name} is not an embedding in this model")
                wrapper: nn.Module = LoraEmbedding(module, rank, ad.scaling)
                wrapper.lora_embedding_A.copy_(ad.a)
                wrapper.lora_embedding_B.copy_(ad.b)
            else:
                if not isinstance(module, nn.Linear):
                    raise WeightsError(f"{adapter_dir}: {name} is not a Linear layer in this model")
                wrapper = LoraLinear(module, rank, ad.scaling, 0.0, ad.magnitude is not None)
                if tuple(ad.a.shape) != tuple(wrapper.lora_A.shape) or tuple(ad.b.shape) != tuple(wrapper.lora_B.shape):
                    raise WeightsError(f"{adapter_dir}: {name} adapter shapes {tuple(ad.a.shape)}/{tuple(ad.b.shape)} "
                                       f"do not fit the layer ({module.in_features} -> {module.out_features})")
                wrapper.lora_A.copy_(ad.a)
                wrapper.lora_B.copy_(ad.b)
                if ad.magnitude is not None:
                    wrapper.lora_magnitude_vector.copy_(ad.magnitude)
            wrapper.to(device)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, wrapper)
            wrapped.append(name)
        params = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters()}
        for key, tensor in full.items():
            key = key.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
            if key not in params:
                raise WeightsError(f"{adapter_dir}: modules_to_save tensor {key} matches no model parameter")
            if tuple(params[key].shape) != tuple(tensor.shape):
                raise WeightsError(f"{adapter_dir}: {key} has shape {tuple(tensor.shape)}, "
                                   f"the model expects {tuple(params[key].shape)}")
            params[key].copy_(tensor)
    log.info("applied LoRA adapter %s to %d modules (r=%s, alpha=%s)", adapter_dir, len(wrapped),
             config.get("r"), config.get("lora_alpha"))
    return wrapped


def _reft_config(adapter_dir: Path, peft_type: str = "LOREFT") -> dict | None:
    """The adapter's config when it is a LoReFT adapter (this project's format) or, with `peft_type`, another
    kind that is not a set of module wrappers (PREFIX_TUNING), else None."""
    from trainer.adapters import CONFIG_FILE

    try:
        config = json.loads((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # read_adapter names the problem
    return config if isinstance(config, dict) and config.get("peft_type") == peft_type else None


def _find_run(path: Path) -> tuple[Path, Path] | None:
    """(run dir, checkpoint dir) when `path` is a run directory or one of its checkpoints, else None."""
    from trainer.checkpoint import MARKER, find_resume_checkpoint

    if (path / MARKER).is_file() and (path.parent.parent / RESOLVED_CONFIG).is_file():
        return path.parent.parent, path
    if (path / RESOLVED_CONFIG).is_file() and (path / "checkpoints").is_dir():
        ckpt = find_resume_checkpoint(path)
        if ckpt is not None:
            return path, ckpt
    return None


def load_checkpoint_model(run_dir: Path, checkpoint_dir: Path, *, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> Transformer:
    """Rebuild the run's model (its resolved config: model path, overrides, PEFT) and load a DCP checkpoint.

    The base weights come from `model.path` as in training; the checkpoint supplies what was trained (all
    weights, or the adapters and any fully trained parameters of a LoRA run). The checkpoint is verified
    against its checksums first. One process only (no FSDP)."""
    from trainer.checkpoint import load_model_state, validate_checkpoint
    from trainer.config import load_config
    from trainer.lora import checkpoint_name_map, setup_peft
    from trainer.model_config import ModelConfig
    from trainer.weights import load_hf_weights, materialize

    validate_checkpoint(checkpoint_dir)
    config = load_config(run_dir / RESOLVED_CONFIG)
    overrides = dict(config.model.overrides)
    model_config = ModelConfig.from_pretrained(config.model.path, **overrides)
    with torch.device("meta"):
        model = Transformer(model_config)
    setup_peft(model, config.peft)
    materialize(model, device)
    lora = config.peft.pet_type in ("lora", "loreft", "prefix_tuning")  # their parameters are not in the base checkpoint
    load_hf_weights(model, config.model.path, show_progress=False, name_map=checkpoint_name_map if lora else None)
    load_model_state(checkpoint_dir, model, verify=False)  # validated above
    model.tie_weights()
    return model.to(dtype)


def load_model(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    base_as_trained: bool | None = None,
) -> LoadedModel:
    """Load anything `trainer run` produces for generation (see the module docstring for the kinds).

    An adapter trained on a quantized base records it (`trainer.quantize.BASE_RECORD`); `base_as_trained`
    None or True applies the adapter to that base (the checkpoint's weights quantized and dequantized again),
    so generation computes what the trained model did; False applies it to the checkpoint's weights as they are."""
    from trainer.adapters import CONFIG_FILE
    from trainer.hf_backend import resolve_backend
    from trainer.weights import load_pretrained

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (a model, adapter, run or checkpoint directory)")
    run = _find_run(path)
    if run is not None:
        if adapter_dir is not None:
            raise ValueError(f"{path} is a training checkpoint; it already holds its adapters (drop --adapter)")
        from trainer.config import load_config

        run_dir, ckpt = run
        base = Path(load_config(run_dir / RESOLVED_CONFIG).model.path)
        model = load_checkpoint_model(run_dir, ckpt, device=device, dtype=dtype)
        return LoadedModel(model.eval(), base, "checkpoint", base, None, ckpt, _eos_ids(base))
    if (path / RESOLVED_CONFIG).is_file() and (path / "export").is_dir():
        path = path / "export"  # a run directory without checkpoints: its final export
    if (path / CONFIG_FILE).is_file() and not (path / "config.json").is_file():
        if adapter_dir is not None:
            raise ValueError(f"{path} is a LoRA adapter directory; pass the base model as --model and it as --adapter")
        raw = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        base_name = raw.get("base_model_name_or_path")
        if not base_name or not Path(base_name).is_dir():
            raise FileNotFoundError(f"{path / CONFIG_FILE}: base_model_name_or_path {base_name!r} is not a local "
                                    "directory; pass the base model as --model and this directory as --adapter")
        adapter_dir, path = path, Path(base_name)
    if resolve_backend("auto", path) == "hf":  # a family the native decoder does not implement
        from trainer.hf_backend import load_pretrained as load_hf

        model = load_hf(path, device=device, dtype=dtype)
    else:
        model = load_pretrained(path, device=device, dtype=dtype)
    tokenizer_dir = path
    base_note = None
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        base_note = _use_recorded_base(model, adapter_dir, base_as_trained)
        apply_adapter(model, adapter_dir)
        model.to(dtype)
        if any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            tokenizer_dir = adapter_dir
    kind: ModelKind = "hf+adapter" if adapter_dir is not None else "hf"
    return LoadedModel(model.eval(), tokenizer_dir, kind, path, Path(adapter_dir) if adapter_dir else None,
                       None, _eos_ids(path), base_note=base_note)


@torch.no_grad()
def _use_recorded_base(model: nn.Module, adapter_dir: Path, as_trained: bool | None) -> str:
    """Put the quantized base the adapter records (if any, and unless `as_trained` is False) in place of the
    loaded weights; how a summary names the base used."""
    from trainer.merge_lora import recorded_base_values

    values, note = recorded_base_values(adapter_dir, as_trained)
    if values is not None:
        for name, param in model.named_parameters():
            param.copy_(values(name.removeprefix("hf_model."), param))
    return note
