"""Fault injection for the tests: a TrainerCallback handed to the train stage through its plugin point,
`train(..., extra_callbacks=faults(sigterm_at_step=3))` (finetune.trainer.build_trainer runs extra callbacks after
a checkpoint's files are written and before it is sealed). Product code knows nothing of it.

    Faults(sigterm_at_step=3)         SIGTERM to this process at the end of step 3 (as `docker stop` would)
    Faults(crash_in_save_at_step=6)   save at step 6, then die like kill -9 (exit 137) before the COMPLETE marker
    Faults(nan_at_step=5)             a LoRA weight turns NaN as step 5 begins, so that step's loss is non-finite

The crash ends its process, so a test runs it in a subprocess:
    python -m tests.faults '<RunConfig.public_dict() as JSON>' crash_in_save_at_step=6
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass

import torch
from transformers import TrainerCallback


@dataclass
class Faults:
    nan_at_step: int = -1
    sigterm_at_step: int = -1
    crash_in_save_at_step: int = -1

    @classmethod
    def parse(cls, spec: str) -> "Faults":
        """"nan_at_step=3,sigterm_at_step=5" -> Faults(nan_at_step=3, sigterm_at_step=5)."""
        f = cls()
        for part in filter(None, (spec or "").split(",")):
            k, v = part.split("=")
            setattr(f, k.strip(), int(v))
        return f


class FaultCallback(TrainerCallback):
    def __init__(self, faults: Faults):
        self.faults = faults

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step + 1 == self.faults.nan_at_step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.faults.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if state.global_step == self.faults.crash_in_save_at_step:
            control.should_save = True

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.faults.crash_in_save_at_step:
            os._exit(137)  # like kill -9 after the trainer wrote files but before the seal


def faults(**at) -> list[FaultCallback]:
    """extra_callbacks for the train stage: faults(sigterm_at_step=3)."""
    return [FaultCallback(Faults(**at))]


def faulty_train(cfg, spec: str, resume: bool = False):
    """The train stage on the CPU with the faults of `spec` injected."""
    from finetune.model import Backend, load_tokenizer
    from finetune.paths import RunPaths
    from finetune.train import train

    tok, _ = load_tokenizer(cfg.base_model_name, cfg)
    return train(cfg, RunPaths.from_config(cfg), cfg.base_model_name, tok, Backend("hf", "tests", "cpu"), resume=resume,
                 extra_callbacks=[FaultCallback(Faults.parse(spec))])


if __name__ == "__main__":
    from finetune.config import RunConfig

    faulty_train(RunConfig(**json.loads(sys.argv[1])), sys.argv[2])
