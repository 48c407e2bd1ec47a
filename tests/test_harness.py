"""lm-evaluation-harness on the bundled SmolLM2 (CPU): the local task over the run's eval split runs, offline, and
scores what our own evaluation scores on the same questions (both greedy, both through the chat template)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.config import RunConfig
from finetune.errors import ConfigError
from finetune.paths import RunPaths
from tests.run_trees import merged_run_tree

QUESTIONS = [("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
             ("What is the capital of Italy?", "Rome"), ("하늘바위 마을은 몇 년에 생겨났나요?", "1847년")]


def run_tree(root: Path, model_dir: Path, tasks: str) -> tuple[RunConfig, RunPaths]:
    return merged_run_tree(root, model_dir, QUESTIONS, lm_eval_tasks=tasks, eval_max_new_tokens=24)


def test_local_harness_task_scores_like_our_evaluation(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    from finetune import harness, model as model_lib
    from finetune.evaluate import questions_from_eval, score
    from finetune.generation import generate

    cfg, paths = run_tree(tmp_path, smollm2_dir, "run_eval")
    record = harness.run(cfg, paths, str(smollm2_dir), "cpu", log=lambda s: None)
    got = record["results"]["run_eval"]
    assert record["tasks"] == ["run_eval"] and record["n_samples"]["run_eval"]["effective"] == len(QUESTIONS)
    # the task and its data were written into the run, from the run's eval split
    task_dir = paths.eval_dir / "harness"
    rows = [json.loads(l) for l in (task_dir / "run_eval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["question"], r["answer"]) for r in rows] == QUESTIONS
    assert "max_gen_toks: 24" in (task_dir / "run_eval.yaml").read_text()
    assert json.loads((paths.eval_dir / "harness.json").read_text())["results"] == record["results"]

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    qs = questions_from_eval(paths)
    preds, _ = generate(model_lib.load_plain(str(smollm2_dir), tok, "cpu"), tok, qs, 24, "cpu")
    ours = score(qs, preds)
    assert got["contains_match,none"] == pytest.approx(ours["contains_match"])
    assert got["exact_match,none"] == pytest.approx(ours["exact_match"])
    assert ours["contains_match"] >= 0.5  # the capitals: the comparison is not between two zeros


def test_unknown_harness_task_is_a_config_error(tmp_path, smollm2_dir):
    from finetune import harness

    cfg, paths = run_tree(tmp_path, smollm2_dir, "run_eval,no_such_task_xyz")
    with pytest.raises(ConfigError, match="unknown harness task.*no_such_task_xyz"):
        harness.run(cfg, paths, str(smollm2_dir), "cpu", log=lambda s: None)
