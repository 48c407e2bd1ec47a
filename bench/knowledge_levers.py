"""Candidate levers for issue 23, tried by bench/knowledge_sweep.py before any of them enters the product.

Each lever is a cell variable (`LEVER_...=value`) that this module applies to the pipeline's own functions in the
cell's process, so a lever costs no product code until a measurement says it helps; the ones that do are then
built into finetune/ properly (and leave this file). `FP32=1` makes a CUDA run hold and multiply the model in
float32, as a CPU run does, so that GPU cells measure the recipe the CPU demo runs.

- LEVER_PERMS=k        each passage row also trained as k copies with its sentences in a shuffled order
- LEVER_OPENBOOK=1     each QA row with a passage also trained with the passage in the prompt (closed-book kept)
- LEVER_QDROP=p:k      each QA row also trained as k copies of its question with each word dropped with chance p
- LEVER_NEFTUNE=alpha  NEFTune noise on the input embeddings (transformers' neftune_noise_alpha)

LEVER_QRULES=1 (each question also trained in rule-written rewordings) became the product's QUESTION_VARIANTS
(finetune/data/variants.py, its rules since corrected). Cells that repeat a recipe measured before it existed set
QUESTION_VARIANTS=off (bench/knowledge_search.py's COMMON does).
"""

from __future__ import annotations

import random
import re

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text.strip()) if s]


def apply(env: dict) -> list[str]:
    """Patch the pipeline for the levers set in `env`; returns what was applied (printed into the cell's log)."""
    applied = []
    if env.get("FP32") == "1":
        import torch

        from finetune import model, trainer

        model.compute_dtype = lambda device: torch.float32
        args = trainer.trainer_args
        trainer.trainer_args = lambda *a, **k: {**args(*a, **k), "bf16": False}
        applied.append("fp32")
    if env.get("LEVER_NEFTUNE"):
        from finetune import trainer

        alpha = float(env["LEVER_NEFTUNE"])
        args2 = trainer.trainer_args
        trainer.trainer_args = lambda *a, **k: {**args2(*a, **k), "neftune_noise_alpha": alpha}
        applied.append(f"neftune {alpha}")
    perms = int(env.get("LEVER_PERMS") or 0)
    openbook = env.get("LEVER_OPENBOOK") == "1"
    qdrop = env.get("LEVER_QDROP") or ""
    if perms or openbook or qdrop:
        _patch_rows(perms, openbook, qdrop, applied)
    return applied


def _patch_rows(perms: int, openbook: bool, qdrop: str, applied: list[str]) -> None:
    from finetune.data import passages as P

    p_drop, k_drop = (float(qdrop.split(":")[0]), int(qdrop.split(":")[1])) if qdrop else (0.0, 0)
    rng = random.Random(1234)
    extra: list[dict] = []
    add0 = P.Passages.add

    def add(self, raw):
        add0(self, raw)
        ctx, q = P.context_of(raw), raw.get("question") if isinstance(raw, dict) else None
        answers = raw.get("answers") if isinstance(raw, dict) else None
        if not (isinstance(q, str) and isinstance(answers, list) and answers):
            return
        a = answers[0]["text"]
        if openbook and ctx:
            extra.append({"format": "qa", "messages": [{"role": "user", "content": f"{ctx}\n\n{q}"},
                                                      {"role": "assistant", "content": a}]})
        for _ in range(k_drop):
            words = q.split()
            kept = [w for w in words if rng.random() >= p_drop] or words
            extra.append({"format": "qa", "messages": [{"role": "user", "content": " ".join(kept)},
                                                      {"role": "assistant", "content": a}]})

    def rows(self):
        n = 0
        for text in self._seen.values():
            n += 1
            yield {"id": f"passage:{n}", "format": "passage", "text": text}
            sents = _sentences(text)
            for _ in range(perms if len(sents) > 1 else 0):
                order = sents[:]
                while order == sents:
                    rng.shuffle(order)
                n += 1
                yield {"id": f"passage:{n}", "format": "passage", "text": " ".join(order)}
        for i, r in enumerate(extra, 1):
            yield {"id": f"augment:{i}", **r}

    P.Passages.add, P.Passages.rows = add, rows
    applied.append(f"rows: perms {perms}, openbook {openbook}, qdrop {qdrop or '-'}")
