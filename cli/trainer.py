"""`trainer`: fine-tune a Hugging Face checkpoint on packed shards with FSDP2."""

from __future__ import annotations

import click

from cli.lazy import LazyGroup

COMMANDS: dict[str, tuple[str, str]] = {}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sftkit")
def main() -> None:
    """Train on packed shards (full-parameter or LoRA), resume from faults, export HF weights."""


if __name__ == "__main__":
    main()
