#!/usr/bin/env python3
"""Issue 19: export a merged model (default: the bundled SmolLM2-135M-Instruct as it is) to every GGUF format and
run each file in llama.cpp beside the merged model, as the export stage does; print the per-file table.

    .venv/bin/python bench/gguf_check.py [--merged <run>/lora_merged] [--questions 10] [--formats f16,q8_0,q5_k_m,q4_k_m]

Without --merged the questions are the first N retention probes (general knowledge); with a run's merged folder,
that run's eval split. The files go to a temporary folder and are deleted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from finetune.config import RunConfig
    from finetune.embedded import materialize
    from finetune.export import export
    from finetune.paths import RunPaths

    ap = argparse.ArgumentParser()
    ap.add_argument("--merged", default="")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--formats", default="f16,q8_0,q5_k_m,q4_k_m")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args()
    merged = Path(a.merged) if a.merged else materialize(RunConfig().cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(base_save_path=str(Path(tmp) / "final_model"), export_gguf=a.formats, num_epochs=3,
                        export_check_questions=a.questions, eval_max_new_tokens=a.max_new_tokens,
                        retention_set=str(ROOT / "data/retention/probes.json"))
        paths = RunPaths.from_config(cfg)
        paths.merged.mkdir(parents=True)
        for f in merged.iterdir():
            (paths.merged / f.name).symlink_to(f.resolve())
        run_eval = merged.parent / "data" / "eval.jsonl"
        if a.merged and run_eval.is_file():
            paths.eval_file.parent.mkdir(parents=True)
            paths.eval_file.symlink_to(run_eval.resolve())
        t0 = time.time()
        out = export(cfg, paths)
        manifest = json.loads((out / "export.json").read_text())
    check = manifest["llama_cpp_check"]
    print(f"\n{merged}: {check['questions']} {check['source']} questions, {a.max_new_tokens} new tokens, "
          f"export {time.time() - t0:.0f} s; {manifest['llama_cpp']}")
    print("| file | MB | identical | contains (merged) | EOS (merged) | max flip nats | max logprob diff | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt, r in check["files"].items():
        mb = manifest["formats"][fmt]["bytes"] / 1e6
        print(f"| {fmt} | {mb:.0f} | {r['agree']}/{r['questions']} | {r['contains']} ({r['contains_hf']}) | "
              f"{r['eos']} ({r['eos_hf']}) | {r['max_flip_nats']:.2f} | {r['max_logprob_diff']:.3f} | {r['verdict']} |")
    print(f"Modelfile: FROM {manifest['modelfile_from']}; {manifest['modelfile_check']['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
