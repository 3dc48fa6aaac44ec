"""The end-to-end demo behind `make demo`: each step is one CLI call, exactly as a user would type it.

Run with the project's virtual environment (`.venv/bin/python examples/demo.py`); the commands are taken
from the same environment's bin directory. Everything is written under demo_out/ (re-runs overwrite it).
Later steps (pack, train, export) are appended here as they land.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Paths relative to the repo root (the commands run there), so the printed commands can be copied.
DATA = Path("examples/data")
OUT = Path("demo_out")


def step(title: str, *argv: str) -> None:
    """Print and run one command; stop the demo at the first failure with that command's exit code."""
    print(f"\n=== {title}\n$ {shlex.join(argv)}", flush=True)
    result = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=REPO)
    if result.returncode != 0:
        print(f"demo failed at: {title} (exit {result.returncode})", file=sys.stderr)
        sys.exit(result.returncode)


def main() -> None:
    (REPO / OUT).mkdir(exist_ok=True)
    conversations = OUT / "conversations.jsonl"

    # 1. Alpaca (with input, history, system, Chinese) and PaddleNLP src/tgt (multi-turn, context.system)
    #    into one canonical conversation file; the format of each file is detected from its first record.
    step(
        "convert: Alpaca + src/tgt -> conversation JSONL",
        "dataprep", "convert",
        str(DATA / "alpaca_example.json"), str(DATA / "src_tgt_example.jsonl"),
        "-o", str(conversations), "--overwrite",
    )

    # 2. The same Alpaca data as MindSpore Transformers' alpaca converter writes it, for users of that tool.
    step(
        "convert: Alpaca -> MindFormers conversations JSON",
        "dataprep", "convert",
        str(DATA / "alpaca_example.json"), "-o", str(OUT / "alpaca_mindformers.json"),
        "--output-style", "mindformers", "--overwrite",
    )

    first = (REPO / conversations).read_text(encoding="utf-8").splitlines()[0]
    print(f"\nfirst conversation record in {conversations}:\n{first}")


if __name__ == "__main__":
    main()
