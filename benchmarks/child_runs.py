"""Run one benchmark arm in a fresh Python process: each arm's imports, allocator and thread pool start clean,
so what one arm leaves behind (memory, compiled kernels, a warm cache) cannot flatter or penalise the next.

The parent writes the arm's spec to `<spec["out"]>/spec.json` and runs `python SCRIPT --child NAME --spec PATH
--threads N`; the child calls `child_main`, which runs the arm and writes `result.json` beside the spec.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_child(script: str | Path, name: str, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """The arm's result dict, or {"error": ...} when the child failed (the table then says so)."""
    spec_path = Path(spec["out"]) / "spec.json"
    shutil.rmtree(spec_path.parent, ignore_errors=True)  # no metrics or result left from an earlier run
    spec_path.parent.mkdir(parents=True)
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(Path(script).resolve()), "--child", name, "--spec", str(spec_path),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, check=False)
    result_path = spec_path.with_name("result.json")
    if proc.returncode != 0 or not result_path.is_file():
        return {"error": f"child {name} exited with {proc.returncode}"}
    return json.loads(result_path.read_text())


def child_main(name: str, spec_path: Path, threads: int, arms: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]
               ) -> None:
    """In the child: run arm `name` (its prefix before the first '-' picks the function) and write its result."""
    import torch

    torch.set_num_threads(threads)
    spec = json.loads(Path(spec_path).read_text())
    result = arms[name.split("-")[0]](spec) if name not in arms else arms[name](spec)
    Path(spec_path).with_name("result.json").write_text(json.dumps(result))
