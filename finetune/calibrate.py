"""The planner's constants, measured on the card that runs: each GPU run records them, the next plan uses them.

plan.py's time model takes two numbers that depend on the card and the software stack, and its memory model is an
estimate:
- the host floor D: tokens' worth of GPU work that one micro-batch costs whatever its size (kernel launches, Python,
  the optimizer step). Below ~D tokens a micro-batch is bound by the host. The default (4,300 for QLoRA) was measured
  on one H100 with one software stack.
- the extra time of a recomputed layer, per checkpointing mode (default +40-50 %, the same H100).
- how far the memory estimate is from the measured peak (it was fitted to the same H100 runs).

So every single-process training run on a GPU measures them from its own steps (a `Recorder`, one of the trainer's
callbacks): the wall time and the tokens of each optimizer step, and the peak memory. At the end of the run:

    step time = c + g x tokens          (Theil-Sen: the median of the pairwise slopes, so warm-up outliers do not
                                         pull it; needs steps whose token counts differ, i.e. variable-length rows)
    D = c / (micro-batches a step x g)  (host seconds of a micro-batch over GPU seconds of a token)
    recompute[mode] = g[mode] / g[off] - 1, per recomputed layer   (once runs in both modes were recorded)
    memory factor = measured peak / the plan's estimate

The record lives in the cache (`<RAPA_CACHE>/calibration/<card>_<backend>_<precision>_<kernels>_<shape>.json`), one
per card, backend, base precision, LoRA kernels and model shape, with the last runs' raw numbers; the planner takes
the median host floor and the largest memory factor of those runs (never below 1: a run rarely meets the plan's
worst micro-batch, so a low peak only makes the plan leaner, never tighter), and says in its notes where its
constants came from. The fit is kept only where the micro-batches straddle the floor it finds (the planner's law is
max(host, GPU) per micro-batch; a line describes it only there), and the recompute cost only from runs without
LoRA dropout and with micro-batches of similar size. A run on rows of one length
measures no host floor (every step has the same tokens) and keeps what earlier runs measured; nor does a run on
padded batches (the trainer counts their non-pad tokens, not the padded ones the GPU computed). The padding-free
overhead (plan.PACKED_OVERHEAD) stays the H100 constant for the same reason: it is defined on rows of one length,
which give a fit no spread.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from finetune.plan import Constants

HISTORY = 5            # runs a record keeps; the constants are taken over them
WARMUP_STEPS = 3       # compilation and allocator growth: not the steady state
MIN_STEPS = 8          # steady steps a fit needs
MIN_SPREAD = 0.10      # the tokens a step trains must vary by this much (relative std) to separate c from g
MAX_PAIRS_STEPS = 256  # Theil-Sen over the last this-many steps (pairs grow with the square)
# A run rarely meets the plan's worst micro-batch (its longest rows together), so a peak under the estimate says
# little: measured memory only ever makes the plan leaner, never tighter.
MEM_SCALE_RANGE = (1.0, 1.5)
FIXED_RANGE = (100.0, 50_000.0)
RECOMPUTE_RANGE = (0.1, 1.5)
MIN_SHARE = 0.25       # a partial run recomputing fewer of the layers says too little about a recomputed layer
SIMILAR_TOKENS = 2.0   # runs compared for the recompute cost: mean micro-batch tokens within this factor


def key_of(device: str, backend: str, precision: str, kernels: str, shape: dict, world_size: int = 1) -> str:
    """A file-name-safe key: the card, the backend, the base's precision, the LoRA kernels and the model's shape."""
    parts = [device, backend, precision, kernels, f"L{shape['layers']}h{shape['hidden']}i{shape['inter']}v{shape['vocab']}"]
    if world_size > 1:
        parts.append(f"x{world_size}")
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(parts)).strip("-")


def path_for(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "calibration" / f"{key}.json"


def fit_host_floor(steps: list[tuple[float, int, int]]) -> dict:
    """steps: (seconds, tokens, micro-batches) of each optimizer step, in order. Returns {"fixed_tokens": D,
    "s_per_token": g, "host_s": c, "steps": n, "micro_tokens": mean} or, where the steps cannot separate c from g,
    {"why": the reason, in words for the log}."""
    xs = steps[WARMUP_STEPS:][-MAX_PAIRS_STEPS:]
    if len(xs) < MIN_STEPS:
        return {"why": f"{len(xs)} steady steps (a fit needs {MIN_STEPS})"}
    tokens = [float(t) for _, t, _ in xs]
    mean = statistics.fmean(tokens)
    spread = statistics.pstdev(tokens) / mean if mean > 0 else 0.0
    if spread < MIN_SPREAD:
        return {"why": f"every step had about the same tokens (spread {spread:.0%} < {MIN_SPREAD:.0%})"}
    slopes = [(b[0] - a[0]) / (b[1] - a[1]) for i, a in enumerate(xs) for b in xs[i + 1:] if b[1] != a[1]]
    g = statistics.median(slopes)
    c = statistics.median(s - g * t for s, t, _ in xs)
    micro = statistics.median(m for _, _, m in xs)
    if g <= 0 or c <= 0 or micro <= 0:
        return {"why": "the step time did not grow with its tokens (host-bound, or noise larger than the GPU's share)"
                if g <= 0 else "the step time has no part independent of its tokens"}
    # The planner's law is max(host, GPU) per micro-batch; a line fits it only where the micro-batches straddle the
    # floor. Micro-batches all above it leave c = the step's sync and optimizer only (a floor far too low); all below
    # it leave g = noise. Either way nothing is learned about D.
    floor, per_micro = c / (micro * g), [t / m for _, t, m in xs]
    lo, hi = min(per_micro), max(per_micro)
    if floor > hi:
        return {"why": f"every micro-batch ({lo:,.0f}-{hi:,.0f} tokens) is under the line's floor ({floor:,.0f}): "
                       "host-bound steps, whose slope is noise"}
    if floor < lo:
        return {"why": f"every micro-batch ({lo:,.0f}-{hi:,.0f} tokens) is over the line's floor ({floor:,.0f}): "
                       "the host's time hides behind the GPU's"}
    return {"fixed_tokens": floor, "s_per_token": g, "host_s": c, "steps": len(xs),
            "micro_tokens": statistics.fmean(per_micro)}


def constants_from(record: dict | None, qlora: bool) -> Constants | None:
    """The planner's constants from a record's runs; None when nothing was measured (the defaults apply)."""
    runs = (record or {}).get("runs") or []
    if not runs:
        return None
    default = Constants.default(qlora)
    floors = [x for x in (_num(r, "fixed_tokens") for r in runs) if x]
    fixed = _clamp(statistics.median(floors), FIXED_RANGE) if floors else default.fixed_tokens
    scales = [x for x in (_num(r, "mem_scale") for r in runs) if x]
    scale = _clamp(max(scales), MEM_SCALE_RANGE) if scales else 1.0
    recompute = dict(default.recompute)
    g = _per_mode_g(runs)
    modes = [m for m in recompute if m != "off" and m in g]  # _per_mode_g has others only beside "off"
    for mode in modes:
        recompute[mode] = _clamp(g[mode] / g["off"] - 1.0, RECOMPUTE_RANGE)
    measured = [w for w, ok in (("host floor", floors), ("memory", scales)) if ok] + [f"recompute ({m})" for m in modes]
    source = (f"measured on {record.get('device', 'this card')} by {len(runs)} earlier run(s) "
              f"({', '.join(measured) or 'nothing usable'}; {record.get('updated', '?')}), "
              f"{record.get('path', 'the cache')}")
    return Constants(fixed, recompute, scale, source)


def measured_constants(path: Path | None, qlora: bool) -> Constants | None:
    """The constants the record at `path` holds (None: no record, nothing usable in it, or no GPU)."""
    return constants_from(load(path), qlora) if path else None


def _per_mode_g(runs: list[dict]) -> dict:
    """GPU seconds per token, per checkpointing mode, from runs that can be compared with the runs without
    checkpointing: LoRA dropout 0 (the plan adds its mask replay on top), micro-batches of similar size (attention's
    cost per token grows with the rows), and partial runs that recompute at least MIN_SHARE of the layers, folded
    back to 'every layer recomputed' (g_partial = g_off x (1 + r x share))."""
    ok = [r for r in runs if _num(r, "s_per_token") and _num(r, "micro_tokens") and not r.get("dropout")
          and isinstance(r.get("mode"), str)]
    off = [r for r in ok if r["mode"] == "off"]
    if not off:
        return {}
    g_off, t_off = statistics.median(r["s_per_token"] for r in off), statistics.median(r["micro_tokens"] for r in off)
    med = {"off": g_off}
    similar = [r for r in ok if r["mode"] != "off" and 1 / SIMILAR_TOKENS <= r["micro_tokens"] / t_off <= SIMILAR_TOKENS]
    for mode in {r["mode"] for r in similar}:
        rs = [r for r in similar if r["mode"] == mode]
        if mode == "partial":
            rs = [(r["s_per_token"] / g_off - 1.0) / r["recomputed_share"] for r in rs
                  if (_num(r, "recomputed_share") or 0) >= MIN_SHARE]
            if rs:
                med["partial"] = g_off * (1.0 + statistics.median(rs))
        else:
            med[mode] = statistics.median(r["s_per_token"] for r in rs)
    return med


def _num(run, name: str) -> float | None:
    """A positive number from a run entry, else None (a hand-edited or foreign record must not stop a run)."""
    x = run.get(name) if isinstance(run, dict) else None
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and math.isfinite(x) else None


def _clamp(x: float, bounds: tuple[float, float]) -> float:
    return min(max(x, bounds[0]), bounds[1])


def load(path: Path) -> dict | None:
    """A record, or None when there is none or it is unreadable (a broken cache file must not stop a run)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("runs"), list):
        return None
    return {**record, "runs": [r for r in record["runs"] if isinstance(r, dict)], "path": str(path)}


def save(path: Path, record: dict, run: dict) -> dict:
    """Append `run` to the record (keeping the last HISTORY) and write it atomically; returns the new record."""
    path = Path(path)
    runs = ((record or {}).get("runs") or [])[-(HISTORY - 1):] + [run]
    new = {"key": path.stem, "device": run["device"], "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(new, indent=1), encoding="utf-8")
    tmp.replace(path)
    return new


@dataclass
class Recorder(TrainerCallback):
    """Times each optimizer step and counts its tokens; at the end of training fits the host floor, compares the
    peak memory with the plan's estimate and appends the run to the card's record.

    tokens_seen: the trainer's running count of trained tokens (counted on the host by its collator). No sync is
    added: each step already waits for the GPU once (the finiteness check before the optimizer step), so the time
    between two step ends is one step's time."""

    path: Path
    device: str
    mode: str
    recomputed_share: float
    est_bytes: float
    micro_batches: int                  # a step's micro-batches (the plan's gradient accumulation)
    tokens_seen: Callable[[], int]
    padding_free: bool = True           # padded batches: tokens_seen counts non-pad tokens, not what ran (no fit)
    dropout: float = 0.0                # LoRA dropout: its mask replay is in a recomputed layer's measured cost
    log: Callable = print
    steps: list = field(default_factory=list)
    _last: tuple | None = None          # (time, tokens seen) at the previous step end

    def on_train_begin(self, args, state, control, **kw):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the training peak, not the load's

    def on_step_end(self, args, state, control, **kw):
        now, seen = time.perf_counter(), int(self.tokens_seen())
        if self._last is not None and seen > self._last[1]:
            self.steps.append((now - self._last[0], seen - self._last[1], self.micro_batches))
        self._last = (now, seen)

    def on_train_end(self, args, state, control, **kw):
        import torch

        if not state.is_world_process_zero:
            return
        # The record is a convenience for the next plan: nothing in it may fail a run whose training has finished.
        try:
            run = measure(self.steps if self.padding_free else None, torch.cuda.max_memory_allocated(),
                          self.est_bytes, self.device, self.mode, self.recomputed_share, self.dropout)
            if run is None:
                return
            save(self.path, load(self.path), run)
        except Exception as e:  # noqa: BLE001 - a read-only cache costs the next run its measurement, nothing more
            self.log(f"[train] planner constants not recorded ({type(e).__name__}: {e})")
            return
        floor = f"host floor {run['fixed_tokens']:,.0f} tokens over {run['fit_steps']} steps" \
            if run.get("fixed_tokens") else f"no host floor ({run['no_floor']})"
        self.log(f"[train] measured for the planner: {floor}, peak {run['peak_gib']} GiB"
                 + (f" = {run['mem_scale']:.2f} x the estimate" if run["mem_scale"] else "") + f" -> {self.path}")


def measure(steps: list[tuple[float, int, int]] | None, peak_bytes: float, est_bytes: float, device: str, mode: str,
            recomputed_share: float, dropout: float = 0.0) -> dict | None:
    """One run's entry in the record: the host-floor fit (where the steps allow it) and the peak against the
    plan's estimate; None when neither was measured."""
    fit = fit_host_floor(steps) if steps is not None else {"why": "padded batches (their tokens leave out the pads)"}
    scale = round(peak_bytes / est_bytes, 4) if est_bytes and peak_bytes else None
    if "fixed_tokens" not in fit and not scale:
        return None
    run = {"device": device, "mode": mode, "recomputed_share": round(recomputed_share, 4), "dropout": dropout,
           "steps": len(steps),
           "peak_gib": round(peak_bytes / 2**30, 2), "mem_scale": scale, "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "fixed_tokens" not in fit:
        run["no_floor"] = fit["why"]
    else:
        run.update(fixed_tokens=round(fit["fixed_tokens"], 1), s_per_token=fit["s_per_token"],
                   host_s=round(fit["host_s"], 5), fit_steps=fit["steps"], micro_tokens=round(fit["micro_tokens"], 1))
    return run


def record_path(cfg, backend, shape: dict | None, world_size: int = 1) -> Path | None:
    """Where this run's card, backend, precision, kernels and model keep their record; None off a GPU."""
    if backend.device != "cuda" or shape is None:
        return None
    import torch

    from finetune import model as model_lib

    kernels = backend.lora_kernels(cfg, shape)
    precision = model_lib.base_precision(cfg, backend)[0]
    key = key_of(torch.cuda.get_device_name(0), backend.name, precision, kernels[0] if kernels else "-", shape,
                 world_size)
    return path_for(cfg.cache_dir, key)


def recorder(path: Path, p, trainer, dropout: float = 0.0, log=print) -> Recorder:
    """The Recorder for a single-process GPU run of plan `p` by `trainer` (a trainer.GuardedSFTTrainer)."""
    import torch

    share = {"off": 0.0, "partial": None, "on": 1.0, "offload": 1.0, "stream": 1.0}[p.grad_ckpt]
    if share is None:  # keep_layers of the model's layers keep activations; the rest are recomputed
        layers = trainer.model.config.get_text_config().num_hidden_layers
        share = (layers - p.keep_layers) / max(layers, 1)
    return Recorder(path, torch.cuda.get_device_name(0), p.grad_ckpt, share, p.est_bytes, p.grad_accum,
                    lambda: trainer._total_train_tokens, p.padding_free, dropout, log)
