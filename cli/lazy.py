"""A Click group that imports a subcommand only when it runs.

`trainer --help` should not pay for importing torch, and `dataprep convert` should not import numba.
Each command lives in its own module; the group maps command names to "module:attribute".
"""

from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # name -> (import path "module:attr", one-line help shown by --help without importing the module)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands:
            target, _ = self.lazy_commands[name]
            module_name, attr = target.split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in sorted(self.lazy_commands.items())]
        rows += [
            (name, cmd.get_short_help_str(70))
            for name in super().list_commands(ctx)
            if name not in self.lazy_commands and (cmd := super().get_command(ctx, name)) is not None
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(sorted(rows))


def lazy_main(name: str, commands: dict[str, tuple[str, str]], help: str) -> click.Group:
    """A console entry point (`dataprep`, `trainer`) over lazily imported subcommands: both tools get the same
    -h/--help, --version and command listing from here."""
    from cli.common import CONTEXT_SETTINGS

    group = LazyGroup(name, lazy_commands=commands, context_settings=CONTEXT_SETTINGS, help=help)
    return click.version_option(package_name="sftkit")(group)
