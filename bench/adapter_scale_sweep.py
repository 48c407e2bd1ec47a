#!/usr/bin/env python3
"""Issue 9 experiment: scale a trained adapter's update (B <- s * B, i.e. base + s * delta, as in WiSE-FT weight
interpolation) and measure learned (contains match on the training questions) and retention (general-knowledge
probes the base answered right) at each scale. No retraining: one trained adapter, several scales.

    .venv/bin/python bench/adapter_scale_sweep.py --save-path /tmp/fresh/final_model --scales 1,0.9,0.8,0.7
        [--env NUM_EPOCHS=8 ...]   (the variables of the run that trained it, so its output folder is found)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--save-path", required=True)
    ap.add_argument("--scales", default="1,0.9,0.8,0.7")
    ap.add_argument("--env", nargs="*", default=[])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from finetune import evaluate as ev
    from finetune import model as model_lib
    from finetune.config import RunConfig
    from finetune.paths import RunPaths

    env = {"BASE_SAVE_PATH": a.save_path, "REPORT_TO": "none", **dict(kv.split("=", 1) for kv in a.env)}
    env = {k: v for k, v in env.items() if k != "DATA"}
    cfg = RunConfig.from_env(env, env_file=None)
    paths = RunPaths.from_config(cfg)
    base = model_lib.resolve_base(cfg)
    tok = AutoTokenizer.from_pretrained(paths.adapters)
    qs, pr = ev.questions_from_eval(paths), ev.probes(cfg)
    _, base_probe = ev._answers("base", cfg, base, None, paths, tok, qs, pr, "cpu")
    base_ok = [ev.contains_match(p, it["answers"]) for p, it in zip(base_probe, pr)]

    model = PeftModel.from_pretrained(model_lib.load_plain(base, tok, "cpu"), str(paths.adapters)).eval()
    Bs = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    rows = []
    for s in [float(x) for x in a.scales.split(",")]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in Bs:
                    p.copy_(Bs[n] * s)
        preds, _ = ev.generate(model, tok, qs, ev.token_budget(cfg, tok, qs), "cpu", f"questions s={s}")
        probe_preds, _ = ev.generate(model, tok, pr, ev.token_budget(cfg, tok, pr), "cpu", f"probes s={s}")
        tuned_ok = [ev.contains_match(p, it["answers"]) for p, it in zip(probe_preds, pr)]
        learned = ev.score(qs, preds)
        ret = ev.retention(pr, base_ok, tuned_ok)
        row = {"scale": s, "learned": learned["contains_match"], "kept": ret["kept"], "of": ret["of"],
               "retention": ret["fraction"], "lost": ret["lost"]}
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    if a.out:
        a.out.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")


if __name__ == "__main__":
    main()
