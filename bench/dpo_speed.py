#!/usr/bin/env python3
"""DPO speed on a GPU (issue 20): this pipeline's preference trainer on the Unsloth backend vs plain TRL + PEFT
(the HF backend: transformers + peft + bitsandbytes, TRL's DPOTrainer), on the bench's random Llama-3.1-8B.

    python3 bench/dpo_speed.py all --model /tmp/llama8b --tokenizer DIR --out $OUT --steps 8
    python3 bench/dpo_speed.py arm unsloth --model /tmp/llama8b --json x.json --steps 8

Each arm runs in its own process (Unsloth patches transformers, trl and peft on import). Both arms: QLoRA NF4,
LoRA r=16 alpha=32 on all 7 projections, the same pairs (random text, seed 42), 4 pairs per micro-batch, gradient
checkpointing on, beta 0.1, reference = the base with the adapter off. Tokens/s = the non-pad tokens the policy
reads (chosen + rejected sequences) over steps 4..N / their wall time, the GPU synchronised at every step end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

WARMUP = 3
PAIRS_PER_STEP = 4
# name -> (backend, extra settings). unsloth_kern: Unsloth's own LoRA kernels instead of fast_lora, to separate
# a failure of our kernel router under DPO (adapter switched off for the reference pass) from one of Unsloth's patch.
ARMS = {"unsloth": ("unsloth", {}), "hf": ("hf", {}), "unsloth_kern": ("unsloth", {"LORA_KERNELS": "unsloth"})}


def write_pairs(tok, path: Path, n: int, seed: int = 42) -> None:
    """Random-token text: prompts of 128-384 tokens, answers of 64-512 (lengths drawn per pair)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lo, hi = 1000, min(len(tok), 40000)
    text = lambda k: tok.decode(rng.integers(lo, hi, size=int(k)).tolist(), skip_special_tokens=True)  # noqa: E731
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": text(rng.integers(128, 384)), "chosen": text(rng.integers(64, 512)),
                                 "rejected": text(rng.integers(64, 512))}) + "\n")


def arm(name: str, model_dir: Path, json_path: Path, steps: int) -> None:
    from finetune import model as model_lib
    from finetune.config import RunConfig

    result: dict = {"arm": name}
    dump = lambda: json_path.write_text(json.dumps(result, indent=1))  # noqa: E731
    work = Path(f"/tmp/dpo_bench_{name}")
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pairs.jsonl"
    environ = {"BASE_MODEL_NAME": str(model_dir), "DATA_PATH": str(data), "TRAINING_OBJECTIVE": "dpo",
               "BACKEND": ARMS[name][0], "USE_QLORA": "1", "BATCH_SIZE": str(PAIRS_PER_STEP), "GRAD_ACCUM": "1",
               "GRADIENT_CHECKPOINTING": "on", "MAX_SEQ_LENGTH": "1024", "EVAL_FRACTION": "0", "REPORT_TO": "none",
               "RETENTION_SET": "none", "SAVE_STEPS": "100000", "BASE_SAVE_PATH": str(work), "OVERWRITE": "1",
               "CHECKPOINT_PATH": str(work / "ckpt"), "MAX_STEPS": str(steps), "WARMUP_RATIO": "0", "OPTIM": "adamw_8bit",
               **ARMS[name][1]}
    cfg = RunConfig.from_env(environ, env_file=None)
    backend = model_lib.choose_backend(cfg)  # imports unsloth first on that arm
    import torch
    from transformers import TrainerCallback, set_seed

    from finetune import plan as plan_lib, preference
    from finetune.data import preference as pdata
    from finetune.paths import RunPaths

    result.update(backend=backend.name, why=backend.why, device=torch.cuda.get_device_name(0))
    tok, _ = model_lib.load_tokenizer(str(model_dir), cfg)
    write_pairs(tok, data, PAIRS_PER_STEP * steps + 8)
    paths = RunPaths.from_config(cfg)
    stats = pdata.prepare(cfg, paths, tok)
    result["data"] = {k: stats[k] for k in ("kept", "rejected", "truncated", "tokens")}
    rows = [json.loads(l) for l in open(paths.train_file, encoding="utf-8")]
    ds, lengths = preference.to_dataset(rows, tok)
    base = model_lib.resolve_base(cfg)
    p = preference.adjust_plan(plan_lib.plan(cfg, backend, len(rows), lengths=lengths, shape=model_lib.model_shape(base),
                                             gpu_memory=backend.gpu_memory()), cfg)
    result["plan"] = {"micro_batch": p.micro_batch, "grad_accum": p.grad_accum, "grad_ckpt": p.grad_ckpt,
                      "optim": p.optim, "lora_kernels": p.lora_kernels}
    set_seed(cfg.seed)
    t0 = time.time()
    model = model_lib.load_for_training(cfg, base, tok, backend, p)
    result["load_s"] = round(time.time() - t0, 1)
    trainer = preference.build_trainer(cfg, paths, model, tok, p, ds, None)
    marks: list[tuple[float, int]] = []

    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            marks.append((time.perf_counter(), trainer._total_train_tokens))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer.add_callback(Clock())
    dump()
    trainer.train()
    (t_a, n_a), (t_b, n_b) = marks[WARMUP - 1], marks[-1]
    result.update(steps=len(marks), tokens_per_s=round((n_b - n_a) / (t_b - t_a), 1),
                  s_per_step=round((t_b - t_a) / (len(marks) - WARMUP), 3), first_losses=losses[:3],
                  peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
    dump()
    print(json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["all", "arm"])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--arms", default="unsloth,hf")
    ap.add_argument("--arm-timeout", type=int, default=240)
    a = ap.parse_args()
    if a.what == "arm":
        return arm(a.name, a.model, a.json, a.steps)
    if not (a.model / "config.json").is_file():
        from gpu_speed import build

        build(a.model, a.tokenizer)
    a.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in a.arms.split(","):
        js = a.out / f"dpo_{name}.json"
        cmd = [sys.executable, __file__, "arm", name, "--model", str(a.model), "--json", str(js), "--steps", str(a.steps)]
        log = a.out / f"dpo_{name}.log"  # the arm's whole output: a failure's trace must come back
        try:
            with open(log, "w") as fh:
                rc = subprocess.run(cmd, timeout=a.arm_timeout, stdout=fh, stderr=subprocess.STDOUT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        summary[name] = {**(json.loads(js.read_text()) if js.is_file() else {}), "rc": rc}
        if rc != 0:
            summary[name]["log_tail"] = log.read_text(errors="replace")[-3000:]
    for n in ARMS:
        if n != "hf" and "tokens_per_s" in summary.get(n, {}) and "tokens_per_s" in summary.get("hf", {}):
            summary[f"{n}_over_hf"] = round(summary[n]["tokens_per_s"] / summary["hf"]["tokens_per_s"], 3)
    (a.out / "dpo_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    main()
