"""`trainer tiny-model`: a small random-init Qwen3-shaped checkpoint with a tokenizer learned from your data.

For smoke tests of a whole pipeline (and the demo) on a CPU, where no real checkpoint can be downloaded:
the result is an ordinary Hugging Face directory that `dataprep pack --tokenizer` and `trainer run` take.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli.common import emit_summary, handle_errors, reporting_options, setup_logging

if TYPE_CHECKING:
    from trainer.tiny_model import TinyShape


def build_tiny_model(records: Sequence[dict[str, Any]], out_dir: str | Path, *, vocab_size: int,
                     shape: TinyShape | None = None, seed: int = 0, tokenizer_dir: str | Path | None = None) -> Path:
    """Learn a ChatML BPE tokenizer from conversation records, then write a random model sized to it.

    This composes dataprep (the tokenizer) with the trainer (the model), which neither library may do itself.
    The learned tokenizer goes to `tokenizer_dir` (default: a hidden folder beside `out_dir`, removed after).
    """
    import shutil

    from dataprep.tokenizer import load_tokenizer
    from dataprep.train_tokenizer import train_chatml_tokenizer
    from trainer.tiny_model import build_tiny_checkpoint

    out = Path(out_dir)
    scratch = tokenizer_dir is None
    tok_dir = train_chatml_tokenizer(records, tokenizer_dir or out.with_name(f".{out.name}.tokenizer"),
                                     vocab_size=vocab_size)
    tok = load_tokenizer(tok_dir)
    build_tiny_checkpoint(out, tok_dir, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                          pad_token_id=tok.pad_id, shape=shape, seed=seed)
    if scratch:
        shutil.rmtree(tok_dir, ignore_errors=True)
    return out


@click.command("tiny-model")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the checkpoint (config.json, model.safetensors, tokenizer files).")
@click.option("--vocab-size", default=2048, show_default=True, help="BPE vocabulary size to learn.")
@click.option("--layers", default=4, show_default=True, help="Transformer blocks.")
@click.option("--hidden-size", default=128, show_default=True, help="Model width.")
@click.option("--heads", default=4, show_default=True, help="Attention heads (KV heads = heads / 2).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random init.")
@reporting_options
@handle_errors
def tiny_model(inputs: tuple[str, ...], out_dir: str, vocab_size: int, layers: int, hidden_size: int, heads: int,
               seed: int, as_json: bool, verbose: int) -> None:
    """Learn a ChatML BPE tokenizer from INPUTS (any format `dataprep convert` reads) and build a random model."""
    setup_logging(verbose)
    if hidden_size % heads or heads % 2:
        raise click.UsageError("--hidden-size must be a multiple of --heads, and --heads must be even")
    from dataprep.convert import ConvertOptions, ConvertStats, iter_conversations
    from trainer.model_config import ModelConfig
    from trainer.tiny_model import TinyShape

    out = Path(out_dir)
    stats = ConvertStats()
    records = list(iter_conversations(list(inputs), ConvertOptions(), stats))
    shape = TinyShape(hidden_size=hidden_size, intermediate_size=3 * hidden_size, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=hidden_size // heads)
    build_tiny_model(records, out, vocab_size=vocab_size, shape=shape, seed=seed)

    config = ModelConfig.from_pretrained(out)
    emit_summary("trainer tiny-model", {
        "records_read": stats.records_out,
        "vocab_size": config.vocab_size,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "parameters": config.num_params(),
        "output": str(out),
    }, as_json)
