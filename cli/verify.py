"""`dataprep verify`: full integrity check of a packed dataset (thin shell over formats.verify)."""

from __future__ import annotations

import sys

import click

from cli.common import (
    CONTEXT_SETTINGS,
    EXIT_FAILURE,
    emit_summary,
    handle_errors,
    reporting_options,
    setup_logging,
)


@click.command("verify", context_settings=CONTEXT_SETTINGS)
@click.argument("directory", type=click.Path())
@click.option(
    "--vocab-size",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Token ids must be below N (the model's embedding rows); default: the tokenizer's size in the manifest.",
)
@reporting_options
@handle_errors
def verify(directory: str, vocab_size: int | None, as_json: bool, verbose: int) -> None:
    """Re-hash every shard and check every row of the dataset in DIRECTORY.

    Checks the manifest (format version, schema, counts); each shard's presence inside the dataset (no links
    out of it but those `merge --link symlink` made), size and xxh3 checksum; and each row: token ids inside
    the vocabulary, every label -100 or the next token, -100 at every document's last position and in the
    padding, padding holds pad_id, documents fit in seq_length, and source ids are unique and as many as the
    manifest says.

    Exit codes: 0 the dataset is intact, 1 any problem (each one is listed), 2 usage error.
    """
    from formats.verify import verify_dataset

    setup_logging(verbose)
    report = verify_dataset(directory, progress=sys.stderr.isatty() and not as_json, vocab_size=vocab_size)
    summary = {
        "dataset": directory,
        "ok": report.ok,
        "shards": report.shards,
        "rows": report.rows,
        "documents": report.docs,
        "tokens": report.tokens,
        "trainable_tokens": report.trainable,
        "problems": len(report.problems),
    }
    if as_json:
        summary["problem_list"] = report.problems
    emit_summary("dataprep verify", summary, as_json)
    if not report.ok:
        if not as_json:
            click.echo("problems:", err=True)
            for p in report.problems:
                click.echo(f"  - {p}", err=True)
        sys.exit(EXIT_FAILURE)
