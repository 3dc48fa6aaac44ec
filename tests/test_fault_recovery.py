"""Fault injection: kill -9 and resume is bitwise exact, SIGTERM saves and exits 3, bad checkpoints are refused.

Each test runs `trainer run` as a real subprocess (the way a scheduler would) on a tiny model the tests build.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.tiny_run import tiny_setup

pytestmark = pytest.mark.slow
STEPS = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("fault"), n_records=200, seq_length=96)


def _cmd(model_dir, data_dir, out, nproc=1, accum=2, extra=()):
    sets = [f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={out}",
            f"train.max_steps={STEPS}", "train.lr=2e-3", "train.warmup_steps=3", "train.deterministic=true",
            "logging.progress_bar=false", "checkpoint.every_steps=3", "checkpoint.keep=2",
            f"train.grad_accum_steps={accum}", "data.micro_batch_size=1", *extra]
    args = [x for s in sets for x in ("--set", s)]
    if nproc == 1:
        return [sys.executable, "-m", "cli.trainer", "run", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "cli.trainer", "run", *args]


def _env(repo_root):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root))


def _run(cmd, repo_root, expect=0):
    proc = subprocess.run(cmd, cwd=repo_root, env=_env(repo_root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stderr[-5000:]
    return proc


def _losses(out: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (before a kill and again after resume) keeps its last value."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def _start_and_kill(cmd, repo_root, out: Path, after_steps: int, sig=signal.SIGKILL) -> int:
    """Start a run, wait until it has logged `after_steps` steps, send `sig` to its whole process group."""
    proc = subprocess.Popen(cmd, cwd=repo_root, env=_env(repo_root), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_steps:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)
    return proc.returncode


@pytest.fixture(scope="module")
def reference(setup, repo_root):
    """The uninterrupted run every recovery is compared with."""
    root, model_dir, data_dir = setup
    out = root / "reference"
    _run(_cmd(model_dir, data_dir, out), repo_root)
    return out


def test_sigkill_then_resume_is_bitwise_identical(setup, reference, repo_root):
    root, model_dir, data_dir = setup
    out = root / "killed"
    _start_and_kill(_cmd(model_dir, data_dir, out), repo_root, out, after_steps=7)
    assert len(_losses(out)) < STEPS  # it really died mid-run
    _run(_cmd(model_dir, data_dir, out), repo_root)  # --resume auto is the default
    assert _losses(out) == _losses(reference)  # exact float equality, every step
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1))  # steps after the last checkpoint are not logged twice
    a = load_file(reference / "export" / "model.safetensors")
    b = load_file(out / "export" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a), "parameters differ after resume"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] and "step-" in summary["resumed_from"]


def test_sigterm_saves_and_exits_3_then_continues(setup, reference, repo_root):
    root, model_dir, data_dir = setup
    out = root / "term"
    code = _start_and_kill(_cmd(model_dir, data_dir, out), repo_root, out, after_steps=4, sig=signal.SIGTERM)
    assert code == 3
    latest = json.loads((out / "checkpoints" / "latest").read_text())
    stopped_at = latest["step"]
    assert stopped_at == max(_losses(out))  # the checkpoint holds the last finished step: nothing lost
    assert (out / "checkpoints" / latest["checkpoint"] / "COMPLETE.json").exists()
    _run(_cmd(model_dir, data_dir, out), repo_root)
    assert _losses(out) == _losses(reference)


def test_corrupt_and_half_written_checkpoints(setup, repo_root):
    root, model_dir, data_dir = setup
    out = root / "corrupt"
    _run(_cmd(model_dir, data_dir, out, extra=("train.max_steps=9",)), repo_root)
    ckpts = out / "checkpoints"
    newest, older = sorted(p for p in ckpts.iterdir() if p.name.startswith("step-"))[::-1][:2]
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (ckpts / "step-00000012.tmp-dead").mkdir()  # a save that died half-way

    explicit = _run(_cmd(model_dir, data_dir, out, extra=("train.max_steps=12",)) + ["--resume", str(newest)],
                    repo_root, expect=1)
    assert "fails its checksum" in explicit.stderr and newest.name in explicit.stderr

    auto = _run(_cmd(model_dir, data_dir, out, extra=("train.max_steps=12",)) + ["-v"], repo_root)
    assert "skipping checkpoint" in auto.stderr and "fails its checksum" in auto.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith(older.name)


def test_two_ranks_kill_and_resume_and_reshard_from_one_rank(setup, reference, repo_root):
    """2 ranks killed and resumed match themselves bitwise; 2 ranks resumed from a 1-rank checkpoint
    (same global batch: 1 rank x accum 2 = 2 ranks x accum 1) continue the same loss curve."""
    root, model_dir, data_dir = setup
    two_ref = root / "two_ref"
    _run(_cmd(model_dir, data_dir, two_ref, nproc=2, accum=1), repo_root)
    two = root / "two_killed"
    _start_and_kill(_cmd(model_dir, data_dir, two, nproc=2, accum=1), repo_root, two, after_steps=7)
    _run(_cmd(model_dir, data_dir, two, nproc=2, accum=1), repo_root)
    assert _losses(two) == _losses(two_ref)

    mixed = root / "one_then_two"
    _start_and_kill(_cmd(model_dir, data_dir, mixed), repo_root, mixed, after_steps=7)
    _run(_cmd(model_dir, data_dir, mixed, nproc=2, accum=1), repo_root)
    ref, got = _losses(reference), _losses(mixed)
    assert sorted(got) == sorted(ref)
    assert [got[s] for s in sorted(got)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-4)


def test_lora_sigkill_then_resume_is_bitwise_identical(setup, repo_root):
    """A LoRA run (PiSSA residual recomputed on start, dropout and NEFTune drawing from the restored RNG)
    killed and resumed from adapter-only checkpoints matches the uninterrupted run bitwise."""
    root, model_dir, data_dir = setup
    lora = ("peft.pet_type=lora", "peft.target_modules=.*proj", "peft.pissa=true", "peft.lora_rank=4",
            "peft.lora_dropout=0.1", "peft.neftune_noise_alpha=5", "peft.loraplus_lr_ratio=4")
    ref, out = root / "lora_ref", root / "lora_killed"
    _run(_cmd(model_dir, data_dir, ref, extra=lora), repo_root)
    _start_and_kill(_cmd(model_dir, data_dir, out, extra=lora), repo_root, out, after_steps=7)
    assert len(_losses(out)) < STEPS
    _run(_cmd(model_dir, data_dir, out, extra=lora), repo_root)
    assert _losses(out) == _losses(ref)
    a = load_file(ref / "export" / "adapter_model.safetensors")
    b = load_file(out / "export" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    from torch.distributed.checkpoint import FileSystemReader

    latest = json.loads((out / "checkpoints" / "latest").read_text())["checkpoint"]
    meta = FileSystemReader(str(out / "checkpoints" / latest)).read_metadata().state_dict_metadata
    saved = {k: v.size.numel() for k, v in meta.items() if k.startswith("model.") and hasattr(v, "size")}
    base = sum(t.numel() for t in load_file(model_dir / "model.safetensors").values())
    assert saved and all(".lora_" in k for k in saved)  # adapters (+ their optimizer state) only
    assert sum(saved.values()) < 0.1 * base
