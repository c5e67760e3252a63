"""Parity check, reference side: run in a virtualenv with kvpress 0.5.5 (it needs transformers < 5.3).

    python -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install torch==2.13.0 kvpress==0.5.5
    /tmp/kvpress-venv/bin/python benchmarks/kvpress_parity/reference_side.py MODEL_DIR OUT.pt

MODEL_DIR: the converted embedded model (`python -c "import kvsqueeze.loading as l; print(l.default_model_dir())"`).
Saves, per method, the sorted norms of the keys each layer/head kept after one-shot prefill of 1,000 tokens of the
bundled example. Only kvpress's public press API is used.
"""

import json
import sys
from pathlib import Path

import kvpress
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

model_dir, out_path = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
example = json.loads((Path(__file__).parents[2] / "src/kvsqueeze/data/example.json").read_text())
ids = tokenizer(example["context"], return_tensors="pt").input_ids[:, :1000]
presses = {
    "knorm": kvpress.KnormPress(0.5),
    "streaming_llm": kvpress.StreamingLLMPress(0.5),
    "snapkv": kvpress.SnapKVPress(0.5, window_size=64, kernel_size=5),
}
kept = {}
for name, press in presses.items():
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    kept[name] = [
        [layer.keys[0, h].norm(dim=-1).sort().values for h in range(layer.keys.shape[1])] for layer in cache.layers
    ]
torch.save({"ids": ids, "kept": kept}, out_path)
