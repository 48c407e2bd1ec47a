"""Choosing the micro-batch and gradient checkpointing for the GPU at hand, keeping the effective batch.

The user's effective batch (BATCH_SIZE, default 8, x GRAD_ACCUM x GPUs) is fixed; what is chosen is how it is cut
(micro-batch x accumulation steps) and how activations are kept:

    off       every decoder layer keeps its activations (fastest, most memory)
    partial   K of L layers keep them, the rest are recomputed in backward (Unsloth only)
    on        every layer recomputed from its saved input
    offload   like on, with the saved inputs in host memory (Unsloth's "unsloth" checkpointing; HF: same as on)
    stream    like offload, and the frozen decoder layers and the input embedding stay in host RAM too: each layer
              is copied to the GPU just before it runs (Unsloth's block swap; OFFLOAD_WEIGHTS). Only the output
              head and a few layers' slots stay on the card: the leanest, taken when nothing else fits.

Every (micro-batch, mode) whose estimated peak fits the budget (0.90 of the GPU, or of MAX_GPU_MEMORY) is scored
with a relative time per token, and the cheapest is taken (ties: the larger micro-batch):

    time/token ~ max(D / tokens_per_micro_batch, 1) + RECOMPUTE[mode] x share of layers recomputed

D: below ~D tokens a micro-batch is bound by the host launching its kernels, not by the GPU. Measured on an H100
with Unsloth, Llama-3.1-8B QLoRA: ~0.3 s of host time per micro-batch against ~70 us of GPU time per token, so
D ~ 4300; one 2048-token row per micro-batch ran at 6.7k tokens/s, four or eight rows at 14.1-14.3k. A recomputed
layer costs +40% (Unsloth's offloaded checkpointing, LoRA dropout 0; +56% with dropout). So: keep activations
where they fit, micro-batches of at least ~4k tokens, and recompute only the layers that do not fit.

Token counts come from the data when it is known: padding-free micro-batches hold the sum of their rows' lengths
(the peak is taken at the `micro` longest rows), padded ones `micro` x the longest row.
The memory model is an estimate from the model's shape, calibrated on an H100 (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

MARGIN = 0.90          # share of the GPU (or of MAX_GPU_MEMORY) the estimate may fill (it is itself ~1-3 GiB high)
GIB = 2**30
# Extra time per token for a recomputed layer, relative to a kept one. H100, Llama-3.1-8B QLoRA, Unsloth's
# offloaded checkpointing: 0.36-0.41 with LoRA dropout 0, 0.56 with dropout 0.05 (the masks are replayed).
RECOMPUTE = {"off": 0.0, "partial": 0.4, "on": 0.45, "offload": 0.4, "stream": 0.5}
# stream: layers on the card at once (the running one and Unsloth's prefetch depth of 2).
STREAM_SLOTS = 3
RECOMPUTE_DROPOUT = 0.16
# Host-bound floor of one micro-batch in tokens' worth of GPU work (H100, 8B, Unsloth, QLoRA: 0.3 s / 70 us).
FIXED_TOKENS = {"qlora": 4300.0, "lora": 2500.0}

# Padding-free batches (rows concatenated, attention split at the row boundaries) cost this much more time per
# token than a padded batch of the same rows on the GPU. H100, Llama-3.1-8B QLoRA, Unsloth, 8 x 2048 equal rows:
# 14,450-14,512 tokens/s padding-free against 15,095 padded (docs/BENCHMARKS.md). So padding-free pays only when
# padding would waste more than this share of the tokens.
PACKED_OVERHEAD = 0.04

# Saved activations per token per decoder layer, in bf16 values: a*hidden + b*intermediate. Unsloth, measured on
# Llama-3.1-8B (H100): 120 KB per token per layer with LoRA dropout 0 (1.83 GiB per kept layer at 8 x 2048
# tokens), plus ~37 KB of dropout masks (one byte per LoRA input element) with dropout > 0.
# HF: raised after an H200 run (docs/BENCHMARKS.md, issue 7) where the old (10, 4) estimated 102 GiB for
# 8 x 2048 tokens without checkpointing and the run needed more than 126 GiB; not yet calibrated precisely.
ACT = {"unsloth": (4.8, 2.8), "hf": (16.0, 6.4)}


# OPTIM=auto on a GPU: torch's fused AdamW (fp32 moments: ~0.25 GiB more than 8-bit for an 8B model's r=16 LoRA, and
# one kernel instead of one per tensor) unless the budget is under this, where 8-bit moments keep the room for
# activations (a 24 GiB card fits two 2048-token rows of an 8B model only with them).
FUSED_ADAM_MIN_BUDGET = MARGIN * 40 * GIB


# LORA_KERNELS=auto: fast_lora (eager decoder blocks) from this hidden size up, Unsloth's kernels in its compiled
# blocks below. Measured (docs/BENCHMARKS.md, runs 10-13): hidden 4096 (Llama-3.1-8B) fast +4-5%; hidden 1024 (a
# 4-layer Qwen2, bench/families_check.py, two runs) fast 6-32% slower, where compiling the blocks' elementwise work
# matters more than the LoRA passes. Between the two nothing was measured; 3072 puts 3B-class models and up on fast.
FAST_LORA_MIN_HIDDEN = 3072


def lora_kernels_for(cfg, shape: dict) -> tuple[str, str]:
    """(fast | unsloth, why) for the Unsloth backend."""
    if cfg.lora_kernels != "auto":
        return cfg.lora_kernels, f"LORA_KERNELS={cfg.lora_kernels}"
    if shape["hidden"] >= FAST_LORA_MIN_HIDDEN:
        return "fast", f"auto: hidden size {shape['hidden']} >= {FAST_LORA_MIN_HIDDEN}"
    return "unsloth", f"auto: hidden size {shape['hidden']} < {FAST_LORA_MIN_HIDDEN}, compiled blocks gain more"


def optimizer_for(cfg, budget: float) -> str:
    if cfg.optim != "auto":
        return cfg.optim
    return "adamw_torch_fused" if budget >= FUSED_ADAM_MIN_BUDGET else "adamw_8bit"


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
                       shape: dict | None = None, budget: float | None = None, max_micro: int | None = None,
                       lengths: list[int] | None = None, padding_free: bool = False,
                       keep_fixed: int | None = None) -> Choice:
    """The fastest (micro-batch, checkpointing) that fits; micro x accum == logical x GRAD_ACCUM always.

    max_micro: an explicit BATCH_SIZE is a ceiling (only split further when it does not fit); with
    BATCH_SIZE=auto accumulation steps may also be merged into one larger micro-batch.
    lengths: the tokenised rows' lengths, when known (else every row counts as MAX_SEQ_LENGTH).
    keep_fixed: under a forced "partial", the number of kept layers of an already loaded model."""
    shape = shape or model_shape(cfg)
    budget = budget if budget is not None else budget_bytes(cfg)
    total = logical * accum
    seq = cfg.max_seq_length
    peak_tokens, mean_tokens = token_counts(lengths, seq, padding_free)
    L = shape["layers"]
    lora_bytes = 12 if optimizer_for(cfg, budget) == "adamw_8bit" else 16
    if grad_ckpt == "auto":
        modes = ["off", "partial", "offload"] if backend == "unsloth" else ["off", "on"]
    else:
        modes = [grad_ckpt]
    if backend != "unsloth" and "offload" in modes:
        modes = ["on"]  # HF has no activation offload: plain checkpointing is the leanest it has
    if backend == "unsloth" and cfg.offload_weights == "on":
        modes = ["stream"]
    elif backend == "unsloth" and cfg.offload_weights == "auto" and "offload" in modes:
        modes.append("stream")  # slower than offload: chosen only when nothing before it fits
    best: tuple | None = None
    for micro in sorted({d for d in range(1, (max_micro or total) + 1) if total % d == 0}):
        for mode in modes:
            if mode == "partial":
                keeps = [keep_fixed] if keep_fixed is not None else range(L - 1, 0, -1)
            else:
                keeps = [L if mode == "off" else 0]
            for keep in keeps:
                need = estimate_bytes(shape, 1, peak_tokens(micro), mode, cfg.use_qlora, backend, keep, cfg.lora_rank,
                                      cfg.lora_dropout, lora_bytes)
                if need > budget:
                    continue
                t = time_per_token(shape, mean_tokens(micro), mode, cfg.use_qlora, keep, cfg.lora_dropout)
                cand = (t, -micro, Choice(micro, total // micro, mode, keep, need, budget))
                if best is None or cand[:2] < best[:2]:
                    best = cand
                break  # the largest K that fits is the fastest partial for this micro-batch
    if best is not None:
        return best[2]
    lean = modes[-1]
    need = estimate_bytes(shape, 1, peak_tokens(1), lean, cfg.use_qlora, backend, keep_fixed or 0, cfg.lora_rank,
                          cfg.lora_dropout, lora_bytes)
    return Choice(1, total, lean, 0, need, budget,
                  note=f"nothing fits the estimate ({need / GIB:.1f} GiB > {budget / GIB:.1f} GiB): trying the leanest")


def token_counts(lengths: list[int] | None, seq: int, padding_free: bool):
    """(peak tokens of a micro-batch of m rows, mean tokens of one) as functions of m."""
    if not lengths:
        return (lambda m: m * seq), (lambda m: m * seq)
    lens = sorted((min(n, seq) for n in lengths), reverse=True)
    mean = sum(lens) / len(lens)
    if padding_free:
        return (lambda m: sum(lens[:m]) + 8 * m), (lambda m: m * mean)
    return (lambda m: m * lens[0]), (lambda m: m * lens[0])


def expected_pad_fraction(lengths: list[int], micro: int, seq: int, seed: int = 0, draws: int = 4) -> float:
    """Share of a padded batch's tokens that are padding, for random micro-batches of these rows (each padded to
    its longest row, as the trainer's collator does), averaged over a few seeded shuffles."""
    import random

    lens = [min(n, seq) for n in lengths]
    if not lens:
        return 0.0
    rng = random.Random(seed)
    useful = padded = 0
    for _ in range(draws):
        rng.shuffle(lens)
        for i in range(0, len(lens), micro):
            chunk = lens[i:i + micro]
            useful += sum(chunk)
            padded += len(chunk) * max(chunk)
    return 1 - useful / padded


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
                   keep: int = 0, lora_rank: int = 16, dropout: float = 0.0, lora_bytes: int = 12) -> float:
    """Peak bytes on the GPU: weights + LoRA states + saved activations + logits + workspace.

    Checked against the H100 runs in docs/BENCHMARKS.md (Llama-3.1-8B QLoRA, Unsloth): estimate vs measured
    peak allocated 50.5 vs 49.1 GiB (8 x 2048 tokens, 23 layers kept), 12.2 vs 10.7 (2 kept), 7.7 vs 7.5
    (4 x 2048, offload); with dropout 0.05: 45.8 vs 45.4 (4 x 2048, none recomputed), 16.6 vs 15.9 (1 x 2048)."""
    h, inter, L, vocab = shape["hidden"], shape["inter"], shape["layers"], shape["vocab"]
    per_param = 0.53 if qlora else 2.0
    if mode == "stream":  # the output head (bf16) and the layer slots; the rest is in host RAM
        weights = vocab * h * 2 + STREAM_SLOTS * shape["layer_params"] / L * per_param
    else:
        weights = shape["layer_params"] * per_param + shape["embed_params"] * 2
    # lora_bytes per LoRA parameter: fp32 weight and grad, plus the Adam moments (12: 8-bit, a little generous; 16: fp32)
    lora = shape["lora_in_out"] * lora_rank * lora_bytes
    tokens = micro * seq
    unsloth = backend == "unsloth"
    a, b = ACT["unsloth" if unsloth else "hf"]
    layer = tokens * (a * h + b * inter) * 2               # one layer's saved activations (bf16)
    if unsloth and dropout > 0:
        layer += tokens * (6 * h + inter)                  # dropout masks
    layer_input = tokens * h * 2
    recompute = 0.5 * layer if unsloth else layer          # one layer being recomputed in backward
    if mode == "off":
        acts = L * layer
    elif mode == "partial":                                # Unsloth: the other layers' inputs go to host memory
        acts = keep * layer + 2 * layer_input + recompute
    elif mode == "on":
        acts = L * layer_input + recompute
    else:  # offload, stream: inputs in host memory, a couple in flight
        acts = 2 * layer_input + recompute
    if unsloth:
        logits = tokens * vocab * 0.25                     # fused, chunked cross-entropy
    else:
        logits = tokens * vocab * 10.0                     # bf16 logits, fp32 upcast and its gradient
    return weights + lora + acts + logits + 1.0 * GIB       # + workspace and allocator slack


def useful_token_times(cfg, shape: dict, lengths: list[int], c_pf: Choice, c_pad: Choice) -> tuple[float, float, float]:
    """(padding-free, padded) relative time per useful token of the two plans, and the padded plan's padding."""
    seq = cfg.max_seq_length
    mean = sum(min(n, seq) for n in lengths) / max(len(lengths), 1)
    pad = expected_pad_fraction(lengths, c_pad.micro_batch, seq, cfg.seed)
    t = lambda c, tokens: time_per_token(shape, tokens, c.mode, cfg.use_qlora, c.keep_layers, cfg.lora_dropout)
    t_pf = t(c_pf, c_pf.micro_batch * mean) * (1 + PACKED_OVERHEAD)
    t_pad = t(c_pad, c_pad.micro_batch * mean / (1 - pad)) / (1 - pad)
    return t_pf, t_pad, pad


def time_per_token(shape: dict, tokens: float, mode: str, qlora: bool, keep: int = 0, dropout: float = 0.0) -> float:
    """Relative time per token of a micro-batch of `tokens` tokens."""
    L = shape["layers"]
    recomputed = {"off": 0.0, "partial": (L - keep) / L, "on": 1.0, "offload": 1.0, "stream": 1.0}[mode]
    cost = RECOMPUTE[mode] + (RECOMPUTE_DROPOUT if dropout > 0 and mode != "off" else 0.0)
    return max(FIXED_TOKENS["qlora" if qlora else "lora"] / max(tokens, 1.0), 1.0) + cost * recomputed


def describe(c: Choice, layers: int) -> str:
    ck = {"off": "off (all layers keep activations)", "on": "on (every layer recomputed)",
          "offload": "offload (recomputed, layer inputs in host memory)",
          "stream": "offload with streamed weights (recomputed, layer inputs in host memory; frozen layers and the "
                    "input embedding in host RAM, copied to the GPU as each layer runs)",
          "partial": f"partial ({c.keep_layers} of {layers} layers keep activations)"}[c.mode]
    return (f"micro-batch {c.micro_batch} x grad-accum {c.grad_accum}, gradient checkpointing {ck}; "
            f"estimated peak {c.est_bytes / GIB:.1f} GiB of a {c.budget_bytes / GIB:.1f} GiB budget"
            + (f" ({c.note})" if c.note else ""))
