"""Bounds that keep memory proportional to what a packed dataset keeps, not to what an input holds.

A record can be far longer than any row it could become (a 200 MB JSON line packed at seq_length 256).
Tokenizing it whole costs hundreds of bytes per character in the tokenizer's buffers, only for the result
to be dropped or cut to seq_length tokens. No token covers more characters than the longest token in the
vocabulary decodes to (plus the partial characters at its two ends), so a message longer than
`overlong_char_limit` characters is certain to exceed seq_length tokens on its own. Cutting it to that many
characters before tokenizing keeps every decision the same (the record is still overlong, so it is dropped,
truncated or split exactly as before) and the first seq_length tokens of a cut tail the same, since the cut
lies several times seq_length tokens further on (only a single "word" of that length could tokenize
differently near the cut).
"""

from __future__ import annotations

from typing import Any

# Margin over the strict bound: Unicode normalisation may compose several input characters into one.
_SAFETY = 4


def max_token_chars(tok: Any) -> int:
    """Characters the longest token of `tok`'s vocabulary decodes to, plus 2 for partial characters."""
    return max(map(len, tok.decode_each(range(tok.vocab_size)))) + 2


def overlong_char_limit(tok: Any, max_length: int) -> int:
    """Characters beyond which one message is sure to hold more than `max_length` tokens."""
    return _SAFETY * (max_length + 1) * max_token_chars(tok)


def cap_message_chars(messages: list[dict], limit: int | None) -> list[dict]:
    """`messages` with every text longer than `limit` characters cut to `limit` (the same list if none is)."""
    if limit is None or all(len(m.get("content") or "") <= limit and len(m.get("reasoning_content") or "") <= limit
                            for m in messages):
        return messages
    out = []
    for m in messages:
        m = dict(m)
        for key in ("content", "reasoning_content"):
            if isinstance(m.get(key), str) and len(m[key]) > limit:
                m[key] = m[key][:limit]
        out.append(m)
    return out
