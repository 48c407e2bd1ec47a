"""Learning from the passage that QA rows come with (issue 23): knowledge, not echoes.

A KorQuAD/SQuAD row (or any row with a `context` field) carries the passage its answer was taken from. Trained on
the question -> answer pairs alone, a small model memorises the pairs: asked the same fact in other words it gives a
neighbouring fact of the same passage. With `PASSAGE_ROWS=on` every distinct passage of the training rows is also
trained once per epoch as a plain text row with loss, so the facts are learned in the passage's own words too.

Only the passages of training rows are added: a passage whose questions all went to the held-out split
(`EVAL_FRACTION`) would otherwise hand its answers to training. The rows go to train.jsonl only, never to the
evaluation questions, and they are not input rows (data_stats.json counts them apart: `passage_rows`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

from finetune.config import RunConfig

# What PASSAGE_ROWS=auto means; measured in docs/QUALITY.md (issue 23).
AUTO = "on"


def enabled(cfg: RunConfig) -> bool:
    if cfg.passage_rows == "auto":  # the bundled demo's numbers were measured without passage rows
        return AUTO == "on" and not _is_bundled_sample(cfg.data_path)
    return cfg.passage_rows == "on"


def _is_bundled_sample(path: str) -> bool:
    from pathlib import Path

    from finetune.config import DEFAULT_DATA

    import os

    return os.path.normpath(path) == os.path.normpath(DEFAULT_DATA) or \
        Path(path).resolve() == (Path(__file__).resolve().parents[2] / DEFAULT_DATA).resolve()


def context_of(raw: Any) -> str:
    """The passage a raw row comes with, or ""."""
    ctx = raw.get("context") if isinstance(raw, dict) else None
    return ctx.strip() if isinstance(ctx, str) else ""


class Passages:
    """Collects the distinct passages of the training rows, in the order first seen."""

    def __init__(self, cfg: RunConfig):
        self.on = enabled(cfg)
        self._seen: dict[bytes, str] = {}

    def add(self, raw: Any) -> None:
        if not self.on:
            return
        ctx = context_of(raw)
        if ctx:
            self._seen.setdefault(hashlib.blake2b(ctx.encode(), digest_size=16).digest(), ctx)

    def rows(self) -> Iterator[dict]:
        """Normalised training rows: `{"id", "format": "passage", "text"}`."""
        for i, text in enumerate(self._seen.values(), 1):
            yield {"id": f"passage:{i}", "format": "passage", "text": text}
