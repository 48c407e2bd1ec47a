"""A user's slip is one line and the documented exit code, checked before anything heavy runs (issue 18, point 5).

Through run.sh on the real SmolLM2 with JOB=prepare (seconds each)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import qa_rows, write_jsonl
from tests.e2e.helpers import ROOT, env_for, run_sh

pytestmark = pytest.mark.e2e


def one_line_error(r) -> str:
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    return lines[0]


def model_copy(tmp, smollm2_dir, drop=(), config_text=None):
    folder = tmp / "model"
    folder.mkdir()
    for f in smollm2_dir.iterdir():
        if f.name not in drop:
            (folder / f.name).symlink_to(f)
    if config_text is not None:
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(config_text)
    return folder


@pytest.mark.parametrize("where", ["file", "under_a_file", "read_only_fs"])
def test_an_output_folder_that_cannot_be_written_is_exit_2_before_anything_runs(tmp_path, smollm2_dir, where):
    (tmp_path / "afile").write_text("x")
    value = {"file": tmp_path / "afile", "under_a_file": tmp_path / "afile" / "out", "read_only_fs": "/proc/rapa"}[where]
    for name in ("BASE_SAVE_PATH", "CHECKPOINT_PATH"):
        r = run_sh(tmp_path, "train", **{name: value, "DATA_PATH": write_jsonl(tmp_path / "qa.jsonl", qa_rows(4))})
        assert r.returncode == 2
        assert f"{name}={value}" in one_line_error(r)
        assert "[config]" not in r.stdout  # nothing ran: not even the banner


@pytest.mark.parametrize("case", ["truncated_config", "no_config", "no_tokenizer"])
def test_a_broken_model_folder_is_exit_2_naming_the_file(tmp_path, smollm2_dir, case):
    text = (smollm2_dir / "config.json").read_text()
    folder = {"truncated_config": lambda: model_copy(tmp_path, smollm2_dir, config_text=text[:100]),
              "no_config": lambda: model_copy(tmp_path, smollm2_dir, drop=("config.json",)),
              "no_tokenizer": lambda: model_copy(tmp_path, smollm2_dir, drop=("tokenizer.json",))}[case]()
    r = run_sh(tmp_path, "prepare", BASE_MODEL_NAME=folder, DATA_PATH=write_jsonl(tmp_path / "qa.jsonl", qa_rows(4)))
    assert r.returncode == 2
    line = one_line_error(r)
    assert ("tokenizer.json" if case == "no_tokenizer" else "config.json") in line
    assert "sentencepiece" not in line


def test_target_modules_are_checked_against_the_model_before_the_data_is_prepared(tmp_path, smollm2_dir):
    r = run_sh(tmp_path, "train", TARGET_MODULES="q_proj,not_a_proj",
               DATA_PATH=write_jsonl(tmp_path / "qa.jsonl", qa_rows(4)))
    assert r.returncode == 2
    line = one_line_error(r)
    assert "TARGET_MODULES=q_proj,not_a_proj" in line and "not_a_proj" in line
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in line
    assert not list(tmp_path.rglob("data_stats.json"))  # refused before data preparation


def test_a_fractional_epoch_count_is_taken_and_names_the_folder(tmp_path, smollm2_dir):
    r = run_sh(tmp_path, "prepare", NUM_EPOCHS="1.5", DATA_PATH=write_jsonl(tmp_path / "qa.jsonl", qa_rows(4)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "final_model" / "SmolLM2-135M-Instruct" / "1.5" / "data" / "train.jsonl").is_file()
    assert "NUM_EPOCHS=1.5 as set" in r.stdout


def test_prepare_prints_no_third_party_notice_that_reads_like_a_broken_install(tmp_path, smollm2_dir):
    r = run_sh(tmp_path, "prepare", REPORT_TO="wandb", DATA_PATH=write_jsonl(tmp_path / "qa.jsonl", qa_rows(4)))
    assert r.returncode == 0, r.stderr[-2000:]
    out = "\n".join(l for l in (r.stdout + r.stderr).splitlines() if not l.startswith("  "))  # not the banner
    for notice in ("pip install", "wandb", "WANDB", "offline", "ds_accelerator", "Setting accelerator"):
        assert notice not in out


HOLD = """
import sys, time
from finetune.config import RunConfig
from finetune.paths import OutputLock
lock = OutputLock(RunConfig(base_save_path=sys.argv[1]), "train").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_tree_in_use_is_refused_naming_the_first_and_kill_9_leaves_no_stuck_lock(tmp_path, smollm2_dir):
    out = tmp_path / "final_model"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(4))
    # the holder's unfinished prepare folder: a second start must not delete it
    live_tmp = out / "SmolLM2-135M-Instruct" / "3" / f".tmp-data-{holder.pid}"
    live_tmp.mkdir(parents=True)
    r = run_sh(tmp_path, "prepare", DATA_PATH=data)
    assert r.returncode == 2
    line = one_line_error(r)
    assert "in use by JOB=train" in line and f"pid {holder.pid}" in line
    assert live_tmp.is_dir()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    r = run_sh(tmp_path, "prepare", DATA_PATH=data)
    assert r.returncode == 0, r.stderr[-2000:]


def test_an_own_small_file_with_nothing_else_set_gets_enough_epochs_named_in_the_banner_and_the_folder(tmp_path, smollm2_dir):
    r = run_sh(tmp_path, "prepare", DATA_PATH=ROOT / "data" / "checks" / "own_qa.jsonl")
    assert r.returncode == 0, r.stderr[-2000:]
    preset = [l for l in r.stdout.splitlines() if l.startswith("[preset]")]
    assert len(preset) == 1
    assert "LoRA without 4-bit at lr 0.001 because 135M parameters" in preset[0]
    assert "NUM_EPOCHS auto -> 14 because 24 rows + 38 replay at batch 8 make 8 steps an epoch" in preset[0]
    assert (tmp_path / "final_model" / "SmolLM2-135M-Instruct" / "14" / "data" / "train.jsonl").is_file()
