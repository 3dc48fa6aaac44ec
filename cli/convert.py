"""`dataprep convert`: instruction data -> conversation records (a thin shell over dataprep.convert)."""

from __future__ import annotations

import logging
from concurrent.futures.process import BrokenProcessPool

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
from dataprep.input_formats import ALIASES, FORMATS  # light: conversation + errors only

FORMAT_CHOICES = ["auto", *FORMATS, *ALIASES]

log = logging.getLogger("dataprep.convert")


@click.command(
    "convert",
    context_settings=CONTEXT_SETTINGS,
    epilog="""\b
Examples:
  dataprep convert alpaca.json -o conv.jsonl
  dataprep convert 'raw/*.jsonl.zst' more.json.gz -o conv.jsonl --on-error skip --rejects bad.jsonl
  dataprep convert train.json -o mf.json --output-style mindformers
  dataprep convert hf:./my_saved_dataset -o conv.jsonl --system "You are a helpful assistant."
  dataprep convert train.parquet -o conv.jsonl
  dataprep convert hf:tatsu-lab/alpaca -o conv.jsonl        # from the local Hugging Face cache
  dataprep convert big.json -o conv.jsonl --num-proc 0
""",
)
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Output file (written atomically); - writes the records to standard output.")
@input_format_option(FORMAT_CHOICES, "Input record format; auto detects it per file from the first record. "
                     "mindformers / llamafactory = sharegpt, openai = messages.")
@click.option(
    "--output-style",
    type=click.Choice(["messages", "mindformers"], case_sensitive=False),
    default="messages",
    show_default=True,
    help="messages: canonical JSONL {id, messages}. mindformers: the JSON array MindSpore Transformers' "
    "alpaca converter writes (Stanford Alpaca prompt as the human turn).",
)
@system_option
@click.option("--take", type=click.IntRange(min=1), metavar="N", help="Stop after the first N converted records.")
@click.option("--shuffle", is_flag=True, help="Shuffle the output (after --take). Spills to a temp file next to OUTPUT.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed for --shuffle.")
@on_error_option
@click.option(
    "--on-unknown-field",
    type=click.Choice(["keep", "fail"]),
    default="keep",
    show_default=True,
    help="Input fields no reader maps: keep them under \"extra\" (counted by name in the summary), or "
    "treat the record as bad (then --on-error decides).",
)
@click.option("--rejects", type=click.Path(dir_okay=False), metavar="FILE", help="With --on-error skip: write skipped records (JSONL with location and reason).")
@overwrite_option("Replace OUTPUT (and --rejects) if they exist.")
@click.option(
    "--num-proc",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    metavar="N",
    help="Worker processes that parse and convert (0: one per CPU). Output is identical to N=1. "
    "--take and --shuffle run in one process.",
)
@reporting_options
@handle_errors
def convert(
    inputs: tuple[str, ...],
    output: str,
    input_format: str,
    output_style: str,
    system: str | None,
    take: int | None,
    shuffle: bool,
    seed: int,
    on_error: str,
    on_unknown_field: str,
    rejects: str | None,
    overwrite: bool,
    num_proc: int,
    as_json: bool,
    verbose: int,
) -> None:
    """Convert Alpaca / src-tgt / ShareGPT / messages data to conversation records.

    INPUT is a JSON array or JSON Lines file (optionally .gz / .zst), a Parquet, Arrow or CSV file, a glob
    (quote it), a folder of such files (hub layout data/train-00000-of-00003.parquet: the train split unless
    hf:FOLDER:SPLIT names one), a Hugging Face save_to_disk directory, or hf:ORG/NAME[:SPLIT] for a hub
    dataset in the local Hugging Face cache (no network is used; `hf download ORG/NAME --repo-type dataset`
    fetches one). Fields no reader maps are kept under "extra" and counted (--on-unknown-field).
    The default output is JSON Lines, one {"id", "tools"?, "extra"?, "messages": [{"role", "content",
    "reasoning_content"?, "tool_calls"?, "tool_call_id"?, "name"?, "train"?}, ...]} per line (the form
    transformers' apply_chat_template takes; see CONTRACTS.md).
    Ids come from the input's "id" field, else FILE:LINE (JSON Lines) or FILE[INDEX] (arrays, datasets).

    Exit codes: 0 ok, 1 bad data (the message names file and line/record), 2 usage error.
    """
    from dataprep.convert import ConvertOptions, ConvertStats, convert_files
    from dataprep.sources import expand_inputs

    setup_logging(verbose)
    if output == "-" and as_json:
        raise click.UsageError("-o - writes the records to standard output, so --json cannot share it")
    if rejects and on_error != "skip":
        raise click.UsageError("--rejects needs --on-error skip (with fail, the first bad record stops the run)")
    try:
        expand_inputs(inputs)
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="INPUT") from None
    options = ConvertOptions(
        input_format=input_format.lower(),
        system=system,
        on_error=on_error,
        on_unknown_field=on_unknown_field,
        take=take,
        shuffle=shuffle,
        seed=seed,
        output_style=output_style.lower(),
        overwrite=overwrite,
        rejects=rejects,
        progress=None,
        num_proc=num_proc,
    )
    stats = ConvertStats()
    try:
        convert_files(list(inputs), output, options, stats)
    except BrokenProcessPool as exc:  # a worker was killed (out of memory, say); nothing was written
        raise click.ClickException(f"a --num-proc worker process died: {exc}") from None
    summary = {"output": output, "output_style": options.output_style, **stats.as_dict()}
    if rejects:
        summary["rejects"] = rejects
    if shuffle:
        summary["shuffle_seed"] = seed
    summary["num_proc"] = 1 if (take or shuffle) else options.num_proc
    emit_summary("dataprep convert", summary, as_json)
