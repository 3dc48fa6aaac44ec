"""The training loop: build, step, log, evaluate, export.

One optimizer step on every rank:
1. take this rank's `grad_accum_steps` micro-batches from the loader;
2. all-reduce their trainable-token count over the data-parallel ranks (the ranks of one tensor-parallel
   group hold the same rows), so every rank knows the global batch's denominator;
3. forward/backward each micro-batch with loss = summed CE / global trainable tokens, times the data-parallel
   size because FSDP2 averages gradients over those ranks; so accumulation and world size do not change the
   update. With context parallelism each cp rank runs its slice of the rows (`trainer.context_parallel`):
   the token count is still the whole rows', FSDP2 averages over dp x cp ranks, and the loss sums add over cp;
4. clip, step, schedule, and tell the loader the step's rows are consumed (exact resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from formats.hub import resolve as resolve_hub
from formats.lock import locked
from formats.schema import IGNORE_INDEX
from formats.tokenizer_id import tokenizer_fingerprint
from formats.verify import require_valid
from trainer import hf_backend
from trainer.checkpoint import Checkpointer
from trainer.config import TrainConfig, save_config
from trainer.context_parallel import check_sequence as check_cp_sequence
from trainer.context_parallel import context_parallel_of, cp_load_balance, local_slice
from trainer.dataset import PackedIterableDataset
from trainer.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed, shard_model
from trainer.generate import GenerationEval, run_generation_eval
from trainer.lora import (
    checkpoint_name_map,
    count_parameters,
    init_adapters,
    install_neftune,
    setup_peft,
    store_frozen_in,
)
from trainer.metrics import StepLogger, StepStats, matmul_params, plot_metrics, training_flops
from trainer.model import Transformer
from trainer.model_config import ModelConfig
from trainer.optim import build_optimizer, build_scheduler
from trainer.quantize import is_quantized, quantize_frozen_base
from trainer.reporting import open_reporters
from trainer.signals import StopFlag, StopRequested
from trainer.tensor_parallel import check_sequence, clip_grad_norm
from trainer.weights import load_hf_weights, materialize

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "labels", "position_ids", "cu_seqlens")


@dataclass
class RunResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    trained_tokens: int = 0
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    output_dir: str = ""
    export_dir: str | None = None
    trainable_params: int = 0
    total_params: int = 0
    world_size: int = 1  # processes that trained (torchrun ranks)
    skipped_steps: list[int] = field(default_factory=list)  # steps whose update was dropped (non-finite)
    plot: str | None = None  # output_dir/loss.png when drawn
    generation_evals: list[dict[str, Any]] = field(default_factory=list)  # eval.generate_every_n_steps records

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def frozen_dtype(name: str, compute: torch.dtype) -> torch.dtype:
    """Storage dtype of frozen parameters: auto = the compute dtype (bf16 on CUDA). A bf16 base with fp32
    compute would make every matmul mix dtypes, so it is refused rather than silently upcast."""
    if name == "auto":
        return compute
    chosen = resolve_dtype(name, torch.device("cpu"))
    if chosen != torch.float32 and compute == torch.float32:
        raise ValueError(f"model.frozen_dtype {name} needs {name} compute: set model.dtype: {name} as well")
    return chosen


def build_model(config: TrainConfig, info: DistInfo, dtype: torch.dtype) -> Transformer:
    """Meta-device build -> FSDP2 shard -> materialize per shard -> stream HF weights into the shards.

    On CUDA with bf16 the parameters stay fp32 (the optimizer's master copy) and FSDP2 casts them to bf16
    for compute; without FSDP (one process) the model itself runs in `dtype`.
    """
    hf = hf_backend.resolve_backend(config.model.backend, config.model.path) == "hf"
    if hf:  # any transformers causal LM (see trainer.hf_backend)
        model = hf_backend.build_meta_model(config.model.path, config.model.overrides, config.model.attn_backend)
        blocks = hf_backend.decoder_blocks(model)
    else:
        overrides = dict(config.model.overrides)
        overrides["attn_backend"] = config.model.attn_backend
        model_config = ModelConfig.from_pretrained(config.model.path, **overrides)
        with torch.device("meta"):
            model = Transformer(model_config)
        blocks = list(model.model.layers)
    # LoRA surgery on the meta model, before sharding, so FSDP2 sees the final tree and frozen flags.
    lora = config.peft.pet_type is not None  # any adapter method (lora, vera, lokr)
    wrapped = setup_peft(model, config.peft)
    store_frozen_in(model, frozen_dtype(config.model.frozen_dtype, dtype))
    quantize_frozen_base(model, config.peft, frozen_dtype(config.model.frozen_dtype, dtype))  # QLoRA (no-op if off)
    if config.model.activation_checkpointing:
        model.activation_checkpointing = True
        if hf:
            hf_backend.enable_activation_checkpointing(model)
    model.loss_config = dataclasses.replace(model.loss_config, impl=config.model.loss,
                                            chunk_tokens=config.model.loss_chunk_tokens)
    if config.model.compile:
        for block in blocks:
            block.compile()
    if info.context_parallel:  # the config refuses model.backend hf with parallel.cp > 1
        model.context_parallel = context_parallel_of(info, config.parallel.cp_attention,
                                                     cp_load_balance(config.parallel))
    # Parameters stay fp32 (the optimizer's master copy). Several ranks: FSDP2 casts them to `dtype` for
    # compute. One process: the forward runs under autocast (see `_forward_loss`), to the same effect.
    param_dtype = dtype if (info.fsdp and dtype != torch.float32) else None
    model.autocast_dtype = dtype if (not info.fsdp and dtype != torch.float32) else None
    shard_model(
        model, blocks, info, param_dtype=param_dtype, reshard_after_forward=config.parallel.reshard_after_forward,
        cpu_offload=config.parallel.cpu_offload,
    )
    (hf_backend.materialize if hf else materialize)(model, info.device)
    show_progress = info.is_main and config.logging.progress_bar and sys.stderr.isatty()
    load = hf_backend.load_weights if hf else load_hf_weights
    load(model, config.model.path, show_progress=show_progress, name_map=checkpoint_name_map if lora else None)
    if lora:
        init_adapters(model, config.peft, config.train.seed)
    _refuse_nonfinite_weights(model, info, config.model.path)
    if config.peft.neftune_noise_alpha is not None:
        install_neftune(model, config.peft.neftune_noise_alpha)
    counts = count_parameters(model)  # DTensor.numel() is the whole tensor's: no per-shard scaling
    log.info("trainable parameters: %d of %d (%.3f%%)%s", counts.trainable_params, counts.total_params,
             counts.trainable_pct, f"; LoRA on {len(wrapped)} modules" if lora else "")
    return model


def _refuse_nonfinite_weights(model: torch.nn.Module, info: DistInfo, source: str) -> None:
    """NaN/Inf in the weights would train to an all-NaN export with exit 0: refuse them before step 1."""
    bad = []
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if local.numel() and not is_quantized(local) and not bool(torch.isfinite(local).all()):  # NF4: at load
            bad.append(name)
    if all_reduce_sum(float(len(bad)), info) > 0:
        where = f": {', '.join(bad[:5])}" if bad else " (in another rank's shard)"
        raise ValueError(f"{source}: the weights hold NaN or Inf{where}; refusing to train on them")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {k: batch[k].to(device, non_blocking=True) for k in BATCH_KEYS}
    out["max_seqlen"] = int(batch["max_seqlen"])
    out["num_trainable"] = int(batch["num_trainable"])
    # For the FLOPs count, from the host copy: reading it back from the device would sync every micro-batch.
    out["doc_len_sq_sum"] = _doc_len_sq_sum(batch["cu_seqlens"])
    return out


def _doc_len_sq_sum(cu_seqlens: torch.Tensor) -> int:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return int((lengths * lengths).sum())


def _forward_loss(model: Transformer, batch: dict[str, Any]) -> torch.Tensor:
    dtype = getattr(model, "autocast_dtype", None)
    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"],
                     labels=batch["labels"])


def _make_loader(dataset: PackedIterableDataset, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
        # Its own generator: starting an iterator must not draw from the global RNG, which dropout and NEFTune
        # use and a checkpoint restores (else a resumed run's noise would be shifted). Row order has its own seed.
        generator=torch.Generator().manual_seed(0),
    )


@torch.no_grad()
def evaluate(model: Transformer, path: str, config: TrainConfig, info: DistInfo, seq_length: int) -> float:
    """Mean token loss over the whole eval dataset (every row once, padded rows not counted)."""
    dataset = PackedIterableDataset(
        path,
        global_batch_size=config.data.micro_batch_size * info.dp_size,  # one micro-batch per rank a step
        micro_batch_size=config.data.micro_batch_size,
        shuffle=False,
        remainder="pad",
        epochs=1,
        rank=info.dp_rank,
        world_size=info.dp_size,
        expected_seq_length=seq_length,
    )
    model.eval()
    loss_sum, tokens = 0.0, 0
    cp = getattr(model, "context_parallel", None)
    for raw in _make_loader(dataset, 0):
        batch = local_slice(_to_device(raw, info.device), cp)
        loss_sum += float(_forward_loss(model, batch))
        tokens += batch["num_trainable"]  # the whole rows' count, the same on every cp rank
    model.train()
    loss_sum = all_reduce_sum(loss_sum, info, data_parallel=True, context_parallel=True)
    tokens = int(all_reduce_sum(tokens, info, data_parallel=True))
    return loss_sum / max(tokens, 1)


def _steps_for(dataset: PackedIterableDataset, config: TrainConfig) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    per_epoch = dataset.plan(0).steps
    return max(1, math.ceil(config.train.epochs * per_epoch))


def _step_batches(loader_iter: Iterator[dict[str, Any]], accum: int, run: Run) -> list[dict[str, Any]]:
    batches = [next(loader_iter) for _ in range(accum)]
    if not batches[-1]["loader"]["last_in_step"]:
        raise RuntimeError("loader and trainer disagree on grad_accum_steps: a step ended mid-way")
    for batch in batches:
        _check_ids(batch, run)
    return batches


def _check_ids(batch: dict[str, Any], run: Run) -> None:
    """Token ids and labels outside the vocabulary would index past the embedding (an IndexError deep in the
    model, or silent garbage on GPU): name the dataset row instead. Two reductions over the host batch."""
    vocab = run.model.config.vocab_size
    ids, labels = batch["input_ids"], batch["labels"]
    bad_ids = (ids < 0) | (ids >= vocab)
    bad_labels = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= vocab)
    if not bool(bad_ids.any() or bad_labels.any()):
        return
    row = int(((bad_ids | bad_labels).any(dim=1)).nonzero()[0])
    path = run.dataset.infos[int(batch["sample_source"][row])].path
    raise ValueError(f"{path}: row {int(batch['sample_row'][row])} holds token ids or labels outside the model's "
                     f"vocabulary of {vocab} (0..{vocab - 1}); was it packed for another model? `dataprep verify` "
                     "checks a dataset's rows")


def train(
    config: TrainConfig,
    *,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    info: DistInfo | None = None,
    generation_eval: GenerationEval | None = None,
) -> RunResult:
    """Run training as configured; returns what happened. Rank 0 writes the run directory.

    `generation_eval`: evaluation by generation every N steps on prompts the caller rendered to ids (the
    trainer never imports dataprep; `trainer run` builds it from eval.generate_data)."""
    info = info or init_distributed(config.parallel.backend, parallel=config.parallel)
    try:
        return _train(config, info, on_step, generation_eval)
    finally:
        cleanup(info)


@dataclass
class Run:
    """What every step works with: built once by `_train`, then read by the step and the parts around it."""

    config: TrainConfig
    info: DistInfo
    model: Transformer
    dataset: PackedIterableDataset
    optimizer: torch.optim.Optimizer
    scheduler: Any
    flops_per_token: int  # matmul parameters of the whole model (times 2 is a token's forward matmul FLOPs)
    trainable: list[torch.nn.Parameter]  # in model order: the gradient norm sums them in this order

    def batch_flops(self, batch: dict[str, Any]) -> float:
        mcfg = self.model.config
        return training_flops(self.flops_per_token, batch["input_ids"].numel(), batch["doc_len_sq_sum"],
                              mcfg.num_hidden_layers, mcfg.num_attention_heads * mcfg.head_dim)


def _train(config: TrainConfig, info: DistInfo, on_step: Callable[[dict[str, Any]], None] | None,
           generation_eval: GenerationEval | None = None) -> RunResult:
    # A hub id (`Qwen/Qwen3-8B`) names its snapshot in the local Hugging Face cache (never downloaded here);
    # the resolved config then records the exact snapshot directory that was trained.
    model_dir = str(resolve_hub(config.model.path, "model").resolve())
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, path=model_dir))
    out_dir = Path(config.logging.output_dir)
    with contextlib.ExitStack() as stack:
        if info.is_main:
            # One run per output directory: a second `trainer run` on it fails here, naming this one, before it
            # touches the config, metrics or checkpoints (only rank 0 locks: ranks on one host would conflict).
            out_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(locked(out_dir, inside=True, what="trainer output directory"))
        return _train_locked(config, info, on_step, out_dir, generation_eval)


def _train_locked(config: TrainConfig, info: DistInfo, on_step: Callable[[dict[str, Any]], None] | None,
                  out_dir: Path, generation_eval: GenerationEval | None = None) -> RunResult:
    torch.manual_seed(config.train.seed)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    if info.is_main:
        save_config(config, out_dir / "config.resolved.yaml")
    barrier(info)

    model = build_model(config, info, resolve_dtype(config.model.dtype, info.device))
    global_batch = config.global_batch(info.dp_size)
    dataset = PackedIterableDataset(
        config.data.train,
        global_batch_size=global_batch,
        micro_batch_size=config.data.micro_batch_size,
        weights=config.data.weights,
        seed=config.train.seed,
        shuffle=config.data.shuffle,
        remainder=config.data.remainder,
        epochs=None,
        rank=info.dp_rank,
        world_size=info.dp_size,
        expected_tokenizer_fingerprint=_model_tokenizer_fingerprint(config.model.path),
    )
    if info.tensor_parallel:
        check_sequence(dataset.seq_length, info.shape.tp, info.sequence_parallel)
    if info.context_parallel:
        check_cp_sequence(dataset.seq_length, info.shape.cp, cp_load_balance(config.parallel))
    _verify_data(dataset, config, info, model.config.vocab_size)
    total_steps = _steps_for(dataset, config)
    optimizer = build_optimizer(model, config.train, config.peft.loraplus_lr_ratio)
    scheduler = build_scheduler(optimizer, config.train, total_steps)
    # Counts from numel(): a DTensor's (FSDP2 or tensor-parallel shard) is that of the whole tensor, so no rank
    # count multiplies them (which would count a 2-rank run's parameters twice).
    trainable = [p for p in model.parameters() if p.requires_grad]
    run = Run(config, info, model, dataset, optimizer, scheduler, matmul_params(model), trainable)
    checkpointer = Checkpointer(config, info, out_dir, model, optimizer, scheduler, dataset, global_batch)
    start_step = checkpointer.resume()

    result = RunResult(steps=start_step, output_dir=str(out_dir), world_size=info.world_size)
    counts = count_parameters(model)  # a quantized Linear counts the weights it stands for, not its bytes
    result.total_params, result.trainable_params = counts.total_params, counts.trainable_params
    stop = StopFlag().install()
    try:
        _run_steps(run, checkpointer, range(start_step, total_steps), result, stop, on_step, generation_eval)
    finally:
        stop.restore()
    checkpointer.save_final(result.steps)
    export_dir = checkpointer.export_final(result.steps)
    result.export_dir = str(export_dir) if export_dir else None
    if info.is_main and config.logging.plot and (out_dir / "metrics.jsonl").exists():
        plot = plot_metrics(out_dir / "metrics.jsonl", out_dir / "loss.png")
        result.plot = str(plot) if plot else None
    if info.is_main:
        summary = {k: v for k, v in result.__dict__.items() if k != "losses"}
        summary["final_loss"] = result.final_loss
        summary["resumed_from"] = str(checkpointer.resumed_from) if checkpointer.resumed_from else None
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


def _run_steps(run: Run, checkpointer: Checkpointer, steps: range, result: RunResult, stop: StopFlag,
               on_step: Callable[[dict[str, Any]], None] | None,
               generation_eval: GenerationEval | None = None) -> None:
    """The loop: one optimizer step, then each part decides whether it is its turn (log, eval, save, stop)."""
    config, info = run.config, run.info
    out_dir = Path(config.logging.output_dir)
    reporters = open_reporters(config.logging.report_to, out_dir, out_dir.name, config.to_dict()) if info.is_main else []
    logger = StepLogger(out_dir=out_dir, is_main=info.is_main, device=info.device,
                        log_every=config.logging.log_every, progress_bar=config.logging.progress_bar,
                        start_step=steps.start, total_steps=steps.stop, reporters=reporters, on_step=on_step)
    loader_iter = iter(_make_loader(run.dataset, config.data.num_workers))
    run_start = time.perf_counter()
    run.model.train()
    try:
        for step in steps:
            raw = _step_batches(loader_iter, config.train.grad_accum_steps, run)
            try:
                stats: StepStats | None = train_step(run, raw)
            except NonFiniteStep as exc:
                stats = None
                _handle_nonfinite(run, checkpointer, result, logger, raw, step, exc)  # skips (counted) or raises
            except Exception:
                log.exception("rank %d: step %d failed in forward/backward", info.rank, step + 1)
                checkpointer.save_after_failure(step)
                raise
            done = step + 1
            result.steps = done
            if stats is not None:
                result.losses.append(stats.loss)
                result.trained_tokens += stats.trainable_tokens
                logger.step_done(done, stats, run.dataset.state_dict()["epoch"])
            if _eval_due(config, done):
                eval_loss = evaluate(run.model, config.data.eval, config, info, run.dataset.seq_length)
                result.eval_losses.append((done, eval_loss))
                logger.write({"step": done, "eval_loss": eval_loss})
                log.info("step %d: eval loss %.4f", done, eval_loss)
            if generation_eval is not None and generation_eval.due(done):
                record = run_generation_eval(run.model, generation_eval, done)
                result.generation_evals.append(record)
                logger.write(record)
                log.info("step %d: generation eval %s", done,
                         {k: round(v, 4) for k, v in record.items() if k.startswith("gen_") and isinstance(v, float)})
            checkpointer.step_done(done)
            # Every rank learns whether any rank was signalled, so all stop at the same step boundary.
            if all_reduce_sum(1.0 if stop.signum is not None else 0.0, info) > 0:
                raise StopRequested(stop.signum or signal.SIGTERM, str(checkpointer.save_for_stop(done)))
    finally:
        logger.close()
        result.elapsed_s = time.perf_counter() - run_start
        result.tokens_per_s = result.trained_tokens / result.elapsed_s if result.elapsed_s > 0 else 0.0


def _eval_due(config: TrainConfig, step: int) -> bool:
    return bool(config.data.eval and config.train.eval_every and step % config.train.eval_every == 0)


def train_step(run: Run, raw: list[dict[str, Any]]) -> StepStats:
    """One optimizer step over this rank's micro-batches of one global batch; the data cursor moves after it."""
    info, model = run.info, run.model
    cp = getattr(model, "context_parallel", None)
    batches = [local_slice(_to_device(b, info.device), cp) for b in raw]  # cp: this rank's slice of the rows
    # The whole rows' trainable tokens (cp ranks hold the same count), summed over the data-parallel ranks.
    global_tokens = all_reduce_sum(sum(b["num_trainable"] for b in batches), info, data_parallel=True)
    denom = max(global_tokens, 1.0)
    # FSDP2 averages over the data-parallel (x context-parallel) ranks; we want the global token mean, and the
    # cp ranks' partial gradients summed.
    grad_scale = info.grad_average_size / denom
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)  # synced once per step
    flops = 0.0
    try:
        for i, batch in enumerate(batches):
            if info.fsdp:
                model.set_requires_gradient_sync(i == len(batches) - 1)
            loss = _forward_loss(model, batch)
            (loss * grad_scale).backward()
            loss_sum += loss.detach().double()
            flops += run.batch_flops(batch)
    except Exception:
        run.optimizer.zero_grad(set_to_none=True)
        raise
    grad_norm = _clip(run.trainable, run.config.train.max_grad_norm, info)
    loss_value = float(all_reduce_sum(loss_sum.cpu(), info, data_parallel=True, context_parallel=True) / denom)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        run.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep(loss_value, grad_norm)
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (step() below moves to the next one)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.dataset.mark_consumed(raw[-1])
    return StepStats(loss=loss_value, grad_norm=grad_norm, lr=lr, trainable_tokens=int(global_tokens),
                     flops=flops)


class NonFiniteStep(RuntimeError):
    """A step's loss or gradient norm is NaN/Inf; raised before the update, so the parameters are untouched."""

    def __init__(self, loss: float, grad_norm: float) -> None:
        self.loss, self.grad_norm = loss, grad_norm
        super().__init__(f"loss {loss}, gradient norm {grad_norm}")


def _handle_nonfinite(run: Run, checkpointer: Checkpointer, result: RunResult, logger: StepLogger,
                      raw: list[dict[str, Any]], step: int, exc: NonFiniteStep) -> None:
    """Step `step + 1` was not finite. `train.nonfinite: skip` drops its update but consumes its batch and its
    schedule step, as if it ran, and counts it (up to max_skipped_steps); otherwise the run stops, exit 1."""
    train = run.config.train
    if train.nonfinite == "skip" and len(result.skipped_steps) < train.max_skipped_steps:
        log.warning("step %d: %s; update skipped (%d so far)", step + 1, exc, len(result.skipped_steps) + 1)
        run.scheduler.step()
        run.dataset.mark_consumed(raw[-1])
        result.skipped_steps.append(step + 1)
        logger.write({"step": step + 1, "skipped": "nonfinite", "loss": exc.loss, "grad_norm": exc.grad_norm})
        return
    checkpointer.save_after_failure(step)
    skipped = f" after skipping {len(result.skipped_steps)} such steps" if result.skipped_steps else ""
    raise RuntimeError(
        f"step {step + 1}: {exc}: training diverged or the data/weights hold NaN/Inf{skipped}. The parameters are "
        f"those after step {step}; lower train.lr, check the data, or set train.nonfinite: skip"
    ) from None


def _clip(params: list[torch.Tensor], max_norm: float | None, info: DistInfo | None = None) -> float:
    """Clip the global gradient norm (over all ranks' shards when FSDP2 DTensors are used); return it."""
    if info is not None and info.tensor_parallel:  # gradients on several meshes (see tensor_parallel)
        return clip_grad_norm(params, max_norm)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _verify_data(dataset: PackedIterableDataset, config: TrainConfig, info: DistInfo, vocab_size: int) -> None:
    """`data.verify` before step 1, once per node (local rank 0: the shards are on that node's disk or cache)."""
    if config.data.verify != "off" and info.local_rank == 0:
        start = time.perf_counter()
        for dataset_info in dataset.infos:
            require_valid(dataset_info.path, vocab_size=vocab_size, level=config.data.verify,
                          progress=info.is_main and config.logging.progress_bar and sys.stderr.isatty())
        log.info("data.verify %s: %d dataset(s) checked in %.1f s", config.data.verify, len(dataset.infos),
                 time.perf_counter() - start)
    barrier(info)


def _model_tokenizer_fingerprint(model_dir: str) -> str | None:
    """The fingerprint of the model directory's tokenizer (the rule `dataprep pack` records), so data packed
    with another tokenizer is refused. A directory without tokenizer files cannot be compared: said, not hidden."""
    fingerprint = tokenizer_fingerprint(model_dir)
    if fingerprint is None:
        log.warning("%s has no tokenizer files; cannot check that the data was packed with this model's "
                    "tokenizer", model_dir)
    return fingerprint
