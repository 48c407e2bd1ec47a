"""Does a model folder answer the same in transformers 4 as in transformers 5? (docs/QUALITY.md, issue 19)

    .venv/bin/python bench/transformers4_parity.py final_model/SmolLM2-135M-Instruct/9/lora_merged

Runs the probe of tests/e2e/test_use_smollm2.py (greedy answers, chat-template ids, last-position logits) in this
interpreter and in transformers 4.57.6's own venv under the cache (built on first use), and prints the comparison.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.helpers import transformers4_python  # noqa: E402
from tests.e2e.test_use_smollm2 import QUESTIONS, probe  # noqa: E402

QS = QUESTIONS[:4] + ["1847년에 무슨 일이 있었나요?", "What is the capital of France?",
                     "Name three primary colours."]

if __name__ == "__main__":
    folder = sys.argv[1]
    new, old = probe(sys.executable, folder, QS), probe(transformers4_python(), folder, QS)
    print(f"transformers {new['version']} vs {old['version']}: rope_theta {new['rope_theta']} vs {old['rope_theta']}")
    print(f"chat-template ids equal: {old['ids'] == new['ids']}; greedy answers equal "
          f"{sum(a == b for a, b in zip(old['answers'], new['answers']))} of {len(QS)}; max |logit diff| "
          f"{max(abs(a - b) for la, lb in zip(old['logits'], new['logits']) for a, b in zip(la, lb)):.3g}")
    for a, b in zip(new["answers"], old["answers"]):
        print(f"  5: {a[:70]!r}\n  4: {b[:70]!r}")
