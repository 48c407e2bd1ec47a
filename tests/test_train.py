"""Training on a tiny random Llama: it learns, it resumes exactly, it stops cleanly, it refuses the unsafe."""

import json
import shutil

import pytest
import torch

from finetune import checkpoints as ck
from finetune.config import RunConfig
from finetune.data.prepare import prepare
from finetune.errors import ConfigError, Interrupted
from finetune.model import Backend, load_tokenizer
from finetune.paths import RunPaths
from finetune.train import train
from finetune.trainer import NonFiniteLoss
from tests.conftest import qa_rows, write_jsonl
from tests.faults import faults

CPU = Backend("hf", "test", "cpu")


def setup_run(tmp_path, tiny_llama_dir, **kw):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(16))
    base = dict(base_model_name=str(tiny_llama_dir), data_path=str(data), base_save_path=str(tmp_path / "out"),
                checkpoint_path=str(tmp_path / "ckpt"), use_qlora=False, num_epochs=2, batch_size="4",
                learning_rate=5e-3, save_steps=3, report_to="none", replay_fraction=0.0, lora_dropout=0.0,
                warmup_ratio=0.0)
    base.update(kw)
    cfg = RunConfig(**base)
    paths = RunPaths.from_config(cfg)
    tok, _ = load_tokenizer(str(tiny_llama_dir), cfg)
    prepare(cfg, paths, tok)
    return cfg, paths, tok


def losses(paths):
    return [json.loads(l) for l in open(paths.metrics) if "loss" in json.loads(l)]


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_lora_learns_and_only_lora_weights_change(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir, num_epochs=3)
    base_before = load_file(str(tiny_llama_dir / "model.safetensors"))
    out = train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False)
    curve = losses(paths)
    assert len(curve) == 12 and curve[-1]["loss"] < curve[0]["loss"]
    assert set(curve[0]) >= {"step", "epoch", "loss", "learning_rate", "grad_norm"}
    tensors = adapter_tensors(out)
    assert tensors and all("lora_" in k for k in tensors)
    assert any(float(t.abs().sum()) > 0 for k, t in tensors.items() if "lora_B" in k)  # B starts at zero
    # the adapter holds the only trained weights: the base on disk is exactly what it was
    base_after = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()


def test_checkpoints_are_sealed_and_rotated(tmp_path, tiny_llama_dir):
    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir, save_total_limit=2)
    train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False)
    names = [p.name for _, p in ck.list_checkpoints(paths.checkpoints)]
    assert names == ["checkpoint-8", "checkpoint-6"]
    for _, p in ck.list_checkpoints(paths.checkpoints):
        assert ck.verify(p) is None
        m = ck.read_manifest(p)
        assert {"step", "epoch", "fingerprint", "versions", "data_fingerprint", "config"} <= set(m)
        assert m["replay_loss"] == m["fingerprint"]["replay_loss"] == "sft"  # as resolved: auto, no replay rows
        assert m["config"]["replay_loss"] == "auto"                           # as the user set it
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(m["files"])


@pytest.mark.parametrize("stop_at", [3, 4])  # 3 is mid-epoch, 4 is the epoch boundary (16 rows / batch 4)
def test_resume_after_sigterm_equals_the_uninterrupted_run(tmp_path, tiny_llama_dir, stop_at):
    cfg, paths, tok = setup_run(tmp_path / "ref", tiny_llama_dir, save_steps=100)
    ref_out = train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False)
    ref = losses(paths)

    cfg2, paths2, tok2 = setup_run(tmp_path / "cut", tiny_llama_dir, save_steps=100)
    with pytest.raises(Interrupted) as e:
        train(cfg2, paths2, str(tiny_llama_dir), tok2, CPU, resume=False, extra_callbacks=faults(sigterm_at_step=stop_at))
    assert e.value.exit_code == 75 and f"checkpoint-{stop_at}" in str(e.value)
    out = train(cfg2, paths2, str(tiny_llama_dir), tok2, CPU, resume=True)
    got = losses(paths2)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-9)
    ra, rb = adapter_tensors(ref_out), adapter_tensors(out)
    for k in ra:
        torch.testing.assert_close(ra[k], rb[k], atol=1e-5, rtol=1e-4)


def test_kill_during_checkpoint_write_resumes_from_the_previous_complete_one(tmp_path, tiny_llama_dir):
    import subprocess
    import sys

    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir)
    import finetune, os
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(finetune.__file__))}
    r = subprocess.run([sys.executable, "-m", "tests.faults", json.dumps(cfg.public_dict()), "crash_in_save_at_step=6"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=env["PYTHONPATH"])
    assert r.returncode == 137, r.stderr[-2000:]
    assert (paths.checkpoints / "checkpoint-6").is_dir() and not (paths.checkpoints / "checkpoint-6" / ck.MARKER).exists()
    said = []
    assert ck.newest_complete(paths.checkpoints, said.append).name == "checkpoint-3"
    assert "checkpoint-6" in said[0]
    train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=True)
    assert losses(paths)[-1]["step"] == 8


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_llama_dir):
    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir, save_steps=3, num_epochs=1.5)
    with pytest.raises(Interrupted):
        train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False, extra_callbacks=faults(sigterm_at_step=5))
    newest = paths.checkpoints / "checkpoint-5"
    f = newest / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    said = []
    assert ck.newest_complete(paths.checkpoints, said.append).name == "checkpoint-3"
    train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=True, log=said.append)
    assert any("skipping" in s and "checkpoint-5" in s for s in said)
    assert any("continuing from" in s and "checkpoint-3" in s for s in said)


def test_resume_refuses_a_changed_config_with_a_field_diff(tmp_path, tiny_llama_dir):
    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir)
    with pytest.raises(Interrupted):
        train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False, extra_callbacks=faults(sigterm_at_step=3))
    changed = RunConfig(**{**cfg.public_dict(), "lora_rank": 8})
    with pytest.raises(ConfigError, match="lora_rank: checkpoint has 16, now 8") as e:
        train(changed, paths, str(tiny_llama_dir), tok, CPU, resume=True)
    assert e.value.exit_code == 2


def test_resume_keeps_the_optimizer_its_checkpoint_was_written_with(tmp_path, tiny_llama_dir):
    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir)
    with pytest.raises(Interrupted):
        train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False, extra_callbacks=faults(sigterm_at_step=3))
    assert ck.read_manifest(ck.newest_complete(paths.checkpoints))["optim"] == "adamw_torch"
    said = []
    other = RunConfig(**{**cfg.public_dict(), "optim": "adamw_torch_fused"})
    train(other, paths, str(tiny_llama_dir), tok, CPU, resume=True, log=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert any("keeping the checkpoint's optimizer adamw_torch" in line for line in said)


def test_train_refuses_to_clobber_checkpoints_and_resume_needs_one(tmp_path, tiny_llama_dir):
    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=True)
    with pytest.raises(Interrupted):
        train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False, extra_callbacks=faults(sigterm_at_step=3))
    with pytest.raises(ConfigError, match="JOB=resume_training.*OVERWRITE=1"):
        train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False)
    again = RunConfig(**{**cfg.public_dict(), "overwrite": True})
    train(again, paths, str(tiny_llama_dir), tok, CPU, resume=False)


def test_non_finite_loss_stops_before_the_optimizer_and_keeps_the_last_checkpoint(tmp_path, tiny_llama_dir):
    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir)
    with pytest.raises(NonFiniteLoss, match="non-finite loss.* at step 5.*before the optimizer step"):
        train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False, extra_callbacks=faults(nan_at_step=5))
    assert ck.newest_complete(paths.checkpoints).name == "checkpoint-3"
    assert not paths.adapters.exists()


def test_eval_loss_during_training_and_early_stopping(tmp_path, tiny_llama_dir):
    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir, eval_fraction=0.25, eval_steps=2, save_steps=2,
                                early_stopping_patience=1, num_epochs=6, learning_rate=0.2)
    out = train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False)
    recs = [json.loads(l) for l in open(paths.metrics)]
    evals = [r for r in recs if "eval_loss" in r]
    assert evals and all(r["step"] % 2 == 0 for r in evals)
    n_train = len([l for l in open(paths.train_file)])
    full = 6 * -(-n_train // 4)
    last = max(r["step"] for r in recs)
    assert last < full, "early stopping never fired"
    # patience 1: it stopped at the first eval that did not improve on the best one
    losses_ = [r["eval_loss"] for r in evals]
    assert losses_[-1] >= min(losses_[:-1]) and all(a > b for a, b in zip(losses_[:-2], losses_[1:-1]))
    # and the adapter it kept is the best checkpoint's, not the last step's
    best_step = min(evals, key=lambda r: r["eval_loss"])["step"]
    assert best_step < last
    best = adapter_tensors(paths.checkpoints / f"checkpoint-{best_step}")
    final = adapter_tensors(out)
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in best)


def test_tensorboard_reporting_writes_event_files(tmp_path, tiny_llama_dir):
    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir, report_to="tensorboard", max_steps=2)
    train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False)
    assert list(paths.checkpoints.rglob("events.out.tfevents.*"))


def test_training_refuses_to_start_without_disk_for_its_checkpoints(tmp_path, tiny_llama_dir, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    from finetune.errors import ResourceError

    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ResourceError, match="not enough disk") as e:
        train(cfg, paths, str(tiny_llama_dir), tok, CPU, resume=False)
    assert e.value.exit_code == 4


@pytest.mark.parametrize("padding_free", [False, True])
def test_tokens_are_counted_on_the_host_as_trl_counts_them(padding_free):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finetune.trainer import TokenCountCollator

    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [9, 10], "labels": [-100, 10]}]
    batch = TokenCountCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free))(rows)
    assert batch["num_tokens"] == 6 and isinstance(batch["num_tokens"], int)  # no pad counted, no GPU touched
