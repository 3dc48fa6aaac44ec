"""Resumable checkpoints: sharded model + optimizer (DCP), schedule, data position, RNG, config; and the
`Checkpointer`, which owns a run's checkpoint lifecycle (resume, when to save, closing saves, exports).

Layout of `<output_dir>/checkpoints/`:

    step-00000010/            a complete checkpoint
        .metadata, __*.distcp DCP files (every rank writes its own shards; resharding on load is DCP's job)
        trainer_state.json    step, scheduler, data-loader state, config
        rng-rank00000.pt      per-rank RNG states
        COMPLETE.json         written last by rank 0: every file's size and xxh3 checksum
    step-00000020.tmp-XXXX/   a save in progress (or one that died): never resumed from
    latest                    name of the newest complete checkpoint, replaced atomically

A checkpoint is written into a temporary directory and renamed into place only after every rank has
finished and rank 0 has recorded the checksums, so a crash at any moment leaves either the previous
checkpoints or a new complete one. Loading re-hashes every file against COMPLETE.json, so a flipped
byte or a truncated shard is found before any of it reaches the model.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from formats.manifest import hash_file
from formats.writer import fsync_path
from trainer.config import TrainConfig
from trainer.distributed import DistInfo, barrier
from trainer.weights import export_hf

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE.json"
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or does not fit this run; the message says which and why."""


@dataclass
class TrainerState:
    step: int
    scheduler: dict[str, Any]
    data: dict[str, Any]
    config: dict[str, Any]
    world_size: int
    global_batch_size: int


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen parameters (LoRA's base weights) come from model.path on every start: a checkpoint holds only what
    # trains, so a LoRA checkpoint is adapters + their optimizer state. Loading it is not `strict` about the
    # frozen ones; a trainable key missing from the checkpoint still fails in dcp.load.
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    # get_state_dict keeps a frozen parameter's second name (a tied lm_head.weight); drop every frozen alias.
    frozen = {_clean_fqn(n) for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {"model": {k: v for k, v in model_sd.items() if k not in frozen}, "optim": optim_sd}


def _clean_fqn(name: str) -> str:
    for part in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(part, "")
    return name


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    info: DistInfo,
    keep: int = 2,
) -> Path:
    """Save on every rank (a collective); returns the final directory. Older ones beyond `keep` are removed."""
    import torch.distributed.checkpoint as dcp

    root = checkpoints_dir(output_dir)
    final = root / f"step-{step:08d}"
    # Every rank must write into the same temporary directory: rank 0 names it and broadcasts the name.
    name = [f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"]
    if info.distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    tmp = root / name[0]
    if info.is_main:
        tmp.mkdir(parents=True, exist_ok=False)
    barrier(info)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp), no_dist=not info.distributed)
    torch.save(_rng_state(), tmp / f"rng-rank{info.rank:05d}.pt")
    if info.is_main:
        _write_json_atomic(tmp / STATE_FILE, {"version": CHECKPOINT_VERSION, **state.__dict__})
    barrier(info)
    if info.is_main:
        files = {
            p.name: {"bytes": p.stat().st_size, "xxh3_128": hash_file(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file() and p.name != MARKER
        }
        _write_json_atomic(tmp / MARKER, {"version": CHECKPOINT_VERSION, "step": step,
                                          "world_size": info.world_size, "files": files})
        fsync_path(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_json_atomic(root / "latest", {"checkpoint": final.name, "step": step})
        fsync_path(root)
        _prune(root, keep)
        log.info("saved checkpoint %s", final)
    barrier(info)
    return final


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MARKER).exists())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def validate_checkpoint(path: Path) -> dict[str, Any]:
    """Return the COMPLETE.json record, or raise CheckpointError naming what is missing or corrupt."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    marker = path / MARKER
    if not marker.exists():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER}; the save did not finish)")
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{marker}: unreadable ({exc})") from None
    if record.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{marker}: checkpoint version {record.get('version')!r} is not {CHECKPOINT_VERSION}")
    for name, expected in record["files"].items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{path}: file {name} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: file {name} has {file.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
            )
        if hash_file(file) != expected["xxh3_128"]:
            raise CheckpointError(f"{path}: file {name} fails its checksum (corrupted)")
    return record


def find_resume_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that validates; incomplete or corrupt ones are reported and skipped."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), reverse=True)
    for stale in root.glob("step-*.tmp-*"):
        log.warning("ignoring unfinished checkpoint save %s", stale)
    for path in candidates:
        try:
            validate_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
            continue
        return path
    return None


def resolve_resume(setting: str, output_dir: str | Path) -> Path | None:
    """`auto` -> newest valid checkpoint (or None); `none` -> None; anything else is a path that must be valid."""
    if setting == "none":
        return None
    if setting == "auto":
        return find_resume_checkpoint(output_dir)
    path = Path(setting)
    validate_checkpoint(path)
    return path


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, *, verify: bool = True
) -> TrainerState:
    """Restore model and optimizer (resharded to this world size by DCP), RNG; return the trainer state.

    `verify=False` skips re-hashing every file, for callers that just validated the checkpoint (the loop's
    rank 0 does, in `resolve_resume`), so a large checkpoint is not read once per rank before loading.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if verify:
        validate_checkpoint(path)
    raw = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    raw.pop("version", None)
    state = TrainerState(**raw)
    sd = _dcp_state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process.*")
        dcp.load(sd, checkpoint_id=str(path), no_dist=not info.distributed)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=_state_options(strict=False))
    rng_file = path / f"rng-rank{info.rank:05d}.pt"
    if rng_file.exists() and state.world_size == info.world_size:
        _set_rng_state(torch.load(rng_file, weights_only=False))
    log.info("resumed from %s at step %d", path, state.step)
    return state


# ---- the lifecycle of one run's checkpoints -----------------------------------------------------------------


@dataclass
class Checkpointer:
    """Everything about one run's checkpoints: where to resume, when to save, the saves at the end, on a stop
    signal and after a failed step, and the HF exports that go with them (and their pruning).

    The loop only reports progress (`step_done`) and asks for the closing saves; each decision (is it time to
    save, was this step already saved, may a failed step be saved) is made here.
    """

    config: TrainConfig
    info: DistInfo
    out_dir: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dataset: Any  # trainer.dataset.PackedIterableDataset: state_dict / load_state_dict
    global_batch: int
    start_step: int = 0
    resumed_from: Path | None = None
    last_saved: int | None = None

    @property
    def every(self) -> int:
        return self.config.checkpoint.every_steps

    def resume(self) -> int:
        """Load the checkpoint `checkpoint.resume` names (rank 0 chooses and validates, all ranks load the same
        one); return the step to continue from (0 for a fresh start)."""
        choice = [None]
        if self.info.is_main:
            found = resolve_resume(self.config.checkpoint.resume, self.out_dir)
            choice = [str(found) if found else None]
        if self.info.distributed:
            import torch.distributed as dist

            dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return 0
        path = Path(choice[0])
        state = load_checkpoint(path, self.model, self.optimizer, self.info, verify=False)  # rank 0 validated it
        self.scheduler.load_state_dict(state.scheduler)
        self.dataset.load_state_dict(state.data)  # refuses another global batch, data, seed or order
        self.start_step = self.last_saved = state.step
        self.resumed_from = path
        return state.step

    def step_done(self, step: int) -> Path | None:
        """After optimizer step `step` (1-based): save when the interval says so; return the checkpoint."""
        if self.every and step % self.every == 0:
            return self.save(step)
        return None

    def save_for_stop(self, step: int) -> Path:
        """A stop signal after step `step`: the state must be on disk before the process exits."""
        return self.checkpoint_of(step) or self.save(step)

    def save_final(self, step: int) -> None:
        """The end of the run: save the final state when checkpointing is on, unless that step is saved."""
        if self.every and step > self.start_step and self.last_saved != step:
            self.save(step)

    def save_after_failure(self, step: int) -> None:
        """Step `step + 1` raised: parameters are still those after `step`, so keep them when that is possible
        (one process only: the other ranks of a job cannot join a collective save after one rank failed)."""
        if not self.info.distributed and self.every and step > 0 and self.last_saved != step:
            self.save(step)

    def checkpoint_of(self, step: int) -> Path | None:
        return checkpoints_dir(self.out_dir) / f"step-{step:08d}" if self.last_saved == step else None

    def save(self, step: int) -> Path:
        """Write the checkpoint of `step` (a collective) and, with save_format dcp+hf, the export beside it."""
        state = TrainerState(
            step=step, scheduler=self.scheduler.state_dict(), data=self.dataset.state_dict(),
            config=self.config.to_dict(), world_size=self.info.world_size, global_batch_size=self.global_batch,
        )
        path = save_checkpoint(self.out_dir, step, self.model, self.optimizer, state, self.info,
                               keep=self.config.checkpoint.keep)
        self.last_saved = step
        if self.config.checkpoint.save_format == "dcp+hf":
            exports = self.out_dir / "exports"
            self.export(exports / f"step-{step:08d}")
            if self.info.is_main:
                _prune_exports(exports, self.config.checkpoint.keep)
        return path

    def export_final(self) -> Path | None:
        """The run's export (`output_dir/export`) when `checkpoint.export` is on."""
        return self.export(self.out_dir / "export") if self.config.checkpoint.export else None

    def export(self, export_dir: Path) -> Path:
        """Full runs export HF weights; LoRA runs the PEFT adapter (and, if asked, merged weights beside it)."""
        config = self.config
        if config.peft.pet_type != "lora":
            return export_hf(self.model, export_dir, source_dir=config.model.path,
                             max_shard_size=config.checkpoint.max_shard_size, overwrite=True)
        from trainer.adapters import save_adapter

        save_adapter(self.model, export_dir, config.peft, base_model=config.model.path)
        if config.peft.export_merged:
            if self.info.is_main:
                from trainer.merge_lora import merge_lora

                merge_lora(config.model.path, export_dir, export_dir.with_name(export_dir.name + "-merged"),
                           overwrite=True, show_progress=config.logging.progress_bar)
            barrier(self.info)
        return export_dir


def _prune_exports(exports: Path, keep: int) -> None:
    """Keep the newest `keep` intermediate exports (and their -merged twins), like the checkpoints."""
    steps = sorted(p.name for p in exports.iterdir() if p.is_dir() and p.name.startswith("step-")
                   and not p.name.endswith("-merged"))
    for name in steps[:-keep]:
        for path in (exports / name, exports / f"{name}-merged"):
            shutil.rmtree(path, ignore_errors=True)
