"""Where one decode step's time goes: transformers' `model.generate` against kvsqueeze's decode loop (uncompressed).

Both answer the benchmark's passkey question over a `--tokens` context on the embedded model, greedily; after
`--skip` steps, `--steps` decode steps run under Python's cProfile (which adds a little to every call, so more to the
path that makes more calls), and the time per step is split into: the linear layers, the attention kernels (SDPA;
kvsqueeze's products, softmax and fused kernel), the cache's copies (`torch.cat`: transformers' DynamicCache copies
each layer at each step), and everything else. kvsqueeze runs twice: as it is, and without prefix attention's fused
kernel ("products"). Run alone: `.venv/bin/python benchmarks/decode_profile.py` (about two minutes); writes
benchmarks/results/decode_profile.md (`--name` another file there).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import pstats
import time
from pathlib import Path
from typing import Any

import torch
from generate_speed import passkey_unit, products_only
from recorded import given_options, machine

import kvsqueeze as kvs
from kvsqueeze.generation import Sampling, encode, stream
from kvsqueeze.pipeline import prefill

RESULTS = Path(__file__).parent / "results"
# kvsqueeze, products: the same loop with prefix attention's fused kernel off (its separate products and softmax)
PATHS = ("transformers", "kvsqueeze", "kvsqueeze, products")
PARTS = {  # a builtin's name (as cProfile shows it) -> the part of the step its own time counts in
    "torch._C._nn.linear": "linear layers",
    "torch._C._nn.scaled_dot_product_attention": "attention kernels",
    "_scaled_dot_product_flash_attention_for_cpu": "attention kernels",
    "torch.bmm": "attention kernels",
    "torch.softmax": "attention kernels",
    "baddbmm_": "attention kernels",
    "addcmul_": "attention kernels",
    "torch.cat": "cache copies (torch.cat)",
}


class Window:
    """Profiles the decode steps skip+1 .. skip+steps: `tick(done)` is called as each token arrives."""

    def __init__(self, skip: int, steps: int) -> None:
        self.skip, self.steps = skip, steps
        self.profile = cProfile.Profile()
        self.begin = self.end = 0.0

    def tick(self, done: int) -> None:
        if done == self.skip:
            self.begin = time.perf_counter()
            self.profile.enable()
        elif done == self.skip + self.steps:
            self.profile.disable()
            self.end = time.perf_counter()

    def parts(self) -> dict[str, float]:
        """Milliseconds per step: wall time, then each part of PARTS and the rest."""
        stats = pstats.Stats(self.profile)
        raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
        parts = dict.fromkeys(PARTS.values(), 0.0)
        for (_, _, name), (_, _, own, _, _) in raw.items():
            for key, part in PARTS.items():
                if key in name:
                    parts[part] += own
        parts["everything else"] = stats.total_tt - sum(parts.values())  # type: ignore[attr-defined]
        out = {"wall time per step": (self.end - self.begin) / self.steps * 1e3}
        return out | {part: seconds / self.steps * 1e3 for part, seconds in parts.items()}


def run_transformers(model: Any, prompt: torch.Tensor, window: Window, new: int) -> None:
    class Streamer:  # the first put is the prompt
        calls = 0

        def put(self, value: torch.Tensor) -> None:
            if self.calls:
                window.tick(self.calls)
            self.calls += 1

        def end(self) -> None:
            pass

    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.pad_token_id = [model.config.vocab_size], 0  # no end token: every step runs
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                   streamer=Streamer(), generation_config=config)  # fmt: skip


def run_kvsqueeze(model: Any, tok: Any, ids: list[int], question: str, window: Window, new: int) -> None:
    context = torch.tensor([ids])
    cache, _, _, _ = prefill(model, context, torch.ones_like(context), None)
    for deltas in stream(model, tok, cache, [0], [question], Sampling(max_new_tokens=new, ignore_eos=True)):
        window.tick(deltas[-1].steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="context length")
    parser.add_argument("--skip", type=int, default=4, help="decode steps before the profiled ones")
    parser.add_argument("--steps", type=int, default=30, help="decode steps profiled")
    parser.add_argument("--name", default="decode_profile", help="results file name (in benchmarks/results, .md)")
    args = parser.parse_args()
    model, tok = kvs.load_model()
    unit = passkey_unit(model, tok, args.tokens)
    new = args.skip + args.steps + 1
    results = {}
    for path in PATHS:
        window = Window(args.skip, args.steps)
        if path == "transformers":
            prompt = torch.tensor([unit.context_ids + encode(tok, unit.question_texts[0])])
            run_transformers(model, prompt, window, new)
        else:
            with products_only() if path.endswith("products") else contextlib.nullcontext():
                run_kvsqueeze(model, tok, unit.context_ids, unit.question_texts[0], window, new)
        results[path] = window.parts()
        print(path, {k: round(v, 1) for k, v in results[path].items()}, flush=True)
    given = given_options(parser, args)
    lines = [
        "# Where a decode step's time goes: transformers vs kvsqueeze, uncompressed",
        "",
        f"{len(unit.context_ids)}-token passkey context, the embedded model, float32; ms per step over {args.steps} "
        f"decode steps under cProfile ({machine()}). Command: `.venv/bin/python benchmarks/decode_profile.py{given}`.",
        "",
        "| part | " + " | ".join(PATHS) + " |",
        "|---" * (len(PATHS) + 1) + "|",
    ]
    for part in results["transformers"]:
        lines.append(f"| {part} | " + " | ".join(f"{results[path][part]:.1f}" for path in PATHS) + " |")
    text = "\n".join(lines) + "\n"
    out = RESULTS / f"{args.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
