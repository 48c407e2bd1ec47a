#!/usr/bin/env python3
"""GPU check of finetune/fast_lora.py against Unsloth's own fused LoRA layers (issue 5).

One Llama-3.1-8B decoder layer's projections (hidden 4096, intermediate 14336, 8 KV heads), NF4 + double-quant
bases from bitsandbytes, LoRA r=16 alpha=32 with non-zero B, 8 x 2048 tokens of bf16 input. For QKV, MLP and O
it runs Unsloth's LoRA_QKV / LoRA_MLP / LoRA_W with its own kernels and with ours (same inputs, same cotangents)
and reports the largest difference of every output and gradient relative to its scale, and the forward+backward
time of each (CUDA events, median of 20 after 5 warm-up).

    python3 bench/fast_lora_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--tokens", type=int, default=8 * 2048)
    a = ap.parse_args()

    import unsloth  # noqa: F401  (first)
    import bitsandbytes as bnb
    import torch
    import unsloth.kernels.fast_lora as ufl
    from unsloth.kernels.swiglu import swiglu_DWf_DW_dfg_kernel, swiglu_fg_kernel

    from finetune import fast_lora

    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    H, I, KV, R, S = 4096, 14336, 1024, 16, 2.0

    def proj(out_f, in_f):
        W = (torch.randn(out_f, in_f, device=dev) * 0.02).to(bf)
        p = bnb.nn.Params4bit(W.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True).to(dev)
        A = (torch.randn(R, in_f, device=dev) * 0.02).requires_grad_()
        B = (torch.randn(out_f, R, device=dev) * 0.02).requires_grad_()
        return p, p.quant_state, A, B

    q, k, v, o = proj(H, H), proj(KV, H), proj(KV, H), proj(H, H)
    gate, up, down = proj(I, H), proj(I, H), proj(H, I)
    X0 = (torch.randn(1, a.tokens, H, device=dev) * 0.5).to(bf)
    cases = {
        "qkv": (ufl.LoRA_QKV, lambda X: (X, *q[:2], q[2], q[3], S, *k[:2], k[2], k[3], S, *v[:2], v[2], v[3], S, True),
                [q[2], q[3], k[2], k[3], v[2], v[3]]),
        "mlp": (ufl.LoRA_MLP, lambda X: (X, *gate[:2], gate[2], gate[3], S, *up[:2], up[2], up[3], S, *down[:2], down[2],
                                         down[3], S, swiglu_fg_kernel, swiglu_DWf_DW_dfg_kernel, True),
                [gate[2], gate[3], up[2], up[3], down[2], down[3]]),
        "o": (ufl.LoRA_W, lambda X: (X, *o[:2], o[2], o[3], S), [o[2], o[3]]),
    }

    def run(fn, argf, leaves, cots=None):
        X = X0.clone().requires_grad_()
        outs = fn.apply(*argf(X * 1))
        outs = outs if isinstance(outs, tuple) else (outs,)
        cots = cots or [torch.randn_like(t) for t in outs]
        grads = torch.autograd.grad(outs, [X] + leaves, cots)
        return [t.detach().float() for t in outs], [g.float() for g in grads], cots

    def timing(fn, argf, leaves, cots):
        times = []
        for i in range(25):
            X = X0.clone().requires_grad_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            outs = fn.apply(*argf(X * 1))
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.grad(outs, [X] + leaves, cots)
            e.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(s.elapsed_time(e))
        return statistics.median(times)

    report = {"tokens": a.tokens, "cases": {}}
    for name, (fn, argf, leaves) in cases.items():
        fast_lora.uninstall()
        ref_out, ref_g, cots = run(fn, argf, leaves)
        t_ref = timing(fn, argf, leaves, cots)
        fast_lora.install()
        out, g, _ = run(fn, argf, leaves, cots)
        t_ours = timing(fn, argf, leaves, cots)
        rel = lambda x, y: float((x - y).abs().max() / y.abs().max().clamp_min(1e-12))
        report["cases"][name] = {
            "unsloth_ms": round(t_ref, 3), "ours_ms": round(t_ours, 3), "speedup": round(t_ref / t_ours, 3),
            "max_rel_diff_outputs": [round(rel(x, y), 6) for x, y in zip(out, ref_out)],
            "max_rel_diff_grads (X, A, B, ...)": [round(rel(x, y), 6) for x, y in zip(g, ref_g)]}
        print(name, json.dumps(report["cases"][name]), flush=True)
    fast_lora.uninstall()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fast_lora_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
