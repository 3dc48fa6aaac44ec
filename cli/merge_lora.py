"""`trainer merge-adapter` (alias `merge-lora`): fold a PEFT LoRA, VeRA or LoKr adapter into its base checkpoint
(thin shell over trainer.merge_lora)."""

from __future__ import annotations

import sys

import click

from cli.common import (
    CONTEXT_SETTINGS,
    EXIT_FAILURE,
    emit_summary,
    handle_errors,
    overwrite_option,
    reporting_options,
    setup_logging,
)


@click.command("merge-adapter", context_settings=CONTEXT_SETTINGS)
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False),
              help="Base Hugging Face checkpoint directory (config.json + *.safetensors).")
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(file_okay=False),
              help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors), e.g. RUN/export.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write the merged checkpoint to (appears atomically when complete).")
@click.option("--base-as-trained/--base-as-is", "as_trained", default=None,
              help="For an adapter trained on a quantized base (it records it in quantized_base.json): merge into "
                   "that base as the run saw it, quantized and dequantized, so the merged model computes what the "
                   "trained one did (the default when the record exists), or into the checkpoint's full-precision "
                   "values as they are (the default without one).")
@overwrite_option()
@reporting_options
@handle_errors
def merge_lora(base_dir: str, adapter_dir: str, out_dir: str, as_trained: bool | None, overwrite: bool,
               as_json: bool, verbose: int) -> None:
    """Write BASE + ADAPTER as full HF safetensors weights that load without peft.

    Each adapted weight becomes W + delta: LoRA (alpha/r) B A (rsLoRA: alpha/sqrt(r); DoRA: rescaled per row by
    its magnitude), VeRA (lambda_b B)(lambda_d A), LoKr (alpha/r) kron(W1, W2); computed in fp32 and stored in the base's dtype; shard files, index, config, generation config
    and tokenizer files follow the base. Memory: one base tensor at a time plus the adapter. An adapter trained on
    a quantized base is folded into that base as trained unless --base-as-is says otherwise; the summary's
    `base` says which was used.

    Exit codes: 0 merged, 1 the adapter does not fit the base or a file is unreadable, 2 usage error.
    """
    setup_logging(verbose)
    from trainer.merge_lora import merge_lora as merge
    from trainer.weights import WeightsError

    try:
        report = merge(base_dir, adapter_dir, out_dir, overwrite=overwrite,
                       show_progress=sys.stderr.isatty() and not as_json, base_as_trained=as_trained)
    except WeightsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    summary = {
        "output_dir": report.output_dir,
        "merged_modules": report.merged_modules,
        "replaced_tensors": report.replaced_tensors,
        "files": len(report.files),
        "dtype": report.dtype,
        "untied_embeddings": report.untied_embeddings,
        "base": report.base,
    }
    emit_summary("trainer merge-adapter", summary, as_json)
