"""BASE_PRECISION=fp8 (finetune/fp8.py) and the MFU arithmetic (finetune/mfu.py), on the CPU.

The FP8 GEMMs run here through torch._scaled_mm's CPU kernel and the activation quantiser through its PyTorch
reference (the Triton kernel is checked against that reference on the GPU by bench/fp8_check.py)."""

import json

import pytest
import torch

from finetune import fp8, mfu
from finetune.config import RunConfig
from finetune.errors import ConfigError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


# ------------------------------------------------------------------ quantisation
def test_weights_round_trip_within_e4m3_rounding_with_one_scale_per_output_row():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * torch.logspace(-3, 0, 96)[:, None]   # rows of very different magnitude
    w8, s = fp8.quantize_weight(w)
    assert w8.dtype == torch.float8_e4m3fn and s.shape == (96,)
    back = fp8.dequantize_weight(w8, s)
    # e4m3 keeps 3 mantissa bits: each element within half a step (2^-4 relative), rows scaled to their own max
    err = (back - w).abs()
    assert bool((err <= w.abs() * 2**-4 + s[:, None] * 2**-9 + 1e-12).all())
    assert float(w8.float().abs().amax(1).min()) == fp8.E4M3_MAX  # every row uses the full range


def test_activation_rows_are_padded_to_16_with_zero_rows_and_unit_scales():
    x = torch.randn(21, 32)
    q, s = fp8.quantize_rows([x])
    assert q.shape == (32, 32) and s.shape == (32, 1)
    assert bool((q[21:].float() == 0).all()) and bool((s[21:] == 1).all())
    assert rel(q[:21].float() * s[:21], x) < 0.03
    # a column scale is folded in before the row scale is taken
    c = torch.rand(32) + 0.5
    q2, s2 = fp8.quantize_rows([x[:, :20], x[:, 20:]], c)
    assert rel(q2[:21].float() * s2[:21], x * c) < 0.03


# ------------------------------------------------------------------ the fused LoRA Functions
def _fp8_weights(ws: dict) -> dict:
    """FP8 weights with the K-major copies quantize_lora_bases builds (groups q/k/v and gate/up)."""
    w8 = {n: fp8.FP8Linear(*fp8.quantize_weight(w)).weight for n, w in ws.items()}
    for group in (("q", "k", "v"), ("gate", "up")):
        t = torch.cat([w8[n] for n in group], 0).t().contiguous()
        cs = torch.cat([fp8.meta(w8[n]).scale for n in group])
        for n in group:
            fp8.meta(w8[n]).group_t, fp8.meta(w8[n]).group_scale = t, cs
    for n in ("o", "down"):
        fp8.meta(w8[n]).t = w8[n].t().contiguous()
    return w8


def _swiglu_fwd(e, g):
    return torch.nn.functional.silu(e) * g


def _swiglu_bwd(DW, e, g):  # Unsloth's kernel contract: in place, DW -> h, e -> d(up), g -> d(gate)
    se = torch.sigmoid(e)
    f = e * se
    h, df, de = f * g, DW * f, DW * g * se * (1 + e * (1 - se))
    DW.copy_(h), e.copy_(df), g.copy_(de)
    return DW, e, g


def test_fp8_lora_layer_matches_autograd_on_the_dequantised_base():
    """One decoder layer through the FP8 Functions against plain autograd on the FP8 weights dequantised: the only
    difference left is the per-token quantisation of the activations and their gradients (~2% relative)."""
    torch.manual_seed(0)
    h, inter, kv, r, S = 64, 128, 32, 4, 2.0
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (inter, h), "up": (inter, h), "down": (h, inter)}
    ws = {n: torch.randn(*s) * 0.1 for n, s in shapes.items()}
    w8 = _fp8_weights(ws)
    wd = {n: fp8.dequantize_weight(w8[n], fp8.meta(w8[n]).scale) for n in ws}
    A = {n: (torch.randn(r, s[1]) * 0.1).requires_grad_() for n, s in shapes.items()}
    B = {n: (torch.randn(s[0], r) * 0.1).requires_grad_() for n, s in shapes.items()}
    X = torch.randn(3, 7, h)

    def lora(n, x, w):
        return x @ w[n].t() + S * (x @ A[n].t()) @ B[n].t()

    def reference():
        x1, x2 = X.clone().requires_grad_(), X.clone().requires_grad_()
        q, k, v = (lora(n, x1, wd) for n in "qkv")
        o = lora("o", q, wd)
        m = lora("down", _swiglu_fwd(lora("gate", x2, wd), lora("up", x2, wd)), wd)
        return x1, x2, (q, k, v, o, m)

    def ours():
        x1, x2 = X.clone().requires_grad_(), X.clone().requires_grad_()
        a = lambda n: (w8[n], fp8.meta(w8[n]).scale, A[n], B[n], S)  # noqa: E731
        q, k, v = fp8.FP8LoRAQKV.apply(x1, *a("q"), *a("k"), *a("v"), False)
        o = fp8.FP8LoRAW.apply(q, *a("o"))
        m = fp8.FP8LoRAMLP.apply(x2, *a("gate"), *a("up"), *a("down"), _swiglu_fwd, _swiglu_bwd, False)
        return x1, x2, (q, k, v, o, m)

    results = []
    for fn in (reference, ours):
        for p in list(A.values()) + list(B.values()):
            p.grad = None
        x1, x2, outs = fn()
        torch.manual_seed(1)
        loss = sum((o * torch.randn_like(o)).sum() for o in outs)
        loss.backward()
        results.append((outs, x1.grad, x2.grad, {n: (A[n].grad, B[n].grad) for n in A}))
    (ref_o, ref_d1, ref_d2, ref_g), (our_o, our_d1, our_d2, our_g) = results
    for a, b in zip(our_o, ref_o):
        assert rel(a, b) < 0.06
    assert rel(our_d1, ref_d1) < 0.05 and rel(our_d2, ref_d2) < 0.05
    for n in A:
        assert rel(our_g[n][0], ref_g[n][0]) < 0.06 and rel(our_g[n][1], ref_g[n][1]) < 0.06, n


def test_a_peft_model_on_an_fp8_base_trains_its_adapters_only(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.randint(10, 1000, (2, 24))
    ref_loss = float(model(input_ids=ids, labels=ids).loss)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    n = fp8.quantize_lora_bases(peft)
    assert n["layers"] == 14 and n["fp8_bytes"] < n["bf16_bytes"]  # float32 base: 4 bytes -> 2 x 1 byte + scales
    bases = [m for m in peft.modules() if isinstance(m, fp8.FP8Linear)]
    assert len(bases) == 14 and all(b.weight.dtype == torch.float8_e4m3fn and not b.weight.requires_grad for b in bases)
    out = peft(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {k: p.grad for k, p in peft.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in k and g is not None and torch.isfinite(g).all() for k, g in grads.items())
    with peft.disable_adapter():
        base_loss = float(peft(input_ids=ids, labels=ids).loss)
    assert abs(base_loss - ref_loss) / ref_loss < 0.01  # the FP8 base alone is within 1% of the original's loss


def test_smollm2_fp8_round_trip_keeps_logits_and_greedy_answers(smollm2_dir):
    """Bounds for the bundled SmolLM2-135M, measured on the CPU (docs/QUALITY.md): its 7 projections of all 30 layers
    through FP8 e4m3 with row scales keep the logits of 8 retention-probe prompts within 15% (relative L2 norm;
    measured 10.9%), the argmax next token at 80% of positions (measured 86.2%), and the greedy 12-token answers
    identical for at least 4 of the 8 (measured 6). A small model is the hard case: every layer's rounding compounds
    through 30 layers of width 576. About 2 CPU-minutes (generation dominates)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    probes = json.load(open("data/retention/probes.json"))[:8]
    enc = [tok.apply_chat_template([{"role": "user", "content": p["question"]}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"] for p in probes]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()

    def run():
        with torch.no_grad():
            logits = [model(ids).logits[0] for ids in enc]
            answers = [model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
                       for ids in enc]
        return logits, [tok.decode(a, skip_special_tokens=True) for a in answers]

    logits0, answers0 = run()
    assert fp8.round_trip_(model, TARGETS) == 30 * 7
    logits1, answers1 = run()
    worst = max(rel(b, a) for a, b in zip(logits0, logits1))
    agree = sum(float((a.argmax(-1) == b.argmax(-1)).float().sum()) for a, b in zip(logits0, logits1)) / sum(
        a.shape[0] for a in logits0)
    same = sum(a == b for a, b in zip(answers0, answers1))
    print(f"SmolLM2 FP8 round trip: logits within {worst:.3f}, argmax agreement {agree:.3f}, greedy identical {same}/8")
    assert worst < 0.15 and agree >= 0.80 and same >= 4
    assert worst > 0.005  # the round trip really changed the weights


# ------------------------------------------------------------------ configuration and fallback
def test_base_precision_sets_use_qlora_and_refuses_a_contradiction(clean_env):
    assert RunConfig.from_env({"BASE_PRECISION": "fp8", "BASE_MODEL_NAME": "/m"}, env_file=None).use_qlora is False
    assert RunConfig.from_env({"BASE_PRECISION": "nf4"}, env_file=None).use_qlora is True
    assert RunConfig.from_env({"BASE_MODEL_NAME": "/m"}, env_file=None).use_qlora is True  # auto: the seed's default
    with pytest.raises(ConfigError, match="BASE_PRECISION=fp8 contradicts USE_QLORA=true"):
        RunConfig.from_env({"BASE_PRECISION": "fp8", "USE_QLORA": "true"}, env_file=None)
    with pytest.raises(ConfigError, match="BASE_PRECISION"):
        RunConfig.from_env({"BASE_PRECISION": "fp4"}, env_file=None)
    with pytest.raises(ConfigError, match="cannot stream"):
        RunConfig.from_env({"BASE_PRECISION": "fp8", "OFFLOAD_WEIGHTS": "on"}, env_file=None)
    # a resume must not switch the base's precision; auto leaves old checkpoints' fingerprints as they were
    assert RunConfig.from_env({"BASE_PRECISION": "fp8"}, env_file=None).fingerprint_fields()["base_precision"] == "fp8"
    assert "base_precision" not in RunConfig.from_env({}, env_file=None).fingerprint_fields()


def test_fp8_falls_back_to_bf16_without_an_fp8_gpu_and_says_why():
    assert fp8.resolve("fp8", False, "cpu") == ("bf16", "BASE_PRECISION=fp8 falls back to a bf16 base: "
                                                        "FP8 GEMMs need a CUDA GPU (none here)")
    assert fp8.resolve("auto", True, "cpu")[0] == "nf4" and fp8.resolve("auto", False, "cuda")[0] == "bf16"


def test_an_fp8_run_on_the_cpu_trains_on_bf16_and_logs_tokens_per_second(tmp_path, tiny_llama_dir):
    from tests.test_train import CPU, losses, setup_run
    from finetune.train import train

    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir, base_precision="fp8", num_epochs=1)
    said = []
    train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False, log=lambda *a, **k: said.append(" ".join(map(str, a))))
    text = "\n".join(said)
    assert "base weights float32 (BASE_PRECISION=fp8 falls back to a bf16 base" in text  # a CPU holds it in float32
    assert "GFLOP per token" in text and "tokens/s after the first logged step" in text
    curve = losses(paths)
    assert "tokens_per_s" not in curve[0] and all(r["tokens_per_s"] > 0 for r in curve[1:])
    assert "mfu" not in curve[-1]  # no peak is known for a CPU
    # the merge reports the FP8 gap beside the parity gate, as it reports the QLoRA gap
    from finetune.merge import merge

    merged = merge(cfg, paths, str(tiny_llama_dir), "cpu", log=lambda *a, **k: None)
    parity = json.loads((merged / "merge_parity.json").read_text())
    assert parity["qlora_gap"] is None and 0 < parity["fp8_gap"] < 1


# ------------------------------------------------------------------ MFU
LLAMA_8B = dict(layers=32, d_attn=4096, n_frozen=32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336) + 128256 * 4096,
                n_trainable=32 * 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336)))


def test_llama_8b_lora_step_is_about_32_gflop_per_token():
    f = mfu.flops_per_token(**LLAMA_8B, attn_span=2048)
    assert 31.5e9 < f < 32.2e9
    # attention grows with the span, the projections do not
    assert mfu.flops_per_token(**LLAMA_8B, attn_span=552) < f - 1e9


def test_peaks_match_the_gpu_and_precision_and_unknown_gpus_report_none():
    assert mfu.peak_tflops("NVIDIA H200", "fp8") == pytest.approx(2 * mfu.peak_tflops("NVIDIA H200", "bf16"), rel=1e-3)
    assert mfu.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert mfu.peak_tflops("NVIDIA H100 80GB HBM3", "nf4") == 989.4   # NF4 multiplies in bf16
    assert mfu.peak_tflops("NVIDIA A100-SXM4-80GB", "fp8") is None     # no FP8 tensor cores
    assert mfu.peak_tflops("Some Future GPU", "bf16") is None
    assert mfu.mfu(20000, 32e9, 989.4) == pytest.approx(0.6469, abs=1e-4)


def test_attention_span_weights_rows_by_their_tokens():
    assert mfu.attention_span([2048] * 4) == 2048
    assert mfu.attention_span([100, 300]) == pytest.approx((100 * 100 + 300 * 300) / 400)


def test_frozen_matmul_params_count_the_tied_head_once_and_skip_norms(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    c = model.config
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    expect = 2 * per_layer + c.vocab_size * 64  # tied: the head multiplies, the embedding lookup does not
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS))
    assert mfu.frozen_matmul_params(peft) == expect
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert mfu.model_flops_per_token(peft, 100) == mfu.flops_per_token(2, 64, expect, trainable, 100)
