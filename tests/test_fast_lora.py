"""The reordered LoRA kernels (finetune/fast_lora.py) compute what plain autograd computes: outputs and every
gradient, with equal and unequal ranks and scales, with dX written into X's buffer and without."""

import os

import pytest
import torch
import torch.nn.functional as F

from finetune import fast_lora as fl

torch.manual_seed(0)
DT = torch.float64


def _proj(out_f, in_f, r):
    W = torch.randn(out_f, in_f, dtype=DT)
    A = torch.randn(r, in_f, dtype=DT, requires_grad=True)
    B = torch.randn(out_f, r, dtype=DT, requires_grad=True)  # non-zero B: every gradient path is exercised
    return W, A, B


def _ref(X, W, A, B, S):
    return X @ W.t() + S * (X @ A.t()) @ B.t()


def _swiglu_fwd(e, g):
    return F.silu(e) * g


def _swiglu_bwd(DW, e, g):
    # Unsloth's contract: in place, DW -> h, e -> dL/d(up output), g -> dL/d(gate output).
    se = torch.sigmoid(e)
    f = e * se
    h, d_up, d_gate = f * g, DW * f, DW * g * se * (1 + e * (1 - se))
    DW.copy_(h), e.copy_(d_up), g.copy_(d_gate)
    return DW, e, g


def _grads(out, leaves, cot):
    return torch.autograd.grad(out, leaves, cot)


@pytest.mark.parametrize("scales,ranks,inplace", [((2.0, 2.0, 2.0), (4, 4, 4), True),
                                                  ((2.0, 0.5, 1.5), (4, 2, 3), False)])
def test_qkv_matches_autograd(scales, ranks, inplace):
    X0 = torch.randn(2, 5, 16, dtype=DT, requires_grad=True)
    projs = [_proj(o, 16, r) for o, r in zip((16, 8, 8), ranks)]
    args = []
    for (W, A, B), S in zip(projs, scales):
        args += [W, None, A, B, S]
    outs = fl.LoRAQKV.apply(X0 * 1, *args, inplace)
    refs = [_ref(X0, W, A, B, S) for (W, A, B), S in zip(projs, scales)]
    leaves = [X0] + [t for _, A, B in projs for t in (A, B)]
    cots = [torch.randn_like(r) for r in refs]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r)
    for g, gr in zip(_grads(outs, leaves, cots), _grads(refs, leaves, cots)):
        torch.testing.assert_close(g, gr)


@pytest.mark.parametrize("scales,inplace", [((2.0, 2.0, 2.0), True), ((0.5, 2.0, 1.0), False)])
def test_mlp_matches_autograd(scales, inplace):
    X0 = torch.randn(2, 5, 16, dtype=DT, requires_grad=True)
    (gW, gA, gB), (uW, uA, uB), (dW, dA, dB) = _proj(24, 16, 4), _proj(24, 16, 3), _proj(16, 24, 4)
    gS, uS, dS = scales
    out = fl.LoRAMLP.apply(X0 * 1, gW, None, gA, gB, gS, uW, None, uA, uB, uS, dW, None, dA, dB, dS,
                           _swiglu_fwd, _swiglu_bwd, inplace)
    ref = _ref(F.silu(_ref(X0, gW, gA, gB, gS)) * _ref(X0, uW, uA, uB, uS), dW, dA, dB, dS)
    torch.testing.assert_close(out, ref)
    leaves, cot = [X0, gA, gB, uA, uB, dA, dB], torch.randn_like(ref)
    for g, gr in zip(_grads(out, leaves, cot), _grads(ref, leaves, cot)):
        torch.testing.assert_close(g, gr)


def test_single_projection_matches_autograd():
    X0 = torch.randn(3, 4, 16, dtype=DT, requires_grad=True)
    W, A, B = _proj(12, 16, 4)
    out = fl.LoRAW.apply(X0, W, None, A, B, 2.0)
    ref = _ref(X0, W, A, B, 2.0)
    torch.testing.assert_close(out, ref)
    cot = torch.randn_like(ref)
    for g, gr in zip(_grads(out, [X0, A, B], cot), _grads(ref, [X0, A, B], cot)):
        torch.testing.assert_close(g, gr)


def test_only_the_plain_case_is_routed():
    X = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    W = torch.randn(4, 8, dtype=torch.bfloat16)
    assert fl._eligible(X, [(W, None)], ())
    assert fl._eligible(X, [(W, None)], (None, None))
    assert not fl._eligible(X, [(W, None)], ((0.1, 0.1, 0.1),))          # LoRA dropout: Unsloth's own path
    assert not fl._eligible(X, [(W, None)], (None, torch.zeros(4)))       # LoRA bias
    assert not fl._eligible(X.transpose(1, 2), [(W, None)], ())           # a non-contiguous input
    assert not fl._eligible(X, [(W.to(torch.int8), None)], ())            # a weight we do not expand
    assert not fl._eligible(X, [(W, object())], ())                       # a quant state that is not bnb 4-bit
    A, B = torch.randn(2, 8), torch.randn(4, 2)
    assert fl._eligible(X, [(W, None)], (), (A, B))
    # the adapter switched off (DPO's reference pass): Unsloth sends A = B = None; its own Function takes it
    assert not fl._eligible(X, [(W, None)], (), (None, None))


def _swiglu_bwd_traced(DW, e, g):
    # What Unsloth's backward function does under torch.compile: the same three results, out of place.
    se = torch.sigmoid(e)
    f = e * se
    return f * g, DW * f, DW * g * se * (1 + e * (1 - se))


def test_traced_by_torch_compile_matches_autograd():
    # The router steps aside while torch.compile traces, but the Functions themselves stay traceable: traced
    # forward and backward give the same numbers, and dX is not written into X (AOT autograd forbids it).
    import torch._dynamo

    torch._dynamo.reset()
    X0 = torch.randn(2, 5, 16, dtype=DT, requires_grad=True)
    qkv = [_proj(o, 16, 4) for o in (16, 8, 8)]
    (gW, gA, gB), (uW, uA, uB), (dW, dA, dB) = _proj(24, 16, 4), _proj(24, 16, 4), _proj(16, 24, 4)
    oW, oA, oB = _proj(16, 16, 4)

    def block(X, fused):
        if fused:
            args = [t for (W, A, B) in qkv for t in (W, None, A, B, 2.0)]
            q, k, v = fl.LoRAQKV.apply(X, *args, True)
        else:
            q, k, v = (_ref(X, W, A, B, 2.0) for W, A, B in qkv)
        h = q + torch.cat([k, v], dim=-1)
        o = fl.LoRAW.apply(h, oW, None, oA, oB, 2.0) if fused else _ref(h, oW, oA, oB, 2.0)
        if fused:
            return fl.LoRAMLP.apply(o, gW, None, gA, gB, 2.0, uW, None, uA, uB, 2.0, dW, None, dA, dB, 2.0,
                                    _swiglu_fwd, _swiglu_bwd_traced, True)
        return _ref(F.silu(_ref(o, gW, gA, gB, 2.0)) * _ref(o, uW, uA, uB, 2.0), dW, dA, dB, 2.0)

    compiled = torch.compile(lambda X: block(X, True), backend="aot_eager", fullgraph=True)
    X = X0 * 1
    out, ref = compiled(X), block(X0, False)
    torch.testing.assert_close(out, ref)
    leaves = [X0, oA, oB, gA, gB, uA, uB, dA, dB] + [t for _, A, B in qkv for t in (A, B)]
    cot = torch.randn_like(ref)
    X_before = X.detach().clone()
    for g, gr in zip(_grads(out, leaves, cot), _grads(ref, leaves, cot)):
        torch.testing.assert_close(g, gr)
    torch.testing.assert_close(X.detach(), X_before)   # X itself untouched by the traced backward


def test_fast_kernels_keep_unsloths_decoder_blocks_eager(monkeypatch):
    # Unsloth reads UNSLOTH_BLOCK_COMPILE_LEGACY when get_peft_model patches the model; with LORA_KERNELS=fast it
    # must read "0" (the router steps aside inside compiled blocks), and the caller's own setting comes back after.
    from finetune.model import _unsloth_block_compile

    key = "UNSLOTH_BLOCK_COMPILE_LEGACY"
    monkeypatch.delenv(key, raising=False)
    with _unsloth_block_compile(on=False):
        assert os.environ[key] == "0"
    assert key not in os.environ
    monkeypatch.setenv(key, "1")
    with _unsloth_block_compile(on=False):
        assert os.environ[key] == "0"
    assert os.environ[key] == "1"
    with _unsloth_block_compile(on=True):       # LORA_KERNELS=unsloth: Unsloth's own choice stands
        assert os.environ[key] == "1"
