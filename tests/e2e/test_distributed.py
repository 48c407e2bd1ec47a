"""Two processes on CPU through run.sh (NUM_GPUS=2 -> torchrun, gloo): the distributed path trains the same thing
as one process, and a SIGTERM stops every rank cleanly with exit 75 and resumes onto the same curve."""

import json
import signal
import time

import pytest

from tests.conftest import qa_rows, write_jsonl
from tests.e2e.helpers import read_jsonl, run_sh, start_run_sh

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

COMMON = dict(USE_QLORA="false", NUM_EPOCHS=2, BATCH_SIZE=4, LEARNING_RATE=5e-3, LORA_DROPOUT=0, WARMUP_RATIO=0,
              SAVE_STEPS=3, REPLAY_FRACTION=0, RETENTION_SET="none", EVAL_MAX_NEW_TOKENS=4)


def env(tmp, tiny_llama_dir, nproc):
    data = write_jsonl(tmp / "qa.jsonl", qa_rows(16))
    # A port per run: a previous run's socket may linger in TIME_WAIT.
    return dict(BASE_MODEL_NAME=tiny_llama_dir, DATA_PATH=data, NUM_GPUS=nproc,
                MASTER_PORT=29400 + nproc * 10 + len(tmp.name) % 10, **COMMON)


def losses(run):
    return [x for x in read_jsonl(run / "metrics.jsonl") if "loss" in x]


def launch(tmp, tiny_llama_dir, nproc):
    r = run_sh(tmp, "train", timeout=600, **env(tmp, tiny_llama_dir, nproc))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return tmp / "final_model" / tiny_llama_dir.name / "2", r


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny_llama_dir):
    return launch(tmp_path_factory.mktemp("two"), tiny_llama_dir, 2)


def test_two_processes_match_one_at_the_same_effective_batch(tmp_path, tiny_llama_dir, two):
    one, _ = launch(tmp_path / "one", tiny_llama_dir, 1)
    two_dir, r = two
    assert "launching 2 process(es)" in r.stderr
    assert "effective batch 4 = micro-batch 2 x grad-accum 1 x 2 process(es)" in r.stdout
    a, b = losses(one), losses(two_dir)
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=2e-3, abs=2e-3), (x, y)
    # rank 0 alone merged, evaluated and wrote run.json; the checkpoint manifest records the world size
    assert (two_dir / "lora_merged" / "config.json").is_file() and (two_dir / "eval" / "report.json").is_file()
    manifest = json.loads((two_dir.parents[2] / "ckpt" / "checkpoint-6" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["fingerprint"]["effective_batch"] == 4


def test_sigterm_stops_both_ranks_with_exit_75_and_resume_joins_the_uninterrupted_curve(tmp_path, tiny_llama_dir, two):
    ref = losses(two[0])
    cut = tmp_path / "cut"
    proc = start_run_sh(cut, "train", **env(cut, tiny_llama_dir, 2))
    metrics = cut / "final_model" / tiny_llama_dir.name / "2" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to run.sh, as `docker stop` does; it forwards to torchrun
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "JOB=resume_training" in out
    stopped_at = read_jsonl(metrics)[-1]["step"]
    assert stopped_at < ref[-1]["step"]

    r = run_sh(cut, "resume_training", timeout=600, **env(cut, tiny_llama_dir, 2))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"checkpoint-{stopped_at}" in r.stdout
    got = {x["step"]: x["loss"] for x in losses(metrics.parent)}
    assert sorted(got) == [x["step"] for x in ref]
    for x in ref:
        assert got[x["step"]] == pytest.approx(x["loss"], abs=1e-4), x
