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
the median host floor and the largest memory factor of those runs (clamped: it may plan up to 10 % tighter than the
defaults, or any amount looser), and says in its notes where its constants came from. A run on rows of one length
measures no host floor (every step has the same tokens) and keeps what earlier runs measured.
"""

from __future__ import annotations

import json
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
MEM_SCALE_RANGE = (0.9, 1.5)
FIXED_RANGE = (100.0, 50_000.0)


def key_of(device: str, backend: str, precision: str, kernels: str, shape: dict, world_size: int = 1) -> str:
    """A file-name-safe key: the card, the backend, the base's precision, the LoRA kernels and the model's shape."""
    parts = [device, backend, precision, kernels, f"L{shape['layers']}h{shape['hidden']}i{shape['inter']}v{shape['vocab']}"]
    if world_size > 1:
        parts.append(f"x{world_size}")
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(parts)).strip("-")


def path_for(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "calibration" / f"{key}.json"


def fit_host_floor(steps: list[tuple[float, int, int]]) -> dict | None:
    """steps: (seconds, tokens, micro-batches) of each optimizer step, in order. Returns {"fixed_tokens": D,
    "s_per_token": g, "host_s": c, "steps": n} or None when the steps cannot separate c from g."""
    xs = steps[WARMUP_STEPS:][-MAX_PAIRS_STEPS:]
    if len(xs) < MIN_STEPS:
        return None
    tokens = [float(t) for _, t, _ in xs]
    mean = statistics.fmean(tokens)
    if mean <= 0 or statistics.pstdev(tokens) / mean < MIN_SPREAD:
        return None
    slopes = [(b[0] - a[0]) / (b[1] - a[1]) for i, a in enumerate(xs) for b in xs[i + 1:] if b[1] != a[1]]
    g = statistics.median(slopes)
    c = statistics.median(s - g * t for s, t, _ in xs)
    micro = statistics.median(m for _, _, m in xs)
    if g <= 0 or c <= 0 or micro <= 0:
        return None
    return {"fixed_tokens": c / (micro * g), "s_per_token": g, "host_s": c, "steps": len(xs)}


def constants_from(record: dict | None, qlora: bool) -> Constants | None:
    """The planner's constants from a record's runs; None when nothing was measured (the defaults apply)."""
    runs = (record or {}).get("runs") or []
    if not runs:
        return None
    default = Constants.default(qlora)
    floors = [r["fixed_tokens"] for r in runs if r.get("fixed_tokens")]
    fixed = min(max(statistics.median(floors), FIXED_RANGE[0]), FIXED_RANGE[1]) if floors else default.fixed_tokens
    scales = [r["mem_scale"] for r in runs if r.get("mem_scale")]
    scale = min(max(max(scales), MEM_SCALE_RANGE[0]), MEM_SCALE_RANGE[1]) if scales else 1.0
    recompute = dict(default.recompute)
    g = _per_mode_g(runs)
    for mode in recompute:
        if mode != "off" and "off" in g and mode in g:
            recompute[mode] = max(g[mode] / g["off"] - 1.0, 0.0)
    measured = [w for w, ok in (("host floor", floors), ("memory", scales)) if ok] + \
        [f"recompute ({m})" for m in recompute if m != "off" and "off" in g and m in g]
    source = (f"measured on {record.get('device', 'this card')} by {len(runs)} earlier run(s) "
              f"({', '.join(measured) or 'nothing usable'}; {record.get('updated', '?')}), "
              f"{record.get('path', 'the cache')}")
    return Constants(fixed, recompute, scale, source)


def _per_mode_g(runs: list[dict]) -> dict:
    """GPU seconds per token of a kept layer's step, per checkpointing mode, normalised to 'all recomputed' for
    partial runs: g_partial = g_off x (1 + r x share) is folded back to the mode's full-recompute equivalent."""
    out: dict[str, list[float]] = {}
    for r in runs:
        mode, g = r.get("mode"), r.get("s_per_token")
        if mode and g:
            out.setdefault(mode, []).append(g)
    med = {m: statistics.median(v) for m, v in out.items()}
    partial = [r for r in runs if r.get("mode") == "partial" and r.get("s_per_token") and r.get("recomputed_share")]
    if "off" in med and partial:
        rs = [(r["s_per_token"] / med["off"] - 1.0) / r["recomputed_share"] for r in partial]
        med["partial"] = med["off"] * (1.0 + statistics.median(rs))
    return med


def load(path: Path) -> dict | None:
    """A record, or None when there is none or it is unreadable (a broken cache file must not stop a run)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("runs"), list):
        return None
    return {**record, "path": str(path)}


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
    log: Callable = print
    steps: list = field(default_factory=list)
    _last: tuple | None = None          # (time, tokens seen) at the previous step end

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
            run = measure(self.steps, torch.cuda.max_memory_allocated(), self.est_bytes, self.device, self.mode,
                          self.recomputed_share)
            if run is None:
                return
            save(self.path, load(self.path), run)
        except Exception as e:  # noqa: BLE001 - a read-only cache costs the next run its measurement, nothing more
            self.log(f"[train] planner constants not recorded ({type(e).__name__}: {e})")
            return
        floor = f"host floor {run['fixed_tokens']:,.0f} tokens over {run['fit_steps']} steps" \
            if run.get("fixed_tokens") else "no host floor (every step had about the same tokens)"
        self.log(f"[train] measured for the planner: {floor}, peak {run['peak_gib']} GiB"
                 + (f" = {run['mem_scale']:.2f} x the estimate" if run["mem_scale"] else "") + f" -> {self.path}")


def measure(steps: list[tuple[float, int, int]], peak_bytes: float, est_bytes: float, device: str, mode: str,
            recomputed_share: float) -> dict | None:
    """One run's entry in the record: the host-floor fit (where the steps allow it) and the peak against the
    plan's estimate; None when neither was measured."""
    fit = fit_host_floor(steps)
    scale = round(peak_bytes / est_bytes, 4) if est_bytes and peak_bytes else None
    if not fit and not scale:
        return None
    run = {"device": device, "mode": mode, "recomputed_share": round(recomputed_share, 4), "steps": len(steps),
           "peak_gib": round(peak_bytes / 2**30, 2), "mem_scale": scale, "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if fit:
        run.update(fixed_tokens=round(fit["fixed_tokens"], 1), s_per_token=fit["s_per_token"],
                   host_s=round(fit["host_s"], 5), fit_steps=fit["steps"])
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


def recorder(path: Path, p, trainer, log=print) -> Recorder:
    """The Recorder for a single-process GPU run of plan `p` by `trainer` (a trainer.GuardedSFTTrainer)."""
    import torch

    share = {"off": 0.0, "partial": None, "on": 1.0, "offload": 1.0, "stream": 1.0}[p.grad_ckpt]
    if share is None:  # keep_layers of the model's layers keep activations; the rest are recomputed
        layers = trainer.model.config.get_text_config().num_hidden_layers
        share = (layers - p.keep_layers) / max(layers, 1)
    return Recorder(path, torch.cuda.get_device_name(0), p.grad_ckpt, share, p.est_bytes, p.grad_accum,
                    lambda: trainer._total_train_tokens, log)
