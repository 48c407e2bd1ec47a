"""Choosing the micro-batch and gradient checkpointing for the GPU at hand, keeping the effective batch.

The user's effective batch (BATCH_SIZE, default 8, x GRAD_ACCUM x GPUs) is fixed; what is chosen is how it is cut:
the largest micro-batch that divides it and fits the memory budget, with the cheapest checkpointing that fits.
The memory model is an estimate from the model's shape, calibrated on the H100 (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from finetune.config import RunConfig


def choose_micro_batch(cfg: RunConfig, logical: int, accum: int, grad_ckpt: str) -> tuple[int, int, str]:
    import torch

    total = logical * accum
    budget = _budget_bytes(cfg)
    shape = _shape(cfg)
    modes = [grad_ckpt] if grad_ckpt != "auto" else ["off", "on", "offload"]
    for mode in modes:
        for micro in sorted({d for d in range(1, total + 1) if total % d == 0}, reverse=True):
            if estimate_bytes(shape, micro, cfg.max_seq_length, mode, cfg.use_qlora) <= budget:
                return micro, total // micro, mode
    return 1, total, modes[-1]


def _budget_bytes(cfg: RunConfig) -> float:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    if cfg.max_gpu_memory > 0:
        total = min(total, cfg.max_gpu_memory * 2**30)
    return 0.85 * total  # margin for fragmentation and the allocator's cache


def _shape(cfg: RunConfig) -> dict:
    import json
    from pathlib import Path

    from finetune.model import resolve_base

    c = json.loads((Path(resolve_base(cfg)) / "config.json").read_text())
    h, L = c["hidden_size"], c["num_hidden_layers"]
    inter = c.get("intermediate_size", 4 * h)
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim", h // heads)
    params = L * (h * hd * (heads + 2 * kv) + heads * hd * h + 3 * h * inter) + 2 * c["vocab_size"] * h
    return {"hidden": h, "layers": L, "inter": inter, "vocab": c["vocab_size"], "params": params}


def estimate_bytes(shape: dict, micro: int, seq: int, mode: str, qlora: bool) -> float:
    """Weights + activations + logits, in bytes (bf16 activations)."""
    weights = shape["params"] * (0.55 if qlora else 2.0)
    tokens = micro * seq
    h, inter, L = shape["hidden"], shape["inter"], shape["layers"]
    per_layer = tokens * (16 * h + 6 * inter) * 2     # saved activations of one decoder layer, bf16
    if mode == "off":
        acts = L * per_layer
    elif mode == "on":
        acts = L * tokens * h * 2 + per_layer          # layer inputs kept, one layer recomputed at a time
    else:  # offload: layer inputs live in host memory
        acts = 2 * tokens * h * 2 + per_layer
    logits = tokens * shape["vocab"] * 4 * 2           # fp32 logits and their gradient
    return weights + acts + logits + 2 * 2**30         # + CUDA context, LoRA states, workspace
