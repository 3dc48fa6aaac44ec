"""Conversation records -> token ids + pre-shifted labels, with an explicit policy for overlong records.

How it stays exact: a template renders pieces (special-token ids and text tagged trainable or not, see
`dataprep.templates`). Each run of text between two ids is encoded as ONE string, so the ids equal what the
tokenizer produces for the whole rendered conversation. When a run mixes untrained and trained text (an assistant
header followed by its content), the boundary token index is found by encoding the text before the boundary and
taking the longest common prefix of the two id lists. If a token straddles the boundary (a BPE merge across it,
e.g. "\\n" + content that starts with "\\n"), it is counted as trainable: it carries content characters.

How it stays fast: records are processed in chunks; all runs of a chunk go to the tokenizer in one batch call
(Rust / C++ parallel), short constant runs ("assistant\\n", "\\n\\n", role names) come from a cache, and
`num_proc` > 1 spreads chunks over worker processes (each with its own tokenizer, reloaded from its files, and
single-threaded). Memory is about two chunks per worker. On 2 cores num_proc does not pay (the Rust batch encode
already uses both cores and Python is ~10% of the time; workers add spawn, tokenizer loading and pickling; see
benchmarks/bench_tokenize.py --num-proc-2); it is for machines with many cores.

Before rendering, each record becomes its samples (`_Processor._prepare`): the multi-turn policy sets the
assistant turns' `train` flags (or expands one sample per turn), reasoning goes inline for templates with no
place for it, and records whose text holds special-token strings are counted. Under the default
content_specials="text" every text run is encoded with the tokenizer's special-token matching off (templates
emit their own special tokens as ids), so such strings stay text.

Labels are pre-shifted (CONTRACTS.md): labels[i] = input_ids[i+1] when token i+1 is a target, else -100, and
labels[-1] = -100, so concatenated samples never predict across a document boundary.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import re
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from dataprep.chat_types import CONTENT_SPECIALS, ChatTemplate, ContentSpecials
from dataprep.errors import DataError
from dataprep.limits import cap_message_chars, overlong_char_limit
from dataprep.templates import get_template, inline_reasoning
from dataprep.tokenizer import Tokenizer
from formats.schema import IGNORE_INDEX

log = logging.getLogger(__name__)

IGNORE = IGNORE_INDEX  # the packed format's ignore label (formats.schema)
Overlong = Literal["drop", "truncate", "split"]
OVERLONG_POLICIES: tuple[str, ...] = Overlong.__args__  # type: ignore[attr-defined]
# Which assistant turns of a multi-turn conversation are trained, and in which rendering (see TokenizeOptions).
MultiTurn = Literal["whole", "last", "expand"]
MULTI_TURN: tuple[str, ...] = MultiTurn.__args__  # type: ignore[attr-defined]
_CACHE_MAX_CHARS = 32
# A chunk also ends once its messages hold this many characters, so a chunk of long records stays bounded in
# memory (two chunks are in flight: one encoding, one being assembled).
_CHUNK_MAX_CHARS = 1 << 24
_CACHE_MAX_ENTRIES = 50_000
_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class TokenizeOptions:
    """`overlong`: what to do with a record longer than max_length -- drop it; truncate (drop whole user+assistant
    pairs oldest-first, never the system prompt; a single turn still too long is cut at the end); or split (several
    samples, each system prompt + consecutive whole turns, ids "{id}#{k}").

    `multi_turn`: "whole" (default) renders the conversation once and trains every assistant turn as that render
    shows it -- the ids are exactly `apply_chat_template(messages, tools=...)` and no prompt is paid for twice;
    "last" trains only the last assistant turn of that render; "expand" makes one sample per assistant turn, the
    conversation up to it rendered as at inference (for templates that render history differently from the last
    turn, e.g. dropping earlier reasoning), ids "{id}#turn{i}". A message's own `"train": false` always wins;
    `"train": true` trains an earlier turn under "last" too. `mask_history` is the old name of "last".

    `content_specials`: what a special-token string inside message text becomes ("text", the default: ordinary
    text, never a control token; "special": the token, as transformers' apply_chat_template does).
    `train_on_prompt`: every token is a target."""

    template: str = "auto"
    max_length: int | None = None
    overlong: Overlong = "drop"
    mask_history: bool = False
    train_on_prompt: bool = False
    num_proc: int = 1
    chunk_size: int = 4096
    multi_turn: MultiTurn = "whole"
    content_specials: ContentSpecials = "text"

    def __post_init__(self) -> None:
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, not {self.overlong!r}")
        if self.multi_turn not in MULTI_TURN:
            raise ValueError(f"multi_turn must be one of {MULTI_TURN}, not {self.multi_turn!r}")
        if self.content_specials not in CONTENT_SPECIALS:
            raise ValueError(f"content_specials must be one of {CONTENT_SPECIALS}, not {self.content_specials!r}")
        if self.mask_history:
            if self.multi_turn == "expand":
                raise ValueError("mask_history (multi_turn='last') and multi_turn='expand' exclude each other")
            self.multi_turn = "last"
        if self.max_length is not None and self.max_length < 2:
            raise ValueError("max_length must be at least 2")
        if self.num_proc < 1 or self.chunk_size < 1:
            raise ValueError("num_proc and chunk_size must be >= 1")


@dataclass
class TokenizeStats:
    """Counts so nothing is lost silently: `dropped[reason]` records not emitted, `truncated[reason]` records
    emitted shortened ("dropped_turns": whole oldest turns removed; "cut_tail": cut at max_length),
    `split_records` records emitted as several samples, `expanded_records` records made into one sample per
    assistant turn (multi_turn="expand"), `special_token_text` records whose message text contains a
    special-token string, `reasoning_inlined` assistant turns whose reasoning went inline as <think>...</think>
    because the template has no place for reasoning_content."""

    records: int = 0
    samples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    split_records: int = 0
    expanded_records: int = 0
    special_token_text: int = 0
    reasoning_inlined: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)

    def merge(self, other: TokenizeStats) -> None:
        self.records += other.records
        self.samples += other.samples
        self.tokens += other.tokens
        self.trainable_tokens += other.trainable_tokens
        self.split_records += other.split_records
        self.expanded_records += other.expanded_records
        self.special_token_text += other.special_token_text
        self.reasoning_inlined += other.reasoning_inlined
        self.dropped.update(other.dropped)
        self.truncated.update(other.truncated)

    def as_dict(self) -> dict:
        return {
            "records": self.records,
            "samples": self.samples,
            "tokens": self.tokens,
            "trainable_tokens": self.trainable_tokens,
            "split_records": self.split_records,
            "expanded_records": self.expanded_records,
            "special_token_text": self.special_token_text,
            "reasoning_inlined": self.reasoning_inlined,
            "dropped": dict(self.dropped),
            "truncated": dict(self.truncated),
        }


@dataclass
class TokenizedSample:
    id: str
    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n], pre-shifted


# ---- the encoder ------------------------------------------------------------------------------------------------


class _Encoder:
    """Template + tokenizer + options for one process; turns message lists into (ids, trained token ranges).

    Three phases, so the tokenizer's batch call (which releases the GIL) can run in a thread while Python plans
    the next chunk and assembles the last one: `plan` renders and lays out the texts to encode (no tokenizer
    call: short texts come from the cache or join the batch), `encode` runs the batch, `assemble` builds ids and
    trained ranges. Every tokenizer call holds `lock`, so two threads never use the tokenizer at once."""

    def __init__(self, tok: Tokenizer, template: ChatTemplate, options: TokenizeOptions) -> None:
        self.tok = tok
        self.template = template
        self.options = options
        self.cache: dict[tuple[str, bool], list[int]] = {}
        self.split = options.content_specials == "text"
        self.lock = threading.Lock()

    def encode_many(
        self, conversations: list[tuple[list[dict], list | None]], names: list[str] | None = None
    ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Token ids and trained [start, end) ranges per (messages, tools) (one batched tokenizer call per mode)."""
        batch = self.plan(conversations, names)
        return self.assemble(batch, self.encode(batch))

    def plan(self, conversations: list[tuple[list[dict], list | None]], names: list[str] | None = None) -> _Batch:
        batch = _Batch()
        for k, (messages, tools) in enumerate(conversations):
            try:
                pieces = self.template.render(messages, tools) if tools else self.template.render(messages)
            except DataError as e:
                if names is None:
                    raise
                raise DataError(f"record {names[k]!r}: {e.message}", record=e.record, reason=e.reason) from e
            plan: list = []
            run: list[tuple[str, bool]] = []
            cont = False
            for value, train in pieces + [(None, False)]:
                if isinstance(value, str):
                    if value:
                        if run and run[-1][1] == train:
                            run[-1] = (run[-1][0] + value, train)
                        else:
                            run.append((value, train))
                    continue
                if run:  # close the run of text before this id / FRESH / end
                    plan.append(self._plan_run(run, cont, batch))
                    run = []
                if value is None:
                    cont = False
                else:
                    plan.append((value, train))
                    cont = True
            batch.plans.append(plan)
        return batch

    def encode(self, batch: _Batch) -> tuple[list[list[int]], list[list[int]]]:
        """The batch's texts as ids, [continued=False] and [continued=True] (safe to call from another thread)."""
        return self._encode(batch.texts[0], False), self._encode(batch.texts[1], True)

    def _encode(self, texts: list[str], cont: bool) -> list[list[int]]:
        if not texts:
            return []
        with self.lock:
            return self.tok.encode_batch(texts, continued=cont, split_special_tokens=self.split)

    def assemble(
        self, batch: _Batch, encoded: tuple[list[list[int]], list[list[int]]]
    ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        if len(self.cache) + len(batch.new_short) > _CACHE_MAX_ENTRIES:  # many distinct short texts: stay flat
            self.cache.clear()
        for key, (mode, index) in batch.new_short.items():
            self.cache[key] = encoded[mode][index]
        train_all = self.options.train_on_prompt
        out: list[tuple[list[int], list[tuple[int, int]]]] = []
        for plan in batch.plans:
            ids: list[int] = []
            spans: list[tuple[int, int]] = []  # trained token ranges [start, end)
            for item in plan:
                kind = item[0] if isinstance(item[0], str) else None
                if kind is None:  # special token id
                    if item[1]:
                        _add_span(spans, len(ids), len(ids) + 1)
                    ids.append(item[0])
                elif kind == "r":  # a uniform run: ("r", mode, index|ids, train)
                    run_ids = item[2] if isinstance(item[2], list) else encoded[item[1]][item[2]]
                    if item[3]:
                        _add_span(spans, len(ids), len(ids) + len(run_ids))
                    ids.extend(run_ids)
                else:  # a mixed run: ("m", mode, index, [(prefix ids|index, flag_before)...], last_flag)
                    full = encoded[item[1]][item[2]]
                    base = len(ids)
                    start = 0
                    for prefix, flag in item[3]:
                        pids = prefix if isinstance(prefix, list) else encoded[item[1]][prefix]
                        cut = max(_common_prefix(pids, full), start)
                        if flag:
                            _add_span(spans, base + start, base + cut)
                        start = cut
                    if item[4]:
                        _add_span(spans, base + start, base + len(full))
                    ids.extend(full)
            if train_all:
                spans = [(0, len(ids))]
            out.append((ids, spans))
        return out

    def _text(self, text: str, cont: bool, batch: _Batch) -> list[int] | int:
        """Ids of a short text from the cache, else the index of `text` in the batch (queued once per batch)."""
        mode = 1 if cont else 0
        if len(text) <= _CACHE_MAX_CHARS:
            key = (text, cont)
            ids = self.cache.get(key)
            if ids is not None:
                return ids
            queued = batch.new_short.get(key)
            if queued is not None:
                return queued[1]
            batch.texts[mode].append(text)
            batch.new_short[key] = (mode, len(batch.texts[mode]) - 1)
            return len(batch.texts[mode]) - 1
        batch.texts[mode].append(text)
        return len(batch.texts[mode]) - 1

    def _plan_run(self, run: list[tuple[str, bool]], cont: bool, batch: _Batch) -> tuple:
        mode = 1 if cont else 0
        if len(run) == 1:
            text, train = run[0]
            return ("r", mode, self._text(text, cont, batch), train)
        batch.texts[mode].append("".join(t for t, _ in run))
        full_index = len(batch.texts[mode]) - 1
        boundaries = []
        prefix = ""
        for text, train in run[:-1]:
            prefix += text
            boundaries.append((self._text(prefix, cont, batch), train))
        return ("m", mode, full_index, boundaries, run[-1][1])


@dataclass
class _Batch:
    """What one `_Encoder.plan` laid out: per conversation its plan, the texts to encode per mode, and the short
    texts that joined the batch because the cache had not seen them ({(text, continued): (mode, index)})."""

    plans: list[list] = field(default_factory=list)
    texts: tuple[list[str], list[str]] = field(default_factory=lambda: ([], []))
    new_short: dict[tuple[str, bool], tuple[int, int]] = field(default_factory=dict)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _add_span(spans: list[tuple[int, int]], start: int, end: int) -> None:
    if end <= start:
        return
    if spans and spans[-1][1] == start:
        spans[-1] = (spans[-1][0], end)
    else:
        spans.append((start, end))


def _clip(spans: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    return [(s, min(e, n)) for s, e in spans if s < n]


# ---- records ------------------------------------------------------------------------------------------------------


def _messages_of(record: dict, index: int) -> tuple[str, list[dict], list | None]:
    if not isinstance(record, dict):
        raise DataError("record is not an object", record=index, reason="bad_record")
    rid = record.get("id")
    rid = str(rid) if rid is not None else str(index)
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise DataError(f"record {rid!r} has no 'messages' list", record=index, reason="bad_record")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"record {rid!r}: each message needs role system|user|assistant|tool and string content",
                record=index, reason="bad_record",
            )
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"record {rid!r}: 'tools' must be a list", record=index, reason="bad_record")
    return rid, messages, tools or None


def _pairs(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(system messages, turns): a turn is a user message and everything that answers it (assistant turns,
    tool calls and their results) up to the next user message."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    turns: list[list[dict]] = []
    for m in rest:
        if m["role"] == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return system, turns


def _with_train(m: dict, train: bool) -> dict:
    return m if m.get("train", True) is train else {**m, "train": train}


def _last_only(messages: list[dict]) -> list[dict]:
    """multi_turn="last": earlier assistant turns become context unless they say `"train": true`."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [m if i == last or m["role"] != "assistant" or m.get("train") is True else _with_train(m, False)
            for i, m in enumerate(messages)]


def _texts_of(messages: list[dict], tools: list | None) -> Iterator[str]:
    for m in messages:
        yield m["content"]
        if "reasoning_content" in m:
            yield m["reasoning_content"]
        for call in m.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                yield fn["arguments"]
    if tools:
        yield repr(tools)


@dataclass
class _Pending:
    """A chunk between `_Processor.prepare` and `_Processor.finish`: its counts so far, its samples to be (id,
    messages, tools) and the encoder's plan for them."""

    stats: TokenizeStats
    todo: list[tuple[str, list[dict], list | None]]
    batch: _Batch


class _Processor:
    """One chunk of records -> samples + stats; lives in the main process or in each worker."""

    def __init__(self, tok: Tokenizer, options: TokenizeOptions) -> None:
        self.options = options
        self.template = get_template(options.template, tok, options.content_specials)
        self.encoder = _Encoder(tok, self.template, options)
        # A message this long cannot fit; cut it before tokenizing so memory follows seq_length (dataprep.limits).
        self.char_limit = None if options.max_length is None else overlong_char_limit(tok, options.max_length)
        specials = sorted(tok.special_tokens, key=len, reverse=True)
        self.special_re = re.compile("|".join(re.escape(t) for t in specials)) if specials else None

    def _prepare(self, rid: str, messages: list[dict], tools: list | None,
                 stats: TokenizeStats) -> list[tuple[str, list[dict], list | None]]:
        """The samples one record becomes before tokenizing: (id, messages, tools) each."""
        opts = self.options
        if self.special_re is not None and self.special_re.search("\x00".join(_texts_of(messages, tools))):
            stats.special_token_text += 1
        if not self.template.renders_reasoning and any("reasoning_content" in m for m in messages):
            stats.reasoning_inlined += sum("reasoning_content" in m for m in messages)
            messages = [inline_reasoning(m) if "reasoning_content" in m else m for m in messages]
        if opts.multi_turn == "whole" or opts.train_on_prompt:
            return [(rid, messages, tools)]
        if opts.multi_turn == "last":
            return [(rid, _last_only(messages), tools)]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True) is not False]
        if len(turns) <= 1:
            return [(rid, messages, tools)]
        stats.expanded_records += 1
        out = []
        for i in turns:
            prefix = [_with_train(m, False) if m["role"] == "assistant" and k < i else m
                      for k, m in enumerate(messages[: i + 1])]
            out.append((f"{rid}#turn{i}", prefix, tools))
        return out

    def process(self, chunk: list[tuple[int, dict]]) -> tuple[list[TokenizedSample], TokenizeStats]:
        pending = self.prepare(chunk)
        return self.finish(pending, self.encoder.encode(pending.batch))

    def prepare(self, chunk: list[tuple[int, dict]]) -> _Pending:
        """Everything before the tokenizer's batch call: read, cap, expand and render the chunk's records."""
        stats = TokenizeStats()
        stats.records = len(chunk)
        todo: list[tuple[str, list[dict], list | None]] = []
        for index, record in chunk:
            rid, messages, tools = _messages_of(record, index)
            messages = cap_message_chars(messages, self.char_limit)
            if not messages:
                stats.dropped["empty"] += 1
            elif not any(m["role"] == "assistant" for m in messages) and not self.options.train_on_prompt:
                stats.dropped["no_assistant"] += 1
            else:
                todo += self._prepare(rid, messages, tools, stats)
        batch = self.encoder.plan([(m, t) for _, m, t in todo], names=[r for r, _, _ in todo])
        return _Pending(stats, todo, batch)

    def finish(
        self, pending: _Pending, encoded: tuple[list[list[int]], list[list[int]]]
    ) -> tuple[list[TokenizedSample], TokenizeStats]:
        """Everything after it: ids and labels per sample, the overlong policy, the counts."""
        stats, todo = pending.stats, pending.todo
        max_len = self.options.max_length
        assembled = self.encoder.assemble(pending.batch, encoded)
        # The chunk's samples side by side in one id array and one label array (each sample a view), so numpy is
        # called once per chunk rather than three times per sample.
        flat: list[int] = []
        kept: list[tuple[str, int, int]] = []  # (id, start, end) in flat
        targets: list[tuple[int, int]] = []  # absolute [start, end) of trained tokens, start >= the sample's + 1
        for (rid, messages, tools), (ids, spans) in zip(todo, assembled, strict=True):
            if max_len is not None and len(ids) > max_len:
                pieces = self._overlong(rid, messages, tools, stats)
            else:
                pieces = [(rid, ids, spans)]
            for pid, pids, pspans in pieces:
                base = len(flat)
                trained = [(base + max(a, 1), base + b) for a, b in pspans if b > max(a, 1)]
                if not trained:  # token 0 is never a target: nothing precedes it
                    if len(pieces) > 1:
                        reason = "split_piece_no_target"
                    elif len(pids) < len(ids):
                        reason = "no_target_after_truncation"
                    else:
                        reason = "no_target"
                    stats.dropped[reason] += 1
                    continue
                flat.extend(pids)
                kept.append((pid, base, len(flat)))
                targets += trained
                stats.trainable_tokens += sum(b - a for a, b in trained)
        input_ids = np.array(flat, dtype=np.int32)
        labels = np.full(len(flat), IGNORE, dtype=np.int32)
        for a, b in targets:  # pre-shifted: the label at i is the token at i + 1
            labels[a - 1 : b - 1] = input_ids[a:b]
        stats.samples += len(kept)
        stats.tokens += len(flat)
        return [TokenizedSample(pid, input_ids[a:b], labels[a:b]) for pid, a, b in kept], stats

    def _overlong(self, rid: str, messages: list[dict], tools: list | None, stats: TokenizeStats) -> list:
        opts = self.options
        max_len = opts.max_length
        assert max_len is not None
        if opts.overlong == "drop":
            stats.dropped["too_long"] += 1
            return []
        system, turns = _pairs(messages)
        if opts.overlong == "truncate":
            # drop whole turns oldest-first; candidates are tried in one batch
            candidates = [(system + [m for t in turns[k:] for m in t], tools) for k in range(1, len(turns))]
            for ids, spans in self.encoder.encode_many(candidates):
                if len(ids) <= max_len:
                    stats.truncated["dropped_turns"] += 1
                    return [(rid, ids, spans)]
            ids, spans = self.encoder.encode_many([(system + turns[-1], tools)])[0]
            stats.truncated["cut_tail"] += 1
            if len(turns) > 1:
                stats.truncated["dropped_turns"] += 1
            return [(rid, ids[:max_len], _clip(spans, max_len))]
        # split: greedy groups of consecutive whole turns, each with the system prompt (under multi_turn="last"
        # the earlier turns already carry "train": false, so only the record's last turn is a target)
        out = []
        start = 0
        while start < len(turns):
            best = None
            end = start + 1
            while end <= len(turns):
                piece = system + [m for t in turns[start:end] for m in t]
                ids, spans = self.encoder.encode_many([(piece, tools)])[0]
                if len(ids) > max_len:
                    break
                best = (end, ids, spans)
                end += 1
            if best is None:  # one turn alone is too long: cut it at the end
                ids, spans = ids[:max_len], _clip(spans, max_len)
                stats.truncated["cut_tail"] += 1
                best = (start + 1, ids, spans)
            end, ids, spans = best
            out.append((f"{rid}#{len(out)}", ids, spans))
            start = end
        stats.split_records += 1
        return out


# ---- public entry point -------------------------------------------------------------------------------------------

_worker: _Processor | None = None


def _worker_init(tokenizer_source: str, options: TokenizeOptions) -> None:
    global _worker
    import os

    # parallelism comes from the processes; Rust threads in every worker would only oversubscribe the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from dataprep.tokenizer import load_tokenizer

    _worker = _Processor(load_tokenizer(tokenizer_source), options)


def _worker_process(chunk: list[tuple[int, dict]]) -> tuple[list[TokenizedSample], TokenizeStats]:
    assert _worker is not None
    return _worker.process(chunk)


@contextmanager
def _gc_deferred() -> Iterator[None]:
    """No automatic garbage collection while one chunk is prepared or finished.

    A chunk allocates some hundred thousand small containers (message dicts, pieces, plans, id lists) that
    reference counting frees; the cyclic collector would otherwise run hundreds of times per chunk, promote the
    live chunk to the old generation and scan it again and again (a large share of the run on 200k records;
    see benchmarks/bench_e2e.py). Collection resumes, with its counts, as soon as the chunk is done, so any
    cycle made meanwhile is still found: this changes when the collector runs, not what it collects."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _chunks(records: Iterable[dict], size: int) -> Iterator[list[tuple[int, dict]]]:
    """(index, record) lists of at most `size` records and about _CHUNK_MAX_CHARS characters of content."""
    chunk: list[tuple[int, dict]] = []
    chars = 0
    for item in enumerate(records):
        chunk.append(item)
        messages = item[1].get("messages") if isinstance(item[1], dict) else None
        if isinstance(messages, list):
            chars += sum(len(c) for m in messages if isinstance(m, dict) and isinstance(c := m.get("content"), str))
        if len(chunk) >= size or chars >= _CHUNK_MAX_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def tokenize_conversations(
    records: Iterable[dict],
    tokenizer: Tokenizer,
    options: TokenizeOptions | None = None,
    stats: TokenizeStats | None = None,
) -> Iterator[TokenizedSample]:
    """Stream conversation records into TokenizedSamples (in input order), counting everything into `stats`.

    Records are read lazily in chunks of `options.chunk_size`; with `num_proc` > 1 chunks go to worker processes
    (spawned, each loading the tokenizer from its files), at most 2 chunks per worker in flight.
    """
    options = options or TokenizeOptions()
    stats = stats if stats is not None else TokenizeStats()
    if options.num_proc <= 1:
        proc = _Processor(tokenizer, options)
        log.info("tokenizing with template %s (%s)", proc.template.name, proc.template.description)
        # One chunk's batch encode runs in a thread (the tokenizer releases the GIL) while this thread reads and
        # renders the next chunk and assembles, yields and spills the one before: Python's share of the work
        # then overlaps the tokenizer's instead of adding to it.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
            inflight: tuple[_Pending, Future] | None = None
            chunks = _chunks(records, options.chunk_size)
            while True:
                with _gc_deferred():
                    chunk = next(chunks, None)  # reading and converting the records allocates as much again
                    pending = proc.prepare(chunk) if chunk is not None else None
                job = (pending, pool.submit(proc.encoder.encode, pending.batch)) if pending is not None else None
                if inflight is not None:
                    with _gc_deferred():
                        samples, chunk_stats = proc.finish(inflight[0], inflight[1].result())
                    stats.merge(chunk_stats)
                    yield from samples
                if job is None:
                    break
                inflight = job
        return
    # validate template/options here so a bad name fails before workers start
    get_template(options.template, tokenizer, options.content_specials)
    ctx = mp.get_context("spawn")
    pending: deque = deque()
    with ctx.Pool(options.num_proc, initializer=_worker_init, initargs=(str(tokenizer.source), options)) as pool:
        for chunk in _chunks(records, options.chunk_size):
            pending.append(pool.apply_async(_worker_process, (chunk,)))
            while len(pending) >= 2 * options.num_proc:
                samples, chunk_stats = pending.popleft().get()
                stats.merge(chunk_stats)
                yield from samples
        while pending:
            samples, chunk_stats = pending.popleft().get()
            stats.merge(chunk_stats)
            yield from samples
