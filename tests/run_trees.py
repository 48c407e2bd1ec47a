"""A finished run's folder for the follow-up jobs' tests (export, harness): the merged model as links to a model
folder, and the run's eval split holding the given questions."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.config import RunConfig
from finetune.paths import RunPaths


def merged_run_tree(root: Path, model_dir: Path | None, questions: list[tuple[str, str]],
                    **settings) -> tuple[RunConfig, RunPaths]:
    """`<root>/final_model/<model>/3/<merged>/` linking to `model_dir` (or absent when None), and an eval split."""
    cfg = RunConfig(base_save_path=str(root / "final_model"), num_epochs=3, **settings)
    paths = RunPaths.from_config(cfg)
    if model_dir is not None:
        paths.merged.mkdir(parents=True)
        for f in model_dir.iterdir():
            (paths.merged / f.name).symlink_to(f.resolve())
    paths.eval_file.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(questions)]
    paths.eval_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return cfg, paths
