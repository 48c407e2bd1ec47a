#!/usr/bin/env python3
"""What the FP8 base costs a trained model (issue 21): the bundled SmolLM2-135M-Instruct in float32 on the CPU, its
7 projections of every layer through FP8 e4m3 with row scales (finetune/fp8.round_trip_), against the original.

    .venv/bin/python bench/fp8_roundtrip_smollm2.py [N_PROBES=16]

Prints the relative L2 difference of the next-token logits over each probe prompt, the argmax agreement over all
prompt positions, the mean KL(original || FP8) per position, and how many greedy 16-token answers stay identical."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune import fp8  # noqa: E402
from finetune.embedded import materialize  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
d = materialize()
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
probes = json.load(open(Path(__file__).resolve().parents[1] / "data/retention/probes.json"))[:n]
enc = [tok.apply_chat_template([{"role": "user", "content": p["question"]}], add_generation_prompt=True,
                               return_tensors="pt", return_dict=True)["input_ids"] for p in probes]


def run():
    logits, outs = [], []
    with torch.no_grad():
        for ids in enc:
            logits.append(model(ids).logits[0].float())
            g = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
            outs.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
    return logits, outs


L0, O0 = run()
changed = fp8.round_trip_(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
L1, O1 = run()
rel = [float((a - b).norm() / a.norm()) for a, b in zip(L0, L1)]
top1 = sum(float((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(L0, L1)) / sum(a.shape[0] for a in L0)
kl = [float((p.exp() * (p - q)).sum(-1).mean()) for p, q in
      ((torch.log_softmax(a, -1), torch.log_softmax(b, -1)) for a, b in zip(L0, L1))]
print(json.dumps({"weights_round_tripped": changed, "prompts": n, "logit_rel_max": round(max(rel), 4),
                  "logit_rel_mean": round(sum(rel) / n, 4), "argmax_agreement": round(top1, 4),
                  "kl_mean": round(sum(kl) / n, 4), "greedy_identical": sum(a == b for a, b in zip(O0, O1))}))
for a, b in zip(O0, O1):
    if a != b:
        print(f"  {a!r}  ->  {b!r}")
