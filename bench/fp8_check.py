#!/usr/bin/env python3
"""FP8 base (issue 21) on the GPU: correctness of finetune/fp8.py against references, then speed of the Llama-3.1-8B
projection shapes at 16k tokens (8 x 2048), FP8 against bf16.

    python3 bench/fp8_check.py --out $OUT          # writes fp8_check.json, prints a table last

Checks (fresh random inputs each, output buffers poisoned first where the kernel writes them):
  quant     the Triton row quantiser against PyTorch ops (one and three segments, column scales, an odd row count)
  linear    FP8 forward / dX against (a) the same math in float32 on the dequantised FP8 operands (must agree to
            accumulation rounding) and (b) bf16 on the original weights (the quantisation error itself)
  lora      one decoder layer's fused LoRA Functions, FP8 against fast_lora's bf16: outputs and every gradient
Timing: triton.testing.do_bench medians; TFLOP/s = 2 M N K / time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from finetune import fp8  # noqa: E402

H, I, KV, TOK = 4096, 14336, 1024, 16384
SHAPES = {"q": (H, H), "k": (KV, H), "v": (KV, H), "o": (H, H), "gate": (I, H), "up": (I, H), "down": (H, I)}


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_quant(res: dict) -> None:
    out = {}
    for m, widths, colscale in ((4096, [4096], False), (4417, [4096], True), (333, [14336], False),
                                (1000, [4096, 1024, 1024], True), (257, [14336, 14336], True)):
        segs = [torch.randn(m, w, device="cuda", dtype=torch.bfloat16) * (1 + 10 * torch.rand(m, 1, device="cuda",
                dtype=torch.bfloat16)) for w in widths]
        cs = torch.rand(sum(widths), device="cuda") + 0.5 if colscale else None
        q, s = fp8.quantize_rows(segs, cs)
        qr, sr = fp8.quantize_rows_reference(torch.cat(segs, 1), cs)
        deq = q[:m].float() * s[:m]
        deq_ref = qr.float() * sr
        x = torch.cat(segs, 1).float() * (cs[None] if cs is not None else 1)
        out[f"m{m}_w{'+'.join(map(str, widths))}{'_cs' if colscale else ''}"] = {
            "scale_rel": rel(s[:m], sr), "deq_vs_ref_rel": rel(deq, deq_ref), "deq_vs_x_rel": rel(deq, x),
            "pad_rows_zero": bool((q[m:].float() == 0).all()) if q.shape[0] > m else None}
    res["quant"] = out


def check_linear(res: dict) -> None:
    out = {}
    for name in ("q", "o", "down", "gate"):
        n, k = SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        lin = fp8.FP8Linear(*fp8.quantize_weight(w))
        fp8.meta(lin.weight).t = lin.weight.t().contiguous()
        x = torch.randn(2, 2001, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = lin(x)
        g = torch.randn_like(y)
        y.backward(g)
        wd = fp8.dequantize_weight(lin.weight, fp8.meta(lin.weight).scale)       # float32
        xq, sx = fp8.quantize_rows_reference(x.detach().reshape(-1, k))
        y_exact = (xq.float() * sx) @ wd.t()                                      # same quantised operands, fp32
        gq, sg = fp8.quantize_rows_reference(g.reshape(-1, n), fp8.meta(lin.weight).scale)
        dx_exact = (gq.float() * sg) @ lin.weight.float()
        y_bf = x.detach().reshape(-1, k) @ w.t()
        dx_bf = g.reshape(-1, n) @ w
        out[name] = {"fast_accum_dx": True, "fwd_vs_exact": rel(y.reshape(-1, n), y_exact), "dx_vs_exact": rel(x.grad.reshape(-1, k), dx_exact),
                     "fwd_vs_bf16": rel(y.reshape(-1, n), y_bf), "dx_vs_bf16": rel(x.grad.reshape(-1, k), dx_bf)}
    res["linear"] = out


def check_lora_layer(res: dict) -> None:
    """One Llama-8B layer's fused LoRA Functions: FP8 vs fast_lora bf16 at 2 x 2048 tokens."""
    from finetune import fast_lora

    try:
        from unsloth.kernels.swiglu import swiglu_DWf_DW_dfg_kernel as bwd, swiglu_fg_kernel as fwd
    except Exception:  # noqa: BLE001 - without unsloth: the same math in PyTorch
        def fwd(e, g):
            return torch.nn.functional.silu(e.float()).to(e.dtype) * g

        def bwd(DW, e, g):
            ef = e.float()
            se = torch.sigmoid(ef)
            f = ef * se
            h = (f * g.float()).to(DW.dtype)
            df = (DW.float() * f).to(DW.dtype)
            de = (DW.float() * g.float() * se * (1 + ef * (1 - se))).to(DW.dtype)
            DW.copy_(h), e.copy_(df), g.copy_(de)
            return DW, e, g
    torch.manual_seed(1)
    r, S = 16, 2.0
    bf = torch.bfloat16
    mk = lambda *s, sc=0.02: (torch.randn(*s, device="cuda", dtype=bf) * sc)
    Ws = {n: mk(*SHAPES[n]) for n in SHAPES}
    As = {n: mk(r, SHAPES[n][1], sc=0.05).requires_grad_() for n in SHAPES}
    Bs = {n: mk(SHAPES[n][0], r, sc=0.05).requires_grad_() for n in SHAPES}
    # FP8 weights built the way quantize_lora_bases builds them (groups q/k/v and gate/up)
    W8 = {}
    for n in SHAPES:
        lin = fp8.FP8Linear(*fp8.quantize_weight(Ws[n]))
        W8[n] = lin.weight
    for group in (("q", "k", "v"), ("gate", "up")):
        t = torch.cat([W8[n] for n in group], 0).t().contiguous()
        cs = torch.cat([fp8.meta(W8[n]).scale for n in group])
        for n in group:
            fp8.meta(W8[n]).group_t, fp8.meta(W8[n]).group_scale = t, cs
    for n in ("o", "down"):
        fp8.meta(W8[n]).t = W8[n].t().contiguous()
    out = {}
    X = mk(2, 2048, H, sc=1.0)

    def run(impl_qkv, impl_mlp, impl_w, weights):
        grads = {}
        x1 = X.clone().requires_grad_()
        q, k, v = impl_qkv.apply(x1, weights["q"], None, As["q"], Bs["q"], S, weights["k"], None, As["k"], Bs["k"], S,
                                 weights["v"], None, As["v"], Bs["v"], S, False)
        o = impl_w.apply(q.contiguous(), weights["o"], None, As["o"], Bs["o"], S)
        x2 = X.clone().requires_grad_()
        mlp = impl_mlp.apply(x2, weights["gate"], None, As["gate"], Bs["gate"], S, weights["up"], None, As["up"],
                             Bs["up"], S, weights["down"], None, As["down"], Bs["down"], S, fwd, bwd, False)
        loss = (o.float() * 1e-2).square().sum() + (k.float() + v.float()).sum() * 1e-3 + (mlp.float() * 1e-2).square().sum()
        for p in list(As.values()) + list(Bs.values()):
            p.grad = None
        loss.backward()
        grads = {f"dA_{n}": As[n].grad.clone() for n in As}
        grads.update({f"dB_{n}": Bs[n].grad.clone() for n in Bs})
        grads["dX_attn"], grads["dX_mlp"] = x1.grad.clone(), x2.grad.clone()
        return {"q": q.detach(), "o": o.detach(), "mlp": mlp.detach()}, grads

    ref_out, ref_g = run(fast_lora.LoRAQKV, fast_lora.LoRAMLP, fast_lora.LoRAW, Ws)
    f8_out, f8_g = run(fp8.FP8LoRAQKV, fp8.FP8LoRAMLP, fp8.FP8LoRAW, W8)
    out["outputs_rel"] = {k: rel(f8_out[k], ref_out[k]) for k in ref_out}
    out["grads_rel"] = {k: rel(f8_g[k], ref_g[k]) for k in ref_g}
    # time one layer forward + backward, both versions
    for label, impls, w in (("bf16", (fast_lora.LoRAQKV, fast_lora.LoRAMLP, fast_lora.LoRAW), Ws),
                            ("fp8", (fp8.FP8LoRAQKV, fp8.FP8LoRAMLP, fp8.FP8LoRAW), W8)):
        out[f"layer_fwd_bwd_ms_{label}"] = triton.testing.do_bench(lambda: run(*impls, w), warmup=50, rep=300,
                                                                   return_mode="median")
    res["lora_layer"] = out


def bench_shapes(res: dict) -> None:
    """Per projection at 16k tokens: bf16 GEMM; FP8 GEMM alone; FP8 with its activation quantisation; dX likewise."""
    rows = {}
    tot = {"bf16": 0.0, "fp8": 0.0}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w8, s = fp8.quantize_weight(w)
        wt8 = w8.t().contiguous()
        x = torch.randn(TOK, k, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(TOK, n, device="cuda", dtype=torch.bfloat16)
        xq, sx = fp8.quantize_rows([x])
        dq, sd = fp8.quantize_rows([dy], s)
        ones = torch.ones(1, k, device="cuda")
        srow = s.view(1, -1)
        f = 2 * TOK * n * k
        med = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        t = {
            "fwd_bf16": med(lambda: x @ w.t()),
            "fwd_fp8_gemm": med(lambda: fp8.scaled_mm(xq, sx, w8, srow, TOK)),
            "fwd_fp8_gemm_slowacc": med(lambda: fp8.scaled_mm(xq, sx, w8, srow, TOK, fast_accum=False)),
            "fwd_quant": med(lambda: fp8.quantize_rows([x])),
            "dx_bf16": med(lambda: dy @ w),
            "dx_fp8_gemm": med(lambda: fp8.scaled_mm(dq, sd, wt8, ones, TOK, fast_accum=False)),
            "dx_fp8_gemm_fastacc": med(lambda: fp8.scaled_mm(dq, sd, wt8, ones, TOK, fast_accum=True)),
            "dx_quant": med(lambda: fp8.quantize_rows([dy], s)),
            "transpose_w": med(lambda: w8.t().contiguous()),
        }
        t["fwd_fp8_total"] = t["fwd_fp8_gemm"] + t["fwd_quant"]
        t["dx_fp8_total"] = t["dx_fp8_gemm"] + t["dx_quant"]
        row = {kk: round(v, 4) for kk, v in t.items()}
        for kk in ("fwd_bf16", "fwd_fp8_gemm", "fwd_fp8_total", "dx_bf16", "dx_fp8_gemm", "dx_fp8_total"):
            row[kk + "_tflops"] = round(f / (t[kk] * 1e-3) / 1e12, 1)
        rows[name] = row
        tot["bf16"] += t["fwd_bf16"] + t["dx_bf16"]
        tot["fp8"] += t["fwd_fp8_total"] + t["dx_fp8_total"]
    res["shapes_16k"] = rows
    # the grouped dX quantisation (q/k/v: 3 segments, gate/up: 2), one pass (registers) against two (max, then cast)
    qab = {}
    for widths in ([H, KV, KV], [I, I]):
        segs = [torch.randn(TOK, w, device="cuda", dtype=torch.bfloat16) for w in widths]
        cs = torch.rand(sum(widths), device="cuda") + 0.5
        n = sum(widths)
        q = torch.empty((TOK, n), dtype=fp8.E4M3, device="cuda")
        sx = torch.empty((TOK, 1), dtype=torch.float32, device="cuda")
        S3 = segs + [segs[0]] * (3 - len(segs))
        W3 = widths + [0] * (3 - len(widths))

        def two_pass():
            fp8._triton_kernel()[(TOK,)](S3[0], S3[1], S3[2], S3[0].stride(0), S3[1].stride(0), S3[2].stride(0), W3[0],
                                         W3[1], W3[2], n, cs, q, q.stride(0), sx, TOK, NSEG=len(segs), HAS_C=True,
                                         ONE_PASS=False, BLOCK=2048, B0=16, B1=16, B2=16, num_warps=8)
        key = "+".join(map(str, widths))
        qab[key] = {"one_pass_ms": triton.testing.do_bench(lambda: fp8.quantize_rows(segs, cs), warmup=25, rep=200,
                                                           return_mode="median"),
                    "two_pass_ms": triton.testing.do_bench(two_pass, warmup=25, rep=200, return_mode="median"),
                    "bytes_min_gb": TOK * n * 3 / 1e9}
    res["grouped_quant_16k"] = qab
    res["layer_projection_ms"] = {k: round(v, 3) for k, v in tot.items()}
    # bandwidth and matrix-rate ceilings of this card
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    tc = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=100, return_mode="median")
    res["copy_TBps"] = round(2 * 2**30 / (tc * 1e-3) / 1e12, 2)
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tm = triton.testing.do_bench(lambda: m @ m, warmup=10, rep=100, return_mode="median")
    res["bf16_8k_tflops"] = round(2 * 8192**3 / (tm * 1e-3) / 1e12, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    a = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    path = a.out / "fp8_check.json"
    for step in (check_quant, check_linear, check_lora_layer, bench_shapes):
        try:
            step(res)
        except Exception as e:  # noqa: BLE001 - record and continue with the next part
            import traceback

            traceback.print_exc()
            res[step.__name__ + "_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        path.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "shapes_16k"}, indent=1))
    print(f"{'proj':<5} {'fwd bf16':>9} {'fwd fp8':>8} {'+quant':>7} {'dx bf16':>8} {'dx fp8':>7} {'+quant':>7}  TFLOP/s")
    for n, r in res.get("shapes_16k", {}).items():
        print(f"{n:<5} {r['fwd_bf16_tflops']:>9} {r['fwd_fp8_gemm_tflops']:>8} {r['fwd_fp8_total_tflops']:>7} "
              f"{r['dx_bf16_tflops']:>8} {r['dx_fp8_gemm_tflops']:>7} {r['dx_fp8_total_tflops']:>7}")


if __name__ == "__main__":
    main()
