"""Follow-up jobs find the run from the variables that identify it (issue 18, point 2), on the tiny model."""

import re
import subprocess

import pytest

from tests.conftest import qa_rows, write_jsonl
from tests.e2e.helpers import ROOT, env_for, run_sh

pytestmark = pytest.mark.e2e

TRAIN = dict(BATCH_SIZE=2, MAX_STEPS=1, SAVE_STEPS=1, REPLAY_FRACTION=0, RETENTION_SET="none", EVAL_MAX_NEW_TOKENS=4,
             EVAL_MAX_QUESTIONS=2)


def test_follow_up_jobs_take_the_newest_run_say_which_and_refuse_with_a_list_when_data_differ(tmp_path, tiny_llama_dir):
    model = str(tiny_llama_dir)
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(4))
    r = run_sh(tmp_path, "train", BASE_MODEL_NAME=model, DATA_PATH=a, **TRAIN)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = tmp_path / "final_model" / tiny_llama_dir.name
    assert [p.name for p in runs.iterdir() if p.is_dir()] == ["3"]  # NUM_EPOCHS auto; MAX_STEPS decides the length

    # only the model: the run is found and named; nothing else repeated (the training settings come from run.json)
    r = run_sh(tmp_path, "evaluate", BASE_MODEL_NAME=model, EVAL_MAX_NEW_TOKENS=4, EVAL_MAX_QUESTIONS=1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"[run] JOB=evaluate on {runs / '3'}" in r.stdout

    # a second run on other data: which one is meant is ambiguous; the refusal lists commands that work as printed
    b = write_jsonl(tmp_path / "b.jsonl", qa_rows(6))
    r = run_sh(tmp_path, "train", BASE_MODEL_NAME=model, DATA_PATH=b, NUM_EPOCHS=2, CHECKPOINT_PATH=tmp_path / "ckpt2", **TRAIN)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_sh(tmp_path, "merge", BASE_MODEL_NAME=model)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "2 runs of" in r.stderr and str(a) in r.stderr and str(b) in r.stderr
    commands = re.findall(r": (BASE_MODEL_NAME=\S+ (?:\S+=\S+ )*NUM_EPOCHS=\S+ JOB=merge \./run\.sh)", r.stderr)
    assert len(commands) == 2, r.stderr
    done = subprocess.run(["bash", "-c", commands[0]], cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    # DATA_PATH identifies a run too
    r = run_sh(tmp_path, "merge", BASE_MODEL_NAME=model, DATA_PATH=b)
    assert r.returncode == 0 and f"[run] JOB=merge on {runs / '2'}" in r.stdout, r.stderr[-2000:]


def test_a_follow_up_job_without_a_run_says_how_to_make_one(tmp_path, tiny_llama_dir):
    r = run_sh(tmp_path, "merge", BASE_MODEL_NAME=str(tiny_llama_dir))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.search(r"no trained run of \S+ in .*; train one first: BASE_MODEL_NAME=\S+ .*\./run\.sh", r.stderr), r.stderr
