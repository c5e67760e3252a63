import json
import os

import torch
from kvpress import ExpectedAttentionPress
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

torch.set_num_threads(1)
d = os.path.expanduser("~/.cache/kvsqueeze/models/smollm2-135m-instruct-98362432")
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
s = json.load(open("/tmp/kvstudy/prompts.json"))[0]
ids = s["context_ids"]
key = s["answers"][0]
pieces = [tok.decode([i]) for i in ids]
# token positions of the needle's key digits
digit_pos = [i for i, p in enumerate(pieces) if p.strip() and p.strip().isdigit() and p.strip() in key]
print("T", len(ids), "digit positions", digit_pos, [pieces[i] for i in digit_pos])
rows = []


class Probe(ExpectedAttentionPress):
    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        T = keys.shape[2]
        res = {"layer": module.layer_idx}
        for eps in (0.0, 1e-2, 1e6):
            self.epsilon = eps
            sc = self.score(module, hidden_states, keys, values, attentions, kwargs)  # (1,H,T)
            for r in (0.5, 0.75):
                n_kept = int(T * (1 - r))
                kept = sc.topk(n_kept, dim=-1).indices[0]  # (H, n)
                res[f"eps{eps}_r{r}"] = sum(
                    int(torch.isin(torch.tensor(digit_pos), kept[h]).sum()) for h in range(kept.shape[0])
                )
        self.epsilon = 0.0
        # softmax size: fraction of (non-sink) keys with expected attention > 1e-2
        self.use_vnorm = False
        a = self.score(module, hidden_states, keys, values, attentions, kwargs)[0, :, self.n_sink :]
        self.use_vnorm = True
        res["frac_a_gt_1e-2"] = round(float((a > 1e-2).float().mean()), 4)
        res["max_a"] = round(float(a.max()), 3)
        res["a_on_digits_mean"] = float(a[:, [p - self.n_sink for p in digit_pos]].mean())
        rows.append(res)
        return keys, values


with torch.no_grad(), Probe(0.5)(model):
    model.model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache())
nd = len(digit_pos) * 3
print("kept digit-token slots out of", nd, "per layer (3 kv heads x digit tokens)")
for r in rows:
    print(r)
tot = {k: sum(r[k] for r in rows) for k in rows[0] if k.startswith("eps")}
print("totals over 30 layers (max", nd * 30, "):", tot)
