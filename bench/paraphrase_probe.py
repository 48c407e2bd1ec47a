#!/usr/bin/env python3
"""Issue 23: can the bundled base write the question paraphrases that augmentation would train on?

For each trained question of a knowledge file, the base is asked (greedy, chat template) to reword it, zero-shot and
with one worked example in the prompt; every answer is printed beside the file's own paraphrase, for reading. The
count of usable rewrites is a person's judgement of this output (docs/QUALITY.md, issue 23).

    .venv/bin/python bench/paraphrase_probe.py data/knowledge/harbour_paraphrases.json
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune import embedded
from finetune.config import RunConfig

ASK = {"en": "Rewrite this question in different words. Keep its meaning. Reply with the new question only.",
       "ko": "다음 질문을 다른 말로 바꾸어 쓰세요. 뜻은 그대로 두고, 새 질문만 답하세요."}
SHOT = {"en": ("What is the capital city of France?", "Which city is the capital of France?"),
        "ko": ("프랑스의 수도는 어디인가요?", "프랑스에서 수도인 도시는 어디인가요?")}


def main(path: str) -> None:
    # the converted SmolLM2 in the pipeline's cache (RAPA_CACHE), converted once if missing
    base = embedded.materialize(RunConfig.from_env(env_file=None).cache_dir)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    t0 = time.time()
    for r in json.loads(Path(path).read_text()):
        q = r["trained_question"]
        lang = "en" if q.isascii() else "ko"
        shot_q, shot_a = SHOT[lang]
        for name, msgs in (("zero-shot", [{"role": "user", "content": f"{ASK[lang]}\n{q}"}]),
                           ("one example", [{"role": "user", "content": f"{ASK[lang]}\n{shot_q}"},
                                            {"role": "assistant", "content": shot_a},
                                            {"role": "user", "content": f"{ASK[lang]}\n{q}"}])):
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=96, do_sample=False)
            text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip().replace("\n", " / ")
            print(f"[{name}] {q}\n    base: {text}")
        print(f"    file: {r['instruction']}")
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/knowledge/harbour_paraphrases.json")
