"""Compress a context once, then answer questions over the compressed cache with kvsqueeze's own greedy loop.

The prompt is split where the question starts: the context part (chat-template header and the document) is
prefilled and compressed before any question is seen (query-agnostic), then each question continues from the
uncompressed length, so positions match the ones the model would have used without compression.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvsqueeze.cache import KVCache
from kvsqueeze.cachefile import SavedCache, load_cache
from kvsqueeze.generation import FinishReason, Sampling, answer, encode, left_pad
from kvsqueeze.memory import cache_stats
from kvsqueeze.methods.base import Method, ScorerMethod
from kvsqueeze.methods.decoding import DecodingCompression
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.registry import check_method
from kvsqueeze.models import get_adapter
from kvsqueeze.press import compress
from kvsqueeze.prompts import encode_prompt, split_prompt
from kvsqueeze.quantization import QuantSpec, quant_spec
from kvsqueeze.step import more_context_follows
from kvsqueeze.validation import check_bool, check_int, check_str

logger = logging.getLogger("kvsqueeze")


@dataclass
class GenerationStats:
    """Measured figures of one `generate` call (bytes come from the cache's storages)."""

    tokens_before: int  # real context tokens, summed over rows
    tokens_after: float  # kept tokens per layer and head (mean over full-attention layers), summed over rows
    kv_bytes_before: int  # full-attention keys+values just before the (last) compression
    kv_bytes_after: int  # ... and just after, before any question is appended
    padding_bytes: int  # part of kv_bytes_after spent on empty slots (padded rows, uneven heads)
    sliding_kv_bytes: int  # sliding-window layers (never pruned), reported apart
    peak_kv_bytes: int  # the most keys+values bytes the cache held during prefill
    prefill_seconds: float  # context forward(s), compression included
    compression_seconds: float  # time spent scoring and pruning
    decode_tokens_per_second: float  # generated tokens / time from the question forward to the last token
    kept_tokens_per_layer: list[int] = field(default_factory=list)
    kv_bits: int | None = None  # bits per cached key/value code (None: the model's dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerateOutput:
    answers: list[str] | list[list[str]]  # one per question (a list per context when several contexts are given)
    stats: GenerationStats
    cache: KVCache = field(repr=False)  # the compressed context cache, reusable
    finish_reasons: list[FinishReason] = field(default_factory=list)  # per question, flat: "stop" (end token or a stop
    # string) or "length" (max_new_tokens reached)


def _brief(value: object) -> str:
    """repr(value), cut to 80 characters (an error message must not print a whole document)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _context_text(i: int, context: object) -> str:
    if not isinstance(context, str):
        raise ValueError(f"context {i} must be a string, got {_brief(context)}")
    if not context.strip():
        raise ValueError(f"context {i} is empty")
    return context


def _question_list(i: int, name: str, questions: object) -> list[str]:
    """Context i's questions: a string or a list of strings, named `name` in errors."""
    if isinstance(questions, str):
        return [questions]
    if not isinstance(questions, (list, tuple)):
        raise ValueError(f"{name} must be a string or a list of strings, got {_brief(questions)}")
    if not questions:
        raise ValueError(f"context {i} has no question")
    for j, question in enumerate(questions):
        if isinstance(question, (list, tuple)) and name == "questions":
            raise ValueError(
                "with one context (a string), questions must be a string or a list of strings, got a list of lists: "
                "to give contexts their own questions, pass the contexts as a list too, e.g. generate(model, "
                "tokenizer, [context], [[q1, q2]])"
            )
        if not isinstance(question, str):
            raise ValueError(f"{name}[{j}] must be a string, got {_brief(question)}")
    return list(questions)


def _normalize(context: object, questions: object) -> list[tuple[str, list[str]]]:
    """[(context, its questions)] from `generate`'s arguments, or a ValueError naming the argument at fault."""
    if isinstance(context, str):
        return [(_context_text(0, context), _question_list(0, "questions", questions))]
    if not isinstance(context, (list, tuple)):
        raise ValueError(f"context must be a string or a list of strings (one per context), got {_brief(context)}")
    if not context:
        raise ValueError("no context given (context is an empty list)")
    n = len(context)
    if not isinstance(questions, (list, tuple)) or len(questions) != n:
        raise ValueError(
            f"with several contexts, questions must be a list of question lists, one per context ({n}), got "
            f"{_brief(questions)}"
        )
    if not all(isinstance(q, (list, tuple)) for q in questions):
        raise ValueError(f"with several contexts, questions must be a list of question lists, one per context ({n})")
    pairs = zip(context, questions, strict=True)
    return [(_context_text(i, c), _question_list(i, f"questions[{i}]", q)) for i, (c, q) in enumerate(pairs)]


def check_model_and_tokenizer(model: Any, tokenizer: Any) -> None:
    """A ValueError when `model` is not a torch module or `tokenizer` cannot be called (None, a path, a string)."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a transformers model (a torch.nn.Module), got {_brief(model)}")
    if not callable(tokenizer) or isinstance(tokenizer, type):
        raise ValueError(f"tokenizer must be a transformers tokenizer, got {_brief(tokenizer)}")


@torch.no_grad()
def prefill(
    model: Any,
    context_ids: Tensor,
    attention_mask: Tensor,
    method: Method | None = None,
    chunk_size: int | None = None,
    quant: QuantSpec | None = None,
) -> tuple[KVCache, float, float, int]:
    """Prefill (and compress) left-padded context ids. Returns (cache, seconds, compression seconds, bytes before).

    quant: keep the full-attention layers' keys and values quantized (`quantization.quant_spec`); the method scores
    each forward's tokens in full precision and what it keeps is quantized after."""
    check_method("method", method)
    check_int("chunk_size", chunk_size, 1, none_ok=True, note="context tokens per prefill forward")
    if quant is None:
        cache = KVCache(model.config)
    else:
        cache = KVCache(model.config, quant.bits, quant.group_size, quant.residual)
    width = chunk_size or context_ids.shape[1]
    start = time.perf_counter()
    n = context_ids.shape[1]
    with compress(model, method) as log:
        for lo in range(0, n, width):
            hi = lo + width
            with more_context_follows() if hi < n else nullcontext():  # early chunks: protection capped
                model(
                    input_ids=context_ids[:, lo:hi],
                    attention_mask=attention_mask[:, lo:hi],
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
    seconds = time.perf_counter() - start
    before = sum(layer.bytes_appended for layer in cache.full_layers())  # the whole context, uncompressed
    return cache, seconds, log.seconds, before


def generate_encoded(
    model: Any,
    tokenizer: Any,
    context_rows: list[list[int]],
    question_texts: list[str],
    rows: list[int],
    method: Method | None = None,
    max_new_tokens: int = 32,
    chunk_size: int | None = None,
    decode_target: int | None = None,
    decode_every: int = 32,
    *,
    sampling: Sampling | None = None,
    quant: QuantSpec | None = None,
) -> GenerateOutput:
    """`generate` on encoded prompts: prefill and compress `context_rows`, then answer question i from row rows[i].
    The answers come back flat, one per question text. decode_target/decode_every: as in `generate`.

    sampling: how tokens are chosen (temperature, top_p, stop, seed); None is greedy with `max_new_tokens`. Given,
    its own max_new_tokens counts, and `max_new_tokens` must be left out or agree with it."""
    check_model_and_tokenizer(model, tokenizer)
    check_method("method", method)
    check_int("max_new_tokens", max_new_tokens, 1)
    if sampling is None:
        sampling = Sampling(max_new_tokens=max_new_tokens)
    elif not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a kvsqueeze.generation.Sampling or None, got {_brief(sampling)}")
    elif max_new_tokens not in (32, sampling.max_new_tokens):
        raise ValueError(
            f"max_new_tokens={max_new_tokens} disagrees with sampling.max_new_tokens={sampling.max_new_tokens}"
        )
    check_int("chunk_size", chunk_size, 1, none_ok=True)
    check_int("decode_target", decode_target, 1, none_ok=True, note="tokens per head kept while answering")
    check_int("decode_every", decode_every, 1)
    decode = decoding_method(method, decode_target, decode_every)
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    check_length(adapter.max_positions, context_rows, question_texts, tokenizer, sampling.max_new_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(context_rows, pad_id, device)
    cache, prefill_s, compress_s, before = prefill(model, ids, mask, method, chunk_size, quant)
    stats = cache_stats(cache)
    answers = answer(model, tokenizer, cache, rows, question_texts, sampling, decode)
    kept = [float(layer.kept.float().mean(dim=1).sum()) for layer in cache.full_layers()]
    out_stats = GenerationStats(
        tokens_before=sum(len(r) for r in context_rows),
        tokens_after=sum(kept) / max(len(kept), 1),
        kv_bytes_before=before,
        kv_bytes_after=stats.kv_bytes,
        padding_bytes=stats.padding_bytes,
        sliding_kv_bytes=stats.sliding_kv_bytes,
        peak_kv_bytes=stats.peak_kv_bytes,
        prefill_seconds=prefill_s,
        compression_seconds=compress_s,
        decode_tokens_per_second=answers.steps / answers.seconds if answers.seconds > 0 else 0.0,
        kept_tokens_per_layer=stats.tokens_kept,
        kv_bits=stats.kv_bits,
    )
    return GenerateOutput(answers=answers.texts, stats=out_stats, cache=cache, finish_reasons=answers.finish_reasons)


def generate(
    model: Any,
    tokenizer: Any,
    context: str | list[str],
    questions: str | list[str] | list[list[str]],
    method: Method | None = None,
    max_new_tokens: int = 32,
    answer_prefix: str = "",
    chunk_size: int | None = None,
    chat_template: bool = True,
    decode_target: int | None = None,
    decode_every: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: str | list[str] | None = None,
    seed: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 32,
    kv_residual: int = 64,
) -> GenerateOutput:
    """Compress each context once (before any question is seen), then answer every question.

    Answers are greedy by default; temperature > 0 samples (with top_p nucleus sampling, and `seed` for the same
    answers every time). stop: a string or strings that end an answer (the answer stops before it).

    decode_target: also compress while answering, back to this many tokens per head every `decode_every` steps
    (`DecodingCompression`, scoring with `method` when it is a scorer, else KNorm). A `DecodingCompression` given
    as `method` compresses the context and the answers alike.

    Every argument is checked before any work: a wrong type or value is a ValueError that names it. `method` is a
    Method object or None; a method's name is refused (build it with `get_method(name, ratio=...)`).
    """
    check_model_and_tokenizer(model, tokenizer)
    items = _normalize(context, questions)
    check_method("method", method)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_str("answer_prefix", answer_prefix)
    check_bool("chat_template", chat_template)
    sampling = Sampling(max_new_tokens, temperature, top_p, _stop_strings(stop), seed)
    quant = quant_spec(kv_bits, kv_group_size, kv_residual)
    encoded = [encode_prompt(tokenizer, c, qs, answer_prefix, chat_template) for c, qs in items]
    question_texts = [t for _, texts in encoded for t in texts]
    rows = [i for i, (_, texts) in enumerate(encoded) for _ in texts]
    out = generate_encoded(
        model,
        tokenizer,
        [ids for ids, _ in encoded],
        question_texts,
        rows,
        method,
        max_new_tokens,
        chunk_size,
        decode_target,
        decode_every,
        sampling=sampling,
        quant=quant,
    )
    if not isinstance(context, str):
        it = iter([str(a) for a in out.answers])  # flat, one per question
        out.answers = [[next(it) for _ in qs] for _, qs in items]
    return out


def _stop_strings(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, (list, tuple)):
        return tuple(stop)
    raise ValueError(f"stop must be a string, a list of strings or None, got {_brief(stop)}")


def decoding_method(method: Method | None, target: int | None, every: int = 32) -> Method | None:
    """The method to apply while answering: `method` itself if it acts while decoding (`Method.acts_while_decoding`:
    H2O, DMS, any `DecodingCompression`), else one built from `target`/`every` around `method`'s scores (KNorm when
    `method` is not a scorer), else None."""
    acts = method is not None and method.acts_while_decoding
    if target is None:
        return method if acts else None
    if acts:
        raise ValueError(
            f"{type(method).__name__} already compresses while decoding: do not give decode_target (a "
            "DecodingCompression takes its own target_tokens)"
        )
    scorer = method if isinstance(method, ScorerMethod) else KNorm()
    return DecodingCompression(scorer=scorer, target_tokens=target, every=every)


def check_length(
    max_positions: int | None, context_rows: list[list[int]], questions: list[str], tokenizer: Any, new: int
) -> None:
    if max_positions is None:
        return
    longest_q = max(len(encode(tokenizer, q, False)) for q in questions)
    for i, row in enumerate(context_rows):
        total = len(row) + longest_q + new
        if total > max_positions:
            raise ValueError(
                f"context {i} has {len(row)} tokens; with the question ({longest_q}) and max_new_tokens ({new}) that "
                f"makes {total} positions, more than the model's maximum of {max_positions}."
            )


def answer_saved(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    questions: str | list[str],
    max_new_tokens: int = 32,
    answer_prefix: str = "",
    decode_target: int | None = None,
    decode_every: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: str | list[str] | None = None,
    seed: int | None = None,
) -> tuple[list[str], SavedCache]:
    """Answer questions over a context cache saved by `save_cache` (e.g. by `kvsqueeze generate --save-cache`).
    `questions`: a string or a list of strings; the sampling arguments as in `generate`."""
    check_model_and_tokenizer(model, tokenizer)
    if not isinstance(path, (str, Path)):
        raise ValueError(f"path must be a str or a Path, got {_brief(path)}")
    questions = _question_list(0, "questions", questions)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_str("answer_prefix", answer_prefix)
    check_int("decode_target", decode_target, 1, none_ok=True)
    check_int("decode_every", decode_every, 1)
    sampling = Sampling(max_new_tokens, temperature, top_p, _stop_strings(stop), seed)
    saved = load_cache(path, model)
    if len(saved.seen) != 1:
        raise ValueError(f"{str(path)!r} holds {len(saved.seen)} contexts; answer_saved reads files of one context")
    template = bool(saved.extra.get("chat_template", True))
    tails = [split_prompt(tokenizer, "-", q, answer_prefix, template)[1] for q in questions]
    decode = decoding_method(None, decode_target, decode_every)
    answers = answer(model, tokenizer, saved.cache, [0] * len(questions), tails, sampling, decode)
    return answers.texts, saved
