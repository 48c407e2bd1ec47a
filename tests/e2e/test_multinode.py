"""Two "nodes" on one host through run.sh (NNODES=2, NODE_RANK 0 and 1, MASTER_ADDR=127.0.0.1, one CPU process
each, gloo): they train as one job, a SIGTERM to node 0's run.sh alone stops both with exit 75 and one sealed
checkpoint, and a resume on both nodes continues the loss curve of the uninterrupted two-node run."""

import json
import signal
import time

import pytest

from tests.conftest import qa_rows, write_jsonl
from tests.e2e.helpers import read_jsonl, start_run_sh

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

COMMON = dict(USE_QLORA="false", NUM_EPOCHS=2, BATCH_SIZE=4, LEARNING_RATE=5e-3, LORA_DROPOUT=0, WARMUP_RATIO=0,
              SAVE_STEPS=3, REPLAY_FRACTION=0, RETENTION_SET="none", EVAL_MAX_NEW_TOKENS=4, NUM_GPUS=1, NNODES=2,
              MASTER_ADDR="127.0.0.1")


def start_nodes(tmp, tiny_llama_dir, job, port):
    """Both nodes' run.sh, sharing the outputs (as nodes share storage); node 0 first, as a user would."""
    data = write_jsonl(tmp / "qa.jsonl", qa_rows(16))
    env = dict(BASE_MODEL_NAME=tiny_llama_dir, DATA_PATH=data, MASTER_PORT=port, **COMMON)
    return [start_run_sh(tmp, job, NODE_RANK=rank, **env) for rank in (0, 1)]


def wait(nodes, timeout=600):
    outs = [n.communicate(timeout=timeout)[0] for n in nodes]
    return [n.returncode for n in nodes], outs


def run_dir(tmp, tiny_llama_dir):
    return tmp / "final_model" / tiny_llama_dir.name / "2"


def losses(run):
    return [x for x in read_jsonl(run / "metrics.jsonl") if "loss" in x]


def test_two_nodes_train_stop_on_one_signal_and_resume_onto_the_uninterrupted_curve(tmp_path, tiny_llama_dir):
    port = 29700 + len(tmp_path.name) % 50
    ref_tmp, cut = tmp_path / "ref", tmp_path / "cut"
    codes, outs = wait(start_nodes(ref_tmp, tiny_llama_dir, "train", port))
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "launching 1 process(es) per node on 2 node(s)" in outs[0]
    assert "effective batch 4 = micro-batch 2 x grad-accum 1 x 2 process(es)" in outs[0]
    ref = losses(run_dir(ref_tmp, tiny_llama_dir))
    assert [x["step"] for x in ref] == list(range(1, 9))

    nodes = start_nodes(cut, tiny_llama_dir, "train", port + 1)
    metrics = run_dir(cut, tiny_llama_dir) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    nodes[0].send_signal(signal.SIGTERM)  # node 0's run.sh only; node 1 hears of it through the stop vote
    codes, outs = wait(nodes, timeout=300)
    assert codes == [75, 75], outs[0][-3000:] + outs[1][-3000:]
    assert "JOB=resume_training" in outs[0]
    stopped_at = read_jsonl(metrics)[-1]["step"]
    assert stopped_at < ref[-1]["step"]
    sealed = sorted((cut / "ckpt").glob("checkpoint-*/COMPLETE"))
    assert [p.parent.name for p in sealed][-1] == f"checkpoint-{stopped_at}"
    manifest = json.loads((cut / "ckpt" / f"checkpoint-{stopped_at}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2

    codes, outs = wait(start_nodes(cut, tiny_llama_dir, "resume_training", port + 2))
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert f"checkpoint-{stopped_at}" in outs[0]
    got = {x["step"]: x["loss"] for x in losses(run_dir(cut, tiny_llama_dir))}
    assert sorted(got) == [x["step"] for x in ref]
    for x in ref:
        assert got[x["step"]] == pytest.approx(x["loss"], abs=1e-4), x
    assert (run_dir(cut, tiny_llama_dir) / "eval" / "report.json").is_file()  # node 0 merged and evaluated
