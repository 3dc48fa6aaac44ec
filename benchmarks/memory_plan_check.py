"""`trainer plan` against measured peaks: train small configs on CPU and print predicted vs measured memory.

    .venv/bin/python benchmarks/memory_plan_check.py            # every case of tests.helpers.memory_check
    .venv/bin/python benchmarks/memory_plan_check.py --seq 512  # longer rows

Not a bench_*.py: it compares the memory model with the trainer it models, not sftkit with a peer. The peak is
measured with PyTorch's profiler over the CPU allocator (tensor bytes only), one process, fp32 compute (CPU's
auto dtype), a few optimizer steps each. tests/test_memory_plan.py runs the same cases and asserts the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=256, help="packed row length")
    ap.add_argument("--records", type=int, default=160, help="records packed into the dataset")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()

    import logging

    import torch

    from tests.helpers.memory_check import CASES, make_model_and_data, markdown, run_case

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data_dir = make_model_and_data(root, args.seq, args.records)
        rows = [run_case(root, model_dir, data_dir, case) for case in CASES]
    print(markdown(rows))
    print()
    for r in rows:
        parts = ", ".join(f"{c.name} {c.bytes / 2**20:.2f}" for c in r["plan"].components)
        print(f"- {r['case']}: {parts} (MiB)")
    print("BENCH_JSON " + json.dumps({r["case"]: {"predicted": r["predicted"], "measured": r["measured"]}
                                       for r in rows}))


if __name__ == "__main__":
    main()
