"""One rank of a measured FSDP2 run (launched by torchrun from tests/test_memory_plan.py).

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/memory_dist_worker.py ROOT MODEL DATA OUT [SET...]

Each rank trains the case under the profiler and writes its peak tensor bytes to OUT/rank<R>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import torch

    from tests.helpers.memory_check import Case, case_config, measure_peak_bytes
    from trainer.loop import train

    torch.set_num_threads(1)
    root, model_dir, data_dir, out = (Path(p) for p in sys.argv[1:5])
    config = case_config(root, model_dir, data_dir, Case("dist-" + "-".join(sys.argv[5:]), tuple(sys.argv[5:])))
    _, peak = measure_peak_bytes(lambda: train(config))
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"peak": peak}))


if __name__ == "__main__":
    main()
