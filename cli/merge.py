"""`dataprep merge`: join packed datasets (the partitions of one pack job) without copying shard data."""

from __future__ import annotations

import sys

import click

from cli.common import (
    CONTEXT_SETTINGS,
    emit_summary,
    handle_errors,
    overwrite_option,
    reporting_options,
    setup_logging,
)


@click.command(
    "merge",
    context_settings=CONTEXT_SETTINGS,
    epilog="""\b
Examples:
  dataprep merge parts/p0 parts/p1 parts/p2 -o data/
  dataprep merge /scratch/p* -o /data/sft --link symlink --json
""",
)
@click.argument("parts", nargs=-1, required=True, type=click.Path(file_okay=False), metavar="PART...")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Merged dataset directory to create.")
@click.option(
    "--link",
    type=click.Choice(["hard", "symlink"]),
    default="hard",
    show_default=True,
    help="hard: hard-link the shards (same filesystem; the merged dataset survives deleting the parts). "
    "symlink: relative symlinks (any filesystem; the parts must stay where they are).",
)
@click.option("--allow-partial", is_flag=True, help="Merge a subset of a partitioned job's parts on purpose.")
@overwrite_option("Replace an existing OUTPUT. Without it, an OUTPUT merged from the same parts is reused "
                  "(exit 0) and any other is refused (exit 1).")
@reporting_options
@handle_errors
def merge(
    parts: tuple[str, ...], output: str, link: str, allow_partial: bool, overwrite: bool, as_json: bool, verbose: int
) -> None:
    """Build one dataset in OUTPUT from the packed datasets PART... without copying shard data.

    OUTPUT gets a manifest over all the parts' shards (checksums kept; totals and packing stats combined)
    and one link per shard. Refused: parts with a different seq_length, tokenizer, template, compression or
    batch size; partitions of different `pack --partition` jobs, a repeated or missing partition; any
    document id present twice. Check the result with `dataprep verify OUTPUT`.

    Exit codes: 0 ok (or reused), 1 parts cannot be merged or OUTPUT exists and differs, 2 usage error.
    """
    from formats.merge import merge_datasets

    setup_logging(verbose)
    summary = merge_datasets(
        list(parts), output, link=link, overwrite=overwrite, allow_partial=allow_partial, command=list(sys.argv)
    )
    emit_summary("dataprep merge", summary, as_json)
