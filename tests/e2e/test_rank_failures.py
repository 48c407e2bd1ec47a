"""A rank that dies or hangs ends a multi-process run through run.sh in bounded time, with a clear last line and a
nonzero code, instead of leaving the job hanging (two processes on CPU, gloo)."""

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import qa_rows, write_jsonl
from tests.e2e.helpers import start_run_sh

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

# Many steps: the run is stopped by the fault long before it could finish.
LONG = dict(USE_QLORA="false", NUM_EPOCHS=50, BATCH_SIZE=4, LEARNING_RATE=5e-3, LORA_DROPOUT=0, WARMUP_RATIO=0,
            SAVE_STEPS=1000, REPLAY_FRACTION=0, RETENTION_SET="none", NUM_GPUS=2)


def descendants(root: int) -> list[int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def worker(root: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank under run.sh's process `root`."""
    for pid in descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
            return pid
    raise AssertionError(f"no worker with RANK={rank} under {root}")


def start_and_wait_for_training(tmp, tiny_llama_dir, **kw):
    data = write_jsonl(tmp / "qa.jsonl", qa_rows(16))
    proc = start_run_sh(tmp, "train", BASE_MODEL_NAME=tiny_llama_dir, DATA_PATH=data,
                        MASTER_PORT=29600 + len(tmp.name) % 50, **LONG, **kw)
    metrics = tmp / "final_model" / tiny_llama_dir.name / "50" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stdout.read()[-6000:]
        time.sleep(0.05)
    return proc


def finish(proc, within: float) -> tuple[str, float]:
    t = time.time()
    out, _ = proc.communicate(timeout=within + 60)  # a hang fails here, not in CI's global timeout
    return out, time.time() - t


def test_a_killed_rank_fails_the_job_with_one_clear_line(tmp_path, tiny_llama_dir):
    proc = start_and_wait_for_training(tmp_path, tiny_llama_dir)
    # kill -9: no handler runs; torchrun sees the worker die and stops the other one
    os.kill(worker(proc.pid, 1), signal.SIGKILL)
    out, took = finish(proc, within=90)
    assert proc.returncode == 1, out[-3000:]
    assert took < 90, took  # torchrun notices at once; the survivor fails at its next collective
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: the job failed on node 0 (torchrun exit 1)"), out[-3000:]
    assert "JOB=resume_training" in last


def test_a_hung_rank_fails_the_job_after_dist_timeout_minutes(tmp_path, tiny_llama_dir):
    # 30 s: above the ranks' start-up skew on a loaded 2-core CPU (DDP's first broadcast waits for the slower rank)
    proc = start_and_wait_for_training(tmp_path, tiny_llama_dir, DIST_TIMEOUT_MINUTES=0.5)
    hung = worker(proc.pid, 1)
    os.kill(hung, signal.SIGSTOP)  # alive but silent: only the collective timeout can tell
    out, took = finish(proc, within=150)
    assert proc.returncode == 1, out[-3000:]
    assert "timed out" in out.lower() or "timeout" in out.lower(), out[-3000:]
    assert out.strip().splitlines()[-1].startswith("error: the job failed on node 0"), out[-3000:]
    assert "Timed out waiting 30000ms" in out, out[-3000:]  # the timeout given, not gloo's default
    assert took < 150, took  # the timeout, then torchrun's grace before it SIGKILLs the stopped process
