"""`dataprep pack`: conversations -> template, tokenize, mask, pack, write verified shards (thin shell)."""

from __future__ import annotations

import sys

import click

from cli.common import (
    CONTEXT_SETTINGS,
    emit_summary,
    handle_errors,
    input_format_option,
    on_error_option,
    overwrite_option,
    reporting_options,
    setup_logging,
    system_option,
)
from cli.convert import FORMAT_CHOICES
from dataprep.chat_types import CONTENT_SPECIALS, TEMPLATE_CHOICES
from dataprep.packing import ALGORITHMS
from dataprep.tokenize import MULTI_TURN, OVERLONG_POLICIES
from formats.schema import MAX_SEQ_LENGTH


@click.command(
    "pack",
    context_settings=CONTEXT_SETTINGS,
    epilog="""\b
Examples:
  dataprep pack conv.jsonl -o data/ --tokenizer ./Qwen2.5-7B-Instruct --seq-length 4096
  dataprep pack alpaca.json more.jsonl.zst -o data/ --tokenizer tok/ --seq-length 2048 --algorithm ffd \\
      --overlong split --on-error skip --num-proc 4 --json
  # three machines, then one merge (no shard data copied):
  dataprep pack conv.jsonl -o parts/p0 --tokenizer tok/ --seq-length 4096 --partition 0/3   # and 1/3, 2/3
  dataprep merge parts/p0 parts/p1 parts/p2 -o data/
""",
)
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="Dataset directory to create."
)
@click.option(
    "--tokenizer",
    "tokenizer_path",
    required=True,
    help="Tokenizer directory or file (tokenizer.json / tokenizer.model / vocab.json+merges.txt), or a hub id "
    "(ORG/NAME) in the local Hugging Face cache.",
)
@click.option(
    "--allow-download",
    is_flag=True,
    help="Let a --tokenizer hub id that is not cached be downloaded (by default nothing is downloaded).",
)
@click.option(
    "--seq-length",
    required=True,
    type=click.IntRange(min=2, max=MAX_SEQ_LENGTH),
    help=f"Tokens per packed row (at most {MAX_SEQ_LENGTH}: every row stores all of them).",
)
@click.option(
    "--template",
    type=click.Choice(TEMPLATE_CHOICES),
    default="auto",
    show_default=True,
    help="Chat template; auto picks the tokenizer family's built-in when it renders exactly like its "
    "chat_template (probed with tools and reasoning when the template has them), else hf (the tokenizer's own).",
)
@click.option(
    "--algorithm",
    type=click.Choice(ALGORITHMS),
    default="bfd",
    show_default=True,
    help="Packing: best-/first-fit-decreasing, or none (one sample per row, padded).",
)
@click.option(
    "--pack-window",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Pack within windows of N samples after the seeded shuffle (default: all at once).",
)
@click.option(
    "--max-docs-per-row",
    type=click.IntRange(min=1),
    default=None,
    metavar="K",
    help="At most K samples in one row.",
)
@click.option(
    "--num-proc", type=click.IntRange(min=1), default=1, show_default=True, help="Tokenizer worker processes."
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=16384,
    show_default=True,
    metavar="ROWS",
    help="Rows per shard file.",
)
@click.option(
    "--compression",
    type=click.Choice(["none", "zstd"]),
    default="none",
    show_default=True,
    help="none keeps shards memory-mappable zero-copy; zstd is smaller but decodes on read.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed for the shuffle before packing and of the rows.",
)
@click.option(
    "--overlong",
    type=click.Choice(OVERLONG_POLICIES),
    default="drop",
    show_default=True,
    help="Samples longer than --seq-length: drop, truncate (oldest turns first), or split into several.",
)
@click.option("--mask-history", is_flag=True, help="Train only on the last assistant turn (= --multi-turn last).")
@click.option(
    "--multi-turn",
    type=click.Choice(MULTI_TURN),
    default="whole",
    show_default=True,
    help="whole: one render of the conversation, every assistant turn trained as it shows there (ids equal "
    "apply_chat_template). last: only the last turn. expand: one sample per assistant turn, rendered as at "
    "inference (for templates that drop earlier reasoning, e.g. Qwen3).",
)
@click.option(
    "--content-special-tokens",
    "content_specials",
    type=click.Choice(CONTENT_SPECIALS),
    default="text",
    show_default=True,
    help="A special-token string inside message text (\"<|im_end|>\" pasted by a user): text keeps it ordinary "
    "text; special makes it the control token, as apply_chat_template does. Such records are counted.",
)
@click.option("--train-on-prompt", is_flag=True, help="Train on every token, prompts included.")
@input_format_option(FORMAT_CHOICES, "Input record format (see `dataprep convert --help`).")
@system_option
@on_error_option
@click.option(
    "--partition",
    "partition_spec",
    metavar="I/N",
    default=None,
    help="Pack only partition I of N (0 <= I < N) into OUTPUT; join the parts with `dataprep merge`.",
)
@click.option(
    "--partition-by",
    type=click.Choice(["record", "file"]),
    default="record",
    show_default=True,
    help="record: converted record k goes to partition k mod N (every part reads all inputs, tokenizes 1/N). "
    "file: input j goes to partition j mod N (each part reads only its files).",
)
@overwrite_option("Replace an existing dataset at OUTPUT. Without it, an OUTPUT made from the same inputs and "
                  "options is reused (exit 0) and any other is refused (exit 1).")
@reporting_options
@handle_errors
def pack(
    inputs: tuple[str, ...],
    output: str,
    tokenizer_path: str,
    allow_download: bool,
    seq_length: int,
    template: str,
    algorithm: str,
    pack_window: int | None,
    max_docs_per_row: int | None,
    num_proc: int,
    shard_size: int,
    compression: str,
    seed: int,
    overlong: str,
    mask_history: bool,
    multi_turn: str,
    content_specials: str,
    train_on_prompt: bool,
    input_format: str,
    system: str | None,
    on_error: str,
    partition_spec: str | None,
    partition_by: str,
    overwrite: bool,
    as_json: bool,
    verbose: int,
) -> None:
    """Template, tokenize (with loss masks), pack and write INPUT... as a packed-shard dataset in OUTPUT.

    INPUT is conversation JSONL from `dataprep convert`, or any input `convert` reads (Alpaca, src/tgt,
    ShareGPT, messages; .gz/.zst; globs). The dataset is written to a temp directory and renamed into place
    when complete, with an index.json manifest (tokenizer fingerprint, template, packing stats, checksums).

    Reruns are idempotent: the manifest records content hashes of the inputs, the tokenizer fingerprint and
    the options; an OUTPUT made from the same ones is reused (summary `reused: true`), a different one is
    refused unless --overwrite.

    Exit codes: 0 ok (or reused), 1 bad data, or OUTPUT exists and differs (the message says which file,
    record or option), 2 usage error.
    """
    from dataprep.partition import parse_partition
    from dataprep.pipeline import PackOptions, pack_dataset
    from formats.hub import resolve

    setup_logging(verbose)
    try:
        tokenizer_path = str(resolve(tokenizer_path, "model", allow_download=allow_download))
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="--tokenizer") from None
    partition = None
    if partition_spec is not None:
        try:
            partition = parse_partition(partition_spec, partition_by)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--partition") from None
    options = PackOptions(
        seq_length=seq_length,
        algorithm=algorithm,
        pack_window=pack_window,
        max_docs_per_row=max_docs_per_row,
        seed=seed,
        shard_rows=shard_size,
        compression=compression,
        overwrite=overwrite,
        template=template,
        overlong=overlong,
        mask_history=mask_history,
        multi_turn=multi_turn,
        content_specials=content_specials,
        train_on_prompt=train_on_prompt,
        input_format=input_format.lower(),
        system=system,
        on_error=on_error,
        num_proc=num_proc,
        progress=sys.stderr.isatty() and not as_json,
        command=list(sys.argv),
        partition=partition,
    )
    summary = pack_dataset(list(inputs), output, tokenizer_path, options)
    emit_summary("dataprep pack", summary, as_json)
