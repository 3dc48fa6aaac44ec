"""Which tokenizer a dataset was packed with: the fingerprint both the packer and the trainer compute.

The fingerprint is the contract between `dataprep pack` (which records it in the manifest) and
`trainer run` (which refuses data packed with another tokenizer than the model's). It lives here, in the
format layer both sides import, so the rule of which files count exists once and the trainer never has to
load a tokenizer (or import dataprep) to check it.

Which files count, in a model directory (or beside a single tokenizer file):
- the main vocabulary: `tokenizer.json`, else `vocab.json` + `merges.txt`, else `tokenizer.model`
  (the preference `dataprep.tokenizer.load_tokenizer` loads by);
- `tokenizer_config.json` when it holds anything, `special_tokens_map.json`, `added_tokens.json`;
- `chat_template.jinja` when `tokenizer_config.json` names no chat_template (the file is then the template).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from formats.errors import FormatError

CONFIG_FILE = "tokenizer_config.json"
MAIN_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")  # in load preference
EXTRA_FILES = ("special_tokens_map.json", "added_tokens.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Every file a tokenizer may consist of: what an export copies beside the weights so it stands alone.
TOKENIZER_FILES = (*MAIN_FILES, "merges.txt", CONFIG_FILE, *EXTRA_FILES, CHAT_TEMPLATE_FILE, "chat_template.json")


class TokenizerFilesError(FormatError):
    """A tokenizer directory exists but its files cannot be read; the message names the file."""


def fingerprint_files(paths: Sequence[Path]) -> str:
    """sha256 over (name, size, bytes) of each file in name order, so renaming or editing any file changes it."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        data = p.read_bytes()
        h.update(p.name.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return "sha256:" + h.hexdigest()


def _main_file(path: Path) -> Path | None:
    if path.is_file():
        return path.parent / "vocab.json" if path.name == "merges.txt" else path
    return next((path / name for name in MAIN_FILES if (path / name).is_file()), None)


def _config_names_template(config: object) -> bool:
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: counts when one entry has a template
        return any(isinstance(t, dict) and t.get("template") for t in template)
    return template is not None


def tokenizer_files(path: str | Path) -> list[Path]:
    """The files the fingerprint of the tokenizer at `path` (a directory or one tokenizer file) covers.

    Empty when `path` holds no tokenizer (a model directory shipped without one).
    """
    p = Path(path)
    main = _main_file(p)
    if main is None:
        return []
    directory = main.parent
    files = [main]
    if main.name == "vocab.json":
        files.append(directory / "merges.txt")
    config_path = directory / CONFIG_FILE
    config: object = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerFilesError(f"{config_path}: cannot read the tokenizer config ({exc})") from None
        if config:
            files.append(config_path)
    files += [directory / name for name in EXTRA_FILES if (directory / name).is_file()]
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file() and not _config_names_template(config):
        files.append(jinja)
    return files


def tokenizer_fingerprint(path: str | Path) -> str | None:
    """The fingerprint of the tokenizer at `path`, or None when there is no tokenizer there."""
    files = tokenizer_files(path)
    if not files:
        return None
    try:
        return fingerprint_files(files)
    except OSError as exc:
        raise TokenizerFilesError(f"cannot read tokenizer file: {exc}") from None
