import json
import os

from transformers import AutoTokenizer

from kvsqueeze.bench.tasks import get_task
from kvsqueeze.prompts import encode_prompt

d = os.path.expanduser("~/.cache/kvsqueeze/models/smollm2-135m-instruct-98362432")
tok = AutoTokenizer.from_pretrained(d)
out = []
for s in get_task("passkey").samples(tok, 1024, 10, 0):
    ctx_ids, qtexts = encode_prompt(tok, s.context, list(s.questions), s.answer_prefix)
    q_ids = tok(qtexts[0], add_special_tokens=False)["input_ids"]
    out.append(
        dict(
            index=s.index,
            context=s.context,
            question=s.questions[0],
            answer_prefix=s.answer_prefix,
            context_ids=ctx_ids,
            question_text=qtexts[0],
            question_ids=q_ids,
            answers=list(s.answers[0]),
            max_new_tokens=s.max_new_tokens,
        )
    )
json.dump(out, open("/tmp/kvstudy/prompts.json", "w"))
print(
    len(out),
    len(out[0]["context_ids"]),
    repr(tok.decode(out[0]["context_ids"][:40])),
    repr(tok.decode(out[0]["context_ids"][-20:])),
    repr(out[0]["question_text"]),
    out[0]["answers"],
    out[0]["max_new_tokens"],
)
