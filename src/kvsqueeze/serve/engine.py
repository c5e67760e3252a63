"""The model's work, run only by the scheduler's thread: split and tokenize a job's prompt and find its compressed
context (memory, disk) or prefill and compress it. Decoding is the running batch's (`serve/batch.py`).

Every job over a cached context decodes from a fork of its row (`BatchDecoder.add` forks it: `KVCache.fork`), which
reads the context where it is and keeps its own tokens apart, so the cached context is never changed by answering,
whatever the job does.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from kvsqueeze.fingerprint import model_fingerprint
from kvsqueeze.generation import encode
from kvsqueeze.memory import cache_bytes, cache_stats
from kvsqueeze.models import get_adapter
from kvsqueeze.pipeline import prefill
from kvsqueeze.serve.errors import APIError
from kvsqueeze.serve.jobs import ContextReady, Job
from kvsqueeze.serve.metrics import Metrics
from kvsqueeze.serve.prompts import chat_over_document, chat_prompt, completion_prompt, document_head, head_ids
from kvsqueeze.serve.settings import ServerSettings
from kvsqueeze.serve.store import ContextStore, Found, StoredContext, context_id


def too_long(message: str) -> APIError:
    return APIError(400, message, None, "context_length_exceeded")


class Engine:
    """The model, its tokenizer and the context store, and what is done with them."""

    def __init__(self, model: Any, tokenizer: Any, store: ContextStore, metrics: Metrics, settings: ServerSettings):
        self.model, self.tokenizer, self.store, self.metrics, self.settings = model, tokenizer, store, metrics, settings
        self.fingerprint = model_fingerprint(model)
        self.max_positions: int | None = get_adapter(model).max_positions
        self.device = next(model.parameters()).device

    def prepare(self, job: Job) -> None:
        """Split and tokenize the job's prompt, name its context (`job.context_id`) and fit its answer length; a
        ValueError or an APIError (400) when the prompt cannot be served."""
        tok = self.tokenizer
        if job.document is not None:
            head = document_head(tok, job.document)
            if job.context_id is None:  # a new document: its id comes from its tokens and the method
                job.prefix_ids = head_ids(tok, head)
                job.prefix_tokens = len(job.prefix_ids)
                job.context_id = context_id(self.fingerprint, job.method, job.prefix_ids, job.compression.kv_bits)
            if job.kind == "generate":
                chat = job.messages is not None
                job.question = chat_over_document(tok, job.document, head, job.messages or []) if chat else job.prompt
        else:
            chat = job.messages is not None
            split = chat_prompt(tok, job.messages or []) if chat else completion_prompt(tok, job.prompt or "")
            job.prefix_ids, job.question, job.prefix_tokens = split.prefix_ids, split.question, len(split.prefix_ids)
            job.context_id = context_id(self.fingerprint, job.method, job.prefix_ids, job.compression.kv_bits)
        if job.kind == "generate":
            self._fit(job)
        else:
            self._fit_document(job)

    def _fit_document(self, job: Job) -> None:
        """A document must leave room for a question and an answer within the limits."""
        limit = self.settings.max_prompt_tokens
        if limit is not None and job.prefix_tokens >= limit:
            raise too_long(f"the document has {job.prefix_tokens} tokens; this server takes prompts of at most {limit} "
                           "(--max-prompt-tokens), questions included")  # fmt: skip
        if self.max_positions is not None and job.prefix_tokens >= self.max_positions:
            raise too_long(f"the document has {job.prefix_tokens} tokens, as many as the model's maximum of "
                           f"{self.max_positions} positions or more: no room is left for a question")  # fmt: skip

    def _fit(self, job: Job) -> None:
        """Count the prompt's tokens and check them, and max_tokens, against the limits and the model's positions."""
        question = len(encode(self.tokenizer, job.question or ""))
        if question == 0:
            raise ValueError("the prompt has no text after the cached context: give a question")
        job.prompt_tokens = job.prefix_tokens + question
        limit = self.settings.max_prompt_tokens
        if limit is not None and job.prompt_tokens > limit:
            raise too_long(
                f"the prompt has {job.prompt_tokens} tokens ({job.prefix_tokens} in the context, "
                f"{question} in the question); this server takes at most {limit} (--max-prompt-tokens)"
            )
        room = None if self.max_positions is None else self.max_positions - job.prompt_tokens
        wanted = job.sampling.max_new_tokens
        if not job.max_tokens_given:
            wanted = min(wanted, room) if room is not None else wanted
            job.sampling = replace(job.sampling, max_new_tokens=max(wanted, 1))
        if room is not None and wanted > room:
            raise too_long(f"the prompt has {job.prompt_tokens} tokens; with max_tokens={wanted} that makes "
                           f"{job.prompt_tokens + wanted} positions, more than the model's maximum of "
                           f"{self.max_positions}")  # fmt: skip

    def context(self, job: Job) -> tuple[StoredContext, Found]:
        """The job's compressed context: from the store, else prefilled and compressed now (and stored)."""
        assert job.context_id is not None
        found, where = self.store.get(job.context_id)
        if found is not None:
            return found, where
        ids = job.prefix_ids
        if ids is None:  # a known document dropped from memory: rebuild it from its text
            assert job.document is not None
            ids = head_ids(self.tokenizer, document_head(self.tokenizer, job.document))
        made = self._prefill(job, ids)
        self.store.put(made, job.method)
        return made, where

    @torch.no_grad()
    def _prefill(self, job: Job, ids: list[int]) -> StoredContext:
        assert job.context_id is not None
        tensor = torch.tensor([ids], device=self.device)
        cache, seconds, _, before = prefill(
            self.model, tensor, torch.ones_like(tensor), job.method, quant=job.compression.quant()
        )
        self.metrics.prefills.inc()
        self.metrics.prefill_seconds.observe(seconds)
        info: dict[str, Any] = {
            "kind": "prefix" if job.document is None else "document",
            "tokens": len(ids),
            "kv_bytes_before": before,
            "kv_bytes_after": cache_stats(cache).kv_bytes,
            "compression": job.compression.to_dict(),
            "method": repr(job.method),
            "created": int(time.time()),
            "prefill_seconds": round(seconds, 4),
        }
        if job.document is not None:
            info["document"] = job.document
        return StoredContext(job.context_id, cache, info, cache_bytes(cache))

    def run_context(self, job: Job) -> None:
        """A context job: make sure the context exists, then report it."""
        stored, found = self.context(job)
        held = self.store.holds(stored.id)
        job.post(ContextReady(stored.id, stored.info, found, held))
