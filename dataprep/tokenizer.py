"""One tokenizer interface over the three file layouts models ship with.

A model directory may hold a Hugging Face `tokenizer.json` (Llama 3, Qwen2/2.5/3, most new models), a GPT-2 style
`vocab.json` + `merges.txt` pair, or a sentencepiece `tokenizer.model` (Llama 2). Templates and the tokenizing
engine must not care which, so all three are wrapped behind `Tokenizer` with the behaviour of the Hugging Face
tokenizer for the same files (what `transformers` would produce), which is what the model was fine-tuned and served with.

The fingerprint (`formats.tokenizer_id`, the rule the trainer applies too) goes into the manifest, so a trainer
can refuse a dataset made with a different tokenizer.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataprep.errors import DataError
from formats.tokenizer_id import tokenizer_fingerprint

log = logging.getLogger(__name__)

# Used only when no tokenizer_config.json names the special tokens: common conventions, first match wins.
_BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>")
_EOS_GUESSES = ("<|eot_id|>", "<|im_end|>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")

# Qwen2's pre-tokenizer split (digits one by one), used for a bare vocab.json+merges.txt of a Qwen2Tokenizer.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens either as strings or as AddedToken dicts."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


@dataclass
class Tokenizer:
    """A loaded tokenizer. Use `load_tokenizer`; the backend objects are private.

    `continuation_sensitive` is True when encoding a text on its own differs from encoding it right after a special
    token inside a longer string (sentencepiece's dummy prefix): the engine then asks for `encode_batch(...,
    continued=True)` for text that follows a special token, so per-piece encoding equals whole-string encoding.
    """

    name: str
    source: Path
    fingerprint: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    chat_template: str | None
    special_ids: dict[str, int]
    special_tokens: dict[str, int]  # content -> id of every special token recognised inside text
    kind: str  # "tokenizers" | "sentencepiece"
    continuation_sensitive: bool = False
    config: dict = field(default_factory=dict, repr=False)
    _backend: Any = field(default=None, repr=False)

    # ---- encoding -------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._backend.encode_batch([text], continued=False)[0]
        if add_special_tokens and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], continued: bool = False,
                     split_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust / C++). Special-token strings inside text become their ids,
        as with Hugging Face tokenizers, unless `split_special_tokens` (transformers' option of that name: they
        are encoded as ordinary text; added tokens that are not special still match).
        `continued=True`: each text follows a special token in the same sequence."""
        if not texts:
            return []
        if split_special_tokens:
            return self._backend.encode_batch(list(texts), continued=continued, split=True)
        return self._backend.encode_batch(list(texts), continued=continued)

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, special tokens included as their strings (like HF decode without skipping)."""
        return self._backend.decode([int(i) for i in ids])

    def decode_each(self, ids: Iterable[int]) -> list[str]:
        """Each id decoded on its own (one batched call where the backend has one)."""
        return self._backend.decode_each([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def __reduce__(self):  # worker processes reload from the files instead of pickling Rust/C++ objects
        return (load_tokenizer, (str(self.source),))


# ---- backends -------------------------------------------------------------------------------------------------


class _HFBackend:
    """`tokenizers.Tokenizer` (from tokenizer.json or vocab.json+merges.txt)."""

    def __init__(self, tok: Any, special_for_prefix: str | None) -> None:
        self.tok = tok
        self.special_for_prefix = special_for_prefix  # only set when the tokenizer is continuation-sensitive

    def encode_batch(self, texts: list[str], continued: bool, split: bool = False) -> list[list[int]]:
        if split:
            return self._encode_split(texts, continued)
        if continued and self.special_for_prefix is not None:
            # Encode inside context: prepend a special token (a hard split) and drop its id again.
            encs = self.tok.encode_batch_fast([self.special_for_prefix + t for t in texts], add_special_tokens=False)
            return [e.ids[1:] for e in encs]
        encs = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encs]

    def _encode_split(self, texts: list[str], continued: bool) -> list[list[int]]:
        """Special-token strings as plain text (the Rust tokenizer's encode_special_tokens switch)."""
        tok = self.tok
        tok.encode_special_tokens = True
        try:
            if continued and self.special_for_prefix is not None:
                # the context prefix must stay one special token: encode it and the text apart, as one would
                # after a real special token (the continuation probe showed a leading-space rule to respect)
                prefix_len = len(tok.encode(self.special_for_prefix, add_special_tokens=False).ids)
                encs = tok.encode_batch_fast([self.special_for_prefix + t for t in texts], add_special_tokens=False)
                return [e.ids[prefix_len:] for e in encs]
            return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            tok.encode_special_tokens = False

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def decode_each(self, ids: list[int]) -> list[str]:
        return self.tok.decode_batch([[i] for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


def _patch_add_dummy_prefix(model: bytes, value: bool) -> bytes:
    """Return the serialized ModelProto with normalizer_spec.add_dummy_prefix set to `value`.

    sentencepiece cannot switch the dummy prefix per call, and the protobuf package is not a dependency, so this
    edits the wire format directly: ModelProto field 3 (normalizer_spec) gets field 3 (add_dummy_prefix, varint)
    appended; for scalar fields protobuf keeps the last value seen.
    """

    def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
        shift = result = 0
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result, pos
            shift += 7

    def write_varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            if n:
                out.append(b | 0x80)
            else:
                out.append(b)
                return bytes(out)

    out = bytearray()
    pos = 0
    found = False
    while pos < len(model):
        start = pos
        key, pos = read_varint(model, pos)
        fnum, wtype = key >> 3, key & 7
        if wtype == 0:
            _, pos = read_varint(model, pos)
        elif wtype == 1:
            pos += 8
        elif wtype == 5:
            pos += 4
        elif wtype == 2:
            length, body = read_varint(model, pos)
            pos = body + length
            if fnum == 3:
                sub = model[body:pos] + bytes([0x18, 1 if value else 0])
                out += write_varint(key) + write_varint(len(sub)) + sub
                found = True
                continue
        else:
            raise ValueError(f"unsupported protobuf wire type {wtype}")
        out += model[start:pos]
    if not found:
        sub = bytes([0x18, 1 if value else 0])
        out += write_varint((3 << 3) | 2) + write_varint(len(sub)) + sub
    return bytes(out)


class _SPBackend:
    """sentencepiece with the behaviour of transformers' LlamaTokenizer (legacy=False, add_prefix_space=True).

    - The dummy prefix "▁" is added only at the very start of the input, not after a special token inside it
      (prepend_scheme "first"); `continued=True` encodes text as if it followed a special token.
    - Special token strings in text ("<s>", "</s>", "<unk>") are recognised and become their ids.
    - Decoding maps "▁" to a space, joins byte-fallback pieces, keeps special tokens as text, and strips one
      leading space of the whole result.
    Segmentation itself is sentencepiece's (the tokenizer the model was trained with).
    """

    def __init__(self, model_bytes: bytes, specials: dict[str, int]) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(_patch_add_dummy_prefix(model_bytes, True))
        self.sp_cont = spm.SentencePieceProcessor()
        self.sp_cont.LoadFromSerializedProto(_patch_add_dummy_prefix(model_bytes, False))
        self.specials = specials
        self.special_re = (
            re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")
            if specials
            else None
        )
        n = self.sp.get_piece_size()
        table: list[bytes] = []
        for i in range(n):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                table.append(bytes([int(piece[3:5], 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        self.table = table
        self.vocab = {self.sp.id_to_piece(i): i for i in range(n)}

    def encode_batch(self, texts: list[str], continued: bool, split: bool = False) -> list[list[int]]:
        if split or self.special_re is None or not any(s in t for t in texts for s in self.specials):
            proc = self.sp_cont if continued else self.sp
            return proc.encode(texts)
        return [self._encode_with_specials(t, continued) for t in texts]

    def _encode_with_specials(self, text: str, continued: bool) -> list[int]:
        ids: list[int] = []
        first = not continued
        for k, part in enumerate(self.special_re.split(text)):
            if k % 2 == 1:
                ids.append(self.specials[part])
            elif part:
                ids.extend((self.sp if first else self.sp_cont).encode(part))
            first = False
        return ids

    def decode(self, ids: list[int]) -> str:
        text = b"".join(self.table[i] for i in ids).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    def decode_each(self, ids: list[int]) -> list[str]:
        return [self.decode([i]) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)


# ---- loading --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read tokenizer file: {e}", source=str(path), reason="bad_tokenizer") from e


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a model directory, a single tokenizer file, or a hub id (`Qwen/Qwen2.5-7B-Instruct`)
    already in the local Hugging Face cache (`formats.hub.resolve`; nothing is downloaded).

    Preference when a directory holds several layouts: tokenizer.json (what transformers' fast tokenizer uses),
    then vocab.json+merges.txt, then tokenizer.model. bos/eos/pad and chat_template come from
    tokenizer_config.json when present; pad falls back to eos.
    """
    p = Path(path)
    if not p.exists():
        from formats.hub import looks_like_repo_id, resolve

        if not looks_like_repo_id(str(path)):
            raise FileNotFoundError(f"tokenizer not found: {p}")
        p = resolve(str(path), "model")  # a hub id in the local Hugging Face cache (never downloads)
    directory = p if p.is_dir() else p.parent
    config_path = directory / "tokenizer_config.json"
    config: dict = _read_json(config_path) if config_path.is_file() else {}

    if p.is_dir():
        candidates = [directory / "tokenizer.json", directory / "vocab.json", directory / "tokenizer.model"]
        main = next((c for c in candidates if c.is_file()), None)
        if main is None:
            raise DataError(
                "no tokenizer.json, vocab.json+merges.txt or tokenizer.model in this directory",
                source=str(directory),
                reason="bad_tokenizer",
            )
    else:
        main = p
    if main.name == "merges.txt":
        main = directory / "vocab.json"

    if main.suffix == ".model":
        tok = _load_sentencepiece(main, config)
    elif main.name == "vocab.json":
        merges = directory / "merges.txt"
        if not merges.is_file():
            raise DataError("vocab.json needs merges.txt next to it", source=str(main), reason="bad_tokenizer")
        tok = _load_vocab_merges(main, merges, config)
    else:
        tok = _load_tokenizer_json(main)

    return _finish(tok, main, directory, config)


def _load_tokenizer_json(path: Path) -> Any:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust error text says what is wrong
        raise DataError(f"cannot load tokenizer.json: {e}", source=str(path), reason="bad_tokenizer") from e


def _load_vocab_merges(vocab: Path, merges: Path, config: dict) -> Any:
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    try:
        model = BPE.from_file(str(vocab), str(merges))
    except Exception as e:
        raise DataError(f"cannot load vocab.json/merges.txt: {e}", source=str(vocab), reason="bad_tokenizer") from e
    tok = HFTokenizer(model)
    if config.get("tokenizer_class", "").startswith("Qwen2"):
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # GPT-2 byte-level BPE
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    tok.decoder = decoders.ByteLevel()
    specials: list[AddedToken] = []
    for entry in (config.get("added_tokens_decoder") or {}).values():
        content = _token_content(entry)
        if content is not None:
            specials.append(AddedToken(content, special=bool(entry.get("special", True)), normalized=False))
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        content = _token_content(config.get(key))
        if content is not None and all(a.content != content for a in specials):
            specials.append(AddedToken(content, special=True, normalized=False))
    added_json = vocab.parent / "added_tokens.json"
    if added_json.is_file():
        added = _read_json(added_json)
        for content in sorted(added, key=lambda c: added[c]):
            if all(a.content != content for a in specials):
                specials.append(AddedToken(content, special=True, normalized=False))
    if specials:
        tok.add_special_tokens(specials)
    return tok


def _load_sentencepiece(path: Path, config: dict) -> _SPBackend:
    import sentencepiece as spm

    data = path.read_bytes()
    probe = spm.SentencePieceProcessor()
    try:
        probe.LoadFromSerializedProto(data)
    except Exception as e:
        raise DataError(f"cannot load sentencepiece model: {e}", source=str(path), reason="bad_tokenizer") from e
    specials: dict[str, int] = {}
    for i in range(probe.get_piece_size()):
        if probe.is_control(i) or probe.is_unknown(i):
            specials[probe.id_to_piece(i)] = i
    return _SPBackend(data, specials)


def _finish(backend_obj: Any, main: Path, directory: Path, config: dict) -> Tokenizer:
    if isinstance(backend_obj, _SPBackend):
        backend: Any = backend_obj
        sp = backend_obj.sp
        special_tokens = dict(backend_obj.specials)
        vocab_size = sp.get_piece_size()
        defaults = {
            "bos": sp.bos_id() if sp.bos_id() >= 0 else None,
            "eos": sp.eos_id() if sp.eos_id() >= 0 else None,
            "pad": sp.pad_id() if sp.pad_id() >= 0 else None,
            "unk": sp.unk_id() if sp.unk_id() >= 0 else None,
        }
        kind = "sentencepiece"
    else:
        hf = backend_obj
        special_tokens = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        vocab_size = hf.get_vocab_size(with_added_tokens=True)
        defaults = {
            "bos": next((hf.token_to_id(t) for t in _BOS_GUESSES if t in special_tokens), None),
            "eos": next((hf.token_to_id(t) for t in _EOS_GUESSES if t in special_tokens), None),
            "pad": None,
            "unk": None,
        }
        kind = "tokenizers"
        backend = _HFBackend(hf, None)

    ids: dict[str, int | None] = {}
    for role in ("bos", "eos", "pad", "unk"):
        key = f"{role}_token"
        if key in config:  # present in the config (maybe explicitly null: Qwen has no bos)
            content = _token_content(config[key])
            if content is None:
                ids[role] = None
                continue
            tid = backend.token_to_id(content)
            if tid is None:
                raise DataError(
                    f"{key} {content!r} from tokenizer_config.json is not in the vocabulary",
                    source=str(directory / "tokenizer_config.json"),
                    reason="bad_tokenizer",
                )
            ids[role] = tid
            special_tokens.setdefault(content, tid)
        else:
            ids[role] = defaults[role]
    if ids["pad"] is None:
        ids["pad"] = ids["eos"]

    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        chat_template = named.get("default") or next(iter(named.values()), None)
    jinja_file = directory / "chat_template.jinja"
    if chat_template is None and jinja_file.is_file():
        chat_template = jinja_file.read_text(encoding="utf-8")

    special_ids = {role: v for role, v in ids.items() if v is not None}
    special_ids.update(special_tokens)
    tok = Tokenizer(
        name=directory.name if main.parent == directory else main.stem,
        source=main if main.name != "vocab.json" else directory,
        fingerprint=tokenizer_fingerprint(main),
        vocab_size=vocab_size,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        pad_id=ids["pad"],
        unk_id=ids["unk"],
        chat_template=chat_template if isinstance(chat_template, str) else None,
        special_ids=special_ids,
        special_tokens=special_tokens,
        kind=kind,
        config=config,
        _backend=backend,
    )
    tok.continuation_sensitive = _probe_continuation(tok)
    if tok.continuation_sensitive and isinstance(backend, _HFBackend):
        backend.special_for_prefix = next(iter(special_tokens))
    return tok


def _probe_continuation(tok: Tokenizer) -> bool:
    """Does text encode differently right after a special token than on its own (a leading-space prefix)?"""
    if tok.kind == "sentencepiece":
        return True
    if not tok.special_tokens:
        return False
    special = next(iter(tok.special_tokens))
    for probe in ("Hello", " Hello", "1+1"):
        alone = tok.encode(probe)
        inside = tok._backend.tok.encode(special + probe, add_special_tokens=False).ids[1:]
        if alone != inside:
            return True
    return False
