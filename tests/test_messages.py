"""What the pipeline tells the user means what it says (issue 18, points 1 and 6)."""

import json

from finetune import evaluate
from finetune.config import RunConfig
from finetune.merge import Parity, gap_line


def test_the_qlora_gap_has_a_unit_a_scale_and_a_meaning():
    p = Parity(1e-4, 1e-3, 4, 4, True, qlora_gap=25.177, qlora_gap_scale=31.0)
    line = gap_line(RunConfig(use_qlora=True), p)
    assert "QLoRA gap 25.177 logits (81% of the largest logit, 31.0)" in line
    assert "the adapter on the 4-bit base it trained on" in line and "QLORA_MERGE_BASE=dequantized" in line
    assert "exactly what was trained" in gap_line(RunConfig(use_qlora=True, qlora_merge_base="dequantized"), p)


def test_the_evaluation_budget_follows_the_longest_reference_answer(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    own = [json.loads(l) for l in open("data/checks/own_qa.jsonl", encoding="utf-8")]
    items = [{"answers": [r["answer"]]} for r in own]
    longest = max(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in own)
    auto = evaluate.token_budget(RunConfig(), tok, items)
    assert auto == min(256, max(32, longest + 16)) and auto > longest  # a full answer fits
    assert evaluate.token_budget(RunConfig(), tok, [{"answers": ["Paris"]}]) == 32  # short answers keep 32
    assert evaluate.token_budget(RunConfig(eval_max_new_tokens=12), tok, items) == 12  # as set
    assert evaluate.token_budget(RunConfig(), tok, [{"answers": ["word " * 1000]}]) == 256


def test_a_bug_prints_the_one_line_first_and_then_the_trace(capsys):
    from finetune import pipeline
    from finetune.errors import PipelineError

    try:
        {}["missing"]
    except KeyError as e:
        code = pipeline._fail(PipelineError(f"unexpected KeyError: {e} (trace below)"), trace=True)
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and err[0].startswith("error: unexpected KeyError") and err[1].startswith("Traceback")
