"""Measure a CPU training run's peak tensor memory and set it beside `trainer.memory_plan`'s prediction.

The measurement: PyTorch's profiler with `profile_memory=True` sees every allocation and free of the CPU
allocator (the storage of every tensor, parameters, gradients, optimizer state, activations, temporaries). The
running sum of the bytes allocated inside the profiled call and not yet freed, at its maximum, is the peak.
Python objects, pyarrow's buffers and the interpreter are not tensors and are not counted; they are not part
of the plan either (nor of GPU memory). RSS would count them, and the 300+ MB of the imported libraries.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from tests.helpers.tiny_run import pack_rows, records

T = TypeVar("T")

# A model where parameters, optimizer state and activations all weigh: hidden 128, NF4-divisible weights.
SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32)


def measure_peak_bytes(fn: Callable[[], T]) -> tuple[T, int]:
    """(fn(), the peak of CPU tensor bytes allocated during fn and alive at once)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    allocation = torch._C._profiler._EventType.Allocation
    events: list[tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        kind, fields = node.typed
        if kind == allocation and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.alloc_size, fields.ptr))
    events.sort(key=lambda e: e[0])
    live: dict[int, int] = {}
    current = peak = 0
    for _, size, ptr in events:
        if size > 0:
            live[ptr] = size
            current += size
            peak = max(peak, current)
        else:
            current -= live.pop(ptr, 0)  # frees of tensors made before the call do not count
    return result, peak


def make_model_and_data(root: Path, seq_length: int, n_records: int) -> tuple[Path, Path]:
    from cli.tiny_model import build_tiny_model
    from trainer.tiny_model import TinyShape

    model_dir = build_tiny_model(records(300, seed=1), root / "model", vocab_size=300,
                                 shape=TinyShape(**SHAPE), tokenizer_dir=root / "tokenizer")
    return model_dir, pack_rows(model_dir, root / f"data-{seq_length}", n_records=n_records, seq_length=seq_length)


@dataclass
class Case:
    name: str
    sets: tuple[str, ...]
    vocab: int | None = None  # a model with a larger vocabulary than the tokenizer's (the head and loss weigh)


def wide_vocab_model(model_dir: Path, vocab: int) -> Path:
    """The same shape with `vocab` embedding rows (ids of the tokenizer's 300 stay valid), built once."""
    import json

    from trainer.tiny_model import TinyShape, build_tiny_checkpoint

    out = model_dir.with_name(f"model-v{vocab}")
    if not (out / "config.json").is_file():
        cfg = json.loads((model_dir / "config.json").read_text())
        build_tiny_checkpoint(out, model_dir, vocab_size=vocab, eos_token_id=cfg.get("eos_token_id"),
                              pad_token_id=cfg.get("pad_token_id"), shape=TinyShape(**SHAPE))
    return out


CASES = [
    Case("full, AC off", ()),
    Case("full, AC on", ("model.activation_checkpointing=true",)),
    Case("full, AC off, mb 1", ("data.micro_batch_size=1",)),
    Case("LoRA qkvo, AC off", ("peft.pet_type=lora", "peft.lora_rank=16")),
    Case("LoRA qkvo, AC on", ("peft.pet_type=lora", "peft.lora_rank=16", "model.activation_checkpointing=true")),
    Case("LoRA all-linear", ("peft.pet_type=lora", "peft.target_modules=all-linear")),
    Case("QLoRA nf4", ("peft.pet_type=lora", "peft.target_modules=all-linear", "peft.weight_quantize_algo=nf4")),
    Case("full, loss full", ("model.loss=full",)),
    Case("full, bf16 autocast", ("model.dtype=bf16",)),
    Case("LoRA, bf16 autocast + base", ("peft.pet_type=lora", "model.dtype=bf16", "model.frozen_dtype=bf16")),
    Case("full, vocab 8192", (), vocab=8192),
    Case("full, vocab 8192, loss full", ("model.loss=full",), vocab=8192),
    Case("LoRA, vocab 8192, AC on", ("peft.pet_type=lora", "model.activation_checkpointing=true"), vocab=8192),
]


def case_config(root: Path, model_dir: Path, data_dir: Path, case: Case, steps: int = 3) -> Any:
    from trainer.config import load_config

    out = root / "runs" / re.sub(r"\W+", "-", case.name)
    return load_config(None, [
        f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={out}",
        "logging.progress_bar=false", "logging.report_to=[none]", "logging.plot=false", "checkpoint.export=false",
        f"train.max_steps={steps}", "data.micro_batch_size=2", "train.lr=1e-3", *case.sets,
    ])


def run_case(root: Path, model_dir: Path, data_dir: Path, case: Case) -> dict[str, Any]:
    """Train the case for a few steps under the profiler; return the prediction beside the measurement."""
    from trainer.loop import train
    from trainer.memory_plan import dataset_facts, plan_memory

    if case.vocab is not None:
        model_dir = wide_vocab_model(model_dir, case.vocab)
    config = case_config(root, model_dir, data_dir, case)
    seq, share, doc = dataset_facts(data_dir)
    plan = plan_memory(config, seq_length=seq, device="cpu", trained_fraction=share or 1.0, doc_length=doc)
    _, measured = measure_peak_bytes(lambda: train(config))
    return {"case": case.name, "predicted": plan.total, "measured": measured, "ratio": plan.total / measured,
            "plan": plan}


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| case | predicted MiB | measured MiB | predicted / measured | peak at |", "|---|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['predicted'] / 2**20:.2f} | {r['measured'] / 2**20:.2f} | "
                   f"{r['ratio']:.3f} | {r['plan'].peak_phase} |")
    return "\n".join(out)
