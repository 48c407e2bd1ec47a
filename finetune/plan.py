"""The training plan, decided without touching a model: (config, backend, model shape, memory budget, row lengths)
-> TrainPlan. No I/O and no torch here; the train stage measures the shape and the budget once and passes them in.

On a GPU the plan chooses the micro-batch and gradient checkpointing for the card at hand, keeping the effective batch.

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
The memory model is an estimate from the model's shape, calibrated on an H100 (docs/BENCHMARKS.md). D, the recompute
cost and a factor on the memory estimate are `Constants`: the H100's by default, the card's own where earlier runs
on it measured them (finetune/calibrate.py; the train stage passes them in as `measured`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from finetune.errors import ConfigError

if TYPE_CHECKING:  # the planner reads the backend's answers; it never loads a model
    from finetune.config import RunConfig
    from finetune.model import Backend

MARGIN = 0.90          # share of the GPU (or of MAX_GPU_MEMORY) the estimate may fill (it is itself ~1-3 GiB high)
GIB = 2**30
# Extra time per token for a recomputed layer, relative to a kept one. H100, Llama-3.1-8B QLoRA, Unsloth's
# offloaded checkpointing: 0.36-0.41 with LoRA dropout 0, 0.56 with dropout 0.05 (the masks are replayed).
RECOMPUTE = {"off": 0.0, "partial": 0.4, "on": 0.45, "offload": 0.4, "stream": 0.5}
# stream: layers on the card at once (the running one and Unsloth's prefetch depth of 2).
STREAM_SLOTS = 3
# REPLAY_LOSS=kl, bytes per token x vocabulary entry on any backend: the tuned model's bf16 logits, their fp32
# log-softmax and its gradient (2 + 4 + 4), the base's bf16 logits and fp32 softmax (2 + 4).
KL_LOGIT_BYTES = 16.0
RECOMPUTE_DROPOUT = 0.16
# Host-bound floor of one micro-batch in tokens' worth of GPU work (H100, 8B, Unsloth, QLoRA: 0.3 s / 70 us).
FIXED_TOKENS = {"qlora": 4300.0, "lora": 2500.0}

# Padding-free batches (rows concatenated, attention split at the row boundaries) cost this much more time per
# token than a padded batch of the same rows on the GPU. H100, Llama-3.1-8B QLoRA, Unsloth, 8 x 2048 equal rows:
# 14,450-14,512 tokens/s padding-free against 15,095 padded (docs/BENCHMARKS.md). So padding-free pays only when
# padding would waste more than this share of the tokens.
PACKED_OVERHEAD = 0.04


# BASE_PRECISION=fp8 measured slower than the default QLoRA at this many tokens a micro-batch (H200, Llama-3.1-8B:
# ~3,700 tokens a step, 0.86x tuned Unsloth where QLoRA ran 1.07x; full 16,384-token steps 1.38x the bf16 base;
# docs/BENCHMARKS.md, issue 21): each GEMM's activation quantisation costs more than the faster GEMM saves. Between
# 4k and 16k tokens nothing is measured, so the plan warns only where the loss was seen.
FP8_SLOW_TOKENS = 4096



@dataclass(frozen=True)
class Constants:
    """What the time and memory models take from the card: the host floor D (FIXED_TOKENS), the cost of a recomputed
    layer (RECOMPUTE) and a factor on the memory estimate. The defaults were measured on one H100; a run on a GPU
    measures its own card (finetune/calibrate.py) and the next plan on that card, backend and model uses those."""

    fixed_tokens: float
    recompute: dict = field(default_factory=lambda: dict(RECOMPUTE))
    mem_scale: float = 1.0
    source: str = ""   # "" for the defaults; else where and how often they were measured (printed in the notes)

    @staticmethod
    def default(qlora: bool) -> Constants:
        return Constants(FIXED_TOKENS["qlora" if qlora else "lora"])


# OPTIM=auto on a GPU: torch's fused AdamW (fp32 moments: ~0.25 GiB more than 8-bit for an 8B model's r=16 LoRA, and
# one kernel instead of one per tensor) unless the budget is under this, where 8-bit moments keep the room for
# activations (a 24 GiB card fits two 2048-token rows of an 8B model only with them).
FUSED_ADAM_MIN_BUDGET = MARGIN * 40 * GIB



@dataclass
class TrainPlan:
    """Derived numbers, printed once in the banner and saved in the manifest."""

    micro_batch: int
    grad_accum: int
    world_size: int
    grad_ckpt: str
    backend: str
    device: str
    rows: int
    steps_per_epoch: int
    total_steps: int
    notes: list[str] = field(default_factory=list)
    keep_layers: int = 0        # grad_ckpt == "partial": decoder layers that keep their activations
    padding_free: bool = False  # rows concatenated without pad tokens (Unsloth on a GPU, or PACKING)
    optim: str = "adamw_torch"
    lora_kernels: str = "unsloth"  # Unsloth backend: fast (finetune/fast_lora.py, eager blocks) | unsloth
    replay_loss: str = "sft"    # REPLAY_LOSS resolved for this device (auto: kl on a CPU, sft on a GPU)
    est_bytes: float = 0.0      # GPU: the memory model's peak for this plan (a run compares its measured peak)

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def resolve_replay_loss(cfg: RunConfig, device: str, shape: dict | None = None) -> str:
    """REPLAY_LOSS=auto: the KL loss wherever it was measured to keep more: on a CPU, and on a GPU for a model under
    1B parameters (`shape`: the base's, shape_from_config). On the H200 the greedy-answer (sft) replay kept 46 % of
    the probes SmolLM2-135M knew where kl kept 78-80 % (docs/QUALITY.md, issue 23). Larger models on a GPU keep sft:
    kl's full logits (KL_LOGIT_BYTES) cost them memory and speed that nobody has weighed against its gain there. Never
    under an FP8 base, whose kernels cannot run the base with the adapter off (the KL's reference pass)."""
    from finetune.config import replay_weight_problem
    from finetune.defaults import SMALL_MODEL_PARAMS

    if cfg.replay_loss != "auto":
        return cfg.replay_loss  # an explicit value was checked with the rest of the config
    small = shape is not None and shape["layer_params"] + shape["embed_params"] < SMALL_MODEL_PARAMS
    kl = cfg.replay_fraction > 0 and cfg.base_precision != "fp8" and (device == "cpu" or small)
    loss = "kl" if kl else "sft"
    why = ("BASE_PRECISION=fp8" if cfg.base_precision == "fp8" else "this CPU" if device == "cpu" else
           "a model under 1B parameters" if small else "a GPU and a model of 1B parameters or more")
    problem = replay_weight_problem(cfg.replay_weight, loss, f"auto means {loss} for {why}")
    if problem:
        raise ConfigError(problem)
    return loss


def plan(cfg: RunConfig, backend: Backend, rows: int, world_size: int = 1, lengths: list[int] | None = None,
         shape: dict | None = None, gpu_memory: float | None = None, measured: Constants | None = None) -> TrainPlan:
    """The plan for `rows` training rows.

    lengths: tokenised row lengths (the GPU choice sizes micro-batches from them when given).
    shape: shape_from_config of the base; gpu_memory: the card's bytes. Both needed on a GPU only.
    measured: this card's constants from earlier runs (finetune/calibrate.py); None: the H100 defaults.
    """
    logical = 8 if cfg.batch_size == "auto" else int(cfg.batch_size)
    # The effective batch is BATCH_SIZE x GRAD_ACCUM whatever the number of processes, so a run moved from 1 to N
    # GPUs trains the same thing: each process takes 1/N of it.
    total = logical * cfg.grad_accum
    if total % world_size:
        raise ConfigError(f"effective batch BATCH_SIZE x GRAD_ACCUM = {total} does not split over {world_size} processes; "
                          f"make it a multiple of {world_size}")
    if world_size > 1:
        share = total // world_size
        logical = max(d for d in range(1, min(logical, share) + 1) if share % d == 0)
        micro, accum = logical, share // logical
    else:
        micro, accum = logical, cfg.grad_accum
    grad_ckpt = cfg.gradient_checkpointing
    if cfg.offload_weights == "on" and not backend.streams_weights:
        raise ConfigError(f"OFFLOAD_WEIGHTS=on streams layers with Unsloth's block swap, but this run's backend is "
                          f"{backend.name} ({backend.why}): set OFFLOAD_WEIGHTS=auto, or run on a CUDA GPU with unsloth")
    keep, notes, est = 0, [], 0.0
    # Padding-free batches by default: no compute on pad tokens. Row boundaries are kept by position ids, which
    # transformers turns into a block-diagonal mask (tests/data/test_packing.py checks the per-row loss). On a GPU,
    # rows of one length train faster padded (nothing to pad, no boundaries to split attention at).
    padding_free = True
    optim = cfg.optim if cfg.optim != "auto" else "adamw_torch"
    lora_kernels = "unsloth"
    if backend.device == "cuda":
        if shape is None or gpu_memory is None:
            raise ValueError("a GPU plan needs the model's shape and the card's memory")
        budget = budget_bytes(cfg, gpu_memory)
        k = measured or Constants.default(cfg.use_qlora)
        # BATCH_SIZE=auto (or any value) on a GPU: the same effective batch, cut into micro-batches that fit.
        choose = lambda pf: choose_micro_batch(  # noqa: E731
            cfg, logical, accum, grad_ckpt, backend, shape, budget, max_micro=None if cfg.batch_size == "auto" else logical,
            lengths=None if cfg.packing else lengths, padding_free=pf, k=k)
        c = choose(padding_free)
        if lengths and not cfg.packing:
            # Padded or padding-free, whichever is estimated faster per useful (non-pad) token. Padding-free never
            # computes on pads but pays for splitting attention at row boundaries; padded rows of one length pay
            # nothing, and on a small GPU the padded plan may fit more rows per micro-batch (its peak is micro x
            # the longest row, padding-free's the sum of the longest rows plus separators).
            c_pad = choose(False)
            t_pf, t_pad, pad = useful_token_times(cfg, shape, lengths, c, c_pad, k)
            if t_pad < t_pf:
                padding_free, c = False, c_pad
                notes.append(f"padded batches: estimated {t_pf / t_pad:.2f}x faster per useful token than padding-free "
                             f"(micro-batch {c_pad.micro_batch}, expected padding {pad:.1%} of tokens)")
        micro, accum, grad_ckpt, keep = c.micro_batch, c.grad_accum, c.mode, c.keep_layers
        optim = optimizer_for(cfg, c.budget_bytes)
        notes.append(("auto: " if cfg.gradient_checkpointing == "auto" else "") + describe(c, shape["layers"]))
        notes.append(describe_constants(k))
        est = c.est_bytes / k.mem_scale  # the model's own estimate: a run's measured peak is compared with it
        kernels = backend.lora_kernels(cfg, shape)
        if kernels:
            lora_kernels, why = kernels
            notes.append(f"LoRA kernels {lora_kernels} ({why})")
        if cfg.base_precision == "fp8":
            note = fp8_short_batch_note(cfg, micro, lengths)
            if note:
                notes.append(note)
    elif grad_ckpt == "auto":
        grad_ckpt = "off"  # CPU: memory is plentiful for the models that train there
    steps_per_epoch = max(1, math.ceil(rows / (micro * world_size)) // accum)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_epochs)
    return TrainPlan(micro, accum, world_size, grad_ckpt, backend.name, backend.device, rows, steps_per_epoch, total,
                     notes, keep, padding_free, optim, lora_kernels, resolve_replay_loss(cfg, backend.device, shape), est)


def fp8_short_batch_note(cfg: RunConfig, micro: int, lengths: list[int] | None) -> str | None:
    """A warning where BASE_PRECISION=fp8 was measured slower than the default: micro-batches of few tokens."""
    seq = cfg.max_seq_length
    tokens = micro * (seq if cfg.packing or not lengths else mean_length(lengths, seq))
    if tokens > FP8_SLOW_TOKENS:
        return None
    return (f"BASE_PRECISION=fp8 with about {tokens:,.0f} tokens a micro-batch: FP8 was measured slower than the "
            f"default 4-bit base at {FP8_SLOW_TOKENS:,} tokens or fewer (its activation quantisation outweighs the "
            f"faster GEMMs; docs/BENCHMARKS.md, issue 21); PACKING=true fills micro-batches, or leave BASE_PRECISION "
            f"at auto")


def budget_bytes(cfg: RunConfig, gpu_memory: float) -> float:
    """What the estimate may fill: MARGIN of the card, or of MAX_GPU_MEMORY when that is smaller."""
    if cfg.max_gpu_memory > 0:
        gpu_memory = min(gpu_memory, cfg.max_gpu_memory * GIB)
    return MARGIN * gpu_memory


# ---- the GPU choice ------------------------------------------------------------------------------------

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


def choose_micro_batch(cfg, logical: int, accum: int, grad_ckpt: str, backend: Backend, shape: dict, budget: float,
                       max_micro: int | None = None,
                       lengths: list[int] | None = None, padding_free: bool = False,
                       keep_fixed: int | None = None, k: Constants | None = None) -> Choice:
    """The fastest (micro-batch, checkpointing) that fits; micro x accum == logical x GRAD_ACCUM always.

    max_micro: an explicit BATCH_SIZE is a ceiling (only split further when it does not fit); with
    BATCH_SIZE=auto accumulation steps may also be merged into one larger micro-batch.
    lengths: the tokenised rows' lengths, when known (else every row counts as MAX_SEQ_LENGTH).
    keep_fixed: under a forced "partial", the number of kept layers of an already loaded model.
    k: the card's constants (None: the H100 defaults)."""
    k = k or Constants.default(cfg.use_qlora)
    total = logical * accum
    seq = cfg.max_seq_length
    peak_tokens, mean_tokens = token_counts(lengths, seq, padding_free)
    L = shape["layers"]
    lora_bytes = 12 if optimizer_for(cfg, budget) == "adamw_8bit" else 16
    kl = resolve_replay_loss(cfg, backend.device, shape) == "kl" and cfg.replay_fraction > 0
    modes = backend.checkpoint_modes(grad_ckpt, cfg.offload_weights)
    best: tuple | None = None
    for micro in sorted({d for d in range(1, (max_micro or total) + 1) if total % d == 0}):
        for mode in modes:
            if mode == "partial":
                keeps = [keep_fixed] if keep_fixed is not None else range(L - 1, 0, -1)
            else:
                keeps = [L if mode == "off" else 0]
            for keep in keeps:
                need = k.mem_scale * estimate_bytes(shape, 1, peak_tokens(micro), mode, cfg.use_qlora, backend, keep,
                                                    cfg.lora_rank, cfg.lora_dropout, lora_bytes, kl)
                if need > budget:
                    continue
                t = time_per_token(shape, mean_tokens(micro), mode, cfg.use_qlora, keep, cfg.lora_dropout, k)
                cand = (t, -micro, Choice(micro, total // micro, mode, keep, need, budget))
                if best is None or cand[:2] < best[:2]:
                    best = cand
                break  # the largest K that fits is the fastest partial for this micro-batch
    if best is not None:
        return best[2]
    lean = modes[-1]
    need = k.mem_scale * estimate_bytes(shape, 1, peak_tokens(1), lean, cfg.use_qlora, backend, keep_fixed or 0,
                                        cfg.lora_rank, cfg.lora_dropout, lora_bytes, kl)
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


def estimate_bytes(shape: dict, micro: int, seq: int, mode: str, qlora: bool, backend: Backend,
                   keep: int = 0, lora_rank: int = 16, dropout: float = 0.0, lora_bytes: int = 12,
                   kl: bool = False) -> float:
    """Peak bytes on the GPU: weights + LoRA states + saved activations + logits + workspace.
    kl: the KL replay loss materialises the full logits on every backend (KL_LOGIT_BYTES).

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
    a, b = backend.activation_values
    layer = tokens * (a * h + b * inter) * 2               # one layer's saved activations (bf16)
    if backend.saves_dropout_masks and dropout > 0:
        layer += tokens * (6 * h + inter)                  # dropout masks
    layer_input = tokens * h * 2
    recompute = backend.recompute_share * layer            # one layer being recomputed in backward
    if mode == "off":
        acts = L * layer
    elif mode == "partial":                                # the other layers' inputs go to host memory
        acts = keep * layer + 2 * layer_input + recompute
    elif mode == "on":
        acts = L * layer_input + recompute
    else:  # offload, stream: inputs in host memory, a couple in flight
        acts = 2 * layer_input + recompute
    logits = tokens * vocab * (KL_LOGIT_BYTES if kl else backend.logit_bytes_per_token_vocab)
    return weights + lora + acts + logits + 1.0 * GIB       # + workspace and allocator slack


def useful_token_times(cfg, shape: dict, lengths: list[int], c_pf: Choice, c_pad: Choice,
                       k: Constants | None = None) -> tuple[float, float, float]:
    """(padding-free, padded) relative time per useful token of the two plans, and the padded plan's padding."""
    seq = cfg.max_seq_length
    mean = mean_length(lengths, seq)
    pad = expected_pad_fraction(lengths, c_pad.micro_batch, seq, cfg.seed)
    t = lambda c, tokens: time_per_token(shape, tokens, c.mode, cfg.use_qlora, c.keep_layers, cfg.lora_dropout, k)
    t_pf = t(c_pf, c_pf.micro_batch * mean) * (1 + PACKED_OVERHEAD)
    t_pad = t(c_pad, c_pad.micro_batch * mean / (1 - pad)) / (1 - pad)
    return t_pf, t_pad, pad


def mean_length(lengths: list[int], seq: int) -> float:
    """Mean tokens a row trains on: rows longer than MAX_SEQ_LENGTH are cut to it."""
    return sum(min(n, seq) for n in lengths) / max(len(lengths), 1)


def time_per_token(shape: dict, tokens: float, mode: str, qlora: bool, keep: int = 0, dropout: float = 0.0,
                   k: Constants | None = None) -> float:
    """Relative time per token of a micro-batch of `tokens` tokens."""
    k = k or Constants.default(qlora)
    L = shape["layers"]
    recomputed = {"off": 0.0, "partial": (L - keep) / L, "on": 1.0, "offload": 1.0, "stream": 1.0}[mode]
    cost = k.recompute.get(mode, RECOMPUTE[mode]) + (RECOMPUTE_DROPOUT if dropout > 0 and mode != "off" else 0.0)
    return max(k.fixed_tokens / max(tokens, 1.0), 1.0) + cost * recomputed


def describe_constants(k: Constants) -> str:
    recompute = ", ".join(f"{m} +{v:.0%}" for m, v in k.recompute.items() if m != "off")
    return (f"planner constants: host floor {k.fixed_tokens:,.0f} tokens a micro-batch, recomputed layer {recompute}, "
            f"memory estimate x{k.mem_scale:.2f}; " + (k.source or "the H100 defaults (this card not measured yet: "
                                                       "this run measures it for the next)"))


def describe(c: Choice, layers: int) -> str:
    ck = {"off": "off (all layers keep activations)", "on": "on (every layer recomputed)",
          "offload": "offload (recomputed, layer inputs in host memory)",
          "stream": "offload with streamed weights (recomputed, layer inputs in host memory; frozen layers and the "
                    "input embedding in host RAM, copied to the GPU as each layer runs)",
          "partial": f"partial ({c.keep_layers} of {layers} layers keep activations)"}[c.mode]
    return (f"micro-batch {c.micro_batch} x grad-accum {c.grad_accum}, gradient checkpointing {ck}; "
            f"estimated peak {c.est_bytes / GIB:.1f} GiB of a {c.budget_bytes / GIB:.1f} GiB budget"
            + (f" ({c.note})" if c.note else ""))
