"""Choosing the micro-batch and gradient checkpointing for the GPU at hand, keeping the effective batch.

The user's effective batch (BATCH_SIZE, default 8, x GRAD_ACCUM x GPUs) is fixed; what is chosen is how it is cut
(micro-batch x accumulation steps) and how activations are kept:

    off       every decoder layer keeps its activations (fastest, most memory)
    partial   K of L layers keep them, the rest are recomputed in backward (Unsloth only)
    on        every layer recomputed from its saved input
    offload   like on, with the saved inputs in host memory (Unsloth's "unsloth" checkpointing; HF: same as on)

Every (micro-batch, mode) whose estimated peak fits the budget (0.85 of the GPU, or of MAX_GPU_MEMORY) is scored
with a relative time per token, and the cheapest is taken:

    time/token ~ (1 + D / tokens_per_micro_batch) x (1 + RECOMPUTE x share of layers recomputed) [x offload cost]

D is the fixed cost of one micro-batch in tokens (mostly dequantising the NF4 weights for forward and backward,
about 330 tokens' worth of matrix work for an 8B model), so a bigger micro-batch is worth a few percent, while
recomputing costs about a third of a layer's forward+backward: keeping activations wins whenever it fits.
The memory model is an estimate from the model's shape, calibrated on an H100 (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

MARGIN = 0.85          # share of the GPU (or of MAX_GPU_MEMORY) the estimate may fill
RECOMPUTE = 0.33       # extra time for recomputing one layer's forward, relative to its forward+backward
OFFLOAD_COST = 0.04    # host<->device copies of the saved layer inputs
GIB = 2**30

# Saved activations per token per decoder layer, in bf16 values: a*hidden + b*intermediate (calibrated).
ACT = {"unsloth": (6.0, 3.0), "hf": (10.0, 4.0)}


@dataclass(frozen=True)
class Choice:
    micro_batch: int
    grad_accum: int
    mode: str           # off | partial | on | offload
    keep_layers: int    # decoder layers that keep their activations (L for off, 0 for on/offload)
    est_bytes: float
    budget_bytes: float
    note: str = ""


def choose_micro_batch(cfg, logical: int, accum: int, grad_ckpt: str, backend: str = "hf",
                       shape: dict | None = None, budget: float | None = None, max_micro: int | None = None) -> Choice:
    """The fastest (micro-batch, checkpointing) that fits; micro x accum == logical x GRAD_ACCUM always.

    max_micro: an explicit BATCH_SIZE is a ceiling (only split further when it does not fit); with
    BATCH_SIZE=auto accumulation steps may also be merged into one larger micro-batch."""
    shape = shape or model_shape(cfg)
    budget = budget if budget is not None else budget_bytes(cfg)
    total = logical * accum
    seq = cfg.max_seq_length
    L = shape["layers"]
    if grad_ckpt == "auto":
        modes = ["off", "partial", "offload"] if backend == "unsloth" else ["off", "on"]
    else:
        modes = [grad_ckpt]
    if backend != "unsloth" and "offload" in modes:
        modes = ["on"]  # HF has no activation offload: plain checkpointing is the leanest it has
    best: tuple | None = None
    for micro in sorted({d for d in range(1, (max_micro or total) + 1) if total % d == 0}):
        for mode in modes:
            keeps = range(L - 1, 0, -1) if mode == "partial" else [L if mode == "off" else 0]
            for keep in keeps:
                need = estimate_bytes(shape, micro, seq, mode, cfg.use_qlora, backend, keep)
                if need > budget:
                    continue
                t = time_per_token(shape, micro, seq, mode, cfg.use_qlora, keep)
                cand = (t, -micro, Choice(micro, total // micro, mode, keep, need, budget))
                if best is None or cand[:2] < best[:2]:
                    best = cand
                break  # the largest K that fits is the fastest partial for this micro-batch
    if best is not None:
        return best[2]
    lean = modes[-1] if modes[-1] != "off" else "off"
    need = estimate_bytes(shape, 1, seq, lean, cfg.use_qlora, backend, 0)
    return Choice(1, total, lean, 0, need, budget,
                  note=f"nothing fits the estimate ({need / GIB:.1f} GiB > {budget / GIB:.1f} GiB): trying the leanest")


def budget_bytes(cfg) -> float:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    if cfg.max_gpu_memory > 0:
        total = min(total, cfg.max_gpu_memory * GIB)
    return MARGIN * total


def model_shape(cfg) -> dict:
    import json
    from pathlib import Path

    from finetune.model import resolve_base

    return shape_from_config(json.loads((Path(resolve_base(cfg)) / "config.json").read_text()))


def shape_from_config(c: dict) -> dict:
    c = c.get("text_config", c)
    h, L = c["hidden_size"], c["num_hidden_layers"]
    inter = c.get("intermediate_size", 4 * h)
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim") or h // heads
    per_layer = h * hd * (heads + 2 * kv) + heads * hd * h + 3 * h * inter
    lora_per_layer = (h + hd * heads) + 2 * (h + hd * kv) + (heads * hd + h) + 2 * (h + inter) + (inter + h)
    embed = c["vocab_size"] * h * (1 if c.get("tie_word_embeddings") else 2)
    return {"hidden": h, "layers": L, "inter": inter, "vocab": c["vocab_size"], "layer_params": L * per_layer,
            "embed_params": embed, "lora_in_out": L * lora_per_layer}


def estimate_bytes(shape: dict, micro: int, seq: int, mode: str, qlora: bool, backend: str = "hf",
                   keep: int = 0, lora_rank: int = 16) -> float:
    """Peak bytes on the GPU: weights + LoRA states + saved activations + logits + workspace."""
    h, inter, L, vocab = shape["hidden"], shape["inter"], shape["layers"], shape["vocab"]
    weights = shape["layer_params"] * (0.53 if qlora else 2.0) + shape["embed_params"] * 2
    lora = shape["lora_in_out"] * lora_rank * 12          # fp32 weight + grad + 8-bit Adam moments, generous
    tokens = micro * seq
    a, b = ACT["unsloth" if backend == "unsloth" else "hf"]
    layer = tokens * (a * h + b * inter) * 2               # one layer's saved activations (bf16)
    layer_input = tokens * h * 2
    if mode == "off":
        acts = L * layer
    elif mode == "partial":
        acts = keep * layer + (L - keep) * layer_input + layer
    elif mode == "on":
        acts = L * layer_input + layer
    else:  # offload: inputs in host memory, a couple in flight
        acts = 2 * layer_input + layer
    if backend == "unsloth":
        logits = tokens * vocab * 1.0                      # fused, chunked cross-entropy
    else:
        logits = tokens * vocab * 10.0                     # bf16 logits, fp32 upcast and its gradient
    return weights + lora + acts + logits + 1.5 * GIB       # + workspace and allocator slack


def time_per_token(shape: dict, micro: int, seq: int, mode: str, qlora: bool, keep: int = 0) -> float:
    fixed = 330.0 if qlora else 100.0
    L = shape["layers"]
    recomputed = {"off": 0.0, "partial": (L - keep) / L, "on": 1.0, "offload": 1.0}[mode]
    t = (1 + fixed / (micro * seq)) * (1 + RECOMPUTE * recomputed)
    return t * (1 + OFFLOAD_COST) if mode == "offload" else t


def describe(c: Choice, layers: int) -> str:
    ck = {"off": "off (all layers keep activations)", "on": "on (every layer recomputed)",
          "offload": "offload (recomputed, layer inputs in host memory)",
          "partial": f"partial ({c.keep_layers} of {layers} layers keep activations)"}[c.mode]
    return (f"micro-batch {c.micro_batch} x grad-accum {c.grad_accum}, gradient checkpointing {ck}; "
            f"estimated peak {c.est_bytes / GIB:.1f} GiB of a {c.budget_bytes / GIB:.1f} GiB budget"
            + (f" ({c.note})" if c.note else ""))
