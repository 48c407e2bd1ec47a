"""Fewer memory passes in Unsloth's fused LoRA layers.

Unsloth computes every LoRA projection as the base GEMM followed by a second GEMM that adds the low-rank term
onto the output (``out.addmm_(X @ A, B)``, which reads and writes the whole output again), and its backward
recomputes ``X @ A`` (re-reading X, or the 14336-wide MLP activation for down_proj). On an H100 QLoRA step of
an 8B model these skinny, memory-bound kernels are about 15% of the GPU time
(``bench/results/profiles/profile_ours_padded.txt``). The same math in a different order:

- the low-rank term is written first and the base GEMM accumulates onto it (cuBLAS beta=1 epilogue), in the
  forward and for dX in the backward: one full pass over each output fewer;
- ``X @ A`` of every projection is kept from the forward (N x r: 4 MB a layer for an 8B model at 16k tokens);
- projections that read the same input (q/k/v, gate/up) get their A products and their dX low-rank terms from
  one GEMM each, so X is read once instead of three (two) times.

Why eager decoder blocks: Unsloth torch.compiles every block (torch >= 2.11), and a block compile cannot trace this
router's fused Functions (it failed on every family tried). So the router steps aside while torch.compile traces,
and with LORA_KERNELS=fast finetune/model.py leaves Unsloth's blocks eager from the start, where these kernels run.
That trade (fewer memory passes, no block compile) pays off on large hidden sizes and loses on small ones, hence
LORA_KERNELS=auto's threshold on the hidden size (model.Backend.lora_kernels); LORA_KERNELS=unsloth keeps
Unsloth's own kernels and its compiled blocks. The measurements behind both, per layer and for the whole step, are
in docs/BENCHMARKS.md ("GPU speed", `bench/fast_lora_check.py` and runs 10-13).

Only the common case takes this path: no LoRA dropout, no LoRA bias, a bf16/fp16/fp32, bitsandbytes 4-bit or
finetune/fp8.py FP8 base weight (BASE_PRECISION=fp8: routed to fp8.py's Functions, same math with FP8 base GEMMs),
eager. Everything else (dropout, biases, other fp8 or int4 formats, torch.compile tracing) runs Unsloth's own code
unchanged. `install()` routes Unsloth's LoRA_QKV / LoRA_MLP / LoRA_W through here; the Function classes below are
the same math on plain tensors, which the CPU test suite checks against autograd, also traced by torch.compile
(where dX gets its own buffer: AOT autograd forbids a backward writing into a forward input).
"""

from __future__ import annotations

import torch

_FP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _dequant_plain(W, W_quant, dtype, global_buffer=False):
    # Unsloth's fast_dequantize replaces this on the GPU (install); here W is an ordinary weight.
    return W if W.dtype == dtype else W.to(dtype)


def _inplace_ok(X) -> bool:
    return True


def _in_place(asked: bool, X) -> bool:
    # A traced backward must not write into a forward input (AOT autograd rejects it), so dX gets its own buffer
    # under torch.compile; eager, dX may reuse X's when the caller allows it and X is not kept elsewhere.
    return asked and not torch.compiler.is_compiling() and _hooks["inplace_ok"](X)


_hooks = {"dequant": _dequant_plain, "inplace_ok": _inplace_ok}


def _lowrank_then_base(X2, XA, B, S, W, out_features: int, dtype):
    """S * XA @ B^T + X2 @ W^T, the low-rank term written first and the base GEMM accumulating onto it."""
    y = torch.empty((X2.shape[0], out_features), dtype=dtype, device=X2.device)
    y.addmm_(XA, B.to(dtype).t(), beta=0, alpha=S)
    return y.addmm_(X2, W.t())


def _split(t, sizes):
    return torch.split(t, sizes, dim=1)


def _grad_A(dBs, Ss, X2):
    """The A gradients of projections sharing the input X2: S_i * dB_i^T @ X2, X2 read once."""
    cat = torch.cat(dBs, dim=1)
    if all(s == Ss[0] for s in Ss):
        dA = torch.empty((cat.shape[1], X2.shape[1]), dtype=X2.dtype, device=X2.device)
        dA.addmm_(cat.t(), X2, beta=0, alpha=Ss[0])
    else:
        dA = torch.cat([d * s for d, s in zip(dBs, Ss)], dim=1).t() @ X2
    return torch.split(dA, [d.shape[1] for d in dBs], dim=0)


def _lowrank_dX(dBs, As, Ss, out):
    """out = sum_i S_i * dB_i @ A_i, one GEMM (beta=0: out's old contents are ignored)."""
    cat_dB = torch.cat(dBs, dim=1)
    if all(s == Ss[0] for s in Ss):
        return out.addmm_(cat_dB, torch.cat(As, dim=0), beta=0, alpha=Ss[0])
    return out.addmm_(cat_dB, torch.cat([a * s for a, s in zip(As, Ss)], dim=0), beta=0)


class LoRAQKV(torch.autograd.Function):
    """Q, K, V = X @ (W + S B A)^T for q/k/v, sharing X. Same arguments and gradients as Unsloth's LoRA_QKV."""

    @staticmethod
    def forward(ctx, X, QW, QW_quant, QA, QB, QS, KW, KW_quant, KA, KB, KS, VW, VW_quant, VA, VB, VS,
                inplace=True, dropout_p=None, QBias=None, KBias=None, VBias=None):
        dtype, deq = X.dtype, _hooks["dequant"]
        X2 = X.view(-1, X.shape[-1])
        As = [A.to(dtype) for A in (QA, KA, VA)]
        ranks = [A.shape[0] for A in As]
        XAs = _split(X2 @ torch.cat(As, dim=0).t(), ranks)
        outs = []
        for W, Wq, B, S, XA in ((QW, QW_quant, QB, QS, XAs[0]), (KW, KW_quant, KB, KS, XAs[1]),
                                (VW, VW_quant, VB, VS, XAs[2])):
            Wd = deq(W, Wq, dtype, True)
            outs.append(_lowrank_then_base(X2, XA, B, S, Wd, B.shape[0], dtype))
            del Wd
        ctx.custom_saved_tensors = (QW, QW_quant, QS, KW, KW_quant, KS, VW, VW_quant, VS)
        ctx.save_for_backward(X, QA, QB, KA, KB, VA, VB, *XAs)
        ctx.inplace = _in_place(inplace, X)
        shape = X.shape[:-1]
        return tuple(o.view(*shape, -1) for o in outs)

    @staticmethod
    def backward(ctx, dQ, dK, dV):
        QW, QW_quant, QS, KW, KW_quant, KS, VW, VW_quant, VS = ctx.custom_saved_tensors
        X, QA, QB, KA, KB, VA, VB, XAq, XAk, XAv = ctx.saved_tensors
        dtype, deq = X.dtype, _hooks["dequant"]
        X2 = X.view(-1, X.shape[-1])
        dYs = [d.reshape(-1, d.shape[-1]) for d in (dQ, dK, dV)]
        As = [A.to(dtype) for A in (QA, KA, VA)]
        Bs = [B.to(dtype) for B in (QB, KB, VB)]
        Ss = [QS, KS, VS]
        dBs = [dY @ B for dY, B in zip(dYs, Bs)]                       # N x r each
        dAs = _grad_A(dBs, Ss, X2)                                     # before dX may overwrite X
        dBw = [torch.empty_like(B).addmm_(dY.t(), XA, beta=0, alpha=S)  # S * dY^T @ (X A^T), X A^T kept
               for dY, XA, B, S in zip(dYs, (XAq, XAk, XAv), Bs, Ss)]
        dX = _lowrank_dX(dBs, As, Ss, X2 if ctx.inplace else torch.empty_like(X2))
        for dY, W, Wq in zip(dYs, (QW, KW, VW), (QW_quant, KW_quant, VW_quant)):
            Wd = deq(W, Wq, dtype)
            dX.addmm_(dY, Wd)
            del Wd
        return (dX.view(X.shape), None, None, dAs[0], dBw[0], None, None, None, dAs[1], dBw[1], None,
                None, None, dAs[2], dBw[2], None, None, None, None, None, None)


class LoRAMLP(torch.autograd.Function):
    """down(act(gate(X)) * up(X)) with LoRA on all three. Same arguments and gradients as Unsloth's LoRA_MLP."""

    @staticmethod
    def forward(ctx, X, gateW, gateW_quant, gateA, gateB, gateS, upW, upW_quant, upA, upB, upS, downW,
                downW_quant, downA, downB, downS, _forward_function, _backward_function, inplace=True,
                dropout_p=None, gateBias=None, upBias=None, downBias=None):
        dtype, deq = X.dtype, _hooks["dequant"]
        X2 = X.view(-1, X.shape[-1])
        gA, uA, dA = gateA.to(dtype), upA.to(dtype), downA.to(dtype)
        XAg, XAu = _split(X2 @ torch.cat([gA, uA], dim=0).t(), [gA.shape[0], uA.shape[0]])
        Wd = deq(gateW, gateW_quant, dtype, True)
        e = _lowrank_then_base(X2, XAg, gateB, gateS, Wd, gateB.shape[0], dtype)
        del Wd
        Wd = deq(upW, upW_quant, dtype, True)
        g = _lowrank_then_base(X2, XAu, upB, upS, Wd, upB.shape[0], dtype)
        del Wd
        lead = X.shape[:-1]
        h = _forward_function(e.view(*lead, -1), g.view(*lead, -1)).view(-1, e.shape[-1])  # Unsloth's wants 3-D
        hA = h @ dA.t()
        Wd = deq(downW, downW_quant, dtype, True)
        i = _lowrank_then_base(h, hA, downB, downS, Wd, downB.shape[0], dtype)
        del Wd, h
        ctx.custom_saved_tensors = (gateW, gateW_quant, gateS, upW, upW_quant, upS, downW, downW_quant, downS,
                                    _backward_function)
        ctx.save_for_backward(gateA, gateB, upA, upB, downA, downB, X, e, g, XAg, XAu, hA)
        ctx.inplace = _in_place(inplace, X)
        return i.view(*X.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dY):
        gateW, gateW_quant, gateS, upW, upW_quant, upS, downW, downW_quant, downS, bwd = ctx.custom_saved_tensors
        gateA, gateB, upA, upB, downA, downB, X, e, g, XAg, XAu, hA = ctx.saved_tensors
        dtype, deq = X.dtype, _hooks["dequant"]
        X2 = X.view(-1, X.shape[-1])
        dY = dY.reshape(-1, dY.shape[-1])
        e, g = e.view(-1, e.shape[-1]), g.view(-1, g.shape[-1])
        gA, gB, uA, uB = gateA.to(dtype), gateB.to(dtype), upA.to(dtype), upB.to(dtype)
        dnA, dnB = downA.to(dtype), downB.to(dtype)

        # Through down_proj: DW = dY @ (Wd + S B A), the low-rank term first.
        dYB = dY @ dnB                                                        # N x r
        DW = torch.empty_like(e).addmm_(dYB, dnA, beta=0, alpha=downS)
        Wd = deq(downW, downW_quant, dtype)
        DW.addmm_(dY, Wd)
        del Wd
        h, df, de = bwd(DW, e, g)       # in place: DW -> h, e -> d(up out), g -> d(gate out)
        d_downA = torch.empty_like(dnA).addmm_(dYB.t(), h, beta=0, alpha=downS)
        d_downB = torch.empty_like(dnB).addmm_(dY.t(), hA, beta=0, alpha=downS)
        del h, DW

        up_dB, gate_dB = df @ uB, de @ gB                                      # N x r each
        d_gateA, d_upA = _grad_A([gate_dB, up_dB], [gateS, upS], X2)
        d_upB = torch.empty_like(uB).addmm_(df.t(), XAu, beta=0, alpha=upS)
        d_gateB = torch.empty_like(gB).addmm_(de.t(), XAg, beta=0, alpha=gateS)

        dX = _lowrank_dX([gate_dB, up_dB], [gA, uA], [gateS, upS], X2 if ctx.inplace else torch.empty_like(X2))
        Wd = deq(upW, upW_quant, dtype)
        dX.addmm_(df, Wd)
        del Wd
        Wd = deq(gateW, gateW_quant, dtype)
        dX.addmm_(de, Wd)
        del Wd
        return (dX.view(X.shape), None, None, d_gateA, d_gateB, None, None, None, d_upA, d_upB, None, None,
                None, d_downA, d_downB, None, None, None, None, None, None, None, None)


class LoRAW(torch.autograd.Function):
    """X @ (W + S B A)^T for one projection (o_proj). Same arguments and gradients as Unsloth's LoRA_W."""

    @staticmethod
    def forward(ctx, X, W, W_quant, A, B, S, dropout_p=None, bias=None):
        dtype = X.dtype
        X2 = X.reshape(-1, X.shape[-1])
        XA = X2 @ A.to(dtype).t()
        Wd = _hooks["dequant"](W, W_quant, dtype, True)
        y = _lowrank_then_base(X2, XA, B, S, Wd, B.shape[0], dtype)
        del Wd
        ctx.custom_saved_tensors = (W, W_quant, S)
        ctx.save_for_backward(A, B, X, XA)
        return y.view(*X.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dY):
        W, W_quant, S = ctx.custom_saved_tensors
        A, B, X, XA = ctx.saved_tensors
        dtype = X.dtype
        X2 = X.reshape(-1, X.shape[-1])
        dY = dY.reshape(-1, dY.shape[-1])
        Ad, Bd = A.to(dtype), B.to(dtype)
        dYB = dY @ Bd
        d_A = torch.empty_like(Ad).addmm_(dYB.t(), X2, beta=0, alpha=S)
        d_B = torch.empty_like(Bd).addmm_(dY.t(), XA, beta=0, alpha=S)
        dX = torch.empty_like(X2).addmm_(dYB, Ad, beta=0, alpha=S)
        Wd = _hooks["dequant"](W, W_quant, dtype)
        dX.addmm_(dY, Wd)
        del Wd
        return dX.view(X.shape), None, None, d_A, d_B, None, None, None


# ----------------------------------------------------------------------------------------------------------
def _plain_weight(W, W_quant) -> bool:
    if W is not None and W.dtype == torch.float8_e4m3fn:  # BASE_PRECISION=fp8: finetune/fp8.py's FP8 weights only
        return getattr(W, "_rapa_fp8", None) is not None
    if W_quant is None:
        return type(W) in (torch.Tensor, torch.nn.Parameter) and W.dim() == 2 and W.dtype in _FP_DTYPES
    return type(W_quant).__name__ == "QuantState"  # bitsandbytes 4-bit: what fast_dequantize expands


def _eligible(X, weights, tail, adapters=()) -> bool:
    """No dropout, no bias (tail: dropout_p then biases), plain or 4-bit bases, eager, contiguous X, and an adapter:
    with the adapter switched off (DPO's reference pass, peft's disable_adapter) Unsloth passes A = B = None and
    its own Function computes the base alone."""
    if any(t is not None for t in tail) or torch.compiler.is_compiling():
        return False
    if any(t is None for t in adapters):
        return False
    if not (X.is_contiguous() and X.dtype in _FP_DTYPES):
        return False
    return all(_plain_weight(W, Wq) for W, Wq in weights)


def _route(cls, ours, eligible, fwd_deco, bwd_deco, ours_fp8=None) -> None:
    orig_fwd, orig_bwd = cls.forward, cls.backward

    def forward(ctx, *args):
        ctx._rapa_fast = eligible(args)
        # An FP8 base (args[1] is the first projection's weight) takes finetune/fp8.py's Functions.
        ctx._rapa_impl = (ours_fp8 if ours_fp8 is not None and args[1].dtype == torch.float8_e4m3fn else ours) \
            if ctx._rapa_fast else None
        return (ctx._rapa_impl.forward if ctx._rapa_fast else orig_fwd)(ctx, *args)

    def backward(ctx, *grads):
        impl = getattr(ctx, "_rapa_impl", None)
        return (impl.backward if impl is not None else orig_bwd)(ctx, *grads)

    forward._rapa_original = (orig_fwd, orig_bwd)
    cls.forward, cls.backward = staticmethod(fwd_deco(forward)), staticmethod(bwd_deco(backward))


def installed() -> bool:
    import sys

    fl = sys.modules.get("unsloth.kernels.fast_lora")
    return fl is not None and hasattr(getattr(fl.LoRA_W.forward, "__wrapped__", fl.LoRA_W.forward), "_rapa_original")


def install() -> bool:
    """Route Unsloth's fused LoRA Functions through the kernels above (idempotent). Needs unsloth imported."""
    import unsloth.kernels.fast_lora as fl  # pragma: no cover - GPU

    from finetune import fp8

    if installed():
        return True
    _hooks["dequant"] = lambda W, Wq, dtype, buf=False: (
        _dequant_plain(W, None, dtype) if Wq is None else fl.fast_dequantize(W, Wq, use_global_buffer=buf, dtype=dtype))
    norm = getattr(fl, "_rms_layernorm", None)
    _hooks["inplace_ok"] = lambda X: not getattr(norm, "_SAVE_OUTPUT", False) or fl._may_overwrite_input(X)
    fwd, bwd = fl.torch_amp_custom_fwd, fl.torch_amp_custom_bwd
    # Argument positions: (X, W, W_quant, A, B, S) per projection, then the optional dropout / biases.
    _route(fl.LoRA_QKV, LoRAQKV, lambda a: _eligible(a[0], [(a[1], a[2]), (a[6], a[7]), (a[11], a[12])], a[17:],
                                                               (a[3], a[4], a[8], a[9], a[13], a[14])),
           fwd, bwd, fp8.FP8LoRAQKV)
    _route(fl.LoRA_MLP, LoRAMLP, lambda a: _eligible(a[0], [(a[1], a[2]), (a[6], a[7]), (a[11], a[12])], a[19:],
                                                               (a[3], a[4], a[8], a[9], a[13], a[14])),
           fwd, bwd, fp8.FP8LoRAMLP)
    _route(fl.LoRA_W, LoRAW, lambda a: _eligible(a[0], [(a[1], a[2])], a[6:], (a[3], a[4])), fwd, bwd, fp8.FP8LoRAW)
    return True


def uninstall() -> None:
    """Give Unsloth its own forward/backward back (benchmarks compare the two in one process)."""
    import sys

    fl = sys.modules.get("unsloth.kernels.fast_lora")
    if fl is None:
        return
    for cls in (fl.LoRA_QKV, fl.LoRA_MLP, fl.LoRA_W):
        f = cls.forward
        orig = getattr(getattr(f, "__wrapped__", f), "_rapa_original", None)
        if orig:
            cls.forward, cls.backward = staticmethod(orig[0]), staticmethod(orig[1])
