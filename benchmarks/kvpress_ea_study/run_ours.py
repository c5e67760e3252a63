"""kvsqueeze side on the same dumped prompts. run_ours.py OUT.jsonl N SPEC;SPEC.. RATIOS  (SPEC = name[:k=v,k=v])"""

import json
import sys
import time

import torch

import kvsqueeze as kvs
from kvsqueeze.pipeline import generate_encoded

torch.set_num_threads(1)
out, n, specs, ratios = (
    sys.argv[1],
    int(sys.argv[2]),
    sys.argv[3].split(";"),
    [float(r) for r in sys.argv[4].split(",")],
)
model, tok = kvs.load_model()
samples = json.load(open("/tmp/kvstudy/prompts.json"))[:n]


def parse(v):
    for f in (int, float):
        try:
            return f(v)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(v, v)


with open(out, "a") as f:
    for spec in specs:
        name, _, opts = spec.partition(":")
        options = {k: parse(v) for k, v in (o.split("=") for o in opts.split(",") if o)}
        for r in ratios:
            t0 = time.time()
            correct = 0
            outs = []
            for s in samples:
                m = kvs.get_method(name, ratio=r, **options)
                o = generate_encoded(model, tok, [s["context_ids"]], [s["question_text"]], [0], m, s["max_new_tokens"])
                a = o.answers[0]
                outs.append(a)
                correct += any(x in a for x in s["answers"])
            rec = dict(
                side="kvsqueeze",
                spec=spec,
                ratio=r,
                correct=correct,
                n=len(samples),
                secs=round(time.time() - t0),
                outs=outs,
            )
            print(json.dumps({k: v for k, v in rec.items() if k != "outs"}), outs[:3], flush=True)
            f.write(json.dumps(rec) + "\n")
