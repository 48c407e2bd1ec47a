"""End to end on the real embedded SmolLM2-135M-Instruct, through run.sh, as a user runs it."""

import json

import pytest

from tests.e2e.helpers import read_jsonl, run_sh

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def qlora_run(smollm2_run):
    return smollm2_run.tmp, smollm2_run.result  # tests/e2e/conftest.py: one run shared with tests/e2e/test_use_smollm2.py


def test_train_job_runs_every_stage_and_honours_the_output_contract(qlora_run):
    tmp, r = qlora_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp / "final_model" / "SmolLM2-135M-Instruct" / "3"
    for rel in ("qlora_adapters/adapter_config.json", "qlora_adapters/adapter_model.safetensors",
                "qlora_merged/config.json", "qlora_merged/model.safetensors", "qlora_merged/tokenizer.json",
                "qlora_merged/generation_config.json", "qlora_merged/merge_parity.json", "metrics.jsonl",
                "eval/report.json", "eval/report.md", "eval/loss_curve.png", "data/train.jsonl",
                "data/data_stats.json", "data/rejected.jsonl", "run.json"):
        assert (run / rel).is_file(), rel
    assert not (run / "lora_adapters").exists()
    steps = read_jsonl(run / "metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert all({"step", "epoch", "loss", "learning_rate", "grad_norm"} <= set(s) for s in steps)
    report = json.loads((run / "eval/report.json").read_text())
    for block in ("base", "finetuned"):
        assert {"exact_match", "contains_match", "n"} <= set(report[block]) and report[block]["n"] == 8
    # it learned: the tuned model answers more of the trained questions than the base did
    assert report["finetuned"]["contains_match"] > report["base"]["contains_match"], report
    assert {"kept", "of", "fraction", "lost"} <= set(report["retention"])
    runlog = json.loads((run / "run.json").read_text())
    assert [runlog["stages"][s]["status"] for s in ("prepare", "train", "merge", "evaluate")] == ["ok"] * 4
    assert runlog["jobs"][-1]["exit_code"] == 0
    assert (tmp / "ckpt" / "checkpoint-12" / "COMPLETE").is_file()  # the last of every SAVE_STEPS=2, kept by rotation
    assert "[done] outputs in" in r.stdout and "contains match" in r.stdout


def test_qlora_loads_the_base_in_nf4_with_double_quant(qlora_run):
    tmp, r = qlora_run
    assert "QLoRA on (NF4, double quant)" in r.stdout
    cfg = json.loads((tmp / "final_model/SmolLM2-135M-Instruct/3/qlora_adapters/training_info.json").read_text())
    assert cfg["config"]["use_qlora"] is True


def test_merged_model_loads_in_plain_transformers_and_answers(qlora_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, _ = qlora_run
    merged = tmp / "final_model/SmolLM2-135M-Instruct/3/qlora_merged"
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "Who founded Brackwater?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    parity = json.loads((merged / "merge_parity.json").read_text())
    assert parity["max_abs_logit_diff"] <= parity["tolerance"] and parity["greedy_identical"] == parity["prompts"]
    assert parity["qlora_gap"] is not None  # the 4-bit-base vs merged gap is measured and reported


def test_resume_after_a_finished_run_is_a_no_op(qlora_run, smollm2_dir):
    tmp, _ = qlora_run
    data = tmp / "qa.jsonl"
    r = run_sh(tmp, "resume_training", DATA_PATH=data, USE_QLORA="true", MAX_STEPS=3, BATCH_SIZE=4, LEARNING_RATE=1e-3, SAVE_STEPS=2,
               REPLAY_FRACTION=0)
    assert r.returncode == 0 and "nothing to do" in r.stdout


def test_train_over_an_existing_run_refuses_and_points_at_resume(qlora_run):
    tmp, _ = qlora_run
    r = run_sh(tmp, DATA_PATH=tmp / "qa.jsonl", USE_QLORA="true", MAX_STEPS=3, BATCH_SIZE=4, LEARNING_RATE=1e-3, SAVE_STEPS=2,
               REPLAY_FRACTION=0)
    assert r.returncode == 2
    assert "JOB=resume_training" in r.stderr and "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("env,code,needle", [
    ({"LORA_RANK": "abc"}, 2, "LORA_RANK='abc': expected an integer"),
    ({"DATA_PATH": "/nonexistent/data.json"}, 3, "DATA_PATH=/nonexistent/data.json: no such file"),
    ({"BASE_MODEL_NAME": "/nonexistent/model", "HF_HUB_OFFLINE": "1"}, 2, "BASE_MODEL_NAME=/nonexistent/model"),
    ({"LORA_RNAK": "8"}, 2, "did you mean LORA_RANK"),
])
def test_user_errors_exit_with_their_code_and_one_clear_line(tmp_path, env, code, needle):
    r = run_sh(tmp_path, **env)
    assert r.returncode == code, r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr + r.stdout
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1].startswith(("error:", "  -")), r.stderr[-500:]


def test_help_lists_every_variable_with_its_default(tmp_path):
    import dataclasses

    from finetune.config import RunConfig

    r = run_sh(tmp_path, "--help")
    assert r.returncode == 0
    for f in dataclasses.fields(RunConfig):
        assert f.name.upper() in r.stdout
