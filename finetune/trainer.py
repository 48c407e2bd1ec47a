"""The trainer itself: trl's SFTTrainer with our guards, collators, the KL replay loss and callbacks.

`build_trainer` is the one way to make it; the train stage (finetune/train.py) and the GPU benchmark's "ours" arm
(bench/gpu_speed.py) both call it, so the benchmark measures the path users run. What the callbacks add to a
plain SFTTrainer: the loss curve in metrics.jsonl, sealed checkpoints (checkpoints.finalize after every save,
rotation only after the seal), a graceful stop on SIGTERM/SIGINT, and no optimizer step on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as td
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from finetune import checkpoints
from finetune import mfu as mfu_lib
from finetune.config import RunConfig
from finetune.dist import agree_on_stop
from finetune.errors import ConfigError, PipelineError, ResourceError
from finetune.paths import RunPaths
from finetune.plan import TrainPlan

DEEPSPEED_DEFAULT = Path(__file__).resolve().parent.parent / "configs" / "deepspeed" / "zero2.json"


class NonFiniteLoss(PipelineError):
    exit_code = 1


def build_trainer(cfg: RunConfig, paths: RunPaths, model, tok, p: TrainPlan, train_ds, eval_ds=None, *, log=print,
                  extra_callbacks: tuple | list = (), speed: "SpeedMeter | None" = None,
                  record: Path | None = None) -> SFTTrainer:
    """The trainer for `model` (from model.load_for_training) as the plan `p` says.

    record: on one GPU, the planner's record for this card (calibrate.record_path): the run measures its host floor
    and peak memory into it for the next plan (finetune/calibrate.py).

    extra_callbacks: TrainerCallbacks added to ours (the plugin point for instrumentation: the tests' fault
    injection, tests/faults.py). They run after the trainer has written a checkpoint and before it is sealed, so
    something they do there lands between the write and the COMPLETE marker.
    """
    args = SFTConfig(
        **trainer_args(cfg, paths, p, eval_ds),
        # Rows are already truncated to MAX_SEQ_LENGTH by the stage's dataset; padding-free without packing needs
        # max_length unset (trl refuses it otherwise).
        max_length=None if p.padding_free and not cfg.packing else cfg.max_seq_length,
        packing=cfg.packing,
        padding_free=p.padding_free,
        remove_unused_columns=p.replay_loss != "kl",  # keep the "replay" column for the collator below
    )
    # One process: no host-GPU sync inside a step (GuardedSFTTrainer). Several: trl's own loss path, whose token
    # count is gathered across the processes.
    no_sync = p.world_size == 1
    trainer = GuardedSFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                                callbacks=trainer_callbacks(cfg, paths, p, log, speed, extra_callbacks),
                                replay_weight=cfg.replay_weight,
                                no_sync=no_sync)
    if p.replay_loss == "kl":
        trainer.data_collator = ReplayMaskCollator(trainer.data_collator)
    if record is not None and no_sync and p.device == "cuda":
        from finetune import calibrate

        trainer.add_callback(calibrate.recorder(record, p, trainer, cfg.lora_dropout, log))
    return trainer


def trainer_args(cfg: RunConfig, paths: RunPaths, p: TrainPlan, eval_ds) -> dict:
    """The TrainingArguments every objective shares (SFTConfig here, DPOConfig/ORPOConfig in finetune/preference.py)."""
    cuda = p.device == "cuda"
    return dict(
        output_dir=str(paths.checkpoints),
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=p.micro_batch,
        per_device_eval_batch_size=p.micro_batch,
        gradient_accumulation_steps=p.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=max(0, round(cfg.warmup_ratio * p.total_steps)),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=p.optim,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # rotation is ours: only after the new checkpoint is sealed
        eval_strategy="steps" if eval_ds is not None and cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        load_best_model_at_end=bool(cfg.early_stopping_patience),
        metric_for_best_model="eval_loss" if cfg.early_stopping_patience else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        run_name=f"{cfg.model_slug}_{cfg.adapter_kind}" + (f"_{cfg.training_objective}" if cfg.preference else ""),
        gradient_checkpointing=False,  # set on the model by model.load_for_training
        use_cpu=not cuda,
        deepspeed=deepspeed_config(cfg, p),
        ddp_find_unused_parameters=False if p.world_size > 1 else None,
        ddp_timeout=max(1, round(cfg.dist_timeout_minutes * 60)),  # the group is ours (dist.init); said again here
        dataloader_num_workers=0,
        disable_tqdm=False,
        save_only_model=False,
    )


def trainer_callbacks(cfg: RunConfig, paths: RunPaths, p: TrainPlan, log=print, speed: "SpeedMeter | None" = None,
                      extra_callbacks: tuple | list = ()) -> list:
    """Metrics, instrumentation, sealing, signals (and early stopping): the same for every objective. Extra callbacks
    run before the seal, so that something they do on save lands between the write and the marker."""
    callbacks = [_MetricsCallback(paths.metrics, speed, log), *extra_callbacks, _SealCallback(cfg, paths, p, log),
                 _SignalCallback()]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    return callbacks

def deepspeed_config(cfg: RunConfig, p: TrainPlan) -> str | None:
    """DeepSpeed for several GPUs (ZeRO-2 by default for LoRA); plain DDP on CPUs (gloo)."""
    if p.world_size == 1 or p.device != "cuda":
        return None
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else DEEPSPEED_DEFAULT
    if not path.is_file():
        raise ConfigError(f"DEEPSPEED_CONFIG={path}: no such file")
    return str(path)


# ---- collators and the KL replay loss ----------------------------------------------------------------------
class TokenCountCollator:
    """A collator plus `num_tokens`, the batch's tokens counted on the host as trl counts them (non-pad tokens of a
    padded batch, the concatenated length of a padding-free one), so logging them needs nothing from the GPU."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        batch = self.inner(examples)
        batch["num_tokens"] = int(batch["attention_mask"].sum()) if "attention_mask" in batch \
            else int(batch["position_ids"].size(1))
        return batch


class ReplayMaskCollator:
    """trl's collator, plus `replay_mask`: the label positions (labels != -100) that belong to replay rows, for
    padded batches ([rows, longest]) and padding-free ones (one concatenated row) alike."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        flags = torch.tensor([bool(e.get("replay", 0)) for e in examples])
        batch = self.inner([{k: v for k, v in e.items() if k != "replay"} for e in examples])
        labels = batch["labels"]
        if "attention_mask" in batch:  # padded: one row per example
            rows = flags[:, None].expand_as(labels)
        else:                          # padding-free: examples concatenated, then padded on the right
            lens = torch.tensor([len(e["input_ids"]) for e in examples])
            rows = torch.zeros_like(labels, dtype=torch.bool)
            rows[0, :int(lens.sum())] = torch.repeat_interleave(flags, lens)
        batch["replay_mask"] = rows & (labels != -100)
        return batch


def replay_kl_loss(model, inputs: dict, replay_mask, num_items_in_batch=None, weight: float = 1.0):
    """Cross-entropy on the user's label tokens plus `weight` x KL(base || tuned) on the replay rows' label tokens,
    summed and divided by all label tokens (as the plain loss is). The base is the same model with the adapter off."""
    feed = {k: v for k, v in inputs.items() if k != "labels"}
    labels = inputs["labels"]
    peft_model = getattr(model, "module", model)
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = model(**feed).logits[:, :-1]
    outputs = model(**feed)
    logp = outputs.logits[:, :-1].float().log_softmax(-1)
    target, rep = labels[:, 1:], replay_mask[:, 1:]
    valid = target != -100
    user = valid & ~rep
    ce = -logp[user].gather(-1, target[user][:, None]).sum()
    p_base = base_logits[rep].float().softmax(-1)
    kl = (p_base * (p_base.clamp_min(1e-30).log() - logp[rep])).sum()
    n = num_items_in_batch if num_items_in_batch is not None else valid.sum()
    return (ce + weight * kl) / n, outputs


# ---- the trainer -------------------------------------------------------------------------------------------
class GuardedSFTTrainer(SFTTrainer):
    """SFTTrainer that refuses a non-finite loss before the optimizer applies it, and takes the KL replay loss."""

    def __init__(self, *a, replay_weight: float = 1.0, no_sync: bool = False, **kw):
        super().__init__(*a, **kw)
        self._replay_weight = replay_weight
        # no_sync (one process): nothing in a micro-batch waits for the GPU. The finiteness of its loss is kept on the
        # device and read once before the optimizer step (_FiniteCheckCallback); the token count comes from the host.
        self._no_sync = no_sync
        self._finite = None
        if no_sync:
            self.data_collator = TokenCountCollator(self.data_collator)
            self.add_callback(_FiniteCheckCallback(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        replay_mask = inputs.pop("replay_mask", None)
        num_tokens = inputs.pop("num_tokens", None)
        if replay_mask is not None and bool(replay_mask.any()):
            loss, outputs = replay_kl_loss(model, inputs, replay_mask, num_items_in_batch, self._replay_weight)
            out = (loss, outputs) if return_outputs else loss
        elif num_tokens is not None:
            # trl's compute_loss would also log entropy and token accuracy (from logits Unsloth's fused loss never
            # materialises) and count the tokens on the GPU, each an .item() that stalls the host mid-step.
            inputs["use_cache"] = False
            out = Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        else:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        if num_tokens is not None and model.training:
            self._total_train_tokens += num_tokens
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        loss = out[0] if isinstance(out, tuple) else out
        if self._no_sync and model.training:
            ok = torch.isfinite(loss.detach()).all()
            self._finite = ok if self._finite is None else self._finite & ok
        elif not torch.isfinite(loss).all():
            raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}; nothing applied. "
                                "Last good checkpoint kept; lower LEARNING_RATE or check the data, then resume")
        return out

    def check_finite(self) -> None:
        """Raise NonFiniteLoss if a micro-batch of this step had a non-finite loss (one host sync per step)."""
        ok, self._finite = self._finite, None
        if ok is not None and not bool(ok):
            raise NonFiniteLoss(f"non-finite loss at step {self.state.global_step + 1}; nothing applied (stopped before "
                                "the optimizer step). Last good checkpoint kept; lower LEARNING_RATE or check the data, "
                                "then resume")

    def _load_optimizer_and_scheduler(self, checkpoint):
        # With several processes transformers maps the optimizer state to args.device, which on CPU (gloo) is
        # "cpu:0": torch.load cannot restore to that. Map it to "cpu" for the duration of this one load.
        if not checkpoint or self.args.world_size <= 1 or self.args.device.type != "cpu":
            return super()._load_optimizer_and_scheduler(checkpoint)
        load = torch.load

        def cpu_load(*a, map_location=None, **kw):
            if isinstance(map_location, (str, torch.device)) and torch.device(map_location).type == "cpu":
                map_location = "cpu"
            return load(*a, map_location=map_location, **kw)

        torch.load = cpu_load
        try:
            return super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            torch.load = load


# ---- callbacks and the signal state ------------------------------------------------------------------------
@dataclass
class SpeedMeter:
    """Tokens/s and model-FLOPs utilisation for the banner and metrics.jsonl (finetune/mfu.py has the formula)."""

    precision: str                 # nf4 | bf16 | fp8: the base's GEMM precision
    why: str
    flops_per_token: float
    peak_tflops: float | None      # the whole run's: per GPU x processes
    device: str

    def describe(self) -> str:
        peak = f"{self.peak_tflops:,.0f} TFLOP/s dense {'FP8' if self.precision == 'fp8' else 'bf16'} peak" \
            if self.peak_tflops else f"no peak known for {self.device}: MFU not reported"
        # On a CPU the unquantised base is held and multiplied in float32 (model.compute_dtype), not bf16.
        held = "float32" if self.precision == "bf16" and self.device == "CPU" else self.precision
        return (f"[train] base weights {held} ({self.why}); {self.flops_per_token / 1e9:.2f} GFLOP per token "
                f"(4 x frozen + 6 x trainable + causal attention); {peak}; tokens/s and MFU go to metrics.jsonl")

    def mfu(self, tokens_per_s: float) -> float | None:
        return mfu_lib.mfu(tokens_per_s, self.flops_per_token, self.peak_tflops)


class _MetricsCallback(TrainerCallback):
    def __init__(self, path: Path, speed: SpeedMeter | None = None, log=print):
        self.path = Path(path)
        self.speed, self.log = speed, log
        self.last = self.first = None  # (time, tokens) at the previous log and at the first one

    def _throughput(self, logs: dict) -> dict:
        """tokens/s since the previous log line (tokens as trl counts them: non-pad) and the MFU it means."""
        tokens, now = logs.get("num_tokens"), time.time()
        if tokens is None:
            return {}
        prev, self.last = self.last, (now, float(tokens))
        self.first = self.first or self.last
        if prev is None or now <= prev[0] or tokens <= prev[1]:
            return {}
        tps = (tokens - prev[1]) / (now - prev[0])
        out = {"tokens_per_s": round(tps, 1)}
        m = self.speed.mfu(tps) if self.speed else None
        return {**out, "mfu": round(m, 4)} if m is not None else out

    def on_train_end(self, args, state, control, **kw):
        if self.first and self.last and self.last[0] > self.first[0] and state.is_world_process_zero:
            tps = (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])
            m = self.speed.mfu(tps) if self.speed else None
            self.log(f"[train] {tps:,.0f} tokens/s after the first logged step"
                     + (f", MFU {m:.1%} of the {self.speed.peak_tflops:,.0f} TFLOP/s peak" if m is not None else ""))

    def on_train_begin(self, args, state, control, **kw):
        # A resumed run drops the lines past the checkpoint it resumes from, so the curve has no duplicates.
        if self.path.is_file():
            keep = [l for l in open(self.path, encoding="utf-8") if json.loads(l).get("step", 0) <= state.global_step]
            self.path.write_text("".join(keep), encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        rec = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "time": round(time.time(), 3)}
        if "loss" in logs:
            rec.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                       **self._throughput(logs))
            rec.update({k: logs[k] for k in ("rewards/accuracies", "rewards/margins") if k in logs})  # dpo
        elif "eval_loss" in logs:
            rec.update(eval_loss=logs["eval_loss"])
        else:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")


class _SealCallback(TrainerCallback):
    def __init__(self, cfg: RunConfig, paths: RunPaths, p: TrainPlan, log):
        self.cfg, self.paths, self.plan, self.log = cfg, paths, p, log

    def on_save(self, args, state, control, **kw):
        if td.is_available() and td.is_initialized():
            td.barrier()  # every rank has written its part (DeepSpeed shards) before rank 0 seals
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        meta = {"step": state.global_step, "epoch": state.epoch,
                "fingerprint": checkpoints.fingerprint(self.cfg, self.plan, self.paths),
                "config": self.cfg.public_dict(), "versions": checkpoints.versions(),
                "data_fingerprint": checkpoints.data_fingerprint(self.paths),
                "micro_batch": self.plan.micro_batch, "grad_accum": self.plan.grad_accum, "world_size": self.plan.world_size,
                "optim": self.plan.optim, "replay_loss": self.plan.replay_loss,
                "saved_at": time.time()}
        try:
            checkpoints.finalize(ckpt, meta)
        except OSError as e:
            if e.errno == 28:  # ENOSPC: the previous checkpoint is untouched
                raise ResourceError(f"disk full while saving {ckpt}; the previous checkpoint is intact. Free space, then "
                                    "JOB=resume_training") from None
            raise
        checkpoints.rotate(Path(args.output_dir), self.cfg.save_total_limit, self.log)


class SignalFlag:
    """SIGTERM/SIGINT while installed: remembered, not fatal; _SignalCallback then saves and stops the trainer."""

    received: str | None = None
    signum: int = 0

    @contextlib.contextmanager
    def installed(self):
        SignalFlag.received, SignalFlag.signum = None, 0
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, self._handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @staticmethod
    def agree() -> int:
        """The signal every process acts on (0: none), once each has voted with its own (dist.agree_on_stop)."""
        agreed = agree_on_stop(SignalFlag.signum)
        if agreed and not SignalFlag.received:
            SignalFlag.received, SignalFlag.signum = f"{signal.Signals(agreed).name} (to another process)", agreed
        return agreed

    def _handler(self, signum, frame):
        SignalFlag.received, SignalFlag.signum = signal.Signals(signum).name, signum
        print(f"\n[train] {SignalFlag.received} received: finishing this step, saving a checkpoint, then exiting 75",
              flush=True)


class _SignalCallback(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        # Several processes stop together or not at all: a signal may reach one node only, or one rank just after
        # the vote (dist.agree_on_stop); every rank acts on the vote, never on its own flag.
        if SignalFlag.agree():
            control.should_save = True
            control.should_training_stop = True


class _FiniteCheckCallback(TrainerCallback):
    def __init__(self, trainer: GuardedSFTTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.trainer.check_finite()
