"""Continuous batching: a decoder whose rows join and leave between steps, each over its own compressed context.

`BatchDecoder` holds the rows being answered in one batch cache (`KVCache.concat_rows`): rows of different contexts,
lengths, methods and layouts side by side, each continuing at its own positions. A row is a fork of its context
(`KVCache.fork`): it reads the context's tokens where they are and holds only its question and answer, so the rows
over one context cost one copy of it, each step reads it once for all of them (`prefix_attention`), and rows join
and leave by copying their own tokens only. A server drives it:

    decoder = BatchDecoder(model, tokenizer)
    row = decoder.add(context_cache, question_text, Sampling(max_new_tokens=64))   # between two steps
    while decoder:
        for delta in decoder.step(): ...                                             # text of each row
    decoder.remove(row)                                                              # a client that left

`step()` advances every row by one token:
1. rows removed since the last step leave the batch (before the forward, so they cost nothing more);
2. one forward of every running row's last token over the batch cache picks each row's next token;
3. the rows added since the last step run their questions in one forward of their own (left-padded, over their
   forks joined), which picks their first tokens: a question of several tokens never shares a forward with the
   running rows' one-token steps;
4. rows that finished leave the batch and the new rows join it.

A row's answer does not depend on the rows beside it: attention reads each row's own slots (`attention.py`), sampled
rows draw from their own seeded generators, and a greedy row gives the tokens `generation.answer` gives for it alone
(logits equal up to float rounding: a padded row's masked slots add exact zeros to its softmax).

The hooks are attached for each forward (`compress(model, decode)`) and removed after it, so the model stays free for
other work between steps (a context's prefill). `decode`, a method that acts while decoding (H2O, DMS, a
`DecodingCompression`), applies to every row of the batch: one per decoder. A `DecodingCompression` whose scorer uses
queries remembers the batch's recent tokens; it starts them afresh when rows join or leave.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvsqueeze.cache import KVCache
from kvsqueeze.generation import Delta, Sampling, TextStream, choose_tokens, encode, eos_ids, generator_for, left_pad
from kvsqueeze.methods.base import Method
from kvsqueeze.press import compress
from kvsqueeze.validation import check_int

__all__ = ["BatchDecoder"]


@dataclass(eq=False)
class Row:
    """One answer being generated: its sampling, its text so far and the token to feed next."""

    id: int
    sampling: Sampling
    generator: torch.Generator | None
    text: TextStream
    question: list[int]  # the question's token ids (prefilled when the row starts)
    cache: KVCache | None  # its own one-row cache until it joins the batch
    token: int = -1  # the last token chosen, fed at the next step
    removed: bool = False


class BatchDecoder:
    """Rows over any compressed contexts, decoded as one batch; rows join (`add`) and leave (`remove`, or when they
    finish) between steps (see the module docstring). `decode`: a method applied while decoding, to every row."""

    def __init__(self, model: Any, tokenizer: Any, decode: Method | None = None) -> None:
        self.model, self.tokenizer, self.decode = model, tokenizer, decode
        self.eos = eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.cache: KVCache | None = None  # the running rows, row i = self._running[i]
        self._running: list[Row] = []
        self._waiting: list[Row] = []  # added since the last step: their question is not prefilled yet
        self._next_id = 0

    def __len__(self) -> int:
        """Rows not finished nor removed: running or waiting to start."""
        return len(self.rows)

    @property
    def rows(self) -> list[int]:
        """Ids of the rows not finished nor removed, running ones first."""
        return [row.id for row in self._running if not row.removed] + [row.id for row in self._waiting]

    def problem(self, cache: KVCache) -> str | None:
        """Why rows of `cache` cannot join this batch (`KVCache.concat_problem`), None when they can."""
        others = [self.cache] if self.cache is not None else []
        others += [row.cache for row in self._waiting if row.cache is not None]
        return None if not others else others[0].concat_problem(cache)

    def add(self, cache: KVCache, question_text: str, sampling: Sampling | int = 32, row: int = 0) -> int:
        """Answer `question_text` over row `row` of `cache` (forked: the cache is left as it is); returns the new row's
        id, which its deltas carry. The row starts at the next `step`. `sampling`: a Sampling, or an int (greedy with
        that max_new_tokens). A ValueError when the question is empty or the cache's rows cannot join the batch."""
        if isinstance(sampling, int) and not isinstance(sampling, bool):
            sampling = Sampling(max_new_tokens=sampling)
        if not isinstance(sampling, Sampling):
            raise ValueError(f"sampling must be a Sampling or max_new_tokens, got {sampling!r}")
        check_int("row", row, 0, cache.batch_size - 1, note="a row of the cache")
        question = encode(self.tokenizer, question_text)
        if not question:
            raise ValueError(f"the question {question_text!r} has no tokens: give the text the answer follows")
        problem = self.problem(cache)
        if problem is not None:
            raise ValueError(f"these rows cannot join the batch: {problem}")
        # a fork reads the context where it is (one copy for every row over it); a decoding-time method prunes the
        # rows as it goes, so its rows are copies
        own = cache.fork([row]) if self.decode is None else cache.select_rows(torch.tensor([row], device=cache.device))
        stream = TextStream(self.tokenizer, self.eos, sampling.stop)
        new = Row(self._next_id, sampling, generator_for(sampling, self.device), stream, question, own)
        self._next_id += 1
        self._waiting.append(new)
        return new.id

    def remove(self, row_id: int) -> None:
        """Stop row `row_id` (a client that left): it gives no more deltas and leaves the batch at the next step. A
        ValueError for an id that is not running or waiting (finished rows are gone)."""
        for row in self._running:
            if row.id == row_id and not row.removed:
                row.removed = True
                return
        for row in self._waiting:
            if row.id == row_id:
                self._waiting.remove(row)
                return
        raise ValueError(f"no row {row_id} is running or waiting (running: {self.rows})")

    @torch.no_grad()
    def step(self) -> list[Delta]:
        """Advance every row by one token (see the module docstring); the deltas of the rows whose text grew or that
        finished, a finished row's last delta carrying its finish reason."""
        self._regroup([], None)
        deltas = self._decode_running()
        started, cache = self._start_waiting(deltas)
        self._regroup(started, cache)
        return deltas

    def _decode_running(self) -> list[Delta]:
        """One forward of the running rows' last tokens over the batch cache."""
        if self.cache is None or not self._running:
            return []
        ids = torch.tensor([[row.token] for row in self._running], device=self.device)
        with compress(self.model, self.decode):
            logits = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        picks = choose_tokens(logits[:, -1], [r.sampling for r in self._running], [r.generator for r in self._running])
        deltas: list[Delta] = []
        for row, token in zip(self._running, picks.tolist(), strict=True):
            self._push(row, token, deltas)
        return deltas

    def _start_waiting(self, deltas: list[Delta]) -> tuple[list[Row], KVCache | None]:
        """The waiting rows' question forward, over their own caches joined: their first tokens. Returns the rows
        started and their cache."""
        started, self._waiting = self._waiting, []
        if not started:
            return [], None
        caches = [row.cache for row in started if row.cache is not None]
        cache = caches[0] if len(caches) == 1 else caches[0].concat_rows(caches[1:])  # one row: no join, no copy
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = left_pad([row.question for row in started], pad, self.device)
        with compress(self.model, self.decode):
            logits = self.model(
                input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1
            ).logits
        picks = choose_tokens(logits[:, -1], [r.sampling for r in started], [r.generator for r in started])
        for row, token in zip(started, picks.tolist(), strict=True):
            row.cache = None
            self._push(row, token, deltas)
        return started, cache

    def _push(self, row: Row, token: int, deltas: list[Delta]) -> None:
        """Hand a row its next token; a delta when its text grew or it finished (at max_new_tokens at the latest)."""
        text = row.text.push(token)
        if not row.text.done and row.text.steps >= row.sampling.max_new_tokens:
            text += row.text.end()
        row.token = token
        if text or row.text.done:
            deltas.append(Delta(row.id, text, row.text.finish_reason, row.text.steps))

    def _regroup(self, started: list[Row], cache: KVCache | None) -> None:
        """Rebuild the batch cache when rows leave (finished or removed) or join (the `started` ones not finished,
        rows of `cache`)."""
        staying = [i for i, row in enumerate(self._running) if not row.removed and not row.text.done]
        joining = [i for i, row in enumerate(started) if not row.text.done]
        if len(staying) == len(self._running) and not joining:
            return
        parts = [part for part in (_rows(self.cache, staying), _rows(cache, joining)) if part is not None]
        self._running = [self._running[i] for i in staying] + [started[i] for i in joining]
        self.cache = parts[0].concat_rows(parts[1:]) if parts else None


def _rows(cache: KVCache | None, rows: list[int]) -> KVCache | None:
    """Rows `rows` of `cache` (itself when they are all its rows), None when there are none."""
    if cache is None or not rows:
        return None
    return cache if rows == list(range(cache.batch_size)) else cache.select_rows(torch.tensor(rows))
