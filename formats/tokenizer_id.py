"""Which tokenizer a dataset was packed with: the fingerprint both the packer and the trainer compute.

The fingerprint is the contract between `dataprep pack` (which records it in the manifest) and
`trainer run` (which refuses data packed with another tokenizer than the model's). It lives here, in the
format layer both sides import, so the rule exists once and the trainer never loads a tokenizer (or imports
dataprep) to check it.

It identifies a tokenizer by what packing depends on, not by file bytes, so re-saving the same tokenizer
(transformers' `save_pretrained` rewrites tokenizer.json with merges as pairs, moves the chat template to
chat_template.jinja, drops and renames config keys) keeps it, while any change that can change token ids or the
rendered conversation changes it:
- `tokenizer.json`: the model (type, vocabulary, merges in one spelling, unk/byte-fallback/prefix options),
  normalizer, pre-tokenizer and post-processor (minus `trim_offsets`, which only moves character offsets), and
  the added tokens (id, content, special, matching flags). The decoder is left out: packed ids never pass
  through it.
- `vocab.json` + `merges.txt`: vocabulary and merges, and the config keys the loader builds the pre-tokenizer
  and special tokens from (`tokenizer_class`, `add_prefix_space`, `added_tokens_decoder`, `added_tokens.json`).
- `tokenizer.model` (sentencepiece): its bytes.
- always: the bos/eos/pad/unk token contents (tokenizer_config.json, else special_tokens_map.json) and the chat
  template (tokenizer_config.json, else chat_template.jinja, else chat_template.json).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

from formats.errors import FormatError

CONFIG_FILE = "tokenizer_config.json"
MAIN_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")  # in load preference
EXTRA_FILES = ("special_tokens_map.json", "added_tokens.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Every file a tokenizer may consist of: what an export copies beside the weights so it stands alone.
TOKENIZER_FILES = (*MAIN_FILES, "merges.txt", CONFIG_FILE, *EXTRA_FILES, CHAT_TEMPLATE_FILE, "chat_template.json")


class TokenizerFilesError(FormatError):
    """A tokenizer directory exists but its files cannot be read; the message names the file."""


FINGERPRINT_SCHEME = "tok1"  # bump when the canonical form below changes


def _main_file(path: Path) -> Path | None:
    if path.is_file():
        return path.parent / "vocab.json" if path.name == "merges.txt" else path
    return next((path / name for name in MAIN_FILES if (path / name).is_file()), None)


def _read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise TokenizerFilesError(f"{path}: cannot read tokenizer file ({exc})") from None


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _without_offsets(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_offsets(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_without_offsets(v) for v in node]
    return node


def _merge_text(merge: Any) -> str:
    return " ".join(merge) if isinstance(merge, list) else str(merge)


def _canonical_tokenizer_json(data: Any, where: Path) -> dict[str, Any]:
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise TokenizerFilesError(f"{where}: not a tokenizers file (no 'model')")
    # Options at their defaults are dropped: re-saving writes some (ignore_merges: false) that older files omit.
    model = {k: v for k, v in data["model"].items() if v is not None and v is not False and v != ""}
    if "merges" in model:
        model["merges"] = [_merge_text(m) for m in model["merges"]]
    added = sorted(
        ({k: t.get(k) for k in ("id", "content", "special", "single_word", "lstrip", "rstrip", "normalized")}
         for t in data.get("added_tokens") or [] if isinstance(t, dict)),
        key=lambda t: (t["id"] if isinstance(t["id"], int) else -1, str(t["content"])),
    )
    return {"model": model, "normalizer": data.get("normalizer"), "pre_tokenizer": _without_offsets(data.get(
        "pre_tokenizer")), "post_processor": _without_offsets(data.get("post_processor")), "added_tokens": added}


def _chat_template(config: dict[str, Any], directory: Path) -> Any:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}] -> {name: template}
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)} or None
    if template is None and (directory / CHAT_TEMPLATE_FILE).is_file():
        template = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if template is None and (directory / "chat_template.json").is_file():
        template = _read_json(directory / "chat_template.json").get("chat_template")
    return template


def tokenizer_identity(path: str | Path) -> dict[str, Any] | None:
    """The canonical description the fingerprint hashes (see the module docstring); None without a tokenizer."""
    main = _main_file(Path(path))
    if main is None:
        return None
    directory = main.parent
    config = _read_json(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else {}
    if not isinstance(config, dict):
        raise TokenizerFilesError(f"{directory / CONFIG_FILE}: not a JSON object")
    special_map = (_read_json(directory / "special_tokens_map.json")
                   if (directory / "special_tokens_map.json").is_file() else {})
    identity: dict[str, Any] = {"scheme": FINGERPRINT_SCHEME}
    if main.name == "tokenizer.model":
        identity["sentencepiece"] = hashlib.sha256(main.read_bytes()).hexdigest()
    elif main.name == "vocab.json":
        merges = [line for line in (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if line and not line.startswith("#version")]
        decoder = config.get("added_tokens_decoder") or {}
        identity["bpe"] = {
            "vocab": _read_json(main), "merges": merges,
            "qwen2": str(config.get("tokenizer_class", "")).startswith("Qwen2"),
            "add_prefix_space": bool(config.get("add_prefix_space", False)),
            "added": sorted((str(k), _token_content(v)) for k, v in decoder.items()) if isinstance(decoder, dict) else [],
            "added_json": (_read_json(directory / "added_tokens.json")
                           if (directory / "added_tokens.json").is_file() else None),
        }
    else:
        identity["tokenizers"] = _canonical_tokenizer_json(_read_json(main), main)
    for role in ("bos", "eos", "pad", "unk"):
        key = f"{role}_token"
        identity[key] = _token_content(config[key]) if key in config else _token_content(special_map.get(key))
    identity["chat_template"] = _chat_template(config, directory)
    return identity


def tokenizer_fingerprint(path: str | Path) -> str | None:
    """The fingerprint of the tokenizer at `path`, or None when there is no tokenizer there."""
    identity = tokenizer_identity(path)
    if identity is None:
        return None
    blob = orjson.dumps(identity, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return f"{FINGERPRINT_SCHEME}:{hashlib.sha256(blob).hexdigest()}"
