"""Golden losses: the first steps of a fixed run equal recorded values (as torchtune's recipe tests do).

A change anywhere on the training path (row formatting, label masking, packing, the loss, the optimiser, the LoRA
initialisation, the learning-rate schedule, a library upgrade) moves these numbers; a test that only asks "did the
loss go down" would let it through. When a change is intended, re-record with the command in GOLDEN's comment and
say why in the commit.
"""

import json

import pytest

from finetune.config import RunConfig
from finetune.data.prepare import prepare
from finetune.model import Backend, load_tokenizer
from finetune.paths import RunPaths
from finetune.train import train
from tests.conftest import qa_rows, write_jsonl

# Recorded on the 2-core CPU with the pins of requirements.txt (torch 2.13.0, transformers 5.17.0, trl 1.14.2,
# peft 0.21.2): .venv/bin/python -m pytest -q -s tests/test_golden_loss.py
GOLDEN = [10.777131080627441, 10.634708404541016, 10.522551536560059, 10.523165702819824]


def test_first_losses_of_a_fixed_run_equal_the_recorded_ones(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(16))
    cfg = RunConfig(base_model_name=str(tiny_llama_dir), data_path=str(data), base_save_path=str(tmp_path / "out"),
                    checkpoint_path=str(tmp_path / "ckpt"), use_qlora=False, batch_size="4", learning_rate=5e-3,
                    max_steps=4, save_steps=100, report_to="none", replay_fraction=0.0, lora_dropout=0.0,
                    warmup_ratio=0.0, seed=42)
    paths = RunPaths.from_config(cfg)
    tok, _ = load_tokenizer(str(tiny_llama_dir), cfg)
    prepare(cfg, paths, tok)
    train(cfg, paths, str(tiny_llama_dir), tok, Backend("hf", "test", "cpu"), resume=False)
    got = [r["loss"] for r in map(json.loads, open(paths.metrics)) if "loss" in r]
    assert got == pytest.approx(GOLDEN, rel=1e-4), f"GOLDEN = {got}"
