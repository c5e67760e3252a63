"""The decode loop: rows of a cache continue with their question text, one token per step, greedy or sampled, until
an end-of-sequence token, a stop string or `max_new_tokens`.

- `Sampling`: how one row picks its tokens (temperature 0 = greedy, top_p, seed) and when it stops.
- `choose_tokens`: the next token of every row from its logits. Each sampled row draws from its own seeded
  generator, so a row's answer does not depend on the rows decoded beside it.
- `TextStream`: one row's text as it grows, detokenized incrementally. Text that may still become a stop string
  (or an incomplete UTF-8 character) is held back until it cannot, so the deltas joined are the final answer.
- `stream`: the loop itself as an iterator of per-step deltas; `answer` runs it to the end.

Greedy decoding takes the argmax exactly as before sampling existed, so greedy answers are unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from kvsqueeze.cache import KVCache
from kvsqueeze.methods.base import Method
from kvsqueeze.press import compress
from kvsqueeze.validation import check_bool, check_float, check_int

FinishReason = Literal["stop", "length"]
_SEED_LIMIT = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


@dataclass(frozen=True)
class Sampling:
    """How a row chooses its tokens and when it ends (the OpenAI API's parameters of the same meaning).

    max_new_tokens: at most this many tokens are generated; temperature: 0 picks the most likely token (greedy),
    higher flattens the distribution; top_p: sample only from the smallest set of tokens whose probabilities add up
    to top_p; stop: strings that end the answer (the answer stops before the first one); seed: the same seed gives
    the same tokens (None: a fresh random seed); ignore_eos: go on past end-of-sequence tokens (they are kept as
    ordinary tokens) until max_new_tokens or a stop string, as benchmarks of decoding speed want (vLLM's option of the
    same name).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_float("temperature", self.temperature, 0.0, 100.0, note="0 = greedy")
        check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_int("seed", self.seed, 0, _SEED_LIMIT, none_ok=True)
        check_bool("ignore_eos", self.ignore_eos)
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def generator_for(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """The random generator a sampled row draws from (None for greedy rows)."""
    if sampling.greedy:
        return None
    gen = torch.Generator(device=device)
    if sampling.seed is None:
        gen.seed()
    else:
        gen.manual_seed(sampling.seed)
    return gen


def sample_token(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token id from a row's logits (V,): the argmax when greedy, else a draw from the tempered distribution
    restricted to its top_p nucleus (always at least the most likely token)."""
    if sampling.greedy:
        return int(logits.argmax())
    logits = logits.double()  # float64 holds any temperature Sampling accepts (float32 would round 1e-300 to 0)
    probs = torch.softmax((logits - logits.max()) / sampling.temperature, dim=-1)  # max first: a tiny temperature
    # then sends the others to -inf (probability 0), never the top one to inf (NaN)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # probability mass ranked above each token
        outside = before >= sampling.top_p  # the nucleus: tokens reached before top_p is covered
        outside[0] = False  # the most likely token always stays (a top_p below float32's range rounds to 0)
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def choose_tokens(
    logits: Tensor, samplings: Sequence[Sampling], generators: Sequence[torch.Generator | None]
) -> Tensor:
    """The next token of each row, (R,) long, from logits (R, V). All-greedy batches take one argmax."""
    if all(s.greedy for s in samplings):
        return logits.argmax(dim=-1)
    picks = [sample_token(logits[i], s, g) for i, (s, g) in enumerate(zip(samplings, generators, strict=True))]
    return torch.tensor(picks, dtype=torch.long, device=logits.device)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end an answer: the model's generation config's, its config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class TextStream:
    """One row's answer as it is generated: `push` each token, get back the text that became final."""

    def __init__(self, tokenizer: Any, eos: set[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.eos, self.stop = tokenizer, eos, stop
        self.tokens: list[int] = []  # generated ids, without the end-of-sequence token
        self.steps = 0  # tokens generated, the end-of-sequence token included
        self.emitted = ""  # text already handed out
        self.final = ""  # the whole answer, set when it finishes (stop string cut)
        self.finish_reason: FinishReason | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _held_back(self, text: str) -> int:
        """How many trailing characters of `text` must wait: an incomplete character, or a start of a stop string."""
        if text.endswith("\ufffd"):  # a multi-byte character cut between tokens
            return len(text) - len(text.rstrip("\ufffd"))
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, final: str) -> str:
        delta = final[len(self.emitted) :] if final.startswith(self.emitted) else ""
        self.emitted = final if final.startswith(self.emitted) else self.emitted
        return delta

    def push(self, token: int) -> str:
        """Add one generated token; returns the new final text (possibly empty)."""
        if self.done:
            raise ValueError("this answer is finished; push no more tokens")
        self.steps += 1
        if token in self.eos:
            return self._finish("stop", self.text())
        self.tokens.append(token)
        text = self.text()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._finish("stop", text[:cut])
        return self._emit(text[: len(text) - self._held_back(text)])

    def end(self) -> str:
        """Mark the answer cut at max_new_tokens (unless it already stopped); returns the text still held back."""
        return "" if self.done else self._finish("length", self.text())

    def _finish(self, reason: FinishReason, final: str) -> str:
        self.finish_reason, self.final = reason, final
        return self._emit(final)

    def text(self) -> str:
        """All the text the generated tokens decode to (stop strings not yet cut)."""
        return str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))


@dataclass
class Delta:
    """What one step added to one row: new text, and the finish reason on the row's last delta; steps: tokens the
    row has generated so far (its end-of-sequence token included)."""

    row: int
    text: str
    finish_reason: FinishReason | None = None
    steps: int = 0


@dataclass
class Answers:
    """The result of `answer`: per row the final text (stripped), the generated ids and why it ended."""

    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[FinishReason]
    steps: int  # tokens generated over all rows, end-of-sequence tokens included
    seconds: float  # from the question forward to the last token


def encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    """The token ids of `text`; special: with the tokenizer's special tokens (e.g. BOS) added."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rows of ids left-padded to one width: (ids (R, W), attention mask (R, W) with 0 on the padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, device=device)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _samplings(sampling: Sampling | int | Sequence[Sampling], n: int) -> list[Sampling]:
    if isinstance(sampling, Sampling):
        return [sampling] * n
    if isinstance(sampling, int) and not isinstance(sampling, bool):
        return [Sampling(max_new_tokens=sampling)] * n
    if isinstance(sampling, (list, tuple)) and all(isinstance(s, Sampling) for s in sampling):
        if len(sampling) != n:
            raise ValueError(f"got {len(sampling)} Sampling objects for {n} rows; give one, or one per row")
        return list(sampling)
    raise ValueError(f"sampling must be a Sampling, a list of them (one per row) or max_new_tokens, got {sampling!r}")


class Decoding:
    """The decode loop over some rows of a cache, as an iterable of per-step deltas (see `stream`). Arguments are
    checked when it is built, before any forward; `streams` holds each row's state (ids, text, finish reason)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        cache: KVCache,
        rows: list[int],
        question_texts: list[str],
        sampling: Sampling | int | Sequence[Sampling] = 32,
        decode: Method | None = None,
    ) -> None:
        if len(rows) != len(question_texts) or not rows:
            raise ValueError(f"give one context row per question: {len(rows)} rows for {len(question_texts)} questions")
        self.model, self.tokenizer, self.cache, self.rows, self.decode = model, tokenizer, cache, rows, decode
        self.question_texts = question_texts
        self.samplings = _samplings(sampling, len(rows))
        eos = eos_ids(model, tokenizer)
        self.streams = [TextStream(tokenizer, set() if s.ignore_eos else eos, s.stop) for s in self.samplings]
        self.seconds = 0.0  # from the question forward to the last token, once iterated

    @torch.no_grad()
    def __iter__(self) -> Iterator[list[Delta]]:
        model, tokenizer, samplings, streams = self.model, self.tokenizer, self.samplings, self.streams
        device = next(model.parameters()).device
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids, mask = left_pad([encode(tokenizer, t) for t in self.question_texts], pad_id, device)
        # forks read the context where it is (each context row once, however many questions); a decoding-time method
        # prunes the rows as it goes, so its rows are copies
        if self.decode is None:
            work = self.cache.fork(self.rows)
        else:
            work = self.cache.select_rows(torch.tensor(self.rows, device=device))
        generators = [generator_for(s, device) for s in samplings]
        start = time.perf_counter()
        with compress(model, self.decode):
            for step in range(max(s.max_new_tokens for s in samplings)):
                logits = model(
                    input_ids=ids, attention_mask=mask, past_key_values=work, use_cache=True, logits_to_keep=1
                ).logits[:, -1]
                nxt = choose_tokens(logits, samplings, generators)
                deltas = []
                for i, tok in enumerate(nxt.tolist()):
                    if streams[i].done:
                        continue
                    text = streams[i].push(tok)
                    if not streams[i].done and step + 1 >= samplings[i].max_new_tokens:
                        text += streams[i].end()
                    if text or streams[i].done:
                        deltas.append(Delta(i, text, streams[i].finish_reason, streams[i].steps))
                self.seconds = time.perf_counter() - start
                if deltas:
                    yield deltas
                if all(s.done for s in streams):
                    break
                ids, mask = nxt[:, None], torch.ones(len(self.rows), 1, dtype=torch.long, device=device)


def stream(
    model: Any,
    tokenizer: Any,
    cache: KVCache,
    rows: list[int],
    question_texts: list[str],
    sampling: Sampling | int | Sequence[Sampling] = 32,
    decode: Method | None = None,
) -> Decoding:
    """Answer question i from context row `rows[i]` of `cache` (left untouched: the rows are copied). Iterating the
    result yields, after every decode step, the deltas of the rows whose text grew or that finished; by the end every
    row has had one delta with its finish reason. `sampling`: one for all rows, one per row, or an int (greedy with
    that max_new_tokens).

    decode: a method applied after every question/decoding forward (e.g. `DecodingCompression`); None = no pruning.
    """
    return Decoding(model, tokenizer, cache, rows, question_texts, sampling, decode)


def answer(
    model: Any,
    tokenizer: Any,
    cache: KVCache,
    rows: list[int],
    question_texts: list[str],
    sampling: Sampling | int | Sequence[Sampling] = 32,
    decode: Method | None = None,
) -> Answers:
    """`stream` run to the end: the answers (stripped of surrounding whitespace), their ids and finish reasons."""
    run = stream(model, tokenizer, cache, rows, question_texts, sampling, decode)
    for _ in run:
        pass
    return Answers(
        texts=[s.final.strip() for s in run.streams],  # the deltas joined, unless the tokenizer's decoding of a
        # longer text rewrote an earlier part (then the deltas could not take it back; the final text is exact)
        tokens=[s.tokens for s in run.streams],
        finish_reasons=[s.finish_reason or "length" for s in run.streams],
        steps=sum(s.steps for s in run.streams),
        seconds=run.seconds,
    )
