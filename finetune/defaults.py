"""The automatic values: one rule for every model and every dataset, stated in one banner line.

USE_QLORA, LEARNING_RATE and NUM_EPOCHS left unset (or `auto`) are resolved here once the model's size and the
number of rows are known; a value the user set is never changed. The same rule holds whichever variables are set,
so copying `.env.example` to `.env` changes nothing. Measured in docs/QUALITY.md (issue 18).

- Model size. From 1B parameters up: QLoRA at 2e-4 (the seeds' Unsloth recipes). Below 1B: LoRA in full precision
  at 1e-3. A small model fits in memory anyway and NF4 alone costs the bundled 135M model 10 of the 24 probes it
  knew; at 2e-4 its adapter learns too little within a CPU budget (docs/QUALITY.md). Seed 003's 5e-6 is a full
  fine-tuning rate: a LoRA adapter barely moves at it.
- Dataset size. A LoRA adapter needs on the order of a hundred optimiser steps to take in a set of new facts
  (the bundled demo: 104 steps learned 72.5% of its questions, 117 steps 97.5%). NUM_EPOCHS=auto is the smallest
  whole number of epochs that makes MIN_STEPS steps, and never fewer than seed 003's 3 epochs, so a large dataset
  trains as the seed does.
"""

from __future__ import annotations

import dataclasses
import math

from finetune.config import PREFERENCE_LR, RunConfig

SMALL_MODEL_PARAMS = 1_000_000_000
LR_SMALL, LR_LARGE = 1e-3, 2e-4
MIN_STEPS = 110
MIN_EPOCHS = 3
DEFAULT_MICRO_BATCH = 8  # BATCH_SIZE=auto's effective batch (finetune/plan.py keeps it on a GPU)


def effective_batch(cfg: RunConfig) -> int:
    micro = int(cfg.batch_size) if cfg.batch_size.isdigit() else DEFAULT_MICRO_BATCH
    return micro * cfg.grad_accum


def replay_rows(cfg: RunConfig, user_rows: int, pool: int) -> int:
    """How many replay rows training mixes in (finetune/train.py: load_rows takes the same number)."""
    if cfg.replay_fraction <= 0 or pool <= 0:
        return 0
    return min(pool, max(1, round(cfg.replay_fraction * user_rows)))


def resolve_model(cfg: RunConfig, explicit: frozenset, params: int) -> tuple[RunConfig, str]:
    """USE_QLORA and LEARNING_RATE from the model's parameter count; returns the config and the reason."""
    small = params < SMALL_MODEL_PARAMS
    size = f"{params / 1e9:.1f}B parameters" if params >= 1e9 else f"{params / 1e6:.0f}M parameters"
    changes = {}
    if "use_qlora" not in explicit:
        changes["use_qlora"] = not small
    if "learning_rate" not in explicit:
        # Preference pairs (DPO/ORPO) train at their own measured rate (docs/QUALITY.md, "Preference training").
        changes["learning_rate"] = PREFERENCE_LR if cfg.preference else LR_SMALL if small else LR_LARGE
    cfg = dataclasses.replace(cfg, **changes)
    kind = "QLoRA (NF4)" if cfg.use_qlora else "LoRA without 4-bit"
    why = (f"{size}, under 1B: a small model fits without 4-bit and needs the higher rate" if small else
           f"{size}, 1B or more: 4-bit and the Unsloth recipes' rate")
    set_ = [n.upper() for n in ("use_qlora", "learning_rate") if n in explicit]
    return cfg, f"{kind} at lr {cfg.lr:g} because {why}" + (f" ({', '.join(set_)} as set)" if set_ else "")


def resolve_epochs(cfg: RunConfig, explicit: frozenset, user_rows: int, pool: int, variants: int = 0) -> tuple[RunConfig, str]:
    """NUM_EPOCHS from the number of rows (user_rows: as read from DATA_PATH, before the gate; pool: the replay rows
    there are; variants: the question variants those rows will add, QUESTION_VARIANTS); returns the config and the
    reason. The steps a run needs are counted over the input rows, as measured with variants (docs/QUALITY.md); the
    seed's three passes count the variants, so on a large file, where the passes decide, variants do not make the
    run 3x as long."""
    if "num_epochs" in explicit:
        return cfg, f"NUM_EPOCHS={cfg.epochs_label} as set"
    if cfg.preference:  # pairs: the seed's 3 epochs, as measured (docs/QUALITY.md, "Preference training")
        cfg = dataclasses.replace(cfg, num_epochs=float(MIN_EPOCHS))
        return cfg, f"NUM_EPOCHS auto -> {MIN_EPOCHS} for TRAINING_OBJECTIVE={cfg.training_objective} (preference pairs)"
    if cfg.max_steps > 0:  # MAX_STEPS decides the length; the folder keeps the seed's label
        cfg = dataclasses.replace(cfg, num_epochs=float(MIN_EPOCHS))
        return cfg, f"NUM_EPOCHS auto -> {MIN_EPOCHS} (the folder's name only: MAX_STEPS={cfg.max_steps} decides the length)"
    train_rows = user_rows - round(user_rows * cfg.eval_fraction)
    added = round(variants * (1 - cfg.eval_fraction))
    rows = train_rows + replay_rows(cfg, train_rows, pool)
    per_epoch = math.ceil(rows / effective_batch(cfg))
    min_epochs = max(1, math.ceil(MIN_EPOCHS * train_rows / (train_rows + added))) if train_rows else MIN_EPOCHS
    epochs = max(min_epochs, math.ceil(MIN_STEPS / max(1, per_epoch)))
    cfg = dataclasses.replace(cfg, num_epochs=float(epochs))
    return cfg, (f"NUM_EPOCHS auto -> {epochs} because {train_rows} rows + {rows - train_rows} replay at batch "
                 f"{effective_batch(cfg)} make {per_epoch} steps an epoch and a run needs {MIN_STEPS} steps "
                 f"(at least {min_epochs} epoch{'s' if min_epochs > 1 else ''}"
                 + (f"; {added} question variants count as passes, not steps)" if added else ")"))


def preset_line(model_reason: str, epochs_reason: str) -> str:
    return f"[preset] {model_reason}; {epochs_reason}"
