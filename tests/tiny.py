"""Tiny, offline stand-ins for a real tokenizer and real causal LMs, for the unit and contract test tiers.

Nothing here touches the network or the model hub:

* `tiny_tokenizer()` trains a byte-level BPE tokenizer in memory (about 500 tokens) on a deterministic, generated
  English-like corpus, wraps it as a `PreTrainedTokenizerFast` and, by default, gives it a small chat template.
* `tiny_model(family)` builds a randomly initialised 4-layer causal LM of one of the `FAMILIES` from its config
  class, sized to that tokenizer's vocabulary.

Both are cheap (the tokenizer is trained once per process and cached; a model builds in well under a second on CPU),
so tests may build fresh ones freely instead of sharing mutable objects.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

__all__ = [
    "ASSISTANT",
    "BOS",
    "CHAT_TEMPLATE",
    "DEFAULT_ATTN_IMPLEMENTATION",
    "EOS",
    "FAMILIES",
    "PAD",
    "SPECIAL_TOKENS",
    "TINY_VOCAB_SIZE",
    "USER",
    "tiny_model",
    "tiny_tokenizer",
    "training_corpus",
]

# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
# Order matters: the trainer gives special tokens the first ids, so pad=0, bos=1, eos=2, user=3, assistant=4.
SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT]
TINY_VOCAB_SIZE = 500

# A plain Jinja chat template built on the special tokens. It starts with BOS (the tokenizer itself does not add one),
# closes every turn with EOS and, with `add_generation_prompt`, opens an assistant turn. A system message, which has
# no role token of its own, is written as plain text before the first turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}"
    "<|user|>{{ message['content'] }}<|eos|>"
    "{% elif message['role'] == 'assistant' %}"
    "<|assistant|>{{ message['content'] }}<|eos|>"
    "{% else %}"
    "{{ raise_exception('Unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_SUBJECTS = [
    "the harbour master",
    "a young sailor",
    "the old baker",
    "my sister",
    "the council",
    "a travelling merchant",
    "the lighthouse keeper",
    "our teacher",
    "the fishermen",
    "a quiet stranger",
    "the mayor",
    "the children",
    "an engineer",
    "the archivist",
    "the captain",
    "a farmer from the hills",
    "the doctor",
    "two students",
]
_VERBS = [
    "walked to",
    "wrote about",
    "remembered",
    "repaired",
    "painted",
    "visited",
    "described",
    "sold",
    "found",
    "counted",
    "opened",
    "closed",
    "measured",
    "carried",
    "watched",
    "asked about",
    "studied",
    "built",
]
_OBJECTS = [
    "the market",
    "a wooden boat",
    "the north bridge",
    "the library",
    "an old map",
    "the river",
    "the stone tower",
    "a letter",
    "the garden",
    "the railway station",
    "the mountain road",
    "a box of apples",
    "the school",
    "the archive",
    "the harbour wall",
    "a silver key",
    "the weather",
    "the island",
    "the museum",
    "a new house",
]
_TIMES = [
    "in the morning",
    "after the storm",
    "before dinner",
    "last winter",
    "on Sunday",
    "during the festival",
    "at night",
    "in early spring",
    "every year",
    "yesterday",
    "in 1894",
    "at 7 o'clock",
    "for 12 days",
    "around noon",
    "in the summer of 1921",
]
_CLAUSES = [
    "because it was raining",
    "although nobody noticed",
    "and then went home",
    "while the bells were ringing",
    "so that everyone could see",
    "when the ship arrived",
    "but the door was locked",
    "as the sun went down",
    "and it cost 35 coins",
    "which surprised the town",
    "and nobody knows why",
    "since the road was closed",
]
_QUESTIONS = [
    "What is the capital of the region?",
    "Where did the ship go?",
    "How many people live here?",
    "Who built the tower?",
    "Why was the bridge closed?",
    "When does the market open?",
    "What is the code for the door?",
    "Can you summarise the story?",
    "Which road leads to the coast?",
]
_EXTRA = [
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 4096.",
    "Punctuation: (a), [b], {c}; d: e - f / g + h = i * j % k & l | m # n @ o ! p ? q ~ r ^ s < t > u _ v ' w \".",
    "def main(x):\n    return x + 1\n",
    'JSON: {"name": "kvsqueeze", "ratio": 0.5, "ok": true}',
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.",
    "Tabs\tand\tnewlines\nare\nfine.",
]


def training_corpus(n_lines: int = 400, seed: int = 1234) -> list[str]:
    """A deterministic, generated English-like corpus (`n_lines` lines) used to train the tiny tokenizer."""
    rng = random.Random(seed)
    lines = list(_EXTRA)
    while len(lines) < n_lines:
        kind = rng.random()
        if kind < 0.1:
            lines.append(rng.choice(_QUESTIONS))
            continue
        sentences = []
        for _ in range(rng.randint(1, 3)):
            sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TIMES)}"
            if rng.random() < 0.6:
                sentence += f" {rng.choice(_CLAUSES)}"
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "!", "?"]))
        lines.append(" ".join(sentences))
    return lines


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process and return it serialised (immutable, so safe to cache)."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # add_prefix_space=False and no normaliser: encoding then decoding any text gives back exactly that text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # Seed the vocabulary with all 256 byte symbols so any input (ASCII or not) is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (~500 tokens) with `<|bos|>`, `<|eos|>`, `<|pad|>`, `<|user|>`,
    `<|assistant|>` as special tokens, pad token set and left padding.

    The tokenizer does not add BOS/EOS on its own (like SmolLM2's or GPT-2's); the chat template starts with BOS.
    With `chat_template=False` the tokenizer has no chat template (`chat_template is None`).
    Every call returns a new object, so callers may mutate it freely.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE if chat_template else None
    return tok


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]

_CLASSES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
}

_NUM_LAYERS = 4
_HIDDEN = 64
_HEADS = 4
_KV_HEADS = 2
_HEAD_DIM = 16
_GEMMA_SLIDING_WINDOW = 16
# Gemma2 declares `_supports_sdpa = False` (SDPA cannot apply its attention-logit softcapping), so constructing it
# with "sdpa" raises ValueError; it defaults to "eager". Every other family defaults to "sdpa".
DEFAULT_ATTN_IMPLEMENTATION = {family: "eager" if family == "gemma2" else "sdpa" for family in FAMILIES}


@functools.lru_cache(maxsize=1)
def _vocab_ids() -> tuple[int, int, int, int]:
    tok = tiny_tokenizer(chat_template=False)
    return len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id


def _config_kwargs(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    vocab_size, pad_id, bos_id, eos_id = _vocab_ids()
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": _HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": _NUM_LAYERS,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "head_dim": _HEAD_DIM,
        "max_position_embeddings": 1024,
        # The default 0.02 init on a 64-wide model gives near-zero attention logits, i.e. almost uniform attention,
        # which would make score-based KV compression methods (and tests that compare them) meaningless: every
        # token would look equally important. 0.2 gives peaked, token-dependent attention patterns.
        "initializer_range": 0.2,
        "pad_token_id": pad_id,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": False,
    }
    if family == "mistral":
        # MistralConfig defaults to sliding_window=4096, which makes DynamicCache(config=...) build sliding-window
        # layers for every layer. Use full attention (like Mistral-7B v0.2+); pass sliding_window=... to change it.
        kwargs["sliding_window"] = None
    elif family == "phi3":
        # Phi3Config has no head_dim field (it is hidden_size // num_attention_heads = 16 here). Half of each head
        # is rotated, so partial rotary embeddings are exercised; it ends up in config.rope_parameters.
        del kwargs["head_dim"]
        kwargs["partial_rotary_factor"] = 0.5
        kwargs["original_max_position_embeddings"] = 1024
    elif family in ("gemma2", "gemma3"):
        kwargs["sliding_window"] = _GEMMA_SLIDING_WINDOW
        kwargs["query_pre_attn_scalar"] = _HEAD_DIM
        kwargs["tie_word_embeddings"] = True  # as in the real Gemma checkpoints
    kwargs.update(overrides)
    if family in ("gemma2", "gemma3") and "layer_types" not in overrides:
        # Alternate sliding / full attention (sliding first), so both layer kinds exist in any model of >= 2 layers.
        kwargs["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(kwargs["num_hidden_layers"])
        ]
    return kwargs


def tiny_model(family: str, seed: int = 0, **config_overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of `family` (one of `FAMILIES`), fp32, in eval mode.

    4 layers, hidden size 64, 4 query heads, 2 KV heads, head_dim 16, MLP 128, vocabulary = `len(tiny_tokenizer())`,
    1024 positions, SDPA attention (eager for gemma2, which does not support SDPA). gemma2/gemma3 alternate sliding
    (window 16) and full attention layers; phi3 uses a fused qkv_proj and partial rotary embeddings (factor 0.5);
    qwen3/gemma3 have q_norm/k_norm (given a gain of 2 so their attention is not near-uniform).
    Weights depend only on `family`, `seed` and the config; the global torch RNG is reseeded with `seed`.
    `config_overrides` go to the config class; `attn_implementation="eager"` (say) selects the attention kernel.
    """
    if family not in _CLASSES:
        raise ValueError(f"Unknown tiny model family {family!r}; known: {', '.join(FAMILIES)}")
    config_cls, model_cls = _CLASSES[family]
    attn_implementation = config_overrides.pop("attn_implementation", None) or DEFAULT_ATTN_IMPLEMENTATION[family]
    config = config_cls(**_config_kwargs(family, config_overrides))
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config)
    _sharpen_qk_norms(model, family)
    model.to(torch.float32)
    model.eval()
    return model


_QK_NORM_GAIN = 2.0


@torch.no_grad()
def _sharpen_qk_norms(model: PreTrainedModel, family: str) -> None:
    """qwen3 and gemma3 RMS-normalise queries and keys per head (q_norm / k_norm), which caps attention logits at
    about head_dim ** 0.5 = 4 whatever the initializer range, so their attention would stay close to uniform.
    A gain of 2 on those norms (logits x 4) gives them attention as peaked as the other families'."""
    for name, module in model.named_modules():
        if name.endswith(("self_attn.q_norm", "self_attn.k_norm")):
            # Gemma's RMSNorm multiplies by (1 + weight) (weight initialised to 0); Qwen3's by weight (init 1).
            module.weight.fill_(_QK_NORM_GAIN - 1.0 if family.startswith("gemma") else _QK_NORM_GAIN)


def save_tiny(directory: Path, family: str) -> Path:
    """A tiny random `family` model and the tiny tokenizer saved in `directory` (usable as `--model` / load_model)."""
    tiny_model(family).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
