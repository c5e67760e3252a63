"""A transformers `Pipeline` over `kvsqueeze.generate`: compress a context once, answer one or several questions.

For users of kvpress's "kv-press-text-generation" pipeline: the same call shape, with a kvsqueeze method (an object
or a registered name plus `ratio`) where kvpress takes a press. Registration is explicit, never an import side
effect. Example (runs on the embedded SmolLM2; any supported causal LM and its tokenizer will do):

    import kvsqueeze as kvs
    from transformers import pipeline

    model, tokenizer = kvs.load_model()
    pipe = pipeline(kvs.register_pipeline(), model=model, tokenizer=tokenizer)
    context = "The lighthouse keeper hid the spare key under the third step of the north stairs. " * 8
    out = pipe(context, question="Where is the spare key?", method="knorm", ratio=0.5, max_new_tokens=16)
    print(out["answer"], out["stats"]["kv_bytes_before"], "->", out["stats"]["kv_bytes_after"])
    snapkv = kvs.get_method("snapkv", ratio=0.5, window=16)
    outs = pipe(context, questions=["Who hid the key?", "Where is it?"], method=snapkv, max_new_tokens=16)
    print(outs["answers"])

Parameters (at construction or per call; per-call values win):
  question / questions   one question (output "answer") or a list of them (output "answers"), never both
  method                 a `kvsqueeze.Method`, a registered method name, or None (no compression)
  ratio, method_options  with a method name: `get_method(method, ratio=ratio, **method_options)`
  max_new_tokens, answer_prefix, chat_template, chunk_size, decode_target, decode_every   as in `kvsqueeze.generate`
Every output also holds "stats": `GenerationStats.to_dict()` (kv_bytes_before, kv_bytes_after, tokens, timings).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from kvsqueeze.methods import METHODS, Method, get_method
from kvsqueeze.models import get_adapter
from kvsqueeze.pipeline import generate_encoded
from kvsqueeze.prompts import encode_prompt

TASK = "kvsqueeze-text-generation"

_PREPROCESS = ("question", "questions", "answer_prefix", "chat_template")
_FORWARD = ("method", "ratio", "method_options", "max_new_tokens", "chunk_size", "decode_target", "decode_every")


def resolve_method(
    method: Method | str | None, ratio: float | None = None, method_options: dict[str, Any] | None = None
) -> Method | None:
    """The Method a pipeline call runs: `method` itself, or the registered `method` name built with `ratio` and
    `method_options`. ratio/method_options only go with a name (a Method object already carries its own)."""
    extra = {} if ratio is None else {"ratio": ratio}
    extra.update(method_options or {})
    if method is None or isinstance(method, Method):
        if extra:
            given = "no method" if method is None else f"the Method object {method!r}"
            raise ValueError(
                f"ratio/method_options ({', '.join(sorted(extra))}) go with a method name, but {given} was given: "
                "pass method='<name>' (see kvsqueeze.list_methods()) or set them on the Method object."
            )
        return method
    if not isinstance(method, str):
        raise ValueError(f"method must be a kvsqueeze Method, a registered method name or None, got {method!r}")
    return get_method(method, **extra)


class KVSqueezePipeline(Pipeline):
    """`pipe(context, question=... | questions=[...], method=..., ratio=...)` -> {"answer" | "answers", "stats"}.

    The context is compressed once, before any question is seen; every question is then answered greedily over the
    compressed cache (batched), exactly as `kvsqueeze.generate` does. See the module docstring for the parameters.
    """

    # Only a tokenizer (None: optional, so a missing one reaches __init__'s clear error); transformers types these
    # flags as None in the base class although its own pipelines set them to booleans.
    _load_processor = False  # type: ignore[assignment]
    _load_image_processor = False  # type: ignore[assignment]
    _load_video_processor = False  # type: ignore[assignment]
    _load_feature_extractor = False  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        get_adapter(self.model)  # an unsupported architecture fails here, naming the supported ones
        if self.tokenizer is None:
            raise ValueError("the kvsqueeze pipeline needs a tokenizer: pass tokenizer=...")

    def __call__(self, context: str | list[str] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Answer `question` (or each of `questions`) about `context`; a list of contexts gives a list of outputs."""
        if context is None:
            raise ValueError("no context given: call pipe(context, question=...) with the document as a string")
        return super().__call__(context, **kwargs)

    def _sanitize_parameters(self, **params: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        unknown = sorted(set(params) - set(_PREPROCESS) - set(_FORWARD))
        if unknown:
            hint = " (kvsqueeze takes method=, not press=)" if "press" in unknown else ""
            allowed = ", ".join((*_PREPROCESS, *_FORWARD))
            raise ValueError(f"unknown pipeline parameter(s) {', '.join(unknown)}{hint}; allowed: {allowed}")
        if isinstance(params.get("method"), str):
            METHODS.get(params["method"])  # an unknown name fails now, with kvsqueeze's "did you mean ..."
        preprocess = {k: params[k] for k in _PREPROCESS if k in params}
        forward = {k: params[k] for k in _FORWARD if k in params}
        return preprocess, forward, {}

    def preprocess(  # type: ignore[override]
        self,
        context: str,
        question: str | None = None,
        questions: list[str] | None = None,
        answer_prefix: str = "",
        chat_template: bool = True,
    ) -> dict[str, Any]:
        if not isinstance(context, str) or not context.strip():
            raise ValueError(f"context must be a non-empty string, got {context!r}")
        if question is not None and questions is not None:
            raise ValueError("give either question (one string) or questions (a list), not both")
        if question is None and questions is None:
            raise ValueError("no question given: pass question='...' or questions=['...', ...]")
        if question is not None and (not isinstance(question, str) or not question.strip()):
            raise ValueError(f"question must be a non-empty string, got {question!r}")
        texts = [question] if question is not None else questions
        if isinstance(texts, str) or not texts or not all(isinstance(q, str) and q.strip() for q in texts):
            raise ValueError(f"questions must be a non-empty list of non-empty strings, got {texts!r}")
        context_ids, question_texts = encode_prompt(self.tokenizer, context, list(texts), answer_prefix, chat_template)
        return {"context_ids": context_ids, "question_texts": question_texts, "single": question is not None}

    def _forward(  # type: ignore[override]
        self,
        inputs: dict[str, Any],
        method: Method | str | None = None,
        ratio: float | None = None,
        method_options: dict[str, Any] | None = None,
        max_new_tokens: int = 32,
        chunk_size: int | None = None,
        decode_target: int | None = None,
        decode_every: int = 32,
    ) -> dict[str, Any]:
        out = generate_encoded(
            self.model,
            self.tokenizer,
            [inputs["context_ids"]],
            inputs["question_texts"],
            [0] * len(inputs["question_texts"]),  # every question continues the one context row
            resolve_method(method, ratio, method_options),
            max_new_tokens,
            chunk_size,
            decode_target,
            decode_every,
        )
        return {"answers": out.answers, "stats": out.stats.to_dict(), "single": inputs["single"]}

    def postprocess(self, outputs: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        answers = [str(a) for a in outputs["answers"]]
        if outputs["single"]:
            return {"answer": answers[0], "stats": outputs["stats"]}
        return {"answers": answers, "stats": outputs["stats"]}


def register_pipeline() -> str:
    """Register `KVSqueezePipeline` with transformers under "kvsqueeze-text-generation" and return that task name,
    so `transformers.pipeline(task, model=model, tokenizer=tokenizer)` builds it. Calling it again does nothing."""
    if PIPELINE_REGISTRY.to_dict().get(TASK, {}).get("impl") is not KVSqueezePipeline:
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=KVSqueezePipeline, pt_model=AutoModelForCausalLM)
    return TASK
