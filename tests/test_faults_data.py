"""Fault injection on the data side (issue 14): each test breaks something the way a crash, a full disk, a
concurrent job or a crafted file would, runs the real `dataprep` CLI in a subprocess, and asserts the exit
code, the one-line message and that nothing was lost or half-published."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import zstandard

from formats.atomic import host_tag, publish_dir, remove_stale, temp_name, write_bytes_atomic
from formats.errors import FormatError
from formats.lock import LockHeldError, lock_path, locked
from formats.manifest import hash_file, read_manifest, write_manifest
from formats.reader import open_dataset
from formats.verify import require_valid, verify_checksums, verify_dataset
from formats.writer import DatasetWriter

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`dataprep ARGS` as a user runs it: a fresh interpreter, exit code and both streams captured."""
    return subprocess.run(
        [sys.executable, "-m", "cli.dataprep", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = error_lines(result)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = lines[-1]
    for needle in needles:
        assert needle in last, result.stderr
    if code == 1:  # warnings (a recovery, another tokenizer) may precede it; the error is one line, last
        assert last.startswith("error: ") and [x for x in lines if x.startswith("error")] == [last], result.stderr
    return last


def conversations(path: Path, n: int = 40, ids: list[str] | None = None) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            rec = {"messages": [{"role": "user", "content": f"question {i}: what is {i} + {i}?"},
                                {"role": "assistant", "content": f"It is {2 * i}."}]}
            if ids is not None:
                rec["id"] = ids[i]
            f.write(json.dumps(rec) + "\n")
    return path


def dead_pid() -> int:
    """The pid of a process that has exited (so leftovers named after it belong to a dead writer)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def pack_args(src: Path, out: Path, qwen: str, *extra: str) -> list[str]:
    return ["pack", str(src), "-o", str(out), "--tokenizer", qwen, "--seq-length", "128", *extra]


# ------------------------------------------------------------------------------ item 2: codecs that end early


def _block_boundary(frame: bytes) -> int:
    """Offset just past the first block of a zstd frame (a cut there fooled the decompressor)."""
    fhd = frame[4]
    single = (fhd >> 5) & 1
    fcs = (1 if single else 0) if fhd >> 6 == 0 else (2, 4, 8)[(fhd >> 6) - 1]
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
    bits = int.from_bytes(frame[pos : pos + 3], "little")
    return pos + 3 + (1 if (bits >> 1) & 3 == 1 else bits >> 3)


def test_truncated_zstd_and_gzip_are_errors_naming_the_file_in_convert_and_pack(tmp_path, qwen):
    plain = conversations(tmp_path / "conv.jsonl", n=999)
    data = plain.read_bytes()
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    frame = b"".join(cobj.compress(data[i : i + 4096]) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
                     for i in range(0, len(data), 4096)) + cobj.flush()
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == data
    cut_block = tmp_path / "block.jsonl.zst"
    cut_block.write_bytes(frame[: _block_boundary(frame)])
    cut_half = tmp_path / "half.jsonl.zst"
    cut_half.write_bytes(frame[: len(frame) // 2])
    cut_gz = tmp_path / "cut.jsonl.gz"
    cut_gz.write_bytes(gzip.compress(data)[:-20])
    for bad in (cut_block, cut_half, cut_gz):
        out = tmp_path / "out.jsonl"
        result = run("convert", str(bad), "-o", str(out))
        assert_one_line_error(result, 1, f"error: {bad}", "cannot decompress")
        assert not out.exists() and not list(tmp_path.glob(".out.jsonl.*"))
        packed = run(*pack_args(bad, tmp_path / "ds", qwen))
        assert_one_line_error(packed, 1, f"error: {bad}", "cannot decompress")
        assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds*"))
    whole = tmp_path / "whole.jsonl.zst"
    whole.write_bytes(frame + zstandard.ZstdCompressor().compress(data))  # two whole frames: both read
    ok = run("convert", str(whole), "-o", str(tmp_path / "ok.jsonl"), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["records_out"] == 2 * 999


# ------------------------------------------------------------------------------ item 7: publish keeps a copy

CRASH_AT_RENAME = textwrap.dedent("""
    import os, signal, sys
    target, when = sys.argv[1], sys.argv[2]
    del sys.argv[1:3]
    real = os.replace
    def replace(src, dst, *a, **k):
        if when == "before" and os.path.basename(str(dst)) == target:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *a, **k)
        moved_aside = os.path.basename(str(src)) == target and ".old-" in str(dst)
        moved_in = os.path.basename(str(dst)) == target and ".tmp-" in str(src)
        if (when == "aside" and moved_aside) or (when == "in" and moved_in):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    from cli.dataprep import main
    sys.argv[0] = "dataprep"
    main()
""")


def test_crash_between_the_renames_of_overwrite_then_a_failing_pack_keeps_the_old_dataset(tmp_path, qwen):
    src = conversations(tmp_path / "conv.jsonl")
    out = tmp_path / "ds"
    first = run(*pack_args(src, out, qwen))
    assert first.returncode == 0, first.stderr
    original = (out / "index.json").read_bytes()
    conversations(src, n=60)  # new content, so --overwrite really rewrites
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_AT_RENAME, "ds", "aside", *pack_args(src, out, qwen, "--overwrite")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert not out.exists()  # killed with the old copy moved aside and the new one not yet in place
    assert len(list(tmp_path.glob("ds.old-*"))) == 1 and len(list(tmp_path.glob("ds.tmp-*"))) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    failing = run(*pack_args(bad, out, qwen, "--overwrite"))
    assert_one_line_error(failing, 1, f"{bad}:1")
    assert (out / "index.json").read_bytes() == original  # the last complete copy came back
    assert not list(tmp_path.glob("ds.*")) and not list(tmp_path.glob(".ds.*"))
    assert run("verify", str(out)).returncode == 0


def test_crash_after_the_new_dataset_is_in_place_leaves_it_and_the_next_run_removes_the_old_one(tmp_path, qwen):
    src = conversations(tmp_path / "conv.jsonl")
    out = tmp_path / "ds"
    assert run(*pack_args(src, out, qwen)).returncode == 0
    conversations(src, n=60)
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_AT_RENAME, "ds", "in", *pack_args(src, out, qwen, "--overwrite")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert crashed.returncode == -signal.SIGKILL
    assert open_dataset(out).manifest["num_docs"] == 60  # the new one, complete
    assert len(list(tmp_path.glob("ds.old-*"))) == 1
    again = run(*pack_args(src, out, qwen, "--json"))
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["reused"] is True and summary["leftovers_removed"] == 2  # the old copy and the spill
    assert not list(tmp_path.glob("ds.*"))


def test_a_convert_killed_before_its_rename_leaves_a_temp_file_the_next_convert_removes(tmp_path):
    src = conversations(tmp_path / "conv.jsonl", n=200)
    out = tmp_path / "o.jsonl"
    crashed = subprocess.run([sys.executable, "-c", CRASH_AT_RENAME, "o.jsonl", "before", "convert", str(src), "-o",
                              str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL and not out.exists()
    (left,) = tmp_path.glob(".o.jsonl.tmp-*")
    assert left.stat().st_size > 0  # the whole converted output, never renamed into place
    again = run("convert", str(src), "-o", str(out), "-v")
    assert again.returncode == 0 and "removed 1 leftover" in again.stderr
    assert len(out.read_text().splitlines()) == 200 and not list(tmp_path.glob(".o.jsonl.*"))


def test_checkpoint_style_leftovers_are_removed_only_when_their_writer_is_gone(tmp_path):
    """What the trainer calls for `checkpoints/step-*.tmp-*` (formats.atomic.remove_stale_in)."""
    from formats.atomic import new_token, remove_stale_in

    legacy = tmp_path / "step-00000010.tmp-1a2b3c4d"  # older name: no pid, so only a lock holder may remove it
    dead = tmp_path / f"step-00000020.tmp-{dead_pid()}-{host_tag()}-99"
    live = tmp_path / f"step-00000030.tmp-{new_token()}"
    done = tmp_path / "step-00000040"
    for d in (legacy, dead, live, done):
        d.mkdir()
        (d / "model.bin").write_bytes(b"x" * 1000)
    assert remove_stale_in(tmp_path, "step-*.tmp-*") == [str(dead)]
    assert legacy.exists() and live.exists()
    assert remove_stale_in(tmp_path, "step-*.tmp-*", assume_dead=True) == [str(legacy), str(live)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000040"]


def test_a_checkpoint_root_is_cleaned_in_one_call_and_a_moved_aside_checkpoint_comes_back(tmp_path):
    """What the trainer calls on `checkpoints/` under its lock (formats.atomic.remove_stale_under)."""
    from formats.atomic import remove_stale_under

    token = f"{dead_pid()}-{host_tag()}-77"
    aside = temp_name(tmp_path / "step-00000020", "old", token)  # killed between publish_dir's two renames
    aside.mkdir()
    (aside / "COMPLETE.json").write_text("{}")
    temp_name(tmp_path / "step-00000020", "tmp", token).mkdir()  # its complete replacement, never renamed
    (tmp_path / "step-00000010.tmp-1a2b3c4d").mkdir()  # an older save's name (random token only)
    (tmp_path / f".latest.tmp-{token}").write_text("{")
    (tmp_path / "latest").write_text("{}")
    report = remove_stale_under(tmp_path, is_complete=lambda p: (p / "COMPLETE.json").is_file(), assume_dead=True)
    assert report.restored and report.count == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000020"]
    assert (tmp_path / "step-00000020" / "COMPLETE.json").is_file()


def test_publish_dir_and_remove_stale_library_contract(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "index.json").write_text("old")
    new = temp_name(out)
    new.mkdir()
    (new / "index.json").write_text("new")
    publish_dir(new, out)
    assert (out / "index.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    # leftovers of a dead writer: a moved-aside complete copy is restored, temps are removed and counted
    token = f"{dead_pid()}-{host_tag()}-abcd"
    shutil.move(out, temp_name(out, "old", token))
    temp_name(out, "tmp", token).mkdir()
    (tmp_path / f".d.tmp-{token}").write_text("partial file")
    report = remove_stale(out, is_complete=lambda p: (p / "index.json").is_file())
    assert (out / "index.json").read_text() == "new" and report.restored and report.count == 2
    # a live writer's temp (this process) and another host's are never touched
    mine = temp_name(out)
    mine.mkdir()
    theirs = out.with_name(f"d.tmp-{dead_pid()}-00000000-abcd")
    theirs.mkdir()
    assert remove_stale(out).count == 0 and mine.exists() and theirs.exists()
    assert remove_stale(out, assume_dead=True).count == 2
    write_bytes_atomic(tmp_path / "f.json", b"{}")
    assert (tmp_path / "f.json").read_bytes() == b"{}" and sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.json"]


# ------------------------------------------------------------------------------ item 6 (data side): the lock

HOLD_LOCK = textwrap.dedent("""
    import os, sys, time
    from formats.lock import locked
    with locked(sys.argv[1], command=["holder", "job"]):
        if sys.argv[2] == "fork":
            child = os.fork()
            if child == 0:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                time.sleep(120)
                os._exit(0)
            print(child, flush=True)
            os._exit(0)  # dies holding the lock; the child inherited the descriptor
        print(os.getpid(), flush=True)
        time.sleep(120)
""")


def test_a_second_pack_into_a_dataset_being_written_fails_fast_naming_the_holder(tmp_path, qwen):
    src = conversations(tmp_path / "conv.jsonl")
    out = tmp_path / "ds"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "hold"], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        pid = int(holder.stdout.readline())
        started = time.monotonic()
        second = run(*pack_args(src, out, qwen))
        assert time.monotonic() - started < 60
        assert_one_line_error(second, 1, f"pid {pid} on", "holder job", "being written")
        merged = run("merge", str(tmp_path / "p0"), "-o", str(out))
        assert merged.returncode == 1 and f"pid {pid} on" in merged.stderr
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    ok = run(*pack_args(src, out, qwen))  # the kernel dropped the dead holder's lock
    assert ok.returncode == 0, ok.stderr
    assert not lock_path(out).exists()  # released on exit


def test_a_lock_kept_by_an_inherited_descriptor_of_a_dead_writer_is_taken_over_with_a_warning(tmp_path, qwen):
    src = conversations(tmp_path / "conv.jsonl")
    out = tmp_path / "ds"
    parent = subprocess.run([sys.executable, "-c", HOLD_LOCK, str(out), "fork"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    child = int(parent.stdout.strip())
    try:
        with pytest.raises(BlockingIOError):  # the flock really is still held, by the child
            import fcntl

            fd = os.open(lock_path(out), os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        result = run(*pack_args(src, out, qwen))
        assert result.returncode == 0, result.stderr
        assert "breaking it" in result.stderr and "holder job" in result.stderr
    finally:
        os.kill(child, signal.SIGKILL)


def test_lock_library_contract(tmp_path):
    d = tmp_path / "run"
    with locked(d, inside=True, what="output directory") as me:
        assert me.pid == os.getpid() and (d / ".sftkit.lock").is_file()
        # a second open file description in this process conflicts like another process would
        with pytest.raises(LockHeldError, match="output directory is being written by pid"):
            with locked(d, inside=True, what="output directory"):
                pass
    assert not (d / ".sftkit.lock").exists()
    # a lock file left by a dead holder (no flock held) is simply taken over
    lock_path(d).write_bytes(orjson.dumps({"pid": dead_pid(), "host": "h", "command": ["x"], "started": "t"}))
    with locked(d):
        pass


# ------------------------------------------------------------------------------ item 3: integrity


def _crafted(tmp_path: Path, rows: list[tuple[list[int], list[int], list[int]]], vocab: int = 50) -> Path:
    out = tmp_path / "crafted"
    with DatasetWriter(out, 8, pad_id=0, overwrite=True) as w:
        for k, (ids, labels, lengths) in enumerate(rows):
            w.write_row(np.array(ids), np.array(labels), lengths, [f"r{k}d{j}" for j in range(len(lengths))])
        w.finish(tokenizer={"fingerprint": "f", "vocab_size": vocab})
    return out


GOOD_ROW = ([1, 2, 3, 4, 5, 0, 0, 0], [2, 3, -100, 5, -100, -100, -100, -100], [3, 2])


def test_row_invariants_out_of_vocab_negative_ids_and_labels_crossing_documents(tmp_path):
    assert verify_dataset(_crafted(tmp_path, [GOOD_ROW])).ok
    rows = [
        GOOD_ROW,
        ([1, 99, 3, 4, 5, 0, 0, 0], [99, 3, -100, 5, -100, -100, -100, -100], [3, 2]),  # id >= vocab 50
        ([1, -5, 3, 4, 5, 0, 0, 0], [-5, 3, -100, 5, -100, -100, -100, -100], [3, 2]),  # negative id
        ([1, 2, 3, 4, 5, 0, 0, 0], [2, 3, 4, 5, -100, -100, -100, -100], [3, 2]),  # label crosses doc 0 -> 1
        ([1, 2, 3, 4, 5, 0, 0, 0], [2, 3, -100, 5, -100, -7, -100, -100], [3, 2]),  # label in padding
    ]
    path = _crafted(tmp_path, rows)
    report = verify_dataset(path)  # vocab from the manifest
    text = "\n".join(report.problems)
    assert "row 1: token id 99 at position 1 is not in [0, 50)" in text
    assert "row 2: token id -5 at position 1" in text
    assert "row 3: label at document end (position 2)" in text
    assert "row 4: padding has labels" in text
    with pytest.raises(FormatError, match="fails verification: .*token id 99"):
        require_valid(path)
    assert require_valid(path, level="checksums") == []  # the bytes are as written; only the rows are bad
    wider = verify_dataset(path, vocab_size=100)  # the model's (larger) embedding admits id 99
    assert not any("token id 99" in p for p in wider.problems) and any("token id -5" in p for p in wider.problems)
    result = run("verify", str(path))
    assert result.returncode == 1 and "token id 99" in result.stderr
    narrow = run("verify", str(_crafted(tmp_path, [GOOD_ROW])), "--vocab-size", "5")
    assert narrow.returncode == 1 and "token id 5 at position 4 is not in [0, 5)" in narrow.stderr


def test_same_size_shard_edits_fail_checksums_and_pack_does_not_reuse_a_corrupt_output(tmp_path, qwen):
    src = conversations(tmp_path / "conv.jsonl")
    out = tmp_path / "ds"
    assert run(*pack_args(src, out, qwen)).returncode == 0
    reused = run(*pack_args(src, out, qwen, "--json"))
    assert json.loads(reused.stdout)["reused"] is True
    shard = out / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    assert any("checksum" in p for p in verify_checksums(out))
    with pytest.raises(FormatError, match="checksum"):
        require_valid(out, level="checksums")
    again = run(*pack_args(src, out, qwen))
    assert_one_line_error(again, 1, "damaged", "checksum", "--overwrite")
    # A forged edit with the manifest re-hashed passes the checksums but not the row checks.
    assert run(*pack_args(src, out, qwen, "--overwrite")).returncode == 0
    ds = open_dataset(out)
    ids = ds.row(0).input_ids
    raw = bytearray(shard.read_bytes())
    at = raw.find(ids[:4].tobytes())
    raw[at : at + 4] = np.int32(10_000_000).tobytes()  # an id far outside Qwen's vocabulary
    shard.write_bytes(bytes(raw))
    manifest = read_manifest(out)
    manifest["shards"][0]["checksum"] = hash_file(shard)
    write_manifest(out, manifest)
    assert verify_checksums(out) == []
    forged = run(*pack_args(src, out, qwen))
    assert_one_line_error(forged, 1, "damaged", "token id 10000000")


def test_checksum_pass_costs_little(tmp_path):
    """Not a benchmark: only that the pre-training check is a pass over the bytes (well under a second here)."""
    out = tmp_path / "big"
    rng = np.random.default_rng(0)
    with DatasetWriter(out, 512, pad_id=0) as w:
        ids = rng.integers(0, 1000, size=(2048, 512), dtype=np.int32)
        labels = np.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        labels[:, -1] = -100
        w.write_rows(ids, labels, np.full(2048, 512, np.int32), np.arange(2049), [f"d{i}" for i in range(2048)])
        w.finish(tokenizer={"fingerprint": "f", "vocab_size": 1000})
    assert verify_checksums(out) == [] and verify_dataset(out).ok


# ------------------------------------------------------------------------------ item 9: duplicate ids


def test_repeated_inputs_and_ids_are_packed_with_unique_ids_that_verify_accepts(tmp_path, qwen):
    src = conversations(tmp_path / "conv.jsonl", n=10, ids=["x"] * 5 + ["x#dup1"] + [f"u{i}" for i in range(4)])
    out = tmp_path / "ds"
    result = run("pack", str(src), str(src), "-o", str(out), "--tokenizer", qwen, "--seq-length", "128", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["samples_out"] == 20 and summary["duplicate_ids_renamed"] == 14
    assert "repeat the id of an earlier sample" in result.stderr
    ids = [i for row in open_dataset(out).iter_rows() for i in row.doc_ids]
    assert len(ids) == len(set(ids)) == 20 and {"x", "x#dup1", "u0"} <= set(ids)
    assert run("verify", str(out)).returncode == 0


# ------------------------------------------------------------------------------ item 10: memory bounds

MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys
    r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    print(json.dumps({"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr,
                      "peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
""")


def measured(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "cli.dataprep", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout)


def test_a_huge_record_costs_memory_for_what_is_kept_not_for_its_size(tmp_path, qwen):
    src = tmp_path / "huge.jsonl"
    words = " ".join(f"word{i % 1000}" for i in range(3_000_000))  # ~23 MB of text in one record
    with open(src, "w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
        f.write("\n" + json.dumps({"messages": [{"role": "user", "content": words},
                                                {"role": "assistant", "content": "ok"}]}) + "\n")
    r = measured(*pack_args(src, tmp_path / "ds", qwen, "--json"))
    assert r["rc"] == 0, r["stderr"]
    assert json.loads(r["stdout"])["dropped"] == {"too_long": 1}
    # Tokenizing it whole took about 250 bytes per character (~6 GB); cut first, it is the JSON line itself.
    assert r["peak_kb"] < 1_500_000, r["peak_kb"]
    t = measured(*pack_args(src, tmp_path / "tr", qwen, "--json", "--overlong", "truncate"))
    assert t["rc"] == 0 and json.loads(t["stdout"])["truncated"] == {"cut_tail": 1}
    assert t["peak_kb"] < 1_500_000, t["peak_kb"]


def test_seq_length_is_bounded_and_memory_follows_the_data(tmp_path, qwen):
    src = conversations(tmp_path / "conv.jsonl", n=5)
    huge = run(*pack_args(src, tmp_path / "x", qwen)[:-2], "--seq-length", "1000000000")
    assert huge.returncode == 2 and "--seq-length" in huge.stderr and "1048576" in huge.stderr
    assert not (tmp_path / "x").exists()
    r = measured("pack", str(src), "-o", str(tmp_path / "long"), "--tokenizer", qwen, "--seq-length", "1048576",
                 "--json")
    assert r["rc"] == 0, r["stderr"]
    assert json.loads(r["stdout"])["rows"] == 1 and r["peak_kb"] < 1_200_000, r["peak_kb"]
    assert verify_dataset(tmp_path / "long").ok


# ------------------------------------------------------------------------------ item 11: one-line errors


def test_usage_errors_are_one_line_with_exit_2(tmp_path, qwen):
    src = conversations(tmp_path / "conv.jsonl", n=3)
    for args, needle in (
        (pack_args(src, tmp_path / "o", qwen, "--seed", "-1"), "--seed"),
        (pack_args(src, tmp_path / "o", qwen, "--input-format", "nope"), "--input-format"),
        (["convert", str(src), "-o", str(tmp_path / "c.jsonl"), "--shuffle", "--seed", "-1"], "--seed"),
        (["convert", str(src), "-o", str(tmp_path / "c.jsonl"), "--input-format", "nope"], "--input-format"),
    ):
        result = run(*args)
        assert_one_line_error(result, 2, needle)
    assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob("*c.jsonl*"))


def test_an_empty_shard_list_is_a_verification_problem_not_a_crash(tmp_path):
    path = _crafted(tmp_path, [GOOD_ROW])
    manifest = read_manifest(path)
    manifest.update(shards=[], num_rows=0, num_docs=0, num_tokens=0, num_trainable=0)
    write_manifest(path, manifest)
    with pytest.raises(FormatError, match="lists no shards"):
        require_valid(path, level="checksums")
    result = run("verify", str(path))
    assert result.returncode == 1 and "lists no shards" in result.stderr


def test_inspect_with_a_smaller_tokenizer_is_one_line_not_an_index_error(tmp_path, qwen, shared_data):
    src = conversations(tmp_path / "conv.jsonl", n=5)
    assert run(*pack_args(src, tmp_path / "ds", qwen)).returncode == 0
    llama2 = str(shared_data / "tokenizers" / "llama2")
    result = run("inspect", str(tmp_path / "ds"), "--row", "0", "--tokenizer", llama2)
    assert_one_line_error(result, 1, "outside tokenizer", "vocabulary of 32000")


def _can_mount() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and unshare -m to mount a small tmpfs")


def in_small_fs(tmp_path: Path, options: str, *args: str) -> subprocess.CompletedProcess:
    """Run dataprep ARGS with MNT mounted as a private tmpfs (-o OPTIONS); afterwards list what MNT holds."""
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    cmd = " ".join([sys.executable, "-m", "cli.dataprep", *[a.replace("MNT", str(mnt)) for a in args]])
    script = f"mount -t tmpfs -o {options} tmpfs {mnt} && {cmd}; rc=$?; echo LEFT: $(ls -A {mnt}); exit $rc"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@needs_mount
def test_disk_full_is_one_line_and_leaves_no_partial_files(tmp_path, qwen):
    src = conversations(tmp_path / "conv.jsonl", n=400)
    result = in_small_fs(tmp_path, "size=96k", *pack_args(src, Path("MNT/ds"), qwen))
    assert_one_line_error(result, 1, f"{tmp_path / 'mnt' / 'ds'}: No space left on device")
    assert result.stdout.strip() == "LEFT:"  # no temp dir, spill, lock or half dataset left behind
    conv = in_small_fs(tmp_path, "size=8k", "convert", str(src), "-o", "MNT/c.jsonl")
    assert_one_line_error(conv, 1, "c.jsonl: No space left on device")
    assert conv.stdout.strip() == "LEFT:"


@needs_mount
def test_read_only_output_is_one_line(tmp_path, qwen):
    src = conversations(tmp_path / "conv.jsonl", n=5)
    result = in_small_fs(tmp_path, "ro", *pack_args(src, Path("MNT/ds"), qwen))
    assert_one_line_error(result, 1, "Read-only file system")
    conv = in_small_fs(tmp_path, "ro", "convert", str(src), "-o", "MNT/c.jsonl")
    assert_one_line_error(conv, 1, "Read-only file system")


# ------------------------------------------------------------------------------ item 12: links outside


def test_shards_linked_outside_the_dataset_are_refused_and_merge_does_not_hard_link_them(tmp_path, qwen):
    src = conversations(tmp_path / "conv.jsonl")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(*pack_args(src, a, qwen)).returncode == 0
    conversations(src, n=20, ids=[f"other{i}" for i in range(20)])
    assert run(*pack_args(src, b, qwen)).returncode == 0
    secret = tmp_path / "elsewhere" / "secret.arrow"
    secret.parent.mkdir()
    shard = b / "shard-00000.arrow"
    shutil.move(shard, secret)  # same bytes, so the manifest's size and checksum still match
    shard.symlink_to(secret)
    with pytest.raises(FormatError, match="outside the dataset directory"):
        open_dataset(b)
    verify = run("verify", str(b))
    assert verify.returncode == 1 and "outside the dataset directory" in verify.stderr
    merged = run("merge", str(a), str(b), "-o", str(tmp_path / "m"))
    assert_one_line_error(merged, 1, "outside the dataset directory")
    assert not (tmp_path / "m").exists() and secret.stat().st_nlink == 1
    shard.unlink()
    shard.symlink_to("/dev/zero")
    assert "link to /dev/zero" in run("verify", str(b)).stderr
    # links that merge --link symlink made to its parts' shards stay readable
    shard.unlink()
    shutil.move(secret, shard)
    linked = run("merge", str(a), str(b), "-o", str(tmp_path / "ml"), "--link", "symlink")
    assert linked.returncode == 0, linked.stderr
    assert (tmp_path / "ml" / "shard-00000.arrow").is_symlink() and run("verify", str(tmp_path / "ml")).returncode == 0
