"""Fault injection on the trainer: checkpoints that try to run code, NaN/Inf, config changes on resume,
malformed checkpoint records. Where a process is involved it is `trainer run` as a real subprocess, and the
tests assert what a user sees: the exit code, the one-line message, and that nothing ran or was lost.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from formats.manifest import hash_file
from tests.helpers.tiny_run import tiny_setup
from trainer.checkpoint import MARKER, CheckpointError, find_resume_checkpoint, validate_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("faults"), n_records=80, seq_length=64)


def _cmd(model_dir: Path, data_dir: Path, out: Path, *extra: str, flags: tuple[str, ...] = ()) -> list[str]:
    sets = [f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={out}",
            "train.max_steps=4", "train.lr=1e-3", "train.warmup_steps=2", "logging.progress_bar=false",
            "checkpoint.every_steps=2", "checkpoint.keep=2", "train.deterministic=true", *extra]
    return [sys.executable, "-m", "cli.trainer", "run", *[x for s in sets for x in ("--set", s)], *flags]


def _run(cmd: list[str], repo_root: Path, expect: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root))
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(setup, repo_root):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    root, model_dir, data_dir = setup
    out = root / "finished"
    _run(_cmd(model_dir, data_dir, out), repo_root, 0)
    return out


class _Payload:
    """Unpickling this creates a file: the proof that a checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _rehash(ckpt: Path) -> None:
    """What an attacker with write access does: make COMPLETE.json agree with the planted file."""
    record = json.loads((ckpt / MARKER).read_text())
    for name in record["files"]:
        f = ckpt / name
        record["files"][name] = {"bytes": f.stat().st_size, "xxh3_128": hash_file(f)}
    (ckpt / MARKER).write_text(json.dumps(record))


def test_a_payload_in_any_checkpoint_file_never_runs(setup, finished, repo_root, tmp_path):
    root, model_dir, data_dir = setup
    names = sorted(p.name for p in (finished / "checkpoints" / "step-00000004").iterdir() if p.name != MARKER)
    assert {".metadata", "trainer_state.json", "rng-rank00000.safetensors"} <= set(names)
    assert any(n.endswith(".distcp") for n in names)
    for name in names:
        out = tmp_path / name.strip(".")
        shutil.copytree(finished, out)
        marker = tmp_path / f"ran-{name}"
        target = out / "checkpoints" / "step-00000004" / name
        if name.endswith(".distcp"):
            torch.save({"x": _Payload(marker)}, target)  # what torch.load would unpickle
        else:
            target.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
        _rehash(target.parent)
        proc = subprocess.run(_cmd(model_dir, data_dir, out, "train.max_steps=6"), cwd=repo_root,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root)),
                              capture_output=True, text=True, timeout=300)
        assert not marker.exists(), f"a payload in {name} ran"
        if proc.returncode == 0:  # refused while choosing: the older checkpoint was resumed instead
            assert "skipping checkpoint" in proc.stderr and name in proc.stderr, proc.stderr[-3000:]
            summary = json.loads((out / "summary.json").read_text())
            assert summary["resumed_from"].endswith("step-00000002"), name
        else:  # the tensor shards are only read while loading: refused then, in one line naming the checkpoint
            assert proc.returncode == 1, proc.stderr[-3000:]
            assert "step-00000004" in _error_line(proc), name


def test_nonfinite_step_fails_with_exit_1_naming_the_step(setup, repo_root):
    root, model_dir, data_dir = setup
    out = root / "diverge"
    cmd = _cmd(model_dir, data_dir, out, "train.lr=1e8", "train.max_grad_norm=null", "train.warmup_steps=0",
               "checkpoint.every_steps=1")
    line = _error_line(_run(cmd, repo_root, 1))
    assert "step 2:" in line and "nan" in line.lower()

    def strict(text: str) -> dict:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}, not JSON"))

    rows = [strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]  # the failed step is not logged as if it trained
    latest = json.loads((out / "checkpoints" / "latest").read_text())
    assert latest["step"] == 1  # the last good state is on disk

    skip = root / "diverge-skip"
    cmd = _cmd(model_dir, data_dir, skip, "train.lr=1e8", "train.max_grad_norm=null", "train.warmup_steps=0",
               "train.nonfinite=skip", "train.max_skipped_steps=5", flags=("--json",))
    proc = _run(cmd, repo_root, 0)
    assert json.loads(proc.stdout)["skipped_steps"] == 3
    rows = [strict(line) for line in (skip / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in rows] == [None, "nonfinite", "nonfinite", "nonfinite"]
    assert all(r["grad_norm"] is None for r in rows[1:])


def test_nan_in_the_weights_is_refused_at_load(setup, repo_root, tmp_path):
    root, model_dir, data_dir = setup
    bad = tmp_path / "nan-model"
    shutil.copytree(model_dir, bad)
    weights = load_file(bad / "model.safetensors")
    name = next(k for k in weights if "layers.0.mlp" in k)
    weights[name][0, 0] = math.nan
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    line = _error_line(_run(_cmd(bad, data_dir, tmp_path / "run"), repo_root, 1))
    assert "NaN or Inf" in line and name in line
    assert not (tmp_path / "run" / "export").exists()


def test_resume_refuses_or_applies_config_changes(setup, finished, repo_root, tmp_path):
    root, model_dir, data_dir = setup
    out = tmp_path / "changed"
    shutil.copytree(finished, out)
    line = _error_line(_run(_cmd(model_dir, data_dir, out, "train.max_steps=6", "train.lr=0.5"), repo_root, 1))
    assert "train.lr: 0.001 -> 0.5" in line and "--allow-config-change" in line
    line = _error_line(_run(_cmd(model_dir, data_dir, out, "model.overrides={num_hidden_layers: 1}"), repo_root, 1))
    assert "model.overrides" in line and "--resume none" in line

    proc = _run(_cmd(model_dir, data_dir, out, "train.max_steps=6", "train.lr=0.5", "train.schedule=constant",
                     flags=("--allow-config-change",)), repo_root, 0)
    assert "resuming from" in proc.stderr and "step-00000004" in proc.stderr  # said at default verbosity
    assert "applying train.lr: 0.001 -> 0.5" in proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["step"] > 4] == [0.5, 0.5]  # the new schedule, from the resumed step on


def test_lora_rank_change_is_refused_and_shapes_are_checked_before_loading(setup, repo_root, tmp_path):
    root, model_dir, data_dir = setup
    out = tmp_path / "lora"
    lora = ("peft.pet_type=lora", "peft.lora_rank=4", "peft.target_modules=.*proj")
    _run(_cmd(model_dir, data_dir, out, *lora), repo_root, 0)
    line = _error_line(_run(_cmd(model_dir, data_dir, out, *lora, "peft.lora_rank=8", "train.max_steps=6"),
                            repo_root, 1))
    assert "peft.lora_rank: 4 -> 8" in line

    # Below the config check, the checkpoint's tensors are compared with the model's before DCP reads any.
    from trainer.checkpoint import load_checkpoint
    from trainer.config import load_config
    from trainer.distributed import DistInfo
    from trainer.loop import build_model
    from trainer.optim import build_optimizer

    config = load_config(None, [f"model.path={model_dir}", *lora, "peft.lora_rank=8"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    model = build_model(config, info, torch.float32)
    with pytest.raises(CheckpointError, match=r"does not fit this model .*other shape"):
        load_checkpoint(out / "checkpoints" / "step-00000004", model, build_optimizer(model, config.train), info)


@pytest.mark.parametrize("damage", [
    "no_files", "files_a_list", "entry_not_a_dict", "path_outside", "device_file", "unlisted_file",
    "state_extra_key", "state_not_json", "metadata_not_dcp",
])
def test_malformed_checkpoint_records_are_skipped_not_crashed(finished, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    ckpt = out / "checkpoints" / "step-00000004"
    record = json.loads((ckpt / MARKER).read_text())
    if damage == "no_files":
        del record["files"]
    elif damage == "files_a_list":
        record["files"] = list(record["files"])
    elif damage == "entry_not_a_dict":
        record["files"]["trainer_state.json"] = 12
    elif damage == "path_outside":
        record["files"]["../../escape"] = {"bytes": 0, "xxh3_128": "0"}
    elif damage == "device_file":
        os.symlink("/dev/zero", ckpt / "zero")
        record["files"]["zero"] = {"bytes": 0, "xxh3_128": "0"}
    elif damage == "unlisted_file":
        (ckpt / "extra.bin").write_bytes(b"x")
    elif damage == "state_extra_key":
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "surprise": 1}))
    elif damage == "state_not_json":
        (ckpt / "trainer_state.json").write_bytes(b"\x80\x04K\x01.")
    elif damage == "metadata_not_dcp":
        (ckpt / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    (ckpt / MARKER).write_text(json.dumps(record))
    if damage.startswith(("state_", "metadata_")):
        _rehash(ckpt)  # the checksums agree: the content itself must be refused
    with pytest.raises(CheckpointError):
        validate_checkpoint(ckpt)
    assert find_resume_checkpoint(out) == out / "checkpoints" / "step-00000002"


def test_a_shard_edited_in_place_is_refused_before_training(setup, repo_root, tmp_path):
    root, model_dir, data_dir = setup
    data = tmp_path / "edited"
    shutil.copytree(data_dir, data)
    shard = next(data.glob("shard-*.arrow"))
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # same size: only the checksum can tell
    shard.write_bytes(bytes(blob))
    line = _error_line(_run(_cmd(model_dir, data, tmp_path / "run"), repo_root, 1))
    assert shard.name in line and "checksum" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_token_ids_outside_the_vocabulary_name_the_row(setup, repo_root, tmp_path):
    import numpy as np

    from formats.reader import open_dataset
    from formats.writer import DatasetWriter

    root, model_dir, data_dir = setup
    src = open_dataset(data_dir)
    out = tmp_path / "oov"
    with DatasetWriter(out, src.seq_length, int(src.manifest["tokenizer"]["pad_id"]), overwrite=True) as writer:
        for i in range(len(src)):
            row = src.row(i)
            ids = np.array(row.input_ids, dtype=np.int32)
            if i == 3:
                ids[5] = 10**6
            writer.write_row(ids, np.array(row.labels, dtype=np.int32), list(row.doc_lengths), list(row.doc_ids))
        writer.finish(tokenizer=dict(src.manifest["tokenizer"]), template="chatml")
    # data.verify: full (the default) finds it before step 1 ...
    line = _error_line(_run(_cmd(model_dir, out, tmp_path / "run"), repo_root, 1))
    assert "row 3: token id 1000000 at position 5 is not in [0, 300)" in line
    # ... and without the row check the batch check still names the row before the embedding sees it.
    line = _error_line(_run(_cmd(model_dir, out, tmp_path / "run2", "data.verify=checksums", "data.shuffle=false",
                                 "train.max_steps=8", "data.micro_batch_size=1", "train.grad_accum_steps=1"),
                            repo_root, 1))
    assert f"{out}: row 3 holds token ids" in line


def test_a_second_run_on_the_same_output_dir_fails_fast_naming_the_first(setup, repo_root, tmp_path):
    import time

    root, model_dir, data_dir = setup
    out = tmp_path / "locked"
    leftover = out / "checkpoints" / "step-00000002.tmp-99999999-deadbeef-0"  # a save whose writer died
    leftover.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root))
    first = subprocess.Popen(_cmd(model_dir, data_dir, out, "train.max_steps=100000"), cwd=repo_root, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:] if first.stderr else ""
            time.sleep(0.05)
        config_before = (out / "config.resolved.yaml").read_text()
        second = _run(_cmd(model_dir, data_dir, out, "train.lr=0.5"), repo_root, 1)
        line = _error_line(second)
        assert f"pid {first.pid}" in line and "trainer output directory" in line
        assert (out / "config.resolved.yaml").read_text() == config_before  # the second run wrote nothing
    finally:
        first.send_signal(signal.SIGTERM)  # the first run stops at a step boundary, saves, exits 3
        first.wait(timeout=300)
    assert first.returncode == 3
    assert not leftover.exists()  # the dead save was removed by the run that held the lock
    assert not (out / ".sftkit.lock").exists()  # released on exit
