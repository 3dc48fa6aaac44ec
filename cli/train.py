"""`trainer run`: train as the YAML config says; the same command runs alone or under torchrun."""

from __future__ import annotations

import os
import shlex
import sys

import click

from cli.common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    emit_summary,
    handle_errors,
    reporting_options,
    setup_logging,
)


@click.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config value (YAML syntax), e.g. --set train.lr=2e-5. Repeatable.")
@click.option("--resume", default=None, metavar="auto|none|PATH",
              help="auto: newest complete checkpoint in the output dir (default); none: start over; "
                   "PATH: that checkpoint (fails if it is incomplete or corrupt).")
@click.option("--save-format", type=click.Choice(["dcp", "dcp+hf"]), default=None,
              help="dcp+hf: also export HF weights (or the LoRA adapter) at every checkpoint.")
@click.option("--allow-config-change", is_flag=True, default=False,
              help="On resume, apply changed optimizer/schedule settings (lr, schedule, warmup, ...) instead of "
                   "refusing them. Model, adapter, data and seed changes are always refused.")
@reporting_options
@handle_errors
def run(config_path: str | None, overrides: tuple[str, ...], resume: str | None, save_format: str | None,
        allow_config_change: bool, as_json: bool, verbose: int) -> None:
    """Fine-tune a Hugging Face checkpoint on packed shards (full-parameter or LoRA: the peft section).

    \b
    Single process:  trainer run --config finetune.yaml
    Several:         torchrun --nproc-per-node 8 -m cli.trainer run --config finetune.yaml
    Every key is documented by `trainer config`.

    Exit codes: 0 done; 1 the run failed (bad data, bad checkpoint, an error in a step); 2 usage error;
    3 stopped by SIGTERM/SIGINT after saving a checkpoint (run the same command again to continue).
    """
    setup_logging(verbose)
    import logging

    logging.getLogger("trainer.progress").setLevel(logging.INFO)  # per-step lines without a terminal
    from trainer.config import ConfigError, load_config

    try:
        extra = [f"checkpoint.resume={resume}"] if resume else []
        extra += [f"checkpoint.save_format={save_format}"] if save_format else []
        extra += ["checkpoint.allow_config_change=true"] if allow_config_change else []
        config = load_config(config_path, list(overrides) + extra)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if not config.model.path:
        raise click.UsageError("model.path is not set (in the config or with --set model.path=DIR)")
    if not config.data.train:
        raise click.UsageError("data.train is not set (in the config or with --set data.train=[DIR])")
    from cli.generate import build_generation_eval
    from trainer.loop import train
    from trainer.signals import StopRequested

    try:
        result = train(config, generation_eval=build_generation_eval(config))
    except StopRequested as exc:
        click.echo(f"interrupted: {exc}", err=True)
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(f"to continue, run the same command again: {resume_command()}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except (ValueError, RuntimeError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    first = result.losses[0] if result.losses else None
    summary = {
        "steps": result.steps,
        "first_loss": first,
        "final_loss": result.final_loss,
        "eval_loss": result.eval_losses[-1][1] if result.eval_losses else None,
        "trained_tokens": result.trained_tokens,
        "skipped_steps": len(result.skipped_steps),
        "tokens_per_s": result.tokens_per_s,
        "elapsed_s": result.elapsed_s,
        "params_total": result.total_params,
        "params_trainable": result.trainable_params,
        "output_dir": result.output_dir,
        "export_dir": result.export_dir,
        "loss_plot": result.plot,
    }
    if result.generation_evals:
        last = result.generation_evals[-1]
        summary["generation_eval"] = {k[4:]: v for k, v in last.items() if k.startswith("gen_") and "sample" not in k}
    emit_summary("trainer run", summary, as_json)


def resume_command() -> str:
    """The command line that continues this run (`--resume auto` is the default, so it is this one)."""
    args = list(sys.argv[1:])
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # under torchrun: the launcher's own arguments are not visible here
        return "torchrun ... -m cli.trainer " + shlex.join(args) + "  (the same torchrun options as before)"
    return shlex.join(["trainer", *args])


@click.command("config")
def describe_config() -> None:
    """Print every config key with its default and documentation (a commented YAML template)."""
    from trainer.config import describe

    click.echo(describe(), nl=False)
