"""Multi-turn conversations over one compressed cache: compress a document once, ask, keep the answer, ask again.

The cache always holds the rendered conversation so far. Each turn appends exactly the text the chat template
adds when the conversation grows: the template is rendered for the whole conversation and the part after what
is already in the cache is tokenized and fed. Splits fall where the template puts special tokens (turn
boundaries), so the token ids fed turn by turn equal those of tokenizing the whole rendered conversation, with
one documented exception: the document and the first question sit in the same user message and are split at
"\\n\\n" (the document is compressed before the question is seen, as in `generate`), and a tokenizer may merge
across that point. Answers are generated in place; when the model's own tokens for an answer differ from the
tokenization of their text (rare), the cache keeps the model's tokens and `exact` becomes False.

Memory: the document is compressed by `method` at its ratio; with `budget`, every later forward keeps the cache
at most `budget` tokens per head (questions and answer endings are compressed as they come, decoding steps every
`every` tokens; see `DecodingCompression`). Positions are absolute: token i of the conversation sits at position i.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvsqueeze.cache import KVCache
from kvsqueeze.cachefile import load_cache, save_cache
from kvsqueeze.generation import eos_ids
from kvsqueeze.methods.base import Method
from kvsqueeze.methods.registry import check_method
from kvsqueeze.pipeline import check_model_and_tokenizer, decoding_method, prefill
from kvsqueeze.press import compress
from kvsqueeze.prompts import split_prompt
from kvsqueeze.validation import check_int, check_str


class Conversation:
    """A chat over a compressed document. `ask(question)` returns the answer and keeps both in the cache."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        context: str,
        method: Method | None = None,
        budget: int | None = None,
        every: int = 32,
        chunk_size: int | None = None,
    ) -> None:
        check_model_and_tokenizer(model, tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("Conversation needs a tokenizer with a chat template")
        check_str("context", context)
        if not context.strip():
            raise ValueError("context is empty")
        check_method("method", method)
        check_int("budget", budget, 1, none_ok=True, note="tokens per head kept after the document")
        check_int("every", every, 1, note="decoding steps between compressions")
        check_int("chunk_size", chunk_size, 1, none_ok=True)
        self.model, self.tokenizer, self.context, self.method = model, tokenizer, context, method
        self.budget, self.every = budget, every
        self.later = decoding_method(method, budget, every)  # what compresses the turns after the document
        self.messages: list[dict[str, str]] = []
        self.ids: list[int] = []  # every token fed to the cache, in order (token i sits at position i)
        self.text = ""  # the rendered conversation those tokens encode
        self.exact = True
        self.cache = KVCache(model.config)
        head, _ = split_prompt(tokenizer, context, "")
        ids = self._encode(head)
        device = next(model.parameters()).device
        tensor = torch.tensor([ids], device=device)
        self.cache, *_ = prefill(model, tensor, torch.ones_like(tensor), method, chunk_size)
        self.ids, self.text = ids, head

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render(self, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            self.messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _extend(self, rendered: str) -> str:
        if not rendered.startswith(self.text):
            raise RuntimeError("the chat template rewrote earlier turns: the conversation cannot be extended in place")
        return rendered[len(self.text) :]

    @torch.no_grad()
    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Feed tokens (compressing with the budget); returns the logits of the last one."""
        limit = getattr(self.model.config.get_text_config(decoder=True), "max_position_embeddings", None)
        if limit is not None and self.seen + len(ids) > limit:
            raise ValueError(
                f"the conversation would reach {self.seen + len(ids)} positions, more than the model's maximum of "
                f"{limit}; start a new conversation"
            )
        device = next(self.model.parameters()).device
        with compress(self.model, self.later):
            tokens = torch.tensor([ids], device=device)
            out = self.model(input_ids=tokens, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.ids += ids
        return out.logits[0, -1]

    @torch.no_grad()
    def ask(self, question: str, max_new_tokens: int = 64, answer: str | None = None) -> str:
        """Append a user turn, answer it greedily (or with the given `answer`), keep both in the cache. Arguments are
        checked first; a question the model cannot take (too long) leaves the conversation as it was."""
        check_str("question", question)
        check_int("max_new_tokens", max_new_tokens, 1)
        check_str("answer", answer, none_ok=True)
        content = f"{self.context}\n\n{question}" if not self.messages else question
        self.messages.append({"role": "user", "content": content})
        try:
            prompt = self._render(True)
            logits = self._feed(self._encode(self._extend(prompt)))
        except ValueError:  # nothing was fed (the position limit is checked first): forget the turn
            self.messages.pop()
            raise
        self.text = prompt
        generated: list[int] = []
        if answer is None:
            eos = eos_ids(self.model, self.tokenizer)
            for _ in range(max_new_tokens):
                token = int(logits.argmax())
                generated.append(token)
                if token in eos or len(generated) == max_new_tokens:
                    break
                logits = self._feed([token])
            reply = self.tokenizer.decode([t for t in generated if t not in eos], skip_special_tokens=True)
        else:
            reply = answer
        self.messages.append({"role": "assistant", "content": reply})
        full = self._render(False)
        tail = self._extend(full)
        self._close_turn(tail, reply, generated)
        self.text = full
        return reply.strip()

    def _close_turn(self, tail: str, reply: str, generated: list[int]) -> None:
        """Feed the rest of the assistant turn: the cache already holds all generated tokens but the last."""
        expected = self._encode(tail)
        fed = generated[:-1]
        if expected[: len(fed)] == fed:
            rest = expected[len(fed) :]
        else:  # the model's tokens are not the tokenization of their text: keep them, close the turn after them
            self.exact = False
            if not tail.startswith(reply):
                raise RuntimeError("the chat template changed the answer text; cannot close the turn in place")
            last = generated[-1:] if generated and generated[-1] not in eos_ids(self.model, self.tokenizer) else []
            rest = last + self._encode(tail[len(reply) :])
        if rest:
            self._feed(rest)

    @property
    def seen(self) -> int:
        return len(self.ids)

    def save(self, path: str | Path) -> Path:
        """Save the compressed cache and the conversation (messages, token ids) to a safetensors file."""
        state: dict[str, Any] = {"context": self.context, "messages": self.messages, "ids": self.ids, "text": self.text}
        state.update({"budget": self.budget, "every": self.every, "exact": self.exact})
        return save_cache(path, self.cache, self.model, self.method, extra={"conversation": json.dumps(state)})

    @classmethod
    def load(cls, path: str | Path, model: Any, tokenizer: Any, method: Method | None = None) -> Conversation:
        """Reload a saved conversation for `model` (the same model that computed it, else ValueError)."""
        check_model_and_tokenizer(model, tokenizer)
        check_method("method", method)
        saved = load_cache(path, model)
        if "conversation" not in saved.extra:
            raise ValueError(f"{str(path)!r} holds a cache but no conversation; use kvsqueeze.load_cache")
        try:
            state = json.loads(saved.extra["conversation"])
            conv = cls.__new__(cls)
            conv.model, conv.tokenizer, conv.context, conv.method = model, tokenizer, state["context"], method
            conv.budget, conv.every = state["budget"], state["every"]
            conv.messages, conv.ids, conv.text = state["messages"], state["ids"], state["text"]
            conv.exact = state["exact"]
        except (TypeError, KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(path)!r} holds a damaged conversation ({type(err).__name__}: {err})") from None
        conv.later = decoding_method(method, conv.budget, conv.every)
        conv.cache = saved.cache
        return conv
