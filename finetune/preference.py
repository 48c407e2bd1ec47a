"""Preference training (TRAINING_OBJECTIVE=dpo|orpo): the trainer, the starting adapter, and the pair metrics.

It plugs into the SFT train stage (`finetune/train.py` calls `to_dataset`, `adjust_plan`, `load_init_adapter` and
`build_trainer`), so checkpoints, sealing, resume, SIGTERM -> 75, the adapter's output folder, merge, evaluate and
export are the SFT ones.

No second model is kept in memory. DPO's reference policy is the same network with the adapter switched off (TRL's
DPOTrainer does that for a PEFT model when `ref_model=None`); when the run starts from INIT_ADAPTER, the reference
is that adapter, held frozen as a second LoRA adapter named "ref" (TRL makes the copy): megabytes, not a model.
The trained adapter is a complete adapter on the base either way, so merge and export need nothing new.
On the Unsloth backend, Unsloth's `PatchDPOTrainer` is applied before the trainer is built (it patches TRL's DPO
and ORPO trainers for its fast paths).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finetune.config import RunConfig
from finetune.data.preference import pair_ids
from finetune.errors import ConfigError
from finetune.paths import RunPaths
from finetune.plan import TrainPlan
from finetune.trainer import NonFiniteLoss, trainer_args, trainer_callbacks

REF = "ref"  # TRL's name for the frozen reference adapter


def to_dataset(rows: list[dict], tok):
    """The pairs in TRL's conversational preference form, and each pair's tokens (prompt + both answers)."""
    from datasets import Dataset

    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    lengths = []
    for r in pairs:
        p, c, x = pair_ids(tok, r)
        lengths.append(2 * len(p) + len(c) + len(x))
    return Dataset.from_list(pairs), lengths


def adjust_plan(p: TrainPlan, cfg: RunConfig) -> TrainPlan:
    """Pairs are padded batches (TRL's DPO collator has no padding-free path); the banner names the objective."""
    import dataclasses

    what = {"dpo": f"DPO, beta {cfg.preference_beta:g}, reference = "
                   + ("INIT_ADAPTER (a frozen copy)" if cfg.init_adapter else "the base (adapter off)"),
            "orpo": f"ORPO, lambda {cfg.preference_beta:g}, no reference model"}[cfg.training_objective]
    start = f"; starts from {cfg.init_adapter}" if cfg.init_adapter else ""
    return dataclasses.replace(p, padding_free=False, notes=[*p.notes, f"objective {what}{start}"])


def load_init_adapter(model, cfg: RunConfig, log=print) -> None:
    """Put INIT_ADAPTER's weights into the fresh "default" adapter (same rank, alpha and targets required)."""
    from peft import load_peft_weights, set_peft_model_state_dict

    folder = Path(cfg.init_adapter)
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"INIT_ADAPTER={folder}: no adapter_config.json there (point it at a finished run's "
                          "lora_adapters/ or qlora_adapters/ folder)")
    saved = json.loads((folder / "adapter_config.json").read_text())
    info = folder / "training_info.json"
    trained_on = json.loads(info.read_text()).get("base_model_name") if info.is_file() else None
    if trained_on and trained_on != cfg.base_model_name:
        raise ConfigError(f"INIT_ADAPTER={folder} was trained on BASE_MODEL_NAME={trained_on}, this run's base is "
                          f"{cfg.base_model_name}: an adapter only fits the base it was trained on")
    now = model.peft_config["default"]
    diff = [f"{k}: adapter has {saved.get(k)!r}, this run {getattr(now, k)!r}"
            for k in ("r", "lora_alpha", "use_rslora", "use_dora") if saved.get(k, getattr(now, k)) != getattr(now, k)]
    if set(saved.get("target_modules") or []) != set(now.target_modules or []):
        diff.append(f"target_modules: adapter has {sorted(saved.get('target_modules') or [])}, "
                    f"this run {sorted(now.target_modules or [])}")
    if diff:
        raise ConfigError(f"INIT_ADAPTER={folder} does not match this run's LoRA settings (set LORA_RANK, LORA_ALPHA, "
                          "TARGET_MODULES as it was trained):\n  - " + "\n  - ".join(diff))
    device = next(p.device for p in model.parameters() if p.requires_grad)
    result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device=str(device)), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(f"INIT_ADAPTER={folder}: {len(result.unexpected_keys)} weights do not fit this model "
                          f"(e.g. {result.unexpected_keys[0]})")
    log(f"[train] starting from the adapter in {folder}")


# ----------------------------------------------------------------------------------------------------
def build_trainer(cfg: RunConfig, paths: RunPaths, model, tok, p: TrainPlan, train_ds, eval_ds=None, *, log=print,
                  extra_callbacks: tuple | list = (), speed=None):
    """trainer.build_trainer's counterpart for pairs: DPOTrainer or ORPOTrainer with the same arguments and callbacks.
    The Unsloth backend's forward returns the logits DPO needs under model.training_switches (pipeline.py)."""
    if p.backend == "unsloth":  # pragma: no cover - GPU
        from unsloth import PatchDPOTrainer

        # Unsloth's documented entry point, called before the trainer is built. (In unsloth 2026.10 it is a no-op:
        # the trainers are patched when unsloth is imported, which choose_backend does first.)
        PatchDPOTrainer()
    common = {**trainer_args(cfg, paths, p, eval_ds), "remove_unused_columns": False}
    callbacks = trainer_callbacks(cfg, paths, p, log, speed, extra_callbacks)
    if cfg.training_objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, beta=cfg.preference_beta, loss_type=["sigmoid"], max_length=cfg.max_seq_length,
                         truncation_mode="keep_start", precompute_ref_log_probs=False, padding_free=False)
        trainer = _guarded(DPOTrainer)(model=model, ref_model=None, args=args, train_dataset=train_ds,
                                       eval_dataset=eval_ds, processing_class=tok, callbacks=callbacks)
        if not cfg.init_adapter and REF in model.peft_config:
            # TRL copies any adapter it is handed as the reference; a fresh one is zero, i.e. the base itself: the
            # adapter switched off gives the same logits without a second set of LoRA weights to run.
            model.delete_adapter(REF)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common, beta=cfg.preference_beta, max_length=cfg.max_seq_length)
        trainer = _guarded(ORPOTrainer)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                        processing_class=tok, callbacks=callbacks)
    kept = len(trainer.train_dataset)
    if kept != len(train_ds):  # the gate promised every prepared pair fits; a silent drop would break kept+rejected=input
        raise RuntimeError(f"the trainer dropped {len(train_ds) - kept} of {len(train_ds)} prepared pairs")
    return trainer


def _guarded(base):
    """`base` (DPOTrainer or ORPOTrainer) refusing a non-finite loss before backward, and saving only the trained
    adapter (the frozen reference copy is rebuilt from INIT_ADAPTER on resume)."""

    class Guarded(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            loss = out[0] if isinstance(out, tuple) else out
            if not torch.isfinite(loss).all():
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}; nothing "
                                    "applied. Last good checkpoint kept; lower LEARNING_RATE or check the data, then resume")
            return out

        def save_model(self, output_dir=None, _internal_call=False):
            super().save_model(output_dir, _internal_call)
            shutil.rmtree(Path(output_dir or self.args.output_dir) / REF, ignore_errors=True)

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


# ----------------------------------------------------------------------------------------------------
def pair_metrics(cfg: RunConfig, paths: RunPaths, base: str, device: str = "cpu", log=print) -> dict:
    """Held-out pairs, base and fine-tuned: the implicit reward's preference and the log-likelihood's.

    The implicit reward of a model m is beta x (log m(answer | prompt) - log ref(answer | prompt)), with ref the
    DPO reference (the base, or INIT_ADAPTER). `reward_accuracy` is the fraction of pairs whose chosen answer gets the
    higher reward (a tie counts half: the reference itself scores exactly 0.5), `reward_margin` the mean of
    reward(chosen) - reward(rejected). `logp_accuracy` / `logp_margin` compare the answers' total log-probabilities
    under the model alone: whether it would rather say the chosen answer at all.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from finetune import model as model_lib

    pairs = [json.loads(l) for l in open(paths.eval_file, encoding="utf-8")] if paths.eval_file.is_file() else []
    if cfg.eval_max_questions:
        pairs = pairs[:cfg.eval_max_questions]
    if not pairs:
        return {}
    tok = AutoTokenizer.from_pretrained(paths.adapters)
    plain = model_lib.load_plain(base, tok, device, torch.float32)
    model = PeftModel.from_pretrained(plain, str(paths.adapters)).eval()
    if cfg.init_adapter:
        model.load_adapter(cfg.init_adapter, adapter_name=REF)
    from trl.trainer.utils import use_adapter

    tuned, ref = [], []
    for pair in pairs:
        seqs = _sequences(tok, pair, cfg.max_seq_length)
        tuned.append(_logps(model, seqs, device))
        with use_adapter(model, adapter_name=REF if cfg.init_adapter else None):
            ref.append(_logps(model, seqs, device))
    beta = cfg.preference_beta
    rewards = [(beta * (t[0] - r[0]), beta * (t[1] - r[1])) for t, r in zip(tuned, ref)]
    out = {"pairs": len(pairs), "beta": beta, "reference": cfg.init_adapter or "base (adapter off)",
           "base": _scores([(0.0, 0.0)] * len(pairs), ref), "finetuned": _scores(rewards, tuned),
           # per pair: which ones the tuned model still gets wrong, and what the base thought of them
           "per_pair": [{"id": pair.get("id"), "reward_margin": round(c - r, 4), "base_logp_margin": round(b[0] - b[1], 3),
                         "finetuned_logp_margin": round(t[0] - t[1], 3)}
                        for pair, (c, r), b, t in zip(pairs, rewards, ref, tuned)]}
    return out


def _sequences(tok, pair: dict, max_len: int) -> list[tuple[list[int], int]]:
    """(ids, prompt length) for prompt+chosen and prompt+rejected, cut at max_len as the trainer cuts them."""
    p, c, r = pair_ids(tok, pair)
    return [((p + c)[:max_len], len(p)), ((p + r)[:max_len], len(p))]


def _logps(model, seqs, device) -> tuple[float, float]:
    import torch

    out = []
    with torch.no_grad():
        for ids, n_prompt in seqs:
            x = torch.tensor([ids], device=device)
            logp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
            tok_logp = logp.gather(-1, x[0, 1:, None])[:, 0]
            out.append(float(tok_logp[n_prompt - 1:].sum()))
    return out[0], out[1]


def _scores(rewards: list[tuple[float, float]], logps: list[tuple[float, float]]) -> dict:
    n = max(len(rewards), 1)
    win = lambda a, b: 1.0 if a > b else 0.5 if a == b else 0.0  # noqa: E731
    return {"reward_accuracy": round(sum(win(c, r) for c, r in rewards) / n, 4),
            "reward_margin": round(sum(c - r for c, r in rewards) / n, 4),
            "logp_accuracy": round(sum(win(c, r) for c, r in logps) / n, 4),
            "logp_margin": round(sum(c - r for c, r in logps) / n, 4)}


def summary(m: dict) -> str:
    b, f = m["base"], m["finetuned"]
    return (f"[evaluate] {m['pairs']} held-out pairs: preference accuracy (implicit reward) {b['reward_accuracy']:.0%} "
            f"(base) -> {f['reward_accuracy']:.0%} (fine-tuned), mean reward margin {f['reward_margin']:.3f}; "
            f"log-likelihood prefers chosen {b['logp_accuracy']:.0%} -> {f['logp_accuracy']:.0%}")
