#!/usr/bin/env python3
"""GPU check that LORA_KERNELS=fast trains every model family the way Unsloth's own kernels do (issue 5).

fast_lora routes Unsloth's fused LoRA Functions for any family Unsloth patches, with the decoder blocks left
eager: Qwen2 (q/k/v biases: those stay on Unsloth's path), Qwen3 (q/k norms), Mistral, Gemma 2 (GeGLU, its own
activation kernels passed through) besides Llama. For each family this builds a small random model of that
architecture (4 layers, hidden 1024, the SmolLM2 tokenizer of .bench_tok), then runs this pipeline's train stage
(`bench/gpu_speed.py arm`) twice, LORA_KERNELS=fast and =unsloth (Unsloth's kernels in its compiled blocks), each
in its own process on the same rows with the same seed, and reports the first losses of both and their tokens/s.

    python3 bench/families_check.py --out $OUT [--families qwen2,qwen3,mistral,gemma2] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=False)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),                      # q/k/v carry biases
    "qwen3": ("Qwen3Config", {"head_dim": 64}),        # q/k RMSNorm
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "gemma2": ("Gemma2Config", {"head_dim": 64, "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096,
                                "query_pre_attn_scalar": 64}),
}


def build(family: str, out: Path, tok: Path) -> Path:
    import torch
    import transformers

    d = out / f"tiny_{family}"
    if (d / "config.json").is_file():
        return d
    cls_name, extra = FAMILIES[family]
    tc = json.loads((tok / "config.json").read_text()) if (tok / "config.json").is_file() else {}
    ids = {k: tc[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in tc}
    cfg = getattr(transformers, cls_name)(**{**SMALL, **extra, **ids})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tok / f).is_file():
            shutil.copy(tok / f, tmp / f)
    tmp.rename(d)
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/families")))
    ap.add_argument("--families", default="qwen2,qwen3,mistral,gemma2")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--deadline", type=float, default=540)
    a = ap.parse_args()
    start = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    report: dict = {}
    log = open(a.out / "families.log", "a")
    for fam in a.families.split(","):
        model = build(fam, Path("/tmp"), ROOT / ".bench_tok")
        for arm in ("ours_fast_kernels", "ours_unsloth_kernels"):
            left = a.deadline - (time.time() - start)
            if left < 40:
                report.setdefault(fam, {})[arm] = {"skipped": f"{left:.0f}s left"}
                continue
            jp = Path(f"/tmp/fam_{fam}_{arm}.json")
            jp.unlink(missing_ok=True)
            log.write(f"\n===== {fam} {arm} =====\n")
            log.flush()
            try:
                rc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_speed.py"), "arm", arm, "--model", str(model),
                                     "--json", str(jp), "--steps", str(a.steps), "--var-steps", "0"], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=min(left - 5, 150)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            r = json.loads(jp.read_text()) if jp.is_file() else {}
            f = r.get("fixed", {})
            report.setdefault(fam, {})[arm] = {"rc": rc, "losses": f.get("losses"), "tokens_per_s": f.get("tokens_per_s"),
                                               "error": f.get("error"), "plan": r.get("plan", {}).get("micro_batch")}
            print(fam, arm, json.dumps(report[fam][arm]), flush=True)
            (a.out / "families_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
