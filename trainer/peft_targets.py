"""Which modules `peft.target_modules` names, in the conventions users bring from PEFT and MindFormers.

- a YAML list of names, `[q_proj, v_proj]`: PEFT's suffix match (`name == t` or `name` ends with `.t`);
- `all-linear`: every Linear layer except the output head, as PEFT means it;
- a string of plain names joined by `|`, `q_proj|v_proj`: the same suffix match (in PEFT this string would be a
  regex matching no full module name, which is never what was meant);
- any other string: a regex matched against the whole module name (PEFT's rule for strings), e.g.
  `.*q_proj|.*v_proj` or `model\\.layers\\.[0-3]\\..*`.

MindFormers / Meta and Megatron-style names are accepted in every form and read as the Hugging Face names our
models use: `wq wk wv wo` -> q/k/v/o_proj, `w1 w2 w3` -> gate/down/up_proj, `tok_embeddings` and
`word_embeddings` -> embed_tokens, and the fused Megatron projections MindFormers' Qwen3 guide targets:
`linear_qkv` -> q_proj, k_proj and v_proj; `linear_proj` -> o_proj; `linear_fc1` -> gate_proj and up_proj;
`linear_fc2` -> down_proj; `output_layer` -> lm_head.
"""

from __future__ import annotations

import re
from collections.abc import Callable

ALL_LINEAR = "all-linear"
OUTPUT_HEAD = "lm_head"

# Foreign module name -> the HF names it stands for (several for a fused projection).
TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "wq": ("q_proj",), "wk": ("k_proj",), "wv": ("v_proj",), "wo": ("o_proj",),
    "w1": ("gate_proj",), "w2": ("down_proj",), "w3": ("up_proj",),
    "attention": ("self_attn",), "self_attention": ("self_attn",), "feed_forward": ("mlp",),
    "tok_embeddings": ("embed_tokens",), "word_embeddings": ("embed_tokens",),
    "linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",), "output_layer": (OUTPUT_HEAD,),
}
_ALIAS_RE = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(sorted(TARGET_ALIASES, key=len, reverse=True))
                       + r")(?![A-Za-z0-9_])")
_PLAIN_NAMES = re.compile(r"^[A-Za-z0-9_.]+(\|[A-Za-z0-9_.]+)*$")


def translate_targets(pattern: str) -> str:
    """Rewrite foreign module names in a target regex to HF names (`.*wq|.*linear_fc1` ->
    `.*q_proj|.*(?:gate_proj|up_proj)`)."""

    def sub(m: re.Match) -> str:
        names = TARGET_ALIASES[m.group(1)]
        return names[0] if len(names) == 1 else "(?:" + "|".join(names) + ")"

    return _ALIAS_RE.sub(sub, pattern)


def _expand(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        head, _, last = name.rpartition(".")
        for hf in TARGET_ALIASES.get(last, (last,)):
            out.append(f"{head}.{hf}" if head else hf)
    return out


def target_matcher(spec: str | list[str]) -> tuple[Callable[[str, bool], bool], str]:
    """A predicate `(module name, is_linear) -> targeted?` for `spec`, and how `spec` was read (for messages)."""
    if isinstance(spec, str) and spec.strip() == ALL_LINEAR:
        return (lambda name, is_linear: is_linear and name.rpartition(".")[2] != OUTPUT_HEAD), ALL_LINEAR
    if isinstance(spec, str) and not _PLAIN_NAMES.match(spec.strip()):
        regex = re.compile(translate_targets(spec))
        return (lambda name, is_linear: regex.fullmatch(name) is not None), f"regex {regex.pattern}"
    names = _expand(spec.strip().split("|") if isinstance(spec, str) else [str(s).strip() for s in spec])

    def suffix(name: str, is_linear: bool) -> bool:
        return any(name == n or name.endswith("." + n) for n in names)

    return suffix, f"names {', '.join(names)} (suffix match)"


def check_target_spec(spec: str | list[str]) -> None:
    """Raise ValueError for a spec that cannot be read (an invalid regex, an empty list)."""
    if isinstance(spec, list) and not spec:
        raise ValueError("an empty list targets nothing")
    if isinstance(spec, str) and not spec.strip():
        raise ValueError("an empty string targets nothing")
    if isinstance(spec, str) and spec.strip() != ALL_LINEAR and not _PLAIN_NAMES.match(spec.strip()):
        try:
            re.compile(translate_targets(spec))
        except re.error as exc:
            raise ValueError(f"not a valid regex ({exc})") from None


def pattern_value(patterns: dict[str, float] | dict[str, int], name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern rule: the value of the first key (a regex) that matches the end of
    `name` at a dot boundary, else `default`. One rule for training, merge and generation, so the ranks we train
    are the ranks PEFT loads. Config keys go through `translated_patterns` first; keys read from an adapter file
    are used as written."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def translated_patterns(patterns: dict[str, float] | dict[str, int]) -> dict:
    """The pattern keys as PEFT must read them in an export (MindFormers / Megatron names -> HF names)."""
    return {translate_targets(k): v for k, v in patterns.items()}
