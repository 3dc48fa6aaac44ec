"""`trainer plan`: the expected memory per rank of a config, before booking the GPUs (see trainer.memory_plan)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cli.common import CONTEXT_SETTINGS, EXIT_FAILURE, handle_errors, reporting_options, setup_logging


@click.command("plan", context_settings=CONTEXT_SETTINGS)
@click.argument("config_path", required=False, type=click.Path(dir_okay=False), metavar="[CONFIG.yaml]")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config value (YAML syntax), as `trainer run --set`. Repeatable.")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="Ranks of the job (default: $WORLD_SIZE, else 1).")
@click.option("--dp-replicate", type=click.IntRange(min=1), default=None, help="Replicas (HSDP); default parallel.dp_replicate or 1.")
@click.option("--dp-shard", type=int, default=None,
              help="FSDP2 shards; -1 = the ranks left over (default parallel.dp_shard or -1).")
@click.option("--tp", type=click.IntRange(min=1), default=None, help="Tensor-parallel ranks (default parallel.tp or 1).")
@click.option("--cp", type=click.IntRange(min=1), default=None, help="Context-parallel ranks (default parallel.cp or 1).")
@click.option("--seq-length", type=click.IntRange(min=1), default=None,
              help="Tokens per packed row (default: the first data.train dataset's manifest).")
@click.option("--trained-fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Share of positions with a label, which sizes the chunked loss (default: the manifest's, "
                   "else 1.0, the bound).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="Where the run will train: resolves model.dtype auto (bf16 on CUDA) and the attention backend.")
@reporting_options
@handle_errors
def plan(config_path: str | None, overrides: tuple[str, ...], world_size: int | None, dp_replicate: int | None,
         dp_shard: int | None, tp: int | None, cp: int | None, seq_length: int | None,
         trained_fraction: float | None, device: str, as_json: bool, verbose: int) -> None:
    """Expected memory per rank for the config's model, row length, micro batch and device mesh.

    \b
    trainer plan finetune.yaml
    trainer plan finetune.yaml --world-size 8 --tp 2 --set model.activation_checkpointing=true --json

    Split into parameters, adapters, optimizer state, gradients, activations, loss buffers, compute copies and
    working sets, with the peak (the larger of the end of the forward and the end of the backward). The model
    is described in the README ("Memory model"); CUDA context and allocator caching come on top.

    Exit codes: 0 printed; 1 the config file or the model's config.json cannot be read; 2 usage error (an
    unknown key, a mesh that does not fit the world size).
    """
    setup_logging(verbose)
    import os

    import yaml

    from trainer.config import ConfigError, load_config

    if config_path is not None:
        try:
            yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            click.echo(f"error: {config_path}: cannot read the config: {exc}", err=True)
            sys.exit(EXIT_FAILURE)
    try:
        config = load_config(config_path, list(overrides))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if not config.model.path:
        raise click.UsageError("model.path is not set (in the config or with --set model.path=DIR)")

    from trainer.memory_plan import PlanError, dataset_facts, mesh_from_config, plan_memory

    fraction = trained_fraction
    doc_length = None
    if (seq_length is None or fraction is None) and config.data.train:
        try:
            seq, share, doc_length = dataset_facts(config.data.train[0])
        except Exception as exc:  # a missing or unfinished dataset: the options can still say what it would be
            if seq_length is None:
                raise click.UsageError(f"--seq-length is needed: {exc}") from None
        else:
            seq_length = seq if seq_length is None else seq_length
            fraction = share if fraction is None else fraction
    if seq_length is None:
        raise click.UsageError("--seq-length is needed (data.train is not set, so no manifest says it)")
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    try:
        mesh = mesh_from_config(config, world, dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, cp=cp)
    except PlanError as exc:
        raise click.UsageError(f"mesh: {exc}") from None
    try:
        result = plan_memory(config, seq_length=seq_length, mesh=mesh, device=device,  # type: ignore[arg-type]
                             trained_fraction=fraction if fraction is not None else 1.0, doc_length=doc_length)
    except PlanError as exc:
        raise click.UsageError(str(exc)) from None
    except ValueError as exc:  # the model's config.json is unreadable or describes an unsupported model
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    if as_json:
        import orjson

        sys.stdout.write(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        click.echo(result.table())
