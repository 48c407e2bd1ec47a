"""The train stage: prepared data + base model -> LoRA/QLoRA adapter, through trl's SFTTrainer.

Checkpoints are HF Trainer checkpoints sealed by `checkpoints.finalize` (manifest + COMPLETE marker); resume
goes through `trainer.train(resume_from_checkpoint=...)`, which restores optimizer, scheduler, RNG states and
skips the batches already seen, so the sample order equals an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune import checkpoints, model as model_lib
from finetune.config import RunConfig
from finetune.data.tokenize import encode
from finetune.errors import ConfigError, Interrupted, PipelineError, ResourceError
from finetune.paths import RunPaths, atomic_dir


class NonFiniteLoss(PipelineError):
    exit_code = 1


@dataclass
class Faults:
    """Test-only fault injection (RAPA_FAULT, e.g. "nan_at_step=3,sigterm_at_step=5"); inert unless set."""

    nan_at_step: int = -1
    sigterm_at_step: int = -1
    crash_in_save_at_step: int = -1

    @classmethod
    def parse(cls, spec: str) -> "Faults":
        f = cls()
        for part in filter(None, (spec or "").split(",")):
            k, v = part.split("=")
            setattr(f, k.strip(), int(v))
        return f


@dataclass
class TrainPlan:
    """Derived numbers, printed once in the banner and saved in the manifest."""

    micro_batch: int
    grad_accum: int
    world_size: int
    grad_ckpt: str
    backend: str
    device: str
    rows: int
    steps_per_epoch: int
    total_steps: int
    notes: list[str] = field(default_factory=list)
    keep_layers: int = 0        # grad_ckpt == "partial": decoder layers that keep their activations
    padding_free: bool = False  # rows concatenated without pad tokens (Unsloth on a GPU, or PACKING)
    optim: str = "adamw_torch"
    lora_kernels: str = "unsloth"  # Unsloth backend: fast (finetune/fast_lora.py, eager blocks) | unsloth

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def plan(cfg: RunConfig, backend: model_lib.Backend, rows: int, world_size: int = 1,
         lengths: list[int] | None = None, keep_fixed: int | None = None) -> TrainPlan:
    """lengths: tokenised row lengths (the GPU choice sizes micro-batches from them when given)."""
    logical = 8 if cfg.batch_size == "auto" else int(cfg.batch_size)
    # The effective batch is BATCH_SIZE x GRAD_ACCUM whatever the number of processes, so a run moved from 1 to N
    # GPUs trains the same thing: each process takes 1/N of it.
    total = logical * cfg.grad_accum
    if total % world_size:
        raise ConfigError(f"effective batch BATCH_SIZE x GRAD_ACCUM = {total} does not split over {world_size} processes; "
                          f"make it a multiple of {world_size}")
    if world_size > 1:
        share = total // world_size
        logical = max(d for d in range(1, min(logical, share) + 1) if share % d == 0)
        micro, accum = logical, share // logical
    else:
        micro, accum = logical, cfg.grad_accum
    grad_ckpt = cfg.gradient_checkpointing
    if cfg.offload_weights == "on" and backend.name != "unsloth":
        raise ConfigError(f"OFFLOAD_WEIGHTS=on streams layers with Unsloth's block swap, but this run's backend is "
                          f"{backend.name} ({backend.why}): set OFFLOAD_WEIGHTS=auto, or run on a CUDA GPU with unsloth")
    keep, notes = 0, []
    # Padding-free batches by default: no compute on pad tokens. Row boundaries are kept by position ids, which
    # transformers turns into a block-diagonal mask (tests/data/test_packing.py checks the per-row loss). On a GPU,
    # rows of one length train faster padded (nothing to pad, no boundaries to split attention at).
    padding_free = True
    optim = cfg.optim if cfg.optim != "auto" else "adamw_torch"
    lora_kernels = "unsloth"
    if backend.device == "cuda":
        from finetune import autotune

        # BATCH_SIZE=auto (or any value) on a GPU: the same effective batch, cut into micro-batches that fit.
        shape = autotune.model_shape(cfg)
        choose = lambda pf: autotune.choose_micro_batch(  # noqa: E731
            cfg, logical, accum, grad_ckpt, backend.name, shape, max_micro=None if cfg.batch_size == "auto" else logical,
            lengths=None if cfg.packing else lengths, padding_free=pf, keep_fixed=keep_fixed)
        c = choose(padding_free)
        if lengths and not cfg.packing:
            # Padded or padding-free, whichever is estimated faster per useful (non-pad) token. Padding-free never
            # computes on pads but pays for splitting attention at row boundaries; padded rows of one length pay
            # nothing, and on a small GPU the padded plan may fit more rows per micro-batch (its peak is micro x
            # the longest row, padding-free's the sum of the longest rows plus separators).
            c_pad = choose(False)
            t_pf, t_pad, pad = autotune.useful_token_times(cfg, shape, lengths, c, c_pad)
            if t_pad < t_pf:
                padding_free, c = False, c_pad
                notes.append(f"padded batches: estimated {t_pf / t_pad:.2f}x faster per useful token than padding-free "
                             f"(micro-batch {c_pad.micro_batch}, expected padding {pad:.1%} of tokens)")
        micro, accum, grad_ckpt, keep = c.micro_batch, c.grad_accum, c.mode, c.keep_layers
        optim = autotune.optimizer_for(cfg, c.budget_bytes)
        notes.append(("auto: " if cfg.gradient_checkpointing == "auto" else "") + autotune.describe(c, shape["layers"]))
        if backend.name == "unsloth":
            lora_kernels, why = autotune.lora_kernels_for(cfg, shape)
            notes.append(f"LoRA kernels {lora_kernels} ({why})")
    elif grad_ckpt == "auto":
        grad_ckpt = "off"  # CPU: memory is plentiful for the models that train there
    steps_per_epoch = max(1, math.ceil(rows / (micro * world_size)) // accum)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_epochs)
    return TrainPlan(micro, accum, world_size, grad_ckpt, backend.name, backend.device, rows, steps_per_epoch, total,
                     notes, keep, padding_free, optim, lora_kernels)


def cap_gpu_memory(cfg: RunConfig) -> None:
    """MAX_GPU_MEMORY: the allocator refuses more than this (so a run sized for a smaller GPU behaves like one)."""
    import torch

    if cfg.max_gpu_memory > 0 and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.max_gpu_memory * 2**30 / total))


def load_rows(paths: RunPaths, cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    def read(p: Path) -> list[dict]:
        return [json.loads(l) for l in open(p, encoding="utf-8")] if p.is_file() else []

    train = read(paths.train_file)
    if cfg.replay_fraction > 0:
        replay = read(paths.replay_file)
        k = min(len(replay), max(1, round(cfg.replay_fraction * len(train))))
        # A seeded sample, not the first k: the pool is ordered by kind (long-form, then short facts, then Korean).
        train += [{**r, "replay": True} for r in random.Random(cfg.seed).sample(replay, k)] if replay else []
    held_out = read(paths.eval_file) if cfg.eval_fraction > 0 else []
    return train, held_out


def resolve_replay_loss(cfg: RunConfig, backend: model_lib.Backend) -> str:
    """REPLAY_LOSS=auto: the KL loss where it was measured (CPU, docs/QUALITY.md), plain SFT on a GPU."""
    loss = cfg.replay_loss if cfg.replay_loss != "auto" else (
        "kl" if backend.device == "cpu" and cfg.replay_fraction > 0 else "sft")
    if loss == "sft" and cfg.replay_weight != 1:
        raise ConfigError(f"REPLAY_WEIGHT={cfg.replay_weight:g} weights the kl replay loss, but REPLAY_LOSS=auto means sft "
                          f"on this {backend.device.upper()}: set REPLAY_LOSS=kl, or leave REPLAY_WEIGHT at 1")
    return loss


def to_dataset(rows: list[dict], tok, cfg: RunConfig):
    from datasets import Dataset

    ids, labels = [], []
    for r in rows:
        e = encode(tok, r, cfg.max_seq_length, cfg.train_on_inputs)
        ids.append(e.input_ids)
        labels.append(e.labels)
    cols = {"input_ids": ids, "labels": labels}
    if cfg.replay_loss == "kl":  # which rows are replay: their loss is the KL to the base model (replay_kl_loss)
        cols["replay"] = [int(bool(r.get("replay"))) for r in rows]
    return Dataset.from_dict(cols)


def data_fingerprint(paths: RunPaths) -> str:
    parts = [checkpoints.sha256(p) for p in (paths.train_file, paths.replay_file) if p.is_file()]
    return "+".join(parts)


# ----------------------------------------------------------------------------------------------------
def train(cfg: RunConfig, paths: RunPaths, base: str, tok, backend: model_lib.Backend, resume: bool,
          faults: Faults | None = None, world_size: int = 1, is_main: bool = True, log=print) -> Path:
    """Train and write the adapter to `paths.adapters`; return that folder."""
    faults = faults or Faults()
    cfg = dataclasses.replace(cfg, replay_loss=resolve_replay_loss(cfg, backend))
    train_rows, eval_rows = load_rows(paths, cfg)
    if not train_rows:
        raise ConfigError(f"no prepared training data in {paths.train_file}: run JOB=prepare (or JOB=train) first")
    if backend.device == "cuda":
        cap_gpu_memory(cfg)
    if cfg.preference:  # issue 20: pairs, DPO/ORPO (finetune/preference.py)
        from finetune import preference

        train_ds, lengths = preference.to_dataset(train_rows, tok)
    else:
        train_ds = to_dataset(train_rows, tok, cfg)
        lengths = [len(x) for x in train_ds["input_ids"]]
    p = plan(cfg, backend, len(train_rows), world_size, lengths=lengths)
    if cfg.preference:
        p = preference.adjust_plan(p, cfg)
    if not is_main:
        log = lambda *a, **k: None  # noqa: E731 - one voice: rank 0 speaks for the run
    resume_from = _resume_point(cfg, paths, resume, p, log, is_main)
    if resume_from:
        # The optimizer state in the checkpoint is that optimizer's (8-bit and fused AdamW keep different state):
        # resume with it, even where OPTIM=auto would now pick another. Checkpoints from before the manifest named
        # it were written with the defaults of the time: 8-bit on a GPU, adamw_torch on a CPU.
        saved = checkpoints.read_manifest(resume_from).get("optim") or (
            "adamw_8bit" if backend.device == "cuda" else "adamw_torch")
        if saved != p.optim:
            log(f"[resume] keeping the checkpoint's optimizer {saved} (its state is {saved}'s; this run would pick {p.optim})")
            p = dataclasses.replace(p, optim=saved)

    # The seed goes first: LoRA initialisation draws from it.
    from transformers import set_seed
    set_seed(cfg.seed)
    model = model_lib.load_for_training(cfg, base, tok, backend, p.grad_ckpt, p.keep_layers,
                                        lora_kernels=p.lora_kernels)
    if cfg.init_adapter:  # issue 20: DPO/ORPO from a finished adapter
        preference.load_init_adapter(model, cfg, log)
    trainable, total = _count_params(model)
    if is_main:
        _check_disk(cfg, paths, trainable, log)
    log(banner(cfg, p, trainable, total, paths))

    if cfg.preference:
        trainer = preference.build_trainer(cfg, paths, model, tok, p, train_ds,
                                           preference.to_dataset(eval_rows, tok)[0] if eval_rows else None, faults, log)
    else:
        trainer = _build_trainer(cfg, paths, model, tok, p, train_ds,
                                 to_dataset(eval_rows, tok, cfg) if eval_rows else None, faults, log)
    stop = _SignalFlag()
    with stop.installed():
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                raise ResourceError(f"out of memory at micro-batch {p.micro_batch}: lower BATCH_SIZE or MAX_SEQ_LENGTH, "
                                    "or set GRADIENT_CHECKPOINTING=offload") from None
            raise
    if stop.received:
        last = checkpoints.newest_complete(paths.checkpoints, log)
        raise Interrupted(f"stopped by {stop.received} at step {trainer.state.global_step}; saved {last}. "
                          "Continue with JOB=resume_training ./run.sh")
    return _save_adapter(cfg, paths, trainer, tok, p, is_main)


def _resume_point(cfg: RunConfig, paths: RunPaths, resume: bool, p: TrainPlan, log, is_main: bool = True) -> Path | None:
    existing = checkpoints.list_checkpoints(paths.checkpoints)
    if not resume:
        if not cfg.overwrite:
            checkpoints.refuse_to_clobber(paths.checkpoints)
        if existing and is_main:
            log(f"[train] OVERWRITE=1: removing {len(existing)} old checkpoint(s) in {paths.checkpoints}")
            for _, c in existing:
                shutil.rmtree(c)
        return None
    ckpt = checkpoints.newest_complete(paths.checkpoints, log)
    if ckpt is None:
        raise ConfigError(f"JOB=resume_training: no complete checkpoint in {paths.checkpoints} to resume from; "
                          "start with JOB=train")
    checkpoints.require_compatible(ckpt, fingerprint(cfg, p, paths))
    saved_world = checkpoints.read_manifest(ckpt).get("world_size", 1)
    if saved_world != p.world_size:
        # Optimizer state and the data order are per process (sharded under DeepSpeed ZeRO): not portable.
        raise ConfigError(f"{ckpt} was written by {saved_world} process(es), this run has {p.world_size}: resume on "
                          f"{saved_world} GPU(s) (NUM_GPUS={saved_world}), or start over with JOB=train OVERWRITE=1")
    log(f"[resume] continuing from {ckpt} (step {checkpoints.read_manifest(ckpt)['step']})")
    return ckpt


def fingerprint(cfg: RunConfig, p: TrainPlan, paths: RunPaths) -> dict:
    return {**cfg.fingerprint_fields(), "effective_batch": p.effective_batch, "data": data_fingerprint(paths)}


def _check_disk(cfg: RunConfig, paths: RunPaths, trainable: int, log) -> None:
    """Refuse to start a run whose checkpoints cannot fit: each holds the adapter (fp32) and AdamW's two moments."""
    per_ckpt = trainable * 12 * 1.1 + 1e6
    need = per_ckpt * (cfg.save_total_limit + 1) + trainable * 4  # + the final adapter
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(paths.checkpoints).free
    log(f"[train] disk: about {need / 1e9:.2f} GB needed for checkpoints and the adapter, {free / 1e9:.1f} GB free")
    if free < need:
        raise ResourceError(f"not enough disk in {paths.checkpoints}: about {need / 1e9:.2f} GB needed "
                            f"({cfg.save_total_limit + 1} checkpoints of {per_ckpt / 1e9:.2f} GB), {free / 1e9:.2f} GB free; "
                            "free space or lower SAVE_TOTAL_LIMIT")


def _count_params(model) -> tuple[int, int]:
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    total = sum(x.numel() for x in model.parameters())
    return trainable, total


def banner(cfg: RunConfig, p: TrainPlan, trainable: int, total: int, paths: RunPaths) -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if p.device == "cuda" else "none (CPU)"
    ckpt = {"partial": f"partial ({p.keep_layers} layers keep activations)",
            "stream": "offload, frozen weights streamed from host RAM"}.get(p.grad_ckpt, p.grad_ckpt)
    return "\n".join([
        "[train] ---------------------------------------------------------------",
        f"[train] backend {p.backend} on {p.device} (GPU: {gpu}); QLoRA {'on (NF4, double quant)' if cfg.use_qlora else 'off'}",
        f"[train] rows {p.rows}; effective batch {p.effective_batch} = micro-batch {p.micro_batch} x grad-accum "
        f"{p.grad_accum} x {p.world_size} process(es); {p.steps_per_epoch} steps/epoch, {p.total_steps} steps total",
        f"[train] LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha} dropout={cfg.lora_dropout} targets={cfg.target_modules};"
        f" trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%"
        + ("; the streamed layers' are not counted" if p.grad_ckpt == "stream" else "") + ")",
        f"[train] lr {cfg.lr:g} ({cfg.lr_scheduler}, warmup {cfg.warmup_ratio:g}), {p.optim}; gradient checkpointing {ckpt};"
        f" replay loss {cfg.replay_loss if cfg.replay_fraction > 0 else 'off'};"
        f" checkpoints every {cfg.save_steps} steps in {paths.checkpoints}",
        *[f"[train] {n}" for n in p.notes],
        *(["[train] padding-free batches: rows concatenated, no pad tokens"] if p.padding_free and not cfg.packing else []),
        "[train] ---------------------------------------------------------------",
    ])


def trainer_args(cfg, paths, p: TrainPlan, eval_ds) -> dict:
    """The TrainingArguments every objective shares (SFTConfig here, DPOConfig/ORPOConfig in finetune/preference.py)."""
    import torch

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
        dataloader_num_workers=0,
        disable_tqdm=False,
        save_only_model=False,
    )


def trainer_callbacks(cfg, paths, p: TrainPlan, faults: Faults, log) -> list:
    """Metrics, fault injection, sealing, signals (and early stopping): the same for every objective.
    The fault callback runs before the seal so that a simulated crash lands between the write and the marker."""
    from transformers import EarlyStoppingCallback

    callbacks = [_MetricsCallback(paths.metrics), _FaultCallback(faults), _SealCallback(cfg, paths, p, log), _SignalCallback()]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    return callbacks


def _build_trainer(cfg, paths, model, tok, p: TrainPlan, train_ds, eval_ds, faults: Faults, log):
    from trl import SFTConfig

    args = SFTConfig(
        **trainer_args(cfg, paths, p, eval_ds),
        # Rows are already truncated to MAX_SEQ_LENGTH by `to_dataset`; padding-free without packing needs
        # max_length unset (trl refuses it otherwise).
        max_length=None if p.padding_free and not cfg.packing else cfg.max_seq_length,
        packing=cfg.packing,
        padding_free=p.padding_free,
        remove_unused_columns=cfg.replay_loss != "kl",  # keep the "replay" column for the collator below
    )
    # One process: no host-GPU sync inside a step (_GuardedSFTTrainer). Several: trl's own loss path, whose token
    # count is gathered across the processes.
    no_sync = p.world_size == 1
    trainer = _GuardedSFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                 processing_class=tok, callbacks=trainer_callbacks(cfg, paths, p, faults, log),
                                 faults=faults, replay_weight=cfg.replay_weight, no_sync=no_sync)
    if cfg.replay_loss == "kl":
        trainer.data_collator = ReplayMaskCollator(trainer.data_collator)
    return trainer


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
        import torch

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
    import torch

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


def _save_adapter(cfg, paths: RunPaths, trainer, tok, p: TrainPlan, is_main: bool = True) -> Path:
    # save_model is collective under DeepSpeed (ZeRO-3 gathers the shards); rank 0 writes, then publishes.
    staging = paths.checkpoints / "adapter-staging"
    trainer.save_model(str(staging))
    if not is_main:
        return paths.adapters
    with atomic_dir(paths.adapters) as tmp:
        for f in staging.iterdir():
            if f.name != "training_args.bin":  # a pickle; the config below says the same in JSON
                shutil.move(str(f), tmp / f.name)
        tok.save_pretrained(tmp)  # the training chat template travels with the adapter
        info = {"base_model_name": cfg.base_model_name, "global_step": trainer.state.global_step,
                "effective_batch": p.effective_batch, "world_size": p.world_size, "backend": p.backend,
                "config": cfg.public_dict()}
        (tmp / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(staging, ignore_errors=True)
    return paths.adapters


DEEPSPEED_DEFAULT = Path(__file__).resolve().parent.parent / "configs" / "deepspeed" / "zero2.json"


def deepspeed_config(cfg: RunConfig, p: TrainPlan) -> str | None:
    """DeepSpeed for several GPUs (ZeRO-2 by default for LoRA); plain DDP on CPUs (gloo)."""
    if p.world_size == 1 or p.device != "cuda":
        return None
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else DEEPSPEED_DEFAULT
    if not path.is_file():
        raise ConfigError(f"DEEPSPEED_CONFIG={path}: no such file")
    return str(path)


# ----------------------------------------------------------------------------------------------------
from transformers import TrainerCallback  # noqa: E402  (kept below the stage code it serves)
from trl import SFTTrainer  # noqa: E402


class _GuardedSFTTrainer(SFTTrainer):
    """SFTTrainer that refuses a non-finite loss before backward, so the optimizer never applies it."""

    def __init__(self, *a, faults: Faults, replay_weight: float = 1.0, no_sync: bool = False, **kw):
        super().__init__(*a, **kw)
        self._faults = faults
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
            from transformers import Trainer

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
        if self._faults.nan_at_step == self.state.global_step + 1 and model.training:
            loss = loss * float("nan")  # fault injection for tests
        import torch
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
        import torch

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


class _MetricsCallback(TrainerCallback):
    def __init__(self, path: Path):
        self.path = Path(path)

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
            rec.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"))
            rec.update({k: logs[k] for k in ("rewards/accuracies", "rewards/margins") if k in logs})  # dpo
        elif "eval_loss" in logs:
            rec.update(eval_loss=logs["eval_loss"])
        else:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")


class _SealCallback(TrainerCallback):
    def __init__(self, cfg, paths, p, log):
        self.cfg, self.paths, self.plan, self.log = cfg, paths, p, log

    def on_save(self, args, state, control, **kw):
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            td.barrier()  # every rank has written its part (DeepSpeed shards) before rank 0 seals
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        meta = {"step": state.global_step, "epoch": state.epoch, "fingerprint": fingerprint(self.cfg, self.plan, self.paths),
                "config": self.cfg.public_dict(), "versions": versions(), "data_fingerprint": data_fingerprint(self.paths),
                "micro_batch": self.plan.micro_batch, "grad_accum": self.plan.grad_accum, "world_size": self.plan.world_size,
                "optim": self.plan.optim,
                "saved_at": time.time()}
        try:
            checkpoints.finalize(ckpt, meta)
        except OSError as e:
            if e.errno == 28:  # ENOSPC: the previous checkpoint is untouched
                raise ResourceError(f"disk full while saving {ckpt}; the previous checkpoint is intact. Free space, then "
                                    "JOB=resume_training") from None
            raise
        checkpoints.rotate(Path(args.output_dir), self.cfg.save_total_limit, self.log)


class _SignalFlag:
    received: str | None = None

    def installed(self):
        import contextlib

        @contextlib.contextmanager
        def cm():
            _SignalFlag.received = None
            old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
            for s in old:
                signal.signal(s, self._handler)
            try:
                yield self
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        return cm()

    def _handler(self, signum, frame):
        _SignalFlag.received = signal.Signals(signum).name
        print(f"\n[train] {_SignalFlag.received} received: finishing this step, saving a checkpoint, then exiting 75",
              flush=True)


class _FiniteCheckCallback(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.trainer.check_finite()


class _SignalCallback(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if _SignalFlag.received:
            control.should_save = True
            control.should_training_stop = True


class _FaultCallback(TrainerCallback):
    def __init__(self, faults: Faults):
        self.faults = faults

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.faults.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if state.global_step == self.faults.crash_in_save_at_step:
            control.should_save = True

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.faults.crash_in_save_at_step:
            os._exit(137)  # like kill -9 after the trainer wrote files but before the seal


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "unsloth"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
