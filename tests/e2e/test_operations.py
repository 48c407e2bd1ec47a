"""Operations through run.sh on the tiny model: real SIGTERM and resume, the parity gate, secrets."""

import json
import re
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import qa_rows, write_jsonl
from tests.e2e.helpers import ROOT, env_for, read_jsonl, run_sh, start_run_sh

pytestmark = pytest.mark.e2e

TINY = dict(USE_QLORA="false", NUM_EPOCHS=3, BATCH_SIZE=2, LEARNING_RATE=5e-3, LORA_DROPOUT=0, WARMUP_RATIO=0,
            SAVE_STEPS=4, REPLAY_FRACTION=0, RETENTION_SET="none", EVAL_MAX_NEW_TOKENS=4)


def tiny_env(tmp, tiny_llama_dir, **kw):
    data = write_jsonl(tmp / "qa.jsonl", qa_rows(16))
    return {**TINY, "BASE_MODEL_NAME": tiny_llama_dir, "DATA_PATH": data, **kw}


def run_dir(tmp, tiny_llama_dir):
    return tmp / "final_model" / tiny_llama_dir.name / "3"


def test_sigterm_through_run_sh_saves_exits_75_and_resume_joins_the_uninterrupted_curve(tmp_path, tiny_llama_dir):
    ref_tmp, cut_tmp = tmp_path / "ref", tmp_path / "cut"
    r = run_sh(ref_tmp, "train", **tiny_env(ref_tmp, tiny_llama_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    ref = [x for x in read_jsonl(run_dir(ref_tmp, tiny_llama_dir) / "metrics.jsonl") if "loss" in x]

    proc = start_run_sh(cut_tmp, "train", **tiny_env(cut_tmp, tiny_llama_dir), LOGGING_STEPS=1)
    metrics = run_dir(cut_tmp, tiny_llama_dir) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 6):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # run.sh exec'd python: the signal reaches the trainer
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "SIGTERM received" in out and "JOB=resume_training" in out
    stopped_at = read_jsonl(metrics)[-1]["step"]
    assert stopped_at < ref[-1]["step"]

    # the message's own command, run as printed: no DATA_PATH, no training settings (they come from the run)
    command = re.search(r"Continue with: (.*)", out).group(1).strip()
    assert "JOB=resume_training ./run.sh" in command and "DATA_PATH" not in command
    r = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env_for(cut_tmp), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"checkpoint-{stopped_at}" in r.stdout
    got = [x for x in read_jsonl(metrics) if "loss" in x]
    assert [x["step"] for x in got] == [x["step"] for x in ref]
    for a, b in zip(ref, got):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_a_corrupted_adapter_fails_the_parity_gate(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    env = tiny_env(tmp_path, tiny_llama_dir, NUM_EPOCHS=3, MAX_STEPS=2)
    assert run_sh(tmp_path, "train", **env).returncode == 0
    merged = run_dir(tmp_path, tiny_llama_dir) / "lora_merged"
    before = {p.relative_to(merged): p.read_bytes() for p in sorted(merged.rglob("*")) if p.is_file()}
    assert any(p.suffix == ".safetensors" for p in before)
    adapter = run_dir(tmp_path, tiny_llama_dir) / "lora_adapters" / "adapter_model.safetensors"
    tensors = load_file(str(adapter))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(adapter))
    r = run_sh(tmp_path, "merge", **env)
    assert r.returncode == 1 and "merge rejected" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    # the rejected merge never replaced the accepted one: the previous merged model is there, byte for byte
    after = {p.relative_to(merged): p.read_bytes() for p in sorted(merged.rglob("*")) if p.is_file()}
    assert after == before
    assert not [p for p in merged.parent.iterdir() if p.name.startswith(".tmp")]


def test_secrets_never_reach_output_files_or_logs(tmp_path, tiny_llama_dir):
    canary_w, canary_h = "wandbCANARY0123456789abcdef", "hf_CANARYzyxwvutsrqponm"
    env = tiny_env(tmp_path, tiny_llama_dir, MAX_STEPS=2, REPORT_TO="wandb", WANDB_MODE="offline",
                   WANDB_API_KEY=canary_w, HF_TOKEN=canary_h)
    r = run_sh(tmp_path, "train", **env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert canary_w not in r.stdout + r.stderr and canary_h not in r.stdout + r.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "qa.jsonl"]
    assert len(written) > 20
    for p in written:
        data = p.read_bytes()
        assert canary_w.encode() not in data and canary_h.encode() not in data, p
    assert any("wandb" in str(p) for p in written), "wandb offline run files are expected"
