"""The training loop: build, step, log, evaluate, export.

One optimizer step on every rank:
1. take this rank's `grad_accum_steps` micro-batches from the loader;
2. all-reduce their trainable-token count, so every rank knows the global batch's denominator;
3. forward/backward each micro-batch with loss = summed CE / global trainable tokens, times the world
   size because FSDP2 averages gradients over ranks; so accumulation and world size do not change the update;
4. clip, step, schedule, and tell the loader the step's rows are consumed (exact resume).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import (
    CheckpointError,
    TrainerState,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from trainer.config import TrainConfig, save_config
from trainer.dataset import PackedIterableDataset
from trainer.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed, shard_model
from trainer.lora import checkpoint_name_map, count_parameters, init_adapters, install_neftune, setup_peft
from trainer.loss import summed_cross_entropy
from trainer.metrics import (
    MetricsWriter,
    Throughput,
    matmul_params,
    peak_flops,
    peak_memory_gib,
    training_flops,
)
from trainer.model import Transformer
from trainer.model_config import ModelConfig
from trainer.optim import build_optimizer, build_scheduler
from trainer.signals import StopFlag, StopRequested
from trainer.weights import export_hf, load_hf_weights, materialize

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

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build_model(config: TrainConfig, info: DistInfo, dtype: torch.dtype) -> Transformer:
    """Meta-device build -> FSDP2 shard -> materialize per shard -> stream HF weights into the shards.

    On CUDA with bf16 the parameters stay fp32 (the optimizer's master copy) and FSDP2 casts them to bf16
    for compute; without FSDP (one process) the model itself runs in `dtype`.
    """
    overrides = dict(config.model.overrides)
    overrides["attn_backend"] = config.model.attn_backend
    model_config = ModelConfig.from_pretrained(config.model.path, **overrides)
    with torch.device("meta"):
        model = Transformer(model_config)
    blocks = list(model.model.layers)
    # LoRA surgery on the meta model, before sharding, so FSDP2 sees the final tree and frozen flags.
    lora = config.peft.pet_type == "lora"
    wrapped = setup_peft(model, config.peft)
    if config.model.activation_checkpointing:
        model.activation_checkpointing = True
    if config.model.compile:
        for block in blocks:
            block.compile()
    # Parameters stay fp32 (the optimizer's master copy). Several ranks: FSDP2 casts them to `dtype` for
    # compute. One process: the forward runs under autocast (see `_forward_loss`), to the same effect.
    param_dtype = dtype if (info.distributed and dtype != torch.float32) else None
    model.autocast_dtype = dtype if (not info.distributed and dtype != torch.float32) else None
    shard_model(
        model, blocks, info, param_dtype=param_dtype, reshard_after_forward=config.parallel.reshard_after_forward
    )
    materialize(model, info.device)
    load_hf_weights(model, config.model.path, show_progress=info.is_main and config.logging.progress_bar,
                    name_map=checkpoint_name_map if lora else None)
    if lora:
        init_adapters(model, config.peft, config.train.seed)
    if config.peft.neftune_noise_alpha is not None:
        install_neftune(model, config.peft.neftune_noise_alpha)
    counts = count_parameters(model, info.world_size if info.distributed else 1)
    log.info("trainable parameters: %d of %d (%.3f%%)%s", counts.trainable_params, counts.total_params,
             counts.trainable_pct, f"; LoRA on {len(wrapped)} modules" if lora else "")
    return model


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
        logits = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"])
    return summed_cross_entropy(logits, batch["labels"])


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
    global_batch = config.data.micro_batch_size * info.world_size
    dataset = PackedIterableDataset(
        path,
        global_batch_size=global_batch,
        micro_batch_size=config.data.micro_batch_size,
        shuffle=False,
        remainder="pad",
        epochs=1,
        rank=info.rank,
        world_size=info.world_size,
        expected_seq_length=seq_length,
    )
    model.eval()
    loss_sum, tokens = 0.0, 0
    for raw in _make_loader(dataset, 0):
        batch = _to_device(raw, info.device)
        loss_sum += float(_forward_loss(model, batch))
        tokens += batch["num_trainable"]
    model.train()
    loss_sum = all_reduce_sum(loss_sum, info)
    tokens = int(all_reduce_sum(tokens, info))
    return loss_sum / max(tokens, 1)


def _steps_for(dataset: PackedIterableDataset, config: TrainConfig) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    per_epoch = dataset.plan(0).steps
    return max(1, math.ceil(config.train.epochs * per_epoch))


def _step_batches(loader_iter: Iterator[dict[str, Any]], accum: int) -> list[dict[str, Any]]:
    batches = [next(loader_iter) for _ in range(accum)]
    if not batches[-1]["loader"]["last_in_step"]:
        raise RuntimeError("loader and trainer disagree on grad_accum_steps: a step ended mid-way")
    return batches


def train(
    config: TrainConfig,
    *,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    info: DistInfo | None = None,
) -> RunResult:
    """Run training as configured; returns what happened. Rank 0 writes the run directory."""
    info = info or init_distributed(config.parallel.backend)
    try:
        return _train(config, info, on_step)
    finally:
        cleanup(info)


def _train(config: TrainConfig, info: DistInfo, on_step: Callable[[dict[str, Any]], None] | None) -> RunResult:
    torch.manual_seed(config.train.seed)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    out_dir = Path(config.logging.output_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.resolved.yaml")
    barrier(info)

    dtype = resolve_dtype(config.model.dtype, info.device)
    model = build_model(config, info, dtype)
    accum = config.train.grad_accum_steps
    global_batch = config.data.micro_batch_size * accum * info.world_size
    dataset = PackedIterableDataset(
        config.data.train,
        global_batch_size=global_batch,
        micro_batch_size=config.data.micro_batch_size,
        weights=config.data.weights,
        seed=config.train.seed,
        shuffle=config.data.shuffle,
        remainder=config.data.remainder,
        epochs=None,
        rank=info.rank,
        world_size=info.world_size,
        expected_tokenizer_fingerprint=_tokenizer_fingerprint(config.model.path),
    )
    total_steps = _steps_for(dataset, config)
    optimizer = build_optimizer(model, config.train, config.peft.loraplus_lr_ratio)
    scheduler = build_scheduler(optimizer, config.train, total_steps)

    start_step = 0
    resume_from = _agree_on_resume(config, out_dir, info)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, info, verify=False)  # rank 0 validated it
        if state.global_batch_size != global_batch:
            raise CheckpointError(
                f"{resume_from}: saved with a global batch of {state.global_batch_size} rows, this run has "
                f"{global_batch} (micro_batch_size x grad_accum_steps x world size); the data position cannot "
                "be carried over. Keep the global batch, or start over with --resume none."
            )
        scheduler.load_state_dict(state.scheduler)
        dataset.load_state_dict(state.data)
        start_step = state.step

    def save(step: int) -> Path:
        trainer_state = TrainerState(
            step=step, scheduler=scheduler.state_dict(), data=dataset.state_dict(), config=config.to_dict(),
            world_size=info.world_size, global_batch_size=global_batch,
        )
        path = save_checkpoint(out_dir, step, model, optimizer, trainer_state, info, keep=config.checkpoint.keep)
        if config.checkpoint.save_format == "dcp+hf":
            exports = out_dir / "exports"
            _export(model, config, out_dir, info, exports / f"step-{step:08d}")
            if info.is_main:
                _prune_exports(exports, config.checkpoint.keep)
        return path

    result = RunResult(steps=start_step, output_dir=str(out_dir))
    stop = StopFlag().install()
    try:
        _run_steps(config, info, model, dataset, optimizer, scheduler, range(start_step, total_steps),
                   result, stop, save, on_step)
    finally:
        stop.restore()
    if config.checkpoint.every_steps and result.steps > start_step and result.steps % config.checkpoint.every_steps:
        save(result.steps)  # the final state, unless the interval just saved it
    if config.checkpoint.export:
        result.export_dir = str(_export(model, config, out_dir, info))
    if info.is_main:
        summary = {k: v for k, v in result.__dict__.items() if k != "losses"}
        summary["final_loss"] = result.final_loss
        summary["resumed_from"] = str(resume_from) if resume_from else None
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


def _export(
    model: Transformer, config: TrainConfig, out_dir: Path, info: DistInfo, export_dir: Path | None = None
) -> Path:
    """Full runs export HF weights; LoRA runs export the PEFT adapter (and, if asked, merged weights beside it)."""
    export_dir = export_dir or out_dir / "export"
    if config.peft.pet_type != "lora":
        return export_hf(model, export_dir, source_dir=config.model.path,
                         max_shard_size=config.checkpoint.max_shard_size, overwrite=True)
    from trainer.adapters import save_adapter

    save_adapter(model, export_dir, config.peft, base_model=config.model.path)
    if config.peft.export_merged:
        if info.is_main:
            from trainer.merge_lora import merge_lora

            merge_lora(config.model.path, export_dir, export_dir.with_name(export_dir.name + "-merged"), overwrite=True,
                       show_progress=config.logging.progress_bar)
        barrier(info)
    return export_dir


def _prune_exports(exports: Path, keep: int) -> None:
    """Keep the newest `keep` intermediate exports (and their -merged twins), like the checkpoints."""
    steps = sorted(p.name for p in exports.iterdir() if p.is_dir() and p.name.startswith("step-")
                   and not p.name.endswith("-merged"))
    for name in steps[:-keep]:
        for path in (exports / name, exports / f"{name}-merged"):
            shutil.rmtree(path, ignore_errors=True)


def _agree_on_resume(config: TrainConfig, out_dir: Path, info: DistInfo) -> Path | None:
    """Rank 0 picks the checkpoint (validating it) and tells the others, so all ranks load the same one."""
    choice = [None]
    if info.is_main:
        found = resolve_resume(config.checkpoint.resume, out_dir)
        choice = [str(found) if found else None]
    if info.distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def _run_steps(config, info, model, dataset, optimizer, scheduler, steps, result, stop, save, on_step) -> None:
    mcfg = model.config
    accum = config.train.grad_accum_steps
    trainable = [p for p in model.parameters() if p.requires_grad]
    shards = info.world_size if info.distributed else 1  # FSDP parameters hold 1/world of each tensor locally
    n_matmul = matmul_params(model) * shards
    attn_dim = mcfg.num_attention_heads * mcfg.head_dim
    peak = peak_flops(info.device)
    result.total_params = sum(p.numel() for p in model.parameters()) * shards
    result.trainable_params = sum(p.numel() for p in trainable) * shards
    out_dir = Path(config.logging.output_dir)
    writer = MetricsWriter(out_dir / "metrics.jsonl" if info.is_main else None,
                           out_dir / "tensorboard" if (info.is_main and config.logging.tensorboard) else None)
    progress = None
    if info.is_main and config.logging.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=steps.stop, initial=steps.start, desc="train", unit="step", dynamic_ncols=True)
    loader_iter = iter(_make_loader(dataset, config.data.num_workers))
    timer = Throughput()
    run_start = time.perf_counter()
    window_tokens = window_flops = 0.0
    every = config.checkpoint.every_steps
    model.train()
    try:
        for step in steps:
            raw = _step_batches(loader_iter, accum)
            batches = [_to_device(b, info.device) for b in raw]
            global_tokens = all_reduce_sum(sum(b["num_trainable"] for b in batches), info)
            denom = max(global_tokens, 1.0)
            grad_scale = info.world_size / denom  # FSDP2 averages over ranks; we want the global token mean
            loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)  # synced once per step
            try:
                for i, batch in enumerate(batches):
                    if info.distributed:
                        model.set_requires_gradient_sync(i == len(batches) - 1)
                    loss = _forward_loss(model, batch)
                    (loss * grad_scale).backward()
                    loss_sum += loss.detach().double()
                    window_flops += training_flops(n_matmul, batch["input_ids"].numel(),
                                                   batch["doc_len_sq_sum"], mcfg.num_hidden_layers,
                                                   attn_dim)
            except Exception:
                log.exception("rank %d: step %d failed in forward/backward", info.rank, step + 1)
                optimizer.zero_grad(set_to_none=True)
                if not info.distributed and every and step > 0:
                    # Parameters are still those after step `step`: keep them (other ranks cannot join a save).
                    save(step)
                raise
            grad_norm = _clip(trainable, config.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dataset.mark_consumed(raw[-1])
            step_loss = all_reduce_sum(loss_sum.cpu(), info) / denom
            result.losses.append(step_loss)
            result.trained_tokens += int(global_tokens)
            window_tokens += global_tokens
            result.steps = step + 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}")
            if (step + 1) % config.logging.log_every == 0 or step + 1 == steps.stop:
                elapsed = timer.lap()
                record = {
                    "step": step + 1,
                    "loss": step_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "trainable_tokens": int(global_tokens),
                    "tokens_per_s": window_tokens / elapsed if elapsed > 0 else 0.0,
                    "peak_memory_gib": peak_memory_gib(info.device),
                    "epoch": dataset.state_dict()["epoch"],
                }
                if peak is not None and elapsed > 0:
                    # window_flops counts this rank's micro-batches; every rank does the same amount of work.
                    record["mfu"] = window_flops / elapsed / peak
                window_tokens = window_flops = 0.0
                writer.write(record)
                if on_step is not None:
                    on_step(record)
            if config.data.eval and config.train.eval_every and (step + 1) % config.train.eval_every == 0:
                eval_loss = evaluate(model, config.data.eval, config, info, dataset.seq_length)
                result.eval_losses.append((step + 1, eval_loss))
                writer.write({"step": step + 1, "eval_loss": eval_loss})
                log.info("step %d: eval loss %.4f", step + 1, eval_loss)
            saved = save(step + 1) if every and (step + 1) % every == 0 else None
            # Every rank learns whether any rank was signalled, so all stop at the same step boundary.
            if all_reduce_sum(1.0 if stop.signum is not None else 0.0, info) > 0:
                saved = saved or save(step + 1)
                raise StopRequested(stop.signum or signal.SIGTERM, str(saved))
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        result.elapsed_s = time.perf_counter() - run_start
        result.tokens_per_s = result.trained_tokens / result.elapsed_s if result.elapsed_s > 0 else 0.0


def _clip(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Clip the global gradient norm (over all ranks' shards when FSDP2 DTensors are used); return it."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _tokenizer_fingerprint(model_dir: str) -> str | None:
    """The fingerprint of the model directory's tokenizer, so data packed with another tokenizer is refused."""
    try:
        from dataprep.tokenizer import load_tokenizer
    except ImportError:  # pragma: no cover - dataprep is part of this distribution
        return None
    try:
        return load_tokenizer(model_dir).fingerprint
    except Exception as exc:  # no tokenizer files in the checkpoint dir: nothing to compare against
        log.warning("could not read a tokenizer from %s (%s); skipping the tokenizer fingerprint check", model_dir, exc)
        return None
