"""Model-FLOPs utilisation: the FLOPs a LoRA step must do per token, over the GPU's dense peak (issue 21).

FLOPs per trained token (multiply-adds count 2), for a decoder with a frozen base and LoRA adapters:

    4 * N_frozen          every frozen matrix (projections and the output head) runs forward (2N) and backward for
                          the activation gradient (2N); a frozen weight gets no weight gradient
  + 6 * N_trainable       the adapters: forward, activation gradient and weight gradient (2N each)
  + 6 * L * S * d_attn    causal attention scores and values (QK^T and PV: 2 * 2 * S/2 * d_attn forward, twice that
                          backward), S the attention span (the token-weighted mean row length), d_attn = heads x head_dim

The input embedding is a lookup (no FLOPs). Recomputation under gradient checkpointing is not counted: MFU counts
the model's FLOPs, not the hardware's. For Llama-3.1-8B at 2048 tokens this is about 31.9 GFLOP per token.

The peak is the dense (no sparsity) tensor-core rate of the precision the frozen GEMMs run in: FP8 for
BASE_PRECISION=fp8, bf16 otherwise (an NF4 base is dequantised to bf16 for its GEMMs).
"""

from __future__ import annotations

# Dense tensor-core peaks in TFLOP/s from the vendors' datasheets (sparsity not counted), matched in order against
# the device name as torch reports it.
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp8": 1513.0}),
    ("H100 NVL", {"bf16": 835.0, "fp8": 1671.0}),
    ("H100", {"bf16": 989.4, "fp8": 1978.9}),      # SXM
    ("H200", {"bf16": 989.4, "fp8": 1978.9}),
    ("GH200", {"bf16": 989.4, "fp8": 1978.9}),
    ("H800", {"bf16": 989.4, "fp8": 1978.9}),
    ("B200", {"bf16": 2250.0, "fp8": 4500.0}),
    ("A100", {"bf16": 312.0}),
    ("A800", {"bf16": 312.0}),
    ("L40S", {"bf16": 362.1, "fp8": 733.0}),
    ("L4", {"bf16": 121.0, "fp8": 242.0}),
    ("A10G", {"bf16": 70.0}),
    ("A10", {"bf16": 125.0}),
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak for `precision` (fp8 | bf16 | nf4, nf4 computing in bf16) on the named GPU; None if unknown."""
    key = "fp8" if precision == "fp8" else "bf16"
    for name, peaks in PEAKS:
        if name.lower() in device_name.lower():
            return peaks.get(key)
    return None


def flops_per_token(layers: int, d_attn: int, n_frozen: int, n_trainable: int, attn_span: float) -> float:
    """Model FLOPs per trained token (see the module docstring)."""
    return 4.0 * n_frozen + 6.0 * n_trainable + 6.0 * layers * attn_span * d_attn


def model_flops_per_token(model, attn_span: float) -> float:
    """flops_per_token for a loaded (peft) model: its config's layers and attention width, its parameters."""
    c = model.config
    c = getattr(c, "text_config", None) or c
    heads = c.num_attention_heads
    d_attn = heads * (getattr(c, "head_dim", None) or c.hidden_size // heads)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return flops_per_token(c.num_hidden_layers, d_attn, frozen_matmul_params(model), trainable, attn_span)


def attention_span(lengths: list[int]) -> float:
    """The token-weighted mean row length: the mean over tokens of the row length the token attends within."""
    total = sum(lengths)
    return sum(n * n for n in lengths) / total if total else 0.0


def frozen_matmul_params(model) -> int:
    """Parameters of the frozen matrices a token multiplies: every frozen 2-D weight except the input embedding
    (a lookup), counting the output head even when it is tied to the embedding."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    n = 0
    for p in model.parameters():
        if p.requires_grad or p.dim() != 2 or p is emb:
            continue
        qs = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: packed storage, the real shape in the state
        n += qs.shape.numel() if qs is not None else p.numel()
    if head is not None and head.weight is emb:
        n += emb.numel()
    return n


def mfu(tokens_per_s: float, flops_token: float, peak: float | None) -> float | None:
    return None if not peak else tokens_per_s * flops_token / (peak * 1e12)
