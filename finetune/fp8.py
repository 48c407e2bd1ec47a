"""An FP8 frozen base for LoRA (BASE_PRECISION=fp8, issue 21): e4m3 weights with row-wise scales, FP8 GEMMs.

Each frozen projection W [out, in] is quantised once at load to W8 = round_e4m3(W / s) with one float32 scale per
output row, s_o = max|W[o, :]| / 448. The two GEMMs of a frozen projection then run on the FP8 tensor cores
through `torch._scaled_mm` (row-wise scales, bf16 out):

- forward  Y  = X W^T         = (sx * Xq) (s * W8)^T    Xq: X quantised per token (row) by a Triton kernel;
- backward dX = dY W          = (dY * s) W8             the weight's row scales fold into dY's columns before dY is
                                                        quantised per token, so W8 needs no second set of scales.

FP8 GEMMs on Hopper take both operands K-major, so dX needs W8 transposed: a second FP8 copy, made once at load
(q/k/v and gate/up share one copy each, concatenated, so their dX is one GEMM). The base therefore holds 2 bytes a
parameter, as bf16 does: this mode buys speed, not memory. The LoRA path, norms, attention and the loss stay bf16;
no weight gradient of the base is ever computed.

Quantising an activation is one Triton launch: per row, the max |x| (times the folded column scale), then the cast,
writing the e4m3 row and its scale. Done with separate PyTorch ops it costs more than the FP8 GEMM saves (issue 21's
measurement: 229-890 TFLOP/s against 1,250-1,380 for the GEMM alone).

Where FP8 cannot run (no CUDA GPU, compute capability below 8.9, no Triton) `resolve` says why and the run trains on
the bf16 base instead. On a CPU the same functions run with PyTorch ops (the test suite checks them there).
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------
def resolve(requested: str, use_qlora: bool, device: str) -> tuple[str, str]:
    """(the base precision this run uses: nf4 | bf16 | fp8, why). BASE_PRECISION=fp8 falls back to bf16 where FP8
    GEMMs cannot run."""
    if requested in ("auto", "nf4", "bf16") or requested == "":
        p = "nf4" if use_qlora else "bf16"
        return p, ("BASE_PRECISION=" + requested if requested not in ("auto", "") else f"auto: USE_QLORA={use_qlora}")
    ok, why = fp8_available(device)
    if not ok:
        return "bf16", f"BASE_PRECISION=fp8 falls back to a bf16 base: {why}"
    return "fp8", f"BASE_PRECISION=fp8 ({why})"


def fp8_available(device: str) -> tuple[bool, str]:
    if device != "cuda" or not torch.cuda.is_available():
        return False, "FP8 GEMMs need a CUDA GPU (none here)"
    cc = torch.cuda.get_device_capability(0)
    if cc < (8, 9):
        return False, f"FP8 tensor cores need compute capability 8.9 or newer; this GPU has {cc[0]}.{cc[1]}"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no _scaled_mm"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "Triton is not installed (it quantises the activations)"
    return True, f"e4m3 row-wise, compute capability {cc[0]}.{cc[1]}"


# ----------------------------------------------------------------------------------------------------------
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 [out, in] e4m3, scale [out] float32) with W ~= scale[:, None] * W8; one scale per output row."""
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp_min(_EPS) / E4M3_MAX
    return (wf / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize_weight(w8: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (w8.float() * scale[:, None]).to(dtype)


def quantize_rows_reference(x: torch.Tensor, col_scale: torch.Tensor | None = None):
    """(Xq [M, K] e4m3, sx [M, 1] float32): each row of x (times col_scale) scaled to the e4m3 range. PyTorch ops;
    the Triton kernel below computes the same in one launch."""
    xf = x.float()
    if col_scale is not None:
        xf = xf * col_scale[None, :]
    s = xf.abs().amax(dim=1, keepdim=True).clamp_min(_EPS) / E4M3_MAX
    return (xf / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), s


try:  # Triton is there wherever a CUDA build of PyTorch is; the CPU path below never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

if triton is not None:
    @triton.jit
    def _seg_amax(X, sx, n, C, coff, row, acc, HAS_C: tl.constexpr, BLOCK: tl.constexpr):
        for off in range(0, n, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            m = cols < n
            x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_C:
                x = x * tl.load(C + coff + cols, mask=m, other=0.0)
            acc = tl.maximum(acc, tl.abs(x))
        return acc

    @triton.jit
    def _seg_store(X, sx, n, C, coff, Q, sq, row, inv, HAS_C: tl.constexpr, BLOCK: tl.constexpr):
        for off in range(0, n, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            m = cols < n
            x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_C:
                x = x * tl.load(C + coff + cols, mask=m, other=0.0)
            y = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
            tl.store(Q + row * sq + coff + cols, y.to(tl.float8e4nv), mask=m)

    @triton.jit
    def _seg_load(X, sx, n, C, coff, row, HAS_C: tl.constexpr, B: tl.constexpr):
        cols = tl.arange(0, B)
        m = cols < n
        x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_C:
            x = x * tl.load(C + coff + cols, mask=m, other=0.0)
        return x

    @triton.jit
    def _seg_put(x, n, Q, sq, coff, row, inv, B: tl.constexpr):
        cols = tl.arange(0, B)
        y = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
        tl.store(Q + row * sq + coff + cols, y.to(tl.float8e4nv), mask=cols < n)

    @triton.jit
    def quant_rows(X0, X1, X2, s0, s1, s2, n0, n1, n2, ntot, C, Q, sq, S, M,
                   NSEG: tl.constexpr, HAS_C: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK: tl.constexpr,
                   B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if row >= M:  # padding rows of Q: zeros, scale 1
            for off in range(0, ntot, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                tl.store(Q + row * sq + cols, tl.zeros([BLOCK], tl.float32).to(tl.float8e4nv), mask=cols < ntot)
            tl.store(S + row, 1.0)
        elif ONE_PASS:  # every segment of the row in registers (B_i >= n_i): each element read once
            x0 = _seg_load(X0, s0, n0, C, 0, row, HAS_C, B0)
            amax = tl.max(tl.abs(x0), axis=0)
            if NSEG > 1:
                x1 = _seg_load(X1, s1, n1, C, n0, row, HAS_C, B1)
                amax = tl.maximum(amax, tl.max(tl.abs(x1), axis=0))
            if NSEG > 2:
                x2 = _seg_load(X2, s2, n2, C, n0 + n1, row, HAS_C, B2)
                amax = tl.maximum(amax, tl.max(tl.abs(x2), axis=0))
            amax = tl.maximum(amax, 1e-12)
            inv = 448.0 / amax
            _seg_put(x0, n0, Q, sq, 0, row, inv, B0)
            if NSEG > 1:
                _seg_put(x1, n1, Q, sq, n0, row, inv, B1)
            if NSEG > 2:
                _seg_put(x2, n2, Q, sq, n0 + n1, row, inv, B2)
            tl.store(S + row, amax / 448.0)
        else:  # long rows: the max first, then the cast (the second read mostly hits L2)
            acc = tl.zeros([BLOCK], tl.float32)
            acc = _seg_amax(X0, s0, n0, C, 0, row, acc, HAS_C, BLOCK)
            if NSEG > 1:
                acc = _seg_amax(X1, s1, n1, C, n0, row, acc, HAS_C, BLOCK)
            if NSEG > 2:
                acc = _seg_amax(X2, s2, n2, C, n0 + n1, row, acc, HAS_C, BLOCK)
            amax = tl.maximum(tl.max(acc, axis=0), 1e-12)
            inv = 448.0 / amax
            _seg_store(X0, s0, n0, C, 0, Q, sq, row, inv, HAS_C, BLOCK)
            if NSEG > 1:
                _seg_store(X1, s1, n1, C, n0, Q, sq, row, inv, HAS_C, BLOCK)
            if NSEG > 2:
                _seg_store(X2, s2, n2, C, n0 + n1, Q, sq, row, inv, HAS_C, BLOCK)
            tl.store(S + row, amax / 448.0)


def _triton_kernel():
    if triton is None:
        raise RuntimeError("the FP8 activation quantiser needs Triton")
    return quant_rows


def _pad16(m: int) -> int:
    return (m + 15) // 16 * 16


def quantize_rows(segments: list[torch.Tensor], col_scale: torch.Tensor | None = None):
    """Quantise the row-wise concatenation of `segments` (each [M, n_i], unit column stride) per row.

    Returns (Xq [M16, sum n_i] e4m3, sx [M16, 1] float32) with M16 = M rounded up to 16 (the extra rows are zero),
    col_scale: float32 [sum n_i], multiplied into the columns before the scale is taken (the folded weight scales
    of the backward)."""
    m = segments[0].shape[0]
    n = sum(s.shape[1] for s in segments)
    if not segments[0].is_cuda:
        x = torch.cat(segments, dim=1) if len(segments) > 1 else segments[0]
        q, s = quantize_rows_reference(x, col_scale)
        mp = _pad16(m)
        if mp != m:
            q = torch.cat([q, torch.zeros(mp - m, n, dtype=E4M3)])
            s = torch.cat([s, torch.ones(mp - m, 1)])
        return q, s
    assert len(segments) <= 3 and all(s.stride(1) == 1 for s in segments)
    mp = _pad16(m)
    q = torch.empty((mp, n), dtype=E4M3, device=segments[0].device)
    sx = torch.empty((mp, 1), dtype=torch.float32, device=segments[0].device)
    segs = list(segments) + [segments[0]] * (3 - len(segments))
    widths = [s.shape[1] for s in segments] + [0] * (3 - len(segments))
    p2 = [max(16, 1 << (w - 1).bit_length()) if w else 16 for w in widths]
    one = sum(p2[:len(segments)]) <= 32768  # the row fits in registers (q/k/v: 6144, gate/up dX: 2 x 16384)
    _triton_kernel()[(mp,)](segs[0], segs[1], segs[2], segs[0].stride(0), segs[1].stride(0), segs[2].stride(0),
                            widths[0], widths[1], widths[2], n, col_scale if col_scale is not None else sx, q,
                            q.stride(0), sx, m, NSEG=len(segments), HAS_C=col_scale is not None, ONE_PASS=one,
                            BLOCK=2048, B0=p2[0], B1=p2[1], B2=p2[2],
                            num_warps=16 if sum(p2) >= 8192 else 8 if sum(p2) >= 2048 else 4)
    return q, sx


def scaled_mm(xq: torch.Tensor, sx: torch.Tensor, w_kmajor: torch.Tensor, sw: torch.Tensor, m: int,
              fast_accum: bool = True, dtype=torch.bfloat16) -> torch.Tensor:
    """(sx * xq) @ (w * sw)^T for xq [M16, K] and w_kmajor [N, K] (K contiguous), rows past m dropped."""
    y = torch._scaled_mm(xq, w_kmajor.t(), scale_a=sx, scale_b=sw, out_dtype=dtype,
                         use_fast_accum=fast_accum and xq.is_cuda)
    return y[:m] if y.shape[0] != m else y


# ----------------------------------------------------------------------------------------------------------
class FP8Weight:
    """What a frozen FP8 projection keeps beside its e4m3 weight `w8` [out, in]: the row scales (`scale` [out],
    float32, and `scale_row` [1, out] as _scaled_mm takes them) and the K-major copy for dX. `t` is this projection's
    transposed weight [in, out]; projections of a group (q/k/v, gate/up) share one concatenated copy `group_t`
    [in, sum out] with `group_scale`, and `t` is then their slice of it."""

    def __init__(self, w8: torch.Tensor, scale: torch.Tensor):
        self.scale = scale
        self.scale_row = scale.view(1, -1)
        self.t: torch.Tensor | None = None
        self.group_t: torch.Tensor | None = None
        self.group_scale: torch.Tensor | None = None
        self.ones_in = torch.ones((1, w8.shape[1]), dtype=torch.float32, device=w8.device)


def meta(W) -> FP8Weight | None:
    return getattr(W, "_rapa_fp8", None)


def is_fp8(W) -> bool:
    return W is not None and W.dtype == E4M3 and meta(W) is not None


def base_forward(Xq, sx, W, m: int, dtype=torch.bfloat16) -> torch.Tensor:
    """X @ W^T from the quantised X for an FP8 weight W."""
    return scaled_mm(Xq, sx, W, meta(W).scale_row, m, dtype=dtype)


def base_dX(dYs: list[torch.Tensor], Ws: list) -> torch.Tensor:
    """sum_i dY_i @ W_i for FP8 weights (one GEMM: their row scales folded into dY's columns, one K-major copy)."""
    first = meta(Ws[0])
    m = dYs[0].shape[0]
    if len(Ws) > 1:
        wt, cs = first.group_t, first.group_scale
    else:
        wt, cs = first.t, first.scale
        if wt.stride(0) != wt.shape[1]:  # one projection's slice of a group's copy (peft's path): packed for cuBLAS
            wt = wt.contiguous()
    dq, sd = quantize_rows(dYs, cs)
    # Hopper's fast accumulation: 6-16% faster dX GEMMs on the 8B shapes (bench/fp8_check.py); its error (~3e-3
    # relative, mostly the bf16 output's rounding) is a tenth of the quantisation's own (~3e-2).
    return scaled_mm(dq, sd, wt, first.ones_in, m, fast_accum=True, dtype=dYs[0].dtype)


class _FP8Linear(torch.autograd.Function):
    """y = x @ W^T for an FP8 W, dX in FP8 too; no gradient for W (it is frozen)."""

    @staticmethod
    def forward(ctx, x, W):
        x2 = x.reshape(-1, x.shape[-1])
        xq, sx = quantize_rows([x2])
        ctx.W = W
        return base_forward(xq, sx, W, x2.shape[0], x.dtype).view(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, dy):
        d2 = dy.reshape(-1, dy.shape[-1])
        if d2.stride(1) != 1:
            d2 = d2.contiguous()
        W = ctx.W
        dx = base_dX([d2], [W]) if meta(W).t is not None else d2 @ dequantize_weight(W, meta(W).scale, d2.dtype)
        return dx.view(*dy.shape[:-1], W.shape[1]), None


class FP8Linear(torch.nn.Module):
    """A frozen Linear whose weight is e4m3 with row scales: the base layer under a LoRA adapter (peft's LoRA
    Linear calls it; Unsloth's fused Functions read `.weight` and `.weight_scale` and route to fast_lora)."""

    def __init__(self, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = w8.shape[1], w8.shape[0]
        self.weight = torch.nn.Parameter(w8, requires_grad=False)
        self.weight._rapa_fp8 = FP8Weight(w8, scale)
        # [out, 1]: the row-scale shape Unsloth's own FP8 dequantisation reads, should a projection take its path
        self.register_buffer("weight_scale", scale.view(-1, 1), persistent=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        y = _FP8Linear.apply(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


# ----------------------------------------------------------------------------------------------------------
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def quantize_lora_bases(model, keep_transposed: bool = True) -> dict:
    """Swap the base Linear under every LoRA layer of `model` for an FP8Linear (quantised once, here). Returns counts
    and bytes. keep_transposed: also build the K-major copies the FP8 dX GEMM needs (GPU); without them dX
    dequantises (CPU)."""
    import torch.nn as nn

    swapped, before, after = 0, 0, 0
    for mod in list(model.modules()):
        base = getattr(mod, "base_layer", None)
        if not isinstance(base, nn.Linear) or isinstance(base, FP8Linear) or not hasattr(mod, "lora_A"):
            continue
        w = base.weight.data
        w8, scale = quantize_weight(w)
        before += w.numel() * w.element_size()
        fp = FP8Linear(w8, scale, None if base.bias is None else base.bias.data)
        mod.base_layer = fp
        swapped += 1
        del w
        base.weight = None
    if keep_transposed:
        for parent in list(model.modules()):
            done = set()
            for group in GROUPS:
                ws = [_fp8_base(getattr(parent, n, None)) for n in group]
                if all(w is not None for w in ws):
                    t = torch.cat([w for w in ws], dim=0).t().contiguous()   # [in, sum out]
                    cs = torch.cat([meta(w).scale for w in ws])
                    off = 0
                    for w in ws:
                        m = meta(w)
                        m.group_t, m.group_scale = t, cs
                        m.t = t[:, off:off + w.shape[0]]
                        off += w.shape[0]
                    done.update(group)
            for name, child in parent.named_children():
                w = _fp8_base(child)
                if w is not None and name not in done and meta(w).t is None:
                    meta(w).t = w.t().contiguous()
    for mod in model.modules():
        if isinstance(mod, FP8Linear):
            after += mod.weight.numel() * (2 if keep_transposed else 1) + mod.weight_scale.numel() * 4
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"layers": swapped, "bf16_bytes": before, "fp8_bytes": after}


def _fp8_base(mod):
    base = getattr(mod, "base_layer", None)
    return base.weight if isinstance(base, FP8Linear) else None


def round_trip_(model, targets=None) -> int:
    """Replace every (targeted) Linear weight of a plain model by its FP8 round trip, in place: the base an FP8 run
    trained on, for measuring the FP8 gap. Returns the number of weights changed."""
    import torch.nn as nn

    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name.endswith("lm_head"):
            continue
        if targets and not any(name.endswith(t) for t in targets):
            continue
        w8, s = quantize_weight(mod.weight.data)
        mod.weight.data.copy_(dequantize_weight(w8, s, mod.weight.dtype))
        n += 1
    return n


# ----------------------------------------------------------------------------------------------------------
# Unsloth's fused LoRA Functions on an FP8 base (finetune/fast_lora.py routes here when the base weight is FP8):
# the same arguments and gradients as fast_lora's LoRAQKV / LoRAMLP / LoRAW, with the base GEMMs in FP8. Inputs
# shared by several projections are quantised once; the dX of projections sharing an input is one FP8 GEMM.
def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(1) == 1 else t.contiguous()


def _lowrank_add(out, dBs, As, Ss):
    """out += sum_i S_i * dB_i @ A_i (one GEMM when the scales agree)."""
    cat_dB = torch.cat(dBs, dim=1) if len(dBs) > 1 else dBs[0]
    if all(s == Ss[0] for s in Ss):
        return out.addmm_(cat_dB, torch.cat(As, dim=0) if len(As) > 1 else As[0], alpha=Ss[0])
    return out.addmm_(cat_dB, torch.cat([a * s for a, s in zip(As, Ss)], dim=0))


class FP8LoRAQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, QW, QW_quant, QA, QB, QS, KW, KW_quant, KA, KB, KS, VW, VW_quant, VA, VB, VS,
                inplace=True, dropout_p=None, QBias=None, KBias=None, VBias=None):
        from finetune.fast_lora import _split

        dtype = X.dtype
        X2 = _rows(X)
        m = X2.shape[0]
        As = [A.to(dtype) for A in (QA, KA, VA)]
        XAs = _split(X2 @ torch.cat(As, dim=0).t(), [A.shape[0] for A in As])
        Xq, sx = quantize_rows([X2])
        outs = [base_forward(Xq, sx, W, m, dtype).addmm_(XA, B.to(dtype).t(), alpha=S)
                for W, B, S, XA in ((QW, QB, QS, XAs[0]), (KW, KB, KS, XAs[1]), (VW, VB, VS, XAs[2]))]
        ctx.custom_saved_tensors = (QW, QS, KW, KS, VW, VS)
        ctx.save_for_backward(X2, QA, QB, KA, KB, VA, VB, *XAs)
        ctx.x_shape = X.shape
        return tuple(o.view(*X.shape[:-1], -1) for o in outs)

    @staticmethod
    def backward(ctx, dQ, dK, dV):
        from finetune.fast_lora import _grad_A

        QW, QS, KW, KS, VW, VS = ctx.custom_saved_tensors
        X2, QA, QB, KA, KB, VA, VB, XAq, XAk, XAv = ctx.saved_tensors
        dtype = X2.dtype
        dYs = [_rows(d) for d in (dQ, dK, dV)]
        As = [A.to(dtype) for A in (QA, KA, VA)]
        Bs = [B.to(dtype) for B in (QB, KB, VB)]
        Ss = [QS, KS, VS]
        dBs = [dY @ B for dY, B in zip(dYs, Bs)]
        dAs = _grad_A(dBs, Ss, X2)
        dBw = [torch.empty_like(B).addmm_(dY.t(), XA, beta=0, alpha=S)
               for dY, XA, B, S in zip(dYs, (XAq, XAk, XAv), Bs, Ss)]
        dX = _lowrank_add(base_dX(dYs, [QW, KW, VW]), dBs, As, Ss)
        return (dX.view(ctx.x_shape), None, None, dAs[0], dBw[0], None, None, None, dAs[1], dBw[1], None,
                None, None, dAs[2], dBw[2], None, None, None, None, None, None)


class FP8LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, gateW, gateW_quant, gateA, gateB, gateS, upW, upW_quant, upA, upB, upS, downW,
                downW_quant, downA, downB, downS, _forward_function, _backward_function, inplace=True,
                dropout_p=None, gateBias=None, upBias=None, downBias=None):
        from finetune.fast_lora import _split

        dtype = X.dtype
        X2 = _rows(X)
        m = X2.shape[0]
        gA, uA, dA = gateA.to(dtype), upA.to(dtype), downA.to(dtype)
        XAg, XAu = _split(X2 @ torch.cat([gA, uA], dim=0).t(), [gA.shape[0], uA.shape[0]])
        Xq, sx = quantize_rows([X2])
        e = base_forward(Xq, sx, gateW, m, dtype).addmm_(XAg, gateB.to(dtype).t(), alpha=gateS)
        g = base_forward(Xq, sx, upW, m, dtype).addmm_(XAu, upB.to(dtype).t(), alpha=upS)
        del Xq
        lead = X.shape[:-1]
        h = _forward_function(e.view(*lead, -1), g.view(*lead, -1)).view(-1, e.shape[-1])
        hA = h @ dA.t()
        hq, sh = quantize_rows([h])
        del h
        i = base_forward(hq, sh, downW, m, dtype).addmm_(hA, downB.to(dtype).t(), alpha=downS)
        ctx.custom_saved_tensors = (gateW, gateS, upW, upS, downW, downS, _backward_function)
        ctx.save_for_backward(gateA, gateB, upA, upB, downA, downB, X2, e, g, XAg, XAu, hA)
        ctx.x_shape = X.shape
        return i.view(*lead, -1)

    @staticmethod
    def backward(ctx, dY):
        from finetune.fast_lora import _grad_A

        gateW, gateS, upW, upS, downW, downS, bwd = ctx.custom_saved_tensors
        gateA, gateB, upA, upB, downA, downB, X2, e, g, XAg, XAu, hA = ctx.saved_tensors
        dtype = X2.dtype
        dY = _rows(dY)
        gA, gB, uA, uB = gateA.to(dtype), gateB.to(dtype), upA.to(dtype), upB.to(dtype)
        dnA, dnB = downA.to(dtype), downB.to(dtype)
        dYB = dY @ dnB
        DW = base_dX([dY], [downW]).addmm_(dYB, dnA, alpha=downS)
        h, df, de = bwd(DW, e, g)       # in place: DW -> h, e -> d(up out), g -> d(gate out)
        d_downA = torch.empty_like(dnA).addmm_(dYB.t(), h, beta=0, alpha=downS)
        d_downB = torch.empty_like(dnB).addmm_(dY.t(), hA, beta=0, alpha=downS)
        del h, DW
        up_dB, gate_dB = df @ uB, de @ gB
        d_gateA, d_upA = _grad_A([gate_dB, up_dB], [gateS, upS], X2)
        d_upB = torch.empty_like(uB).addmm_(df.t(), XAu, beta=0, alpha=upS)
        d_gateB = torch.empty_like(gB).addmm_(de.t(), XAg, beta=0, alpha=gateS)
        dX = _lowrank_add(base_dX([de, df], [gateW, upW]), [gate_dB, up_dB], [gA, uA], [gateS, upS])
        return (dX.view(ctx.x_shape), None, None, d_gateA, d_gateB, None, None, None, d_upA, d_upB, None, None,
                None, d_downA, d_downB, None, None, None, None, None, None, None, None)


class FP8LoRAW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, W, W_quant, A, B, S, dropout_p=None, bias=None):
        dtype = X.dtype
        X2 = _rows(X)
        XA = X2 @ A.to(dtype).t()
        Xq, sx = quantize_rows([X2])
        y = base_forward(Xq, sx, W, X2.shape[0], dtype).addmm_(XA, B.to(dtype).t(), alpha=S)
        ctx.custom_saved_tensors = (W, S)
        ctx.save_for_backward(A, B, X2, XA)
        ctx.x_shape = X.shape
        return y.view(*X.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dY):
        W, S = ctx.custom_saved_tensors
        A, B, X2, XA = ctx.saved_tensors
        dtype = X2.dtype
        dY = _rows(dY)
        Ad, Bd = A.to(dtype), B.to(dtype)
        dYB = dY @ Bd
        d_A = torch.empty_like(Ad).addmm_(dYB.t(), X2, beta=0, alpha=S)
        d_B = torch.empty_like(Bd).addmm_(dY.t(), XA, beta=0, alpha=S)
        dX = base_dX([dY], [W]).addmm_(dYB, Ad, alpha=S)
        return dX.view(ctx.x_shape), None, None, d_A, d_B, None, None, None
