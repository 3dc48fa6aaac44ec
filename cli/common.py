"""What every command shares: exit codes, error reporting and the end-of-run summary.

Exit codes: 0 success, 1 the data or the run failed (bad record, corrupt shard, failed step),
2 usage error (Click's own), 3 interrupted but state saved (trainer, so a pipeline can retry).
"""

from __future__ import annotations

import errno
import functools
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click
import orjson

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3

F = TypeVar("F", bound=Callable[..., Any])


def _expected_errors() -> tuple[type[BaseException], ...]:
    from dataprep.errors import DataError
    from formats.errors import FormatError

    return (DataError, FormatError, FileNotFoundError, FileExistsError)


def os_error_message(exc: OSError) -> str:
    """One line for a failed system call: the file, what went wrong, and for a full or read-only disk what it
    means for the output (writers publish by rename, so nothing half-written is left that looks complete)."""
    if exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = " ".join(str(exc).split())  # Arrow's messages span lines
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (disk full: nothing was published and the partial output was removed; free space and rerun)"
    elif exc.errno == errno.EROFS:
        text += " (read-only filesystem: choose a writable output location)"
    elif exc.errno == errno.EACCES:
        text += " (permission denied: choose an output location you can write)"
    return text


def handle_errors(func: F) -> F:
    """Turn library errors into one clear line on stderr and exit code 1, instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _expected_errors() as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_FAILURE)
        except OSError as exc:  # disk full, read-only or vanished output, permissions
            click.echo(f"error: {os_error_message(exc)}", err=True)
            sys.exit(EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: int = 0) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fmt(value: Any, key: str = "") -> str:
    """Counts with thousands separators; ids, seeds and versions as written; yes/no and '-' for flags and
    unset values instead of Python's True/False/None."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return str(value) if key.endswith(("_id", "id", "seed", "version", "step")) else f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) or "-"
    return str(value)


def emit_summary(title: str, summary: Mapping[str, Any], as_json: bool) -> None:
    """Print the end-of-command summary: JSON on stdout for pipelines, else a short table on stderr.

    Nested mappings (e.g. skipped-by-reason counts) are shown indented under their key.
    """
    if as_json:
        sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())
        sys.stdout.write("\n")
        return
    lines = [title, "-" * len(title)]

    def walk(mapping: Mapping[str, Any], indent: int) -> None:
        for key, value in mapping.items():
            if isinstance(value, Mapping):
                lines.append(f"{' ' * indent}{key}:" + ("" if value else " none"))
                walk(value, indent + 2)
            else:
                lines.append(f"{' ' * indent}{key + ':':<24} {_fmt(value, str(key))}")

    walk(summary, 0)
    click.echo("\n".join(lines), err=True)


# ------------------------------------------------------------------------------------------ shared options
# One declaration per option that several commands take, so `--json`, `-v`, `--on-error` ... read and behave
# the same in every command (Click's documented way to share options: a decorator that applies them).

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def apply_options(func: F, options: list[Callable[[F], F]]) -> F:
    for option in reversed(options):
        func = option(func)
    return func


def reporting_options(func: F) -> F:
    """`--json` (the end-of-command summary as JSON on stdout) and `-v/--verbose` (repeatable)."""
    return apply_options(func, [
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout (for pipelines)."),
        click.option("-v", "--verbose", count=True, help="-v: info logs; -vv: debug."),
    ])


def on_error_option(func: F) -> F:
    return click.option(
        "--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
        help="fail: stop at the first bad record (exit 1). skip: count it by reason and go on.",
    )(func)


def system_option(func: F) -> F:
    return click.option("--system", metavar="TEXT", default=None,
                        help="System prompt added to conversations that have none.")(func)


def input_format_option(choices: tuple[str, ...] | list[str], help: str) -> Callable[[F], F]:
    return click.option("--input-format", type=click.Choice(choices, case_sensitive=False), default="auto",
                        show_default=True, help=help)


def overwrite_option(help: str = "Replace OUTPUT if it exists.") -> Callable[[F], F]:
    return click.option("--overwrite", is_flag=True, help=help)
