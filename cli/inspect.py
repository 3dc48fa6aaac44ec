"""`dataprep inspect`: what is in a packed dataset, and what one row looks like with its trained spans."""

from __future__ import annotations

import click
import numpy as np

from cli.common import CONTEXT_SETTINGS, emit_summary, handle_errors, reporting_options, setup_logging
from formats.schema import IGNORE_INDEX

_HIST_BINS = 10


def _length_histogram(ds, limit_rows: int) -> list[tuple[int, int, int]]:
    lengths = np.concatenate(
        [ds.row(i).doc_lengths for i in range(min(len(ds), limit_rows))] or [np.zeros(0)]
    )
    if lengths.size == 0:
        return []
    # Bins over the lengths that occur, not 0..seq_length: short documents in long rows would leave most empty.
    low, high = int(lengths.min()), int(lengths.max()) + 1
    bins = max(1, min(_HIST_BINS, high - low))
    edges = np.unique(np.linspace(low, high, bins + 1).astype(int))
    counts, _ = np.histogram(lengths, bins=edges)
    return [(int(edges[k]), int(edges[k + 1]) - 1, int(counts[k])) for k in range(len(counts))]


def render_row(row, decode, ignore_index: int = IGNORE_INDEX) -> str:
    """Each document on its own line; trained tokens in [[...]] -- the tokens the labels make the model predict
    (labels are pre-shifted: label i trains token i+1)."""
    out = []
    pos = 0
    for doc_id, length in zip(row.doc_ids, row.doc_lengths, strict=True):
        ids = row.input_ids[pos : pos + length]
        labels = row.labels[pos : pos + length]
        trained = np.zeros(length, dtype=bool)
        trained[1:] = labels[:-1] != ignore_index
        parts = []
        start = 0
        for k in range(1, length + 1):
            if k == length or trained[k] != trained[start]:
                text = decode(ids[start:k].tolist())
                parts.append(f"[[{text}]]" if trained[start] else text)
                start = k
        out.append(f"--- doc {doc_id} ({length} tokens, {int(trained.sum())} trained)\n{''.join(parts)}")
        pos += length
    out.append(f"--- padding: {len(row.input_ids) - pos} tokens")
    return "\n".join(out)


@click.command("inspect", context_settings=CONTEXT_SETTINGS)
@click.argument("directory", type=click.Path())
@click.option(
    "--row", "row_index", type=int, default=None, metavar="I", help="Decode row I, trained spans in [[...]]."
)
@click.option(
    "--tokenizer",
    "tokenizer_path",
    type=click.Path(exists=True),
    default=None,
    help="Tokenizer for --row (default: the path stored in the manifest).",
)
@click.option(
    "--hist-rows",
    type=click.IntRange(min=1),
    default=10000,
    show_default=True,
    help="Rows sampled for the length histogram.",
)
@reporting_options
@handle_errors
def inspect(
    directory: str,
    row_index: int | None,
    tokenizer_path: str | None,
    hist_rows: int,
    as_json: bool,
    verbose: int,
) -> None:
    """Summarise the dataset in DIRECTORY (manifest, packing stats, document-length histogram) and
    optionally decode one row with its trained spans marked.

    Exit codes: 0 ok, 1 unreadable dataset or row out of range, 2 usage error.
    """
    from formats.reader import open_dataset

    setup_logging(verbose)
    ds = open_dataset(directory)
    m = ds.manifest
    stats = m.get("packing", {}).get("stats", {})
    summary = {
        "dataset": directory,
        "format": f"{m['format']['name']} v{m['format']['version']}",
        "rows": len(ds),
        "seq_length": ds.seq_length,
        "documents": m["num_docs"],
        "tokens": m["num_tokens"],
        "trainable_tokens": m["num_trainable"],
        "packing_efficiency": m["num_tokens"] / (len(ds) * ds.seq_length) if len(ds) else 0.0,
        "lower_bound_rows": stats.get("lower_bound_rows"),
        "algorithm": m.get("packing", {}).get("algorithm"),
        "template": m.get("template"),
        "tokenizer": m["tokenizer"].get("name"),
        "tokenizer_fingerprint": ds.tokenizer_fingerprint,
        "pad_id": ds.pad_id,
        "shards": ds.num_shards,
        "compression": m["compression"],
        "created": m.get("created"),
        "fingerprint": ds.fingerprint,
    }
    if row_index is not None:  # asked for one row: show that row, not the whole summary before it
        _show_row(ds, directory, row_index, tokenizer_path)
        return
    hist = _length_histogram(ds, hist_rows)
    if as_json:
        summary["doc_length_histogram"] = [{"from": a, "to": b, "count": c} for a, b, c in hist]
    emit_summary("dataprep inspect", summary, as_json)
    if not as_json and hist:
        peak = max(c for _, _, c in hist) or 1
        click.echo("document lengths:", err=True)
        for a, b, c in hist:
            click.echo(f"  {a:>6}-{b:<6} {c:>9,} {'#' * round(40 * c / peak)}", err=True)


def _show_row(ds, directory: str, row_index: int, tokenizer_path: str | None) -> None:
    from dataprep.errors import DataError

    m = ds.manifest
    if not -len(ds) <= row_index < len(ds):
        raise DataError(f"row {row_index} out of range (dataset has {len(ds)} rows)", source=directory)
    from dataprep.tokenizer import load_tokenizer

    path = tokenizer_path or m["tokenizer"].get("path")
    if not path:
        raise DataError("the manifest stores no tokenizer path; pass --tokenizer", source=directory)
    try:
        tok = load_tokenizer(path)
    except FileNotFoundError as exc:
        raise DataError(
            f"cannot load tokenizer {path} ({exc}); pass --tokenizer", source=directory
        ) from exc
    if tok.fingerprint != ds.tokenizer_fingerprint:
        click.echo(f"warning: tokenizer {path} differs from the one the data was packed with", err=True)
    row = ds.row(row_index)
    top = int(row.input_ids.max()) if len(row.input_ids) else 0
    if top >= tok.vocab_size or (len(row.input_ids) and int(row.input_ids.min()) < 0):
        raise DataError(
            f"row {row_index} holds token ids outside tokenizer {path}'s vocabulary of {tok.vocab_size} "
            "(packed with another tokenizer, or a damaged shard: run `dataprep verify`)",
            source=directory,
        )
    click.echo(render_row(row, tok.decode))
