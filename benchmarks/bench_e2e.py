"""End to end: `dataprep pack` of resampled Alpaca-GPT4 JSON to verified shards, beside TRL's SFT data path and the
bare ceiling, on the same records, in paired runs (wall time and peak memory of each arm's own process).

Arms (each a fresh process, so peak RSS is its own; the timer starts after imports and tokenizer loading):
- ours:    `pack_dataset` (what `dataprep pack` runs: read the JSON array, convert, template `auto` -> llama3,
           tokenize with assistant-only masks, pack bfd into seq-length rows, write Arrow shards + manifest), then
           `verify_dataset` (re-hash every shard, check every row).
- trl:     TRL's SFTTrainer data preparation on the same records as conversational prompt-completion pairs
           (`completion_only_loss`: the assistant-only mask TRL can build for a template without
           {% generation %} blocks, which Llama 3's has not), `packing=True` (bfd), `max_length` = seq length,
           then `save_to_disk`. TRL is pip-installed without dependencies into benchmarks/_work/trl-pkgs (the
           project's transformers / datasets / accelerate / torch are used); a tiny random Llama is built for
           the trainer before the timer starts.
- ceiling: read the JSON, render each record as the Llama 3 chat text (Python string building) and
           `encode_batch` it (the ceiling as issue 15 defines it): no masks, no packing, nothing written.
- ceiling_fast: the same with `encode_batch_fast` (no offsets or other per-token extras computed): a stricter
           bound, reported beside the other; ours calls encode_batch_fast too.
Ours and the ceilings must count the same tokens (ours yields exactly the chat template's ids).

Usage: python benchmarks/bench_e2e.py [--records 200000] [--repeats 3] [--seq-length 4096] [--quick] [--no-trl]
Prints a Markdown table and a final `BENCH_JSON {...}` line. Run it alone on the machine (the lead does).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
WORK = REPO / "benchmarks" / "_work"
TRL_DIR = WORK / "trl-pkgs"
DATA = SHARED / "alpaca" / "alpaca_gpt4_en_demo_1k.json"
TOKENIZER = SHARED / "tokenizers" / "llama3_instruct"
ARMS = ("ours", "trl", "ceiling", "ceiling_fast")


def make_input(n: int, seed: int) -> Path:
    """n records drawn with replacement from the real Alpaca-GPT4 sample, as one JSON array (cached)."""
    path = WORK / f"e2e_alpaca_gpt4_{n}_{seed}.json"
    if not path.exists():
        raw = json.loads(DATA.read_text(encoding="utf-8"))
        rng = random.Random(seed)
        rows = [dict(raw[rng.randrange(len(raw))], id=f"r{i}") for i in range(n)]
        WORK.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
    return path


# ---- the arms (run in a child process: `--arm NAME`) ------------------------------------------------------------


def arm_ours(src: Path, out: Path, seq_length: int) -> dict:
    import dataprep.tokenizer  # noqa: F401 - imports outside the timer, as for the other arms
    from dataprep.pipeline import PackOptions, pack_dataset
    from formats.verify import verify_dataset

    t = time.perf_counter()
    summary = pack_dataset([str(src)], out, TOKENIZER, PackOptions(seq_length=seq_length, template="auto", overwrite=True))
    report = verify_dataset(out)
    seconds = time.perf_counter() - t
    assert report.ok, report.problems[:3]
    return {"seconds": seconds, "tokens": report.tokens, "trainable": report.trainable, "rows": report.rows,
            "template": summary.get("template")}


def load_trl():
    if str(TRL_DIR) not in sys.path:
        sys.path.insert(0, str(TRL_DIR))
    try:
        return importlib.import_module("trl")
    except ImportError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(TRL_DIR), "trl"]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise RuntimeError("pip could not install trl")
    importlib.invalidate_caches()
    return importlib.import_module("trl")


def arm_trl(src: Path, out: Path, seq_length: int) -> dict:
    import datasets
    import orjson
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    trl = load_trl()
    datasets.disable_progress_bars()
    cfg = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER / "tokenizer.json"), bos_token=cfg["bos_token"],
                                  eos_token=cfg["eos_token"], pad_token=cfg["eos_token"])
    tok.chat_template = cfg["chat_template"]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with tempfile.TemporaryDirectory() as tmp:
        args = trl.SFTConfig(output_dir=tmp, max_length=seq_length, packing=True, completion_only_loss=True,
                             report_to=[], dataset_num_proc=None, use_cpu=True, bf16=False)
        t = time.perf_counter()
        rows = []
        for r in orjson.loads(src.read_bytes()):
            user = r["instruction"] + ("\n\n" + r["input"] if r.get("input") and not r["input"].isspace() else "")
            rows.append({"prompt": [{"role": "user", "content": user}],
                         "completion": [{"role": "assistant", "content": r["output"]}]})
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok)
        ds = trainer.train_dataset
        ds.save_to_disk(str(out))
        seconds = time.perf_counter() - t
    tokens = sum(len(x) for x in ds["input_ids"])
    return {"seconds": seconds, "tokens": tokens, "rows": len(ds), "trl_version": trl.__version__}


def arm_ceiling(src: Path, out: Path, seq_length: int, fast: bool = False) -> dict:
    import orjson
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    t = time.perf_counter()
    tokens = 0
    texts: list[str] = []
    head = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    mid = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    for r in orjson.loads(src.read_bytes()):
        user = r["instruction"] + ("\n\n" + r["input"] if r.get("input") and not r["input"].isspace() else "")
        texts.append(head + user.strip() + mid + r["output"].strip() + "<|eot_id|>")
        if len(texts) == 4096:
            tokens += sum(len(e.ids) for e in encode(texts, add_special_tokens=False))
            texts = []
    if texts:
        tokens += sum(len(e.ids) for e in encode(texts, add_special_tokens=False))
    return {"seconds": time.perf_counter() - t, "tokens": tokens}


def child(arm: str, src: Path, out: Path, seq_length: int) -> None:
    arms = {"ours": arm_ours, "trl": arm_trl, "ceiling": arm_ceiling,
            "ceiling_fast": lambda *a: arm_ceiling(*a, fast=True)}
    result = arms[arm](src, out, seq_length)
    # ru_maxrss is KiB on Linux; no arm starts worker processes, so the process's own peak is the arm's
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("ARM_JSON " + json.dumps(result))


# ---- the driver -------------------------------------------------------------------------------------------------


def run_arm(arm: str, src: Path, seq_length: int) -> dict:
    out = WORK / f"e2e_out_{arm}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--arm", arm, "--input", str(src), "--out", str(out), "--seq-length", str(seq_length)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    stdout, stderr = proc.communicate()
    shutil.rmtree(out, ignore_errors=True)
    line = next((x for x in stdout.splitlines() if x.startswith("ARM_JSON ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": (stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(line[len("ARM_JSON "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2000 records, one round (a smoke run)")
    ap.add_argument("--no-trl", action="store_true", help="leave TRL out (no pip install)")
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.arm:
        child(a.arm, a.input, a.out, a.seq_length)
        return
    if a.quick:
        a.records, a.repeats = 2000, 1
    src = make_input(a.records, a.seed)
    arms = [x for x in ARMS if not (a.no_trl and x == "trl")]
    runs: dict[str, list[dict]] = {x: [] for x in arms}
    for r in range(a.repeats):  # paired: every round runs every arm, in a rotating order
        for arm in arms[r % len(arms):] + arms[: r % len(arms)]:
            runs[arm].append(run_arm(arm, src, a.seq_length))
            print(f"round {r} {arm}: {runs[arm][-1]}", file=sys.stderr)

    def best(arm: str) -> dict | None:
        ok = [x for x in runs.get(arm, []) if "error" not in x]
        return min(ok, key=lambda x: x["seconds"]) if ok else None

    ours, trl, ceiling, fast = best("ours"), best("trl"), best("ceiling"), best("ceiling_fast")
    for name, other in (("ceiling", ceiling), ("ceiling_fast", fast)):
        if ours and other and ours["tokens"] != other["tokens"]:
            print(f"WARNING: token counts differ: ours {ours['tokens']} {name} {other['tokens']}", file=sys.stderr)
    print(f"\n{a.records} Alpaca-GPT4 records (resampled), Llama 3 tokenizer, seq {a.seq_length}, best of {a.repeats}\n")
    print("| arm | seconds | records/s | peak RSS MB | tokens |")
    print("|---|---|---|---|---|")
    for arm in arms:
        b = best(arm)
        if b is None:
            print(f"| {arm} | failed: {runs[arm][-1].get('error')} | | | |")
        else:
            print(f"| {arm} | {b['seconds']:.2f} | {a.records / b['seconds']:.0f} | {b['peak_rss_mb']} | {b['tokens']} |")
    ratios = {}
    if ours and trl:
        ratios["ours_vs_trl_speedup"] = round(trl["seconds"] / ours["seconds"], 2)
    if ours and ceiling:
        ratios["ours_fraction_of_ceiling"] = round(ceiling["seconds"] / ours["seconds"], 3)
    if ours and fast:
        ratios["ours_fraction_of_ceiling_fast"] = round(fast["seconds"] / ours["seconds"], 3)
    print("\n" + ", ".join(f"{k} = {v}" for k, v in ratios.items()))
    print("BENCH_JSON " + json.dumps({"records": a.records, "seq_length": a.seq_length, "repeats": a.repeats,
                                     "runs": runs, **ratios}))


if __name__ == "__main__":
    main()
