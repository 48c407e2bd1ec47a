"""Two processes on CPU (torchrun, gloo): the distributed path trains the same thing as one process."""

import subprocess
import sys

import pytest

from tests.conftest import qa_rows, write_jsonl
from tests.e2e.helpers import ROOT, env_for, read_jsonl

COMMON = dict(USE_QLORA="false", NUM_EPOCHS=2, BATCH_SIZE=4, LEARNING_RATE=5e-3, LORA_DROPOUT=0, WARMUP_RATIO=0,
              SAVE_STEPS=3, REPLAY_FRACTION=0, RETENTION_SET="none", EVAL_MAX_NEW_TOKENS=4, JOB="train")


def launch(tmp, tiny_llama_dir, nproc):
    data = write_jsonl(tmp / "qa.jsonl", qa_rows(16))
    env = env_for(tmp, BASE_MODEL_NAME=tiny_llama_dir, DATA_PATH=data, **COMMON)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + nproc), "-m", "finetune"] if nproc > 1 else [sys.executable, "-m", "finetune"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return tmp / "final_model" / tiny_llama_dir.name / "2", r


def test_two_processes_match_one_at_the_same_effective_batch(tmp_path, tiny_llama_dir):
    one, _ = launch(tmp_path / "one", tiny_llama_dir, 1)
    two, r = launch(tmp_path / "two", tiny_llama_dir, 2)
    assert "effective batch 4 = micro-batch 2 x grad-accum 1 x 2 process(es)" in r.stdout
    a = [x for x in read_jsonl(one / "metrics.jsonl") if "loss" in x]
    b = [x for x in read_jsonl(two / "metrics.jsonl") if "loss" in x]
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=2e-3, abs=2e-3), (x, y)
    # rank 0 alone merged, evaluated and wrote run.json; the checkpoint manifest records the world size
    assert (two / "lora_merged" / "config.json").is_file() and (two / "eval" / "report.json").is_file()
    import json

    manifest = json.loads((tmp_path / "two" / "ckpt" / "checkpoint-6" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["fingerprint"]["effective_batch"] == 4
