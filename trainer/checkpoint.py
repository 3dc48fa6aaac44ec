"""Resumable checkpoints: sharded model + optimizer (DCP), schedule, data position, RNG, config; and the
`Checkpointer`, which owns a run's checkpoint lifecycle (resume, when to save, closing saves, exports).

Layout of `<output_dir>/checkpoints/`:

    step-00000010/            a complete checkpoint
        .metadata, __*.distcp DCP files (every rank writes its own shards; resharding on load is DCP's job)
        trainer_state.json    step, scheduler, data-loader state, config
        rng-rank00000.safetensors  per-rank RNG states (tensors + JSON metadata: no pickle)
        COMPLETE.json         written last by rank 0: every file's size and xxh3 checksum
    step-00000020.tmp-<pid>-<host>-<rand>/  a save in progress (or one that died): never resumed from;
                              removed on the next start, which holds the output directory's lock
    latest                    name of the newest complete checkpoint, replaced atomically

A checkpoint is written into a temporary directory and renamed into place only after every rank has
finished and rank 0 has recorded the checksums, so a crash at any moment leaves either the previous
checkpoints or a new complete one. Loading re-hashes every file against COMPLETE.json, so a flipped
byte or a truncated shard is found before any of it reaches the model.

Nothing in a checkpoint can run code when it is loaded. COMPLETE.json is a checksum, not a signature (anyone
who can write the directory can re-hash it), so safety cannot rest on it: RNG and trainer state are tensors
and JSON; DCP's `.metadata` is a pickle, read here by an unpickler that admits only DCP's own metadata types
(`_SafeReader`); the non-tensor values DCP stores (optimizer hyperparameters) are read with
`torch.load(weights_only=True)` (`_SafePlanner`) instead of DCP's default unrestricted `torch.load`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from formats.atomic import fsync_path, publish_dir, remove_stale_under, temp_name, write_text_atomic
from formats.hub import portable_ref
from formats.manifest import hash_file
from trainer.config import TrainConfig, resume_changes
from trainer.distributed import DistInfo, barrier
from trainer.weights import export_hf

log = logging.getLogger(__name__)

# 2: RNG state in safetensors instead of a torch.save pickle.
CHECKPOINT_VERSION = 2
STEP_DIR = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE.json"
STATE_FILE = "trainer_state.json"
METADATA_FILE = ".metadata"  # DCP's
REQUIRED_FILES = (METADATA_FILE, STATE_FILE)


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
    write_text_atomic(path, json.dumps(payload, indent=2))


def _rng_file(path: Path, rank: int) -> Path:
    return path / f"rng-rank{rank:05d}.safetensors"


def _save_rng_state(file: Path) -> None:
    """This process's RNG streams as tensors plus JSON metadata (safetensors: loading it runs no code)."""
    from safetensors.torch import save_file

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
    }
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, t in enumerate(cuda):
        tensors[f"cuda{i}"] = t
    meta = {"numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
            "python": json.dumps([version, gauss_next]), "cuda_devices": str(len(cuda))}
    save_file(tensors, str(file), metadata=meta)


def _load_rng_state(file: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        kind, pos, has_gauss, cached = json.loads(meta["numpy"])
        version, gauss_next = json.loads(meta["python"])
        cuda = [t[f"cuda{i}"] for i in range(int(meta["cuda_devices"]))]
        torch.set_rng_state(t["torch"])
        np.random.set_state((kind, t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate((version, tuple(int(x) for x in t["python_state"].tolist()), gauss_next))
    except (SafetensorError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: unreadable RNG state ({exc})") from None
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# What DCP's .metadata pickle may contain: its own metadata records and the few torch/stdlib values they hold.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # returns only torch.layout values
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _METADATA_GLOBALS.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: not a DCP metadata type")
        return super().find_class(module, name)


def read_dcp_metadata(path: Path) -> Any:
    """DCP's checkpoint metadata, unpickled with only DCP's own types admitted; CheckpointError otherwise."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = path / METADATA_FILE
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{file}: not a valid DCP metadata file ({exc})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: not a valid DCP metadata file (holds a {type(metadata).__name__})")
    return metadata


def _safe_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeReader(FileSystemReader):
        """DCP's file reader, but .metadata goes through the restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_dcp_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeReader(str(path))


def _safe_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class _SafePlanner(DefaultLoadPlanner):
        """DCP's planner, but stored non-tensor values load with weights_only=True (no arbitrary objects)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"checkpoint value {read_item.dest_index.fqn}: refused ({exc})") from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return _SafePlanner()


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
    name = [temp_name(final, "tmp").name]
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
    _save_rng_state(_rng_file(tmp, info.rank))
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
        # A checkpoint of the same step from an earlier attempt is replaced whole, and only once this one is in
        # place (publish_dir moves the old one aside first), so a crash here never leaves neither.
        publish_dir(tmp, final)
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


def _is_plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _read_json_object(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    return data


def _read_marker(path: Path) -> dict[str, Any]:
    """COMPLETE.json, checked for shape: anything else is a damaged or foreign checkpoint, not a crash."""
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER}; the save did not finish)")
    record = _read_json_object(marker)
    if record.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{marker}: checkpoint version {record.get('version')!r} is not {CHECKPOINT_VERSION} "
            "(written by another sftkit version; start over with --resume none)"
        )
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{marker}: 'files' must map file names to their size and checksum")
    for name, entry in files.items():
        ok = _is_plain_name(name) and isinstance(entry, dict)
        ok = ok and type(entry.get("bytes")) is int and entry["bytes"] >= 0 and isinstance(entry.get("xxh3_128"), str)
        if not ok:
            raise CheckpointError(f"{marker}: bad entry for {name!r} (want a plain file name -> {{bytes, xxh3_128}})")
    return record


def validate_checkpoint(path: Path) -> dict[str, Any]:
    """Return the COMPLETE.json record, or raise CheckpointError naming what is missing, corrupt or foreign.

    Every file of the directory must be listed with its size and checksum and be a regular file (a link or a
    device such as /dev/zero is refused before it is read), and the trainer state and DCP metadata must parse
    as what they claim to be (the metadata with the restricted unpickler).
    """
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    record = _read_marker(path)
    files = record["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{path}: {MARKER} does not list {name}")
    unlisted = sorted(p.name for p in path.iterdir() if p.name != MARKER and p.name not in files)
    if unlisted:
        raise CheckpointError(f"{path}: files not recorded in {MARKER}: {', '.join(unlisted[:5])}")
    for name, expected in files.items():
        file = path / name
        try:
            st = os.lstat(file)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file {name} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: {name} is not a regular file")
        if st.st_size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: file {name} has {st.st_size} bytes, expected {expected['bytes']} (truncated?)"
            )
        if hash_file(file) != expected["xxh3_128"]:
            raise CheckpointError(f"{path}: file {name} fails its checksum (corrupted)")
    read_trainer_state(path)
    read_dcp_metadata(path)
    for rng in path.glob("rng-rank*.safetensors"):
        _check_safetensors_header(rng)
    return record


def _check_safetensors_header(file: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a safetensors file ({exc})") from None


def read_trainer_state(path: Path) -> TrainerState:
    """trainer_state.json as a TrainerState; a missing key, an unknown key or a wrong type is a CheckpointError."""
    file = path / STATE_FILE
    raw = _read_json_object(file)
    raw.pop("version", None)
    types = {"step": int, "scheduler": dict, "data": dict, "config": dict, "world_size": int,
             "global_batch_size": int}
    if set(raw) != set(types):
        extra, missing = sorted(set(raw) - set(types)), sorted(set(types) - set(raw))
        raise CheckpointError(f"{file}: unexpected keys {extra} / missing keys {missing}")
    for key, kind in types.items():
        if type(raw[key]) is not kind:
            raise CheckpointError(f"{file}: {key} must be a {kind.__name__}, got {raw[key]!r:.60}")
    if raw["step"] < 0 or raw["world_size"] < 1 or raw["global_batch_size"] < 1:
        raise CheckpointError(f"{file}: step, world_size or global_batch_size out of range")
    return TrainerState(**raw)


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
    Before anything is loaded, the checkpoint's tensors are compared with the model's by name and shape, so a
    model of another depth, width or adapter rank is refused with the differences named.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if verify:
        validate_checkpoint(path)
    state = read_trainer_state(path)
    sd = _dcp_state(model, optimizer)
    _check_same_tensors(path, read_dcp_metadata(path), sd["model"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process.*")
        try:
            dcp.load(sd, storage_reader=_safe_reader(path), planner=_safe_planner(), no_dist=not info.distributed)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:  # DCP wraps a bad shard's error (a BaseException)
            raise CheckpointError(f"{path}: cannot load the checkpoint's tensors ({type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''})") from None
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=_state_options(strict=False))
    rng_file = _rng_file(path, info.rank)
    if rng_file.exists() and state.world_size == info.world_size:
        _load_rng_state(rng_file)
    return state


def load_model_state(path: Path, model: torch.nn.Module, *, verify: bool = True) -> None:
    """Load only the model's trained tensors from a checkpoint (no optimizer, RNG or data position), for
    inference (`trainer generate/predict` on a checkpoint dir). One process; the same safe reader and the
    same name/shape check as `load_checkpoint`. Frozen parameters (LoRA's base) must already be loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    if verify:
        validate_checkpoint(path)
    frozen = {_clean_fqn(n) for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    model_sd = {k: v for k, v in get_model_state_dict(model, options=_state_options()).items() if k not in frozen}
    _check_same_tensors(path, read_dcp_metadata(path), model_sd)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process.*")
        dcp.load({"model": model_sd}, storage_reader=_safe_reader(path), planner=_safe_planner(), no_dist=True)
    set_model_state_dict(model, model_sd, options=_state_options(strict=False))


def _check_same_tensors(path: Path, metadata: Any, model_sd: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {k[len("model."):]: tuple(md.size) for k, md in metadata.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    mine = {k: tuple(v.shape) for k, v in model_sd.items()}
    missing = sorted(set(mine) - set(saved))
    unexpected = sorted(set(saved) - set(mine))
    shapes = sorted(f"{k} {saved[k]} -> {mine[k]}" for k in set(saved) & set(mine) if saved[k] != mine[k])
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''} ({len(items)})"
                 for label, items in (("not in the checkpoint", missing), ("only in the checkpoint", unexpected),
                                      ("other shape", shapes)) if items]
        raise CheckpointError(f"{path}: the checkpoint does not fit this model ({'; '.join(parts)}); "
                              "resume with the model config it was saved with, or start over with --resume none")


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
            # This process holds the output directory's lock, so every leftover save is a dead writer's.
            remove_stale_under(checkpoints_dir(self.out_dir), is_complete=lambda p: (p / MARKER).is_file(),
                               assume_dead=True)
            found = resolve_resume(self.config.checkpoint.resume, self.out_dir)
            choice = [str(found) if found else None]
        if self.info.distributed:
            import torch.distributed as dist

            dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return 0
        path = Path(choice[0])
        state = read_trainer_state(path)
        self._check_config(path, state.config)
        # The optimizer's hyperparameters and the schedule's peak rates as this run's config set them; loading
        # the checkpoint overwrites them with the saved ones, which must not silently win (see _check_config).
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        state = load_checkpoint(path, self.model, self.optimizer, self.info, verify=False)  # rank 0 validated it
        self.scheduler.load_state_dict(state.scheduler)
        self.scheduler.base_lrs = base_lrs
        for group, hyper, base, factor in zip(self.optimizer.param_groups, fresh, base_lrs,
                                              self.scheduler.lr_lambdas, strict=True):
            group.update(hyper)
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.dataset.load_state_dict(state.data)  # refuses another global batch, data, seed or order
        self.start_step = self.last_saved = state.step
        self.resumed_from = path
        if self.info.is_main:
            log.warning("resuming from %s at step %d", path, state.step)
        return state.step

    def _check_config(self, path: Path, saved: dict[str, Any]) -> None:
        """Refuse what would make the resumed run another run; say what else changed."""
        changes = resume_changes(saved, self.config.to_dict())
        if changes.breaking:
            raise CheckpointError(
                f"{path}: cannot resume, the config changed in what the checkpoint is: "
                f"{'; '.join(changes.breaking)}. Undo those changes, or start over with --resume none"
            )
        if changes.optimizer and not self.config.checkpoint.allow_config_change:
            raise CheckpointError(
                f"{path}: the optimizer or schedule config changed since this checkpoint: "
                f"{'; '.join(changes.optimizer)}. Pass --allow-config-change to apply the new values from step "
                f"{read_trainer_state(path).step} on, undo them, or start over with --resume none"
            )
        if self.info.is_main:
            for line in changes.optimizer + changes.other:
                log.warning("resume: config changed since the checkpoint, applying %s", line)

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
            self.export(exports / f"step-{step:08d}", step)
            if self.info.is_main:
                _prune_exports(exports, self.config.checkpoint.keep)
        return path

    def export_final(self, step: int) -> Path | None:
        """The run's export (`output_dir/export`) when `checkpoint.export` is on."""
        return self.export(self.out_dir / "export", step) if self.config.checkpoint.export else None

    def export(self, export_dir: Path, step: int) -> Path:
        """Full runs export HF weights; LoRA runs the PEFT adapter (and, if asked, merged weights beside it).

        Either stands alone: tokenizer files and chat template, a model card (README.md) with the config and the
        data fingerprints, and a base model named by hub id or absolute path, whatever the working directory."""
        from trainer.model_card import CARD_FILE, model_card

        config = self.config
        base = portable_ref(config.model.path)
        card = None  # only rank 0 writes, so only it reads the datasets' manifests for the card
        if self.info.is_main:
            kind = "full" if config.peft.pet_type is None else "adapter"
            card = {CARD_FILE: model_card(config, base_model=base, step=step, kind=kind)}
        if config.peft.pet_type is None:
            return export_hf(self.model, export_dir, source_dir=config.model.path, extra_files=card,
                             max_shard_size=config.checkpoint.max_shard_size, overwrite=True)
        from trainer.adapters import save_adapter

        save_adapter(self.model, export_dir, config.peft, base_model=base, tokenizer_dir=config.model.path,
                     extra_files=card)
        if config.peft.export_merged:
            if self.info.is_main:
                from trainer.merge_lora import merge_lora
                from trainer.quantize import dequantized_base

                base = dequantized_base(self.model, config.peft)  # a quantized run: its dequantized base
                merge_lora(config.model.path, export_dir, export_dir.with_name(export_dir.name + "-merged"),
                           overwrite=True, show_progress=config.logging.progress_bar, base_values=base)
            barrier(self.info)
        return export_dir


def _prune_exports(exports: Path, keep: int) -> None:
    """Keep the newest `keep` intermediate exports (and their -merged twins), like the checkpoints."""
    steps = sorted(p.name for p in exports.iterdir() if p.is_dir() and p.name.startswith("step-")
                   and not p.name.endswith("-merged"))
    for name in steps[:-keep]:
        for path in (exports / name, exports / f"{name}-merged"):
            shutil.rmtree(path, ignore_errors=True)
