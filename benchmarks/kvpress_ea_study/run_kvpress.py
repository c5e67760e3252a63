"""Run kvpress 0.5.5 presses on kvsqueeze's exact passkey prompts. Usage:
run_kvpress.py OUT.jsonl DTYPE MODE N VARIANT[,VARIANT..] RATIO[,RATIO..]
MODE: ids (kvsqueeze's context/question ids) | pipe (kvpress pipeline on the raw context + question text)
"""

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from kvpress import ExpectedAttentionPress, KnormPress
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

torch.set_num_threads(1)
out_path, dtype, mode, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
variants, ratios = sys.argv[5].split(","), [float(r) for r in sys.argv[6].split(",")]
d = os.path.expanduser("~/.cache/kvsqueeze/models/smollm2-135m-instruct-98362432")
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()
pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
samples = json.load(open("/tmp/kvstudy/prompts.json"))[:n]


class EAfp32(ExpectedAttentionPress):
    """Same score, computed in fp32 (cast keys/values/hidden to float, module weights used in float via autocast-free matmul)."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        k = keys.float()[:, :, self.n_sink :]
        v = values.float()[:, :, self.n_sink :]
        q_len = hidden_states.shape[1]
        h = hidden_states[:, self.n_sink :].float()
        W = module.q_proj.weight.float()
        q = (h @ W.T).view(h.shape[0], h.shape[1], -1, module.head_dim).transpose(1, 2)
        mu = q.mean(dim=2, keepdim=True)
        c = q - mu
        cov = torch.einsum("bnsi,bnsj->bnij", c, c) / h.shape[1]
        mu = mu.squeeze(2)
        # averaged rope in fp32
        pos = torch.arange(q_len, q_len + self.n_future_positions).unsqueeze(0)
        cos, sin = module.rotary_emb(mu, pos)
        cos, sin = cos[0].float(), sin[0].float()
        D = module.head_dim
        Id = torch.eye(D)
        P = torch.zeros(D, D)
        P[D // 2 :, : D // 2], P[: D // 2, D // 2 :] = torch.eye(D // 2), -torch.eye(D // 2)
        R = (cos.unsqueeze(1) * Id + sin.unsqueeze(1) * P).mean(0)
        mu = mu @ R.T
        cov = R @ cov @ R.T
        b, hk, t, _ = k.shape
        g = module.config.num_attention_heads // hk
        kr = k.repeat_interleave(g, dim=1).transpose(2, 3)
        s = torch.matmul(mu.unsqueeze(2), kr).squeeze(2) / math.sqrt(D)
        s = s + torch.einsum("bhin,bhij,bhjn->bhn", kr, cov, kr) / D / 2
        s = F.softmax(s, dim=-1).view(b, hk, g, t).mean(2)
        s = (s + self.epsilon) * v.norm(dim=-1)
        return F.pad(s, (self.n_sink, 0), value=s.max().item() + 1).to(keys.dtype)


def make(variant, ratio):
    if variant == "none":
        return None
    if variant == "knorm":
        return KnormPress(ratio)
    if variant == "ea":  # kvpress defaults (epsilon 0)
        return ExpectedAttentionPress(ratio)
    if variant == "ea_eps":  # kvsqueeze's eps
        return ExpectedAttentionPress(ratio, epsilon=1e-2)
    if variant.startswith("ea_eps="):
        return ExpectedAttentionPress(ratio, epsilon=float(variant.split("=")[1]))
    if variant == "ea_novnorm":
        return ExpectedAttentionPress(ratio, use_vnorm=False)
    if variant == "ea_nocov":
        return ExpectedAttentionPress(ratio, use_covariance=False)
    if variant == "ea_fp32":
        return EAfp32(ratio)
    if variant == "ea_fp32_eps":
        return EAfp32(ratio, epsilon=1e-2)
    raise ValueError(variant)


with open(out_path, "a") as f:
    for variant in variants:
        for ratio in ratios if variant != "none" else [0.0]:
            correct = 0
            outs = []
            t0 = time.time()
            for s in samples:
                press = make(variant, ratio)
                if mode == "ids":
                    ctx = torch.tensor([s["context_ids"]])
                    q = torch.tensor([s["question_ids"]])
                    cache = DynamicCache()
                    with torch.no_grad():
                        with press(model) if press is not None else torch.no_grad():
                            model.model(input_ids=ctx, past_key_values=cache)
                        ans = pipe.generate_answer(q, cache, ctx.shape[1], s["max_new_tokens"])
                else:
                    ans = pipe(
                        s["context"],
                        question=s["question"],
                        answer_prefix=" " + s["answer_prefix"] if False else s["answer_prefix"],
                        press=press,
                        max_new_tokens=s["max_new_tokens"],
                    )["answer"]
                ok = any(a in ans for a in s["answers"])
                correct += ok
                outs.append(ans)
            rec = dict(
                mode=mode,
                dtype=dtype,
                variant=variant,
                ratio=ratio,
                correct=correct,
                n=len(samples),
                secs=round(time.time() - t0),
                outs=outs,
            )
            print(json.dumps({k: v for k, v in rec.items() if k != "outs"}), outs[:3], flush=True)
            f.write(json.dumps(rec) + "\n")
