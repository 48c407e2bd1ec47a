"""Preference training (TRAINING_OBJECTIVE=dpo|orpo) on the tiny random Llama: the formats and the gate, a falling
loss, exact resume, starting from an SFT adapter, and the merged model through the parity gate."""

import json

import pytest
import torch

from finetune import checkpoints as ck
from finetune.config import PREFERENCE_LR, RunConfig
from finetune.data.prepare import prepare
from finetune.errors import ConfigError, DataError, Interrupted
from finetune.model import Backend, load_tokenizer
from finetune.paths import RunPaths
from finetune.train import train
from tests.conftest import qa_rows, write_jsonl
from tests.faults import faults

CPU = Backend("hf", "test", "cpu")


def pairs(n: int = 16) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.",
             "rejected": f"Well, that is a hard one; it could be {2 * i + 1}, or maybe not."} for i in range(n)]


def setup_run(tmp_path, tiny_llama_dir, rows=None, **kw):
    data = write_jsonl(tmp_path / "d.jsonl", rows if rows is not None else pairs())
    base = dict(base_model_name=str(tiny_llama_dir), data_path=str(data), base_save_path=str(tmp_path / "out"),
                checkpoint_path=str(tmp_path / "ckpt"), use_qlora=False, num_epochs=2, batch_size="4",
                learning_rate=5e-3, save_steps=3, report_to="none", replay_fraction=0.0, warmup_ratio=0.0,
                training_objective="dpo", eval_fraction=0.0)
    base.update(kw)
    cfg = RunConfig(**base)
    paths = RunPaths.from_config(cfg)
    tok, _ = load_tokenizer(str(tiny_llama_dir), cfg)
    stats = prepare(cfg, paths, tok)
    return cfg, paths, tok, stats


def log_lines(paths):
    return [json.loads(l) for l in open(paths.metrics) if "loss" in json.loads(l)]


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------- data
def test_the_three_preference_shapes_are_detected_and_normalised_alike(tmp_path, tiny_llama_dir):
    user = [{"role": "user", "content": "Capital of France?"}]
    rows = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": [{"role": "system", "content": "Be brief."}, *user],
         "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Nice."}]},
        {"chosen": [*user, {"role": "assistant", "content": "Paris."}],
         "rejected": [*user, {"role": "assistant", "content": "Marseille."}]},
    ]
    cfg, paths, tok, stats = setup_run(tmp_path, tiny_llama_dir, rows)
    assert stats["preference_formats"] == {"preference_standard": 1, "preference_conversational": 1,
                                           "preference_implicit": 1}
    got = [json.loads(l) for l in open(paths.train_file)]
    assert [r["prompt"][-1] for r in got] == [user[0]] * 3  # the implicit prompt is the shared prefix
    assert [r["chosen"] for r in got] == [[{"role": "assistant", "content": "Paris."}]] * 3
    assert [r["rejected"][0]["content"] for r in got] == ["Lyon.", "Nice.", "Marseille."]
    assert all(r["messages"] == r["prompt"] + r["chosen"] for r in got)  # what merge and evaluate read


def test_the_gate_rejects_bad_pairs_with_reasons_and_kept_plus_rejected_is_input(tmp_path, tiny_llama_dir):
    good = pairs(12)
    bad = [
        {"prompt": "Same?", "chosen": "Yes.", "rejected": " Yes. "},                   # identical once stripped
        {"prompt": "Empty?", "chosen": "", "rejected": "No."},                           # an empty side
        {"prompt": [{"role": "user", "content": "Empty too?"}], "chosen": [],
         "rejected": [{"role": "assistant", "content": "x"}]},
        {"prompt": "word " * 200, "chosen": "a", "rejected": "b"},                       # no room under 64 tokens
        {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},  # implicit, identical
        {"chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]},
        {"prompt": "Types?", "chosen": 3, "rejected": "x"},
        {"input": "an SFT row", "output": "in a preference file"},
        good[0],                                                                         # exact duplicate
    ]
    cfg, paths, tok, stats = setup_run(tmp_path, tiny_llama_dir, good + bad, max_seq_length=64,
                                       data_max_reject_fraction=0.5)
    assert stats["rows_in"] == len(good) + len(bad) == stats["kept"] + stats["rejected"]
    assert stats["kept"] == len(good) and stats["rejected"] == len(bad)
    reasons = [json.loads(l)["reason"] for l in open(paths.rejected_file)]
    assert sum("identical" in r for r in reasons) == 2
    assert sum("empty" in r or "non-empty list" in r for r in reasons) == 2
    assert any("no room for an answer under MAX_SEQ_LENGTH=64" in r for r in reasons)
    assert any("share no prompt" in r for r in reasons)
    assert any("must be a string" in r for r in reasons)
    assert any("not a preference pair" in r for r in reasons)
    assert any("exact duplicate" in r for r in reasons)


def test_pairs_under_sft_and_sft_rows_under_dpo_are_refused_by_name(tmp_path, tiny_llama_dir):
    with pytest.raises(DataError) as e:
        setup_run(tmp_path / "a", tiny_llama_dir, training_objective="sft")
    assert "preference pair" in str(e.value) and "TRAINING_OBJECTIVE=dpo" in str(e.value)
    with pytest.raises(DataError) as e:
        setup_run(tmp_path / "b", tiny_llama_dir, rows=qa_rows(8))
    assert "not a preference pair" in str(e.value)


def test_config_preference_defaults_and_refusals(clean_env):
    cfg = RunConfig.from_env({"TRAINING_OBJECTIVE": "dpo"}, env_file=None)
    # the bundled pairs, held-out pairs, no replay, the LoRA preference learning rate, its own output folder
    assert cfg.data_path.endswith("preference_sample.jsonl") and cfg.eval_fraction > 0 and cfg.replay_fraction == 0
    from finetune.defaults import resolve_epochs, resolve_model

    cfg, _ = resolve_model(cfg, frozenset(), 135_000_000)
    cfg, _ = resolve_epochs(cfg, frozenset(), 82, 0)
    assert cfg.num_epochs == 3 and cfg.lr == PREFERENCE_LR  # not the SFT demo's 9 and 1e-3
    assert RunPaths.from_config(cfg).run_dir.name == "dpo-3"
    assert RunPaths.from_config(RunConfig(num_epochs=3)).run_dir.name == "3"  # SFT keeps the plain epoch label
    with pytest.raises(ConfigError) as e:
        RunConfig.from_env({"TRAINING_OBJECTIVE": "dpo", "REPLAY_FRACTION": "1", "PACKING": "1"}, env_file=None)
    assert "REPLAY_FRACTION=1" in str(e.value) and "PACKING=true" in str(e.value)
    with pytest.raises(ConfigError) as e:
        RunConfig.from_env({"INIT_ADAPTER": "x"}, env_file=None)
    assert "INIT_ADAPTER=x" in str(e.value)


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_loss_falls_and_only_the_trained_adapter_is_saved(tmp_path, tiny_llama_dir, objective):
    cfg, paths, tok, _ = setup_run(tmp_path, tiny_llama_dir, training_objective=objective)
    out = train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False)
    curve = log_lines(paths)
    assert len(curve) == 8 and curve[-1]["loss"] < curve[0]["loss"]
    assert curve[-1]["rewards/accuracies"] > 0.5 and curve[-1]["rewards/margins"] > curve[0]["rewards/margins"]
    if objective == "dpo":  # step 1: the policy is the reference, so the DPO loss is exactly ln 2
        assert curve[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    tensors = adapter_tensors(out)
    assert tensors and all("lora_" in k for k in tensors) and not (out / "ref").exists()
    for _, c in ck.list_checkpoints(paths.checkpoints):
        assert ck.verify(c) is None and ck.read_manifest(c)["fingerprint"]["training_objective"] == objective


def test_dpo_resume_after_sigterm_equals_the_uninterrupted_run(tmp_path, tiny_llama_dir):
    cfg, paths, tok, _ = setup_run(tmp_path / "ref", tiny_llama_dir, save_steps=100)
    ref_out = train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False)
    ref = log_lines(paths)

    cfg2, paths2, tok2, _ = setup_run(tmp_path / "cut", tiny_llama_dir, save_steps=100)
    with pytest.raises(Interrupted) as e:
        train(cfg2, paths2, str(tiny_llama_dir), tok2, CPU, resume=False, extra_callbacks=faults(sigterm_at_step=3))
    assert e.value.exit_code == 75 and "checkpoint-3" in str(e.value)
    out = train(cfg2, paths2, str(tiny_llama_dir), tok2, CPU, resume=True)
    got = log_lines(paths2)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    ra, rb = adapter_tensors(ref_out), adapter_tensors(out)
    for k in ra:
        torch.testing.assert_close(ra[k], rb[k], atol=1e-5, rtol=1e-4)


def test_dpo_from_an_sft_adapter_uses_it_as_the_reference(tmp_path, tiny_llama_dir):
    sft_cfg, sft_paths, tok, _ = setup_run(tmp_path / "sft", tiny_llama_dir, rows=qa_rows(8), training_objective="sft",
                                           num_epochs=1)
    sft_adapter = train(sft_cfg, sft_paths, str(tiny_llama_dir), tok, CPU, resume=False)
    cfg, paths, tok, _ = setup_run(tmp_path / "dpo", tiny_llama_dir, init_adapter=str(sft_adapter))
    out = train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False)
    curve = log_lines(paths)
    # Step 1: the policy starts as the SFT adapter and the reference is that adapter, so every reward is 0. Had the
    # reference been the bare base, the SFT adapter's own shift would show as a non-zero margin.
    assert curve[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and curve[0]["rewards/margins"] == 0
    assert curve[-1]["loss"] < curve[0]["loss"]
    start, end = adapter_tensors(sft_adapter), adapter_tensors(out)
    assert set(start) == set(end) and not (out / "ref").exists()
    assert any(not torch.equal(start[k], end[k]) for k in start)

    wrong = RunConfig(**{**cfg.__dict__, "lora_rank": 4, "checkpoint_path": str(tmp_path / "xc")})
    with pytest.raises(ConfigError) as e:  # refused before any step: the adapter of the run above is untouched
        train(wrong, RunPaths.from_config(wrong), str(tiny_llama_dir), tok, CPU, resume=False)
    assert "does not match this run's LoRA settings" in str(e.value) and "r: adapter has 16, this run 4" in str(e.value)


def test_merged_dpo_model_passes_the_parity_gate_and_the_report_scores_pairs(tmp_path, tiny_llama_dir):
    from finetune.evaluate import evaluate
    from finetune.merge import merge

    cfg, paths, tok, _ = setup_run(tmp_path, tiny_llama_dir, eval_max_new_tokens=4, retention_set="none")
    train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False)
    merged = merge(cfg, paths, str(tiny_llama_dir))
    parity = json.loads((merged / "merge_parity.json").read_text())
    assert parity["max_abs_logit_diff"] <= parity["tolerance"] and parity["greedy_identical"] == parity["prompts"]
    pm = evaluate(cfg, paths, str(tiny_llama_dir))["preference"]
    assert pm["pairs"] == 16
    assert pm["base"]["reward_accuracy"] == 0.5 and pm["base"]["reward_margin"] == 0  # the reference against itself
    # evaluated on the training pairs (EVAL_FRACTION=0): the trained adapter prefers chosen, as its training log said
    assert pm["finetuned"]["reward_accuracy"] >= log_lines(paths)[-1]["rewards/accuracies"] - 0.25
    assert pm["finetuned"]["reward_margin"] > 0
    assert "Preference pairs" in (paths.eval_dir / "report.md").read_text()


def test_a_non_finite_dpo_loss_stops_before_the_optimizer_and_keeps_the_last_checkpoint(tmp_path, tiny_llama_dir):
    from finetune.trainer import NonFiniteLoss

    cfg, paths, tok, _ = setup_run(tmp_path, tiny_llama_dir, save_steps=1)
    with pytest.raises(NonFiniteLoss):
        train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False, extra_callbacks=faults(nan_at_step=3))
    assert ck.newest_complete(paths.checkpoints).name == "checkpoint-2"
