"""Forgetting is measured (a model that forgets is reported as forgetting) and replay data reaches training."""

import json
from pathlib import Path

import pytest
import torch

from finetune.config import RunConfig
from finetune.evaluate import contains_match, evaluate, retention
from finetune.paths import RunPaths
from tests.conftest import write_jsonl

PROBES = [{"id": "p1", "question": "What is the capital of France?", "answers": ["Paris"]},
          {"id": "p2", "question": "What is the capital of Japan?", "answers": ["Tokyo"]},
          {"id": "p3", "question": "Which planet is known as the Red Planet?", "answers": ["Mars"]}]


def test_retention_counts_only_what_the_base_knew():
    items = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(4)]
    r = retention(items, [True, True, False, True], [True, False, True, True])
    assert (r["kept"], r["of"], r["fraction"], r["gained"]) == (2, 3, round(2 / 3, 4), 1)
    assert r["lost"] == ["q1"]


def test_contains_match_is_whole_word_and_normalised():
    assert contains_match("It is 1847년, I think.", ["1847년"])
    assert contains_match("The answer: PARIS!", ["Paris"])
    assert not contains_match("about 18 legs", ["8"])
    assert contains_match("8 legs", ["8", "eight"])


def test_a_number_inside_a_longer_number_does_not_match():
    # The base model's "-18.0°C" for the freezing point of water once counted as "0" (the point became a space).
    assert not contains_match("The freezing point of water is -18.0°C.", ["0", "zero"])
    assert contains_match("Water freezes at 0°C.", ["0", "zero"])
    assert contains_match("It freezes at 0.", ["0"])
    assert not contains_match("about 1,000 people", ["000", "1"])
    assert contains_match("about 1,000 people", ["1,000"])
    assert not contains_match("twenty-four", ["four"])
    assert contains_match("It boils at 100 degrees, at sea level.", ["100"])


def _run_tree(tmp_path, smollm2_dir):
    cfg = RunConfig(base_model_name=str(smollm2_dir), base_save_path=str(tmp_path / "out"),
                    retention_set=str(tmp_path / "probes.json"), eval_max_new_tokens=16, use_qlora=False)
    (tmp_path / "probes.json").write_text(json.dumps(PROBES))
    paths = RunPaths.from_config(cfg)
    write_jsonl(paths.eval_file, [{"id": "e1", "messages": [{"role": "user", "content": "Who founded Brackwater?"},
                                                             {"role": "assistant", "content": "Ilse Varn"}]}])
    return cfg, paths


def test_a_model_that_forgets_is_reported_as_forgetting(tmp_path, smollm2_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, paths = _run_tree(tmp_path, smollm2_dir)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir),
                           LoraConfig(r=8, lora_alpha=64, target_modules=["down_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)  # a destructive "fine-tune": the MLP outputs are scrambled
    model.save_pretrained(paths.adapters)
    tok.save_pretrained(paths.adapters)
    report = evaluate(cfg, paths, str(smollm2_dir), "cpu", log=lambda *_: None)
    r = report["retention"]
    assert r["of"] >= 2, "the base model should know at least two of these"
    assert r["fraction"] <= 0.5 and len(r["lost"]) >= 1
    saved = json.loads(paths.report_json.read_text())
    assert saved["retention"] == r and "Retention" in (paths.eval_dir / "report.md").read_text()


def test_an_untouched_model_keeps_everything(tmp_path, smollm2_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, paths = _run_tree(tmp_path, smollm2_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir),
                           LoraConfig(r=8, target_modules=["down_proj"], task_type="CAUSAL_LM"))  # B = 0: a no-op
    model.save_pretrained(paths.adapters)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(paths.adapters)
    r = evaluate(cfg, paths, str(smollm2_dir), "cpu", log=lambda *_: None)["retention"]
    assert r["fraction"] == 1.0 and r["lost"] == []


def test_replay_rows_are_the_base_models_own_answers_and_are_mixed_into_training(tmp_path, smollm2_dir):
    from finetune.replay import build_replay
    from finetune.train import load_rows

    cfg = RunConfig(base_model_name=str(smollm2_dir), base_save_path=str(tmp_path / "out"), replay_fraction=0.5)
    paths = RunPaths.from_config(cfg)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Say hello in one word.", "What is 2 + 2? Answer with a number."]))
    build_replay(cfg, paths, str(smollm2_dir), prompts_file=prompts, max_new_tokens=32)
    replay = [json.loads(l) for l in open(paths.replay_file)]
    assert replay and all(r["messages"][0]["role"] == "user" and r["messages"][1]["content"] for r in replay)
    write_jsonl(paths.train_file, [{"id": f"u{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                                                 {"role": "assistant", "content": f"a{i}"}]} for i in range(4)])
    train_rows, _ = load_rows(paths, cfg)
    assert len(train_rows) == 4 + min(len(replay), 2)
    assert sum(r["id"].startswith("replay:") for r in train_rows) == min(len(replay), 2)
    off = RunConfig(**{**cfg.public_dict(), "replay_fraction": 0.0})
    assert len(load_rows(paths, off)[0]) == 4


def test_replay_prompts_never_ask_a_retention_probe():
    """Replay may share the probes' kind of question (short facts) but never a probe itself, or retention would
    measure memorised replay instead of kept knowledge."""
    import re

    root = Path(__file__).resolve().parent.parent / "data" / "retention"
    norm = lambda s: re.sub(r"[^\w]+", " ", s.lower()).strip()  # noqa: E731
    prompts = {norm(p) for p in json.loads((root / "replay_prompts.json").read_text(encoding="utf-8"))}
    probes = json.loads((root / "probes.json").read_text(encoding="utf-8"))
    assert len(prompts) >= 90
    assert not prompts & {norm(p["question"]) for p in probes}
