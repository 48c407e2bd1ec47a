"""The train stage: prepared data + base model -> LoRA/QLoRA adapter, through trl's SFTTrainer.

The stage gathers what the pieces need and runs them in order; the pieces are the planner (finetune/plan.py, what
to run: micro-batch, checkpointing, optimizer, replay loss), the backend (finetune/model.py, how the model is
loaded) and the trainer (finetune/trainer.py, how a step runs, is checkpointed and stopped).

Checkpoints are HF Trainer checkpoints sealed by `checkpoints.finalize` (manifest + COMPLETE marker); resume
goes through `trainer.train(resume_from_checkpoint=...)`, which restores optimizer, scheduler, RNG states and
skips the batches already seen, so the sample order equals an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import torch
from datasets import Dataset
from transformers import set_seed

from finetune import calibrate, checkpoints, mfu, model as model_lib, portable, preference
from finetune.config import RunConfig
from finetune.data.tokenize import encode
from finetune.errors import ConfigError, Interrupted, PipelineError, ResourceError
from finetune.paths import RunPaths, atomic_dir, followup, require_disk, start_over
from finetune.plan import TrainPlan, plan, resolve_replay_loss
from finetune.trainer import SignalFlag, SpeedMeter, build_trainer


def replay_loss_of(cfg: RunConfig, base: str, backend: model_lib.Backend) -> str:
    """REPLAY_LOSS as this run resolves it (the plan's rule; on a GPU it depends on the base's size). The pipeline
    asks before the stage starts: the kl loss needs the library switch that returns logits."""
    return resolve_replay_loss(cfg, backend.device, gpu_shape(base, backend))


def gpu_shape(base: str, backend: model_lib.Backend) -> dict | None:
    """The base's shape where the planner sizes for a GPU; None on a CPU (nothing to size)."""
    return model_lib.model_shape(base) if backend.device == "cuda" else None


def train(cfg: RunConfig, paths: RunPaths, base: str, tok, backend: model_lib.Backend, resume: bool,
          world_size: int = 1, is_main: bool = True, log=print, extra_callbacks: tuple | list = (),
          resume_command: str = "JOB=resume_training ./run.sh") -> Path:
    """Train and write the adapter to `paths.adapters`; return that folder.

    extra_callbacks: passed to trainer.build_trainer (instrumentation such as the tests' fault injection)."""
    if not is_main:
        log = lambda *a, **k: None  # noqa: E731 - one voice: rank 0 speaks for the run
    # Rows first: a run without prepared data stops here, before anything heavy loads.
    train_rows, eval_rows = load_rows(paths, cfg)
    if not train_rows:
        raise ConfigError(f"no prepared training data in {paths.train_file}: prepare it first: "
                          f"{followup(cfg, 'prepare', data=True)}")
    # The dataset before the plan: the plan sizes micro-batches from the tokenised lengths. Replay rows are flagged
    # for the kl loss, which REPLAY_LOSS=auto takes on some devices only (resolved as the plan resolves it).
    shape = gpu_shape(base, backend)
    replay_loss = resolve_replay_loss(cfg, backend.device, shape)
    if cfg.preference:  # pairs for DPO/ORPO (finetune/preference.py); lengths count prompt + both answers
        train_ds, lengths = preference.to_dataset(train_rows, tok)
        eval_ds = preference.to_dataset(eval_rows, tok)[0] if eval_rows else None
    else:
        train_ds = to_dataset(train_rows, tok, cfg, replay_loss)
        eval_ds = to_dataset(eval_rows, tok, cfg, replay_loss) if eval_rows else None
        lengths = [len(x) for x in train_ds["input_ids"]]
    # The plan: the model's shape and the card's memory are measured here, once; the planner touches neither. Its
    # constants come from earlier runs on this card where there were any (finetune/calibrate.py).
    record = calibrate.record_path(cfg, backend, shape, world_size)
    measured = calibrate.measured_constants(record, cfg.use_qlora)
    p = plan(cfg, backend, len(train_rows), world_size, lengths=lengths,
             shape=shape, gpu_memory=backend.gpu_memory(), measured=measured)
    if cfg.preference:
        p = preference.adjust_plan(p, cfg)
    # The resume point after the plan: a checkpoint must match the plan's fingerprint and process count, and it
    # keeps the optimizer its state belongs to.
    resume_from = _resume_point(cfg, paths, resume, p, log, is_main)
    if resume_from:
        p = _keep_checkpoint_optimizer(p, resume_from, backend, log)
    # The model only now: everything above can refuse the run in seconds.
    model = _load_model(cfg, paths, base, tok, backend, p, log, is_main)
    speed = speed_meter(cfg, backend, model, lengths, p.world_size)
    log(speed.describe())
    if cfg.preference:  # pairs: tokens are counted otherwise, so these runs measure nothing for the planner
        trainer = preference.build_trainer(cfg, paths, model, tok, p, train_ds, eval_ds, log=log,
                                           extra_callbacks=extra_callbacks, speed=speed)
    else:
        trainer = build_trainer(cfg, paths, model, tok, p, train_ds, eval_ds, log=log, extra_callbacks=extra_callbacks,
                                speed=speed, record=record if is_main else None)
    _run(trainer, resume_from, p, paths, log, resume_command)
    return _save_adapter(cfg, paths, trainer, tok, p, is_main)


def _load_model(cfg: RunConfig, paths: RunPaths, base: str, tok, backend: model_lib.Backend, p: TrainPlan, log,
                is_main: bool):
    if backend.device == "cuda":
        cap_gpu_memory(cfg)  # before the first allocation
    set_seed(cfg.seed)  # LoRA initialisation draws from it
    model = model_lib.load_for_training(cfg, base, tok, backend, p)
    if cfg.init_adapter:  # DPO/ORPO from a finished adapter
        preference.load_init_adapter(model, cfg, log)
    trainable, total = count_params(model)
    if is_main:  # the checkpoints' size is known once the adapter exists; still before the first step
        _check_disk(cfg, paths, trainable, log)
    log(banner(cfg, p, trainable, total, paths))
    return model


def _run(trainer, resume_from: Path | None, p: TrainPlan, paths: RunPaths, log, resume_command: str) -> None:
    """trainer.train with SIGTERM/SIGINT turned into a checkpoint and Interrupted (exit 75), OOM into exit 4."""
    stop = SignalFlag()
    with stop.installed():
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                raise ResourceError(f"out of memory at micro-batch {p.micro_batch}: lower BATCH_SIZE or MAX_SEQ_LENGTH, "
                                    "or set GRADIENT_CHECKPOINTING=offload") from None
            if p.world_size > 1 and _lost_peer(e):
                raise PipelineError(f"another process of this job died or hung (DIST_TIMEOUT_MINUTES bounds the wait): "
                                    f"{str(e).splitlines()[0][:300]}. The last sealed checkpoint is kept; "
                                    "JOB=resume_training continues once the cause is fixed") from None
            raise
        stopped = stop.agree()  # a signal after the last step's vote: every process stops here, together
    if stopped:
        last = checkpoints.newest_complete(paths.checkpoints, log)
        raise Interrupted(f"stopped by {stop.received} at step {trainer.state.global_step}; saved {last}. "
                          f"Continue with: {resume_command}")


def speed_meter(cfg: RunConfig, backend: model_lib.Backend, model, lengths: list[int], world_size: int = 1) -> SpeedMeter:
    """The FLOPs a token costs this model and the GPU's peak for the base's precision (finetune/mfu.py)."""
    precision, why = model_lib.base_precision(cfg, backend)
    span = mfu.attention_span([min(n, cfg.max_seq_length) for n in lengths]) if lengths else cfg.max_seq_length
    device = torch.cuda.get_device_name(0) if backend.device == "cuda" else "CPU"
    peak = mfu.peak_tflops(device, precision) if backend.device == "cuda" else None
    return SpeedMeter(precision, why, mfu.model_flops_per_token(model, span), peak and peak * world_size, device)


def _lost_peer(e: RuntimeError) -> bool:
    """A collective that failed because a peer is gone or silent (gloo says so in a RuntimeError; NCCL's watchdog
    aborts the process instead, and torchrun reports it)."""
    import torch.distributed as td

    text = str(e)
    return isinstance(e, td.DistError) or any(k in text for k in ("Timed out", "Connection closed", "Connection reset",
                                                                  "gloo", "NCCL"))


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


def to_dataset(rows: list[dict], tok, cfg: RunConfig, replay_loss: str) -> Dataset:
    ids, labels = [], []
    for r in rows:
        e = encode(tok, r, cfg.max_seq_length, cfg.train_on_inputs)
        ids.append(e.input_ids)
        labels.append(e.labels)
    cols = {"input_ids": ids, "labels": labels}
    if replay_loss == "kl":  # which rows are replay: their loss is the KL to the base model (trainer.replay_kl_loss)
        cols["replay"] = [int(bool(r.get("replay"))) for r in rows]
    return Dataset.from_dict(cols)


def cap_gpu_memory(cfg: RunConfig) -> None:
    """MAX_GPU_MEMORY: the allocator refuses more than this (so a run sized for a smaller GPU behaves like one)."""
    if cfg.max_gpu_memory > 0 and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.max_gpu_memory * 2**30 / total))


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
                          f"start over: {start_over(cfg)}")
    checkpoints.require_compatible(ckpt, checkpoints.fingerprint(cfg, p, paths), start_over(cfg))
    saved_world = checkpoints.read_manifest(ckpt).get("world_size", 1)
    if saved_world != p.world_size:
        # Optimizer state and the data order are per process (sharded under DeepSpeed ZeRO): not portable.
        raise ConfigError(f"{ckpt} was written by {saved_world} process(es), this run has {p.world_size}: resume on "
                          f"{saved_world} GPU(s) (NUM_GPUS={saved_world}), or start over: {start_over(cfg)}")
    log(f"[resume] continuing from {ckpt} (step {checkpoints.read_manifest(ckpt)['step']})")
    return ckpt


def _keep_checkpoint_optimizer(p: TrainPlan, ckpt: Path, backend: model_lib.Backend, log) -> TrainPlan:
    # The optimizer state in the checkpoint is that optimizer's (8-bit and fused AdamW keep different state):
    # resume with it, even where OPTIM=auto would now pick another. Checkpoints from before the manifest named
    # it were written with the defaults of the time: 8-bit on a GPU, adamw_torch on a CPU.
    saved = checkpoints.read_manifest(ckpt).get("optim") or ("adamw_8bit" if backend.device == "cuda" else "adamw_torch")
    if saved == p.optim:
        return p
    log(f"[resume] keeping the checkpoint's optimizer {saved} (its state is {saved}'s; this run would pick {p.optim})")
    return dataclasses.replace(p, optim=saved)


def _check_disk(cfg: RunConfig, paths: RunPaths, trainable: int, log) -> None:
    """Refuse to start a run whose checkpoints cannot fit: each holds the adapter (fp32) and AdamW's two moments."""
    per_ckpt = trainable * 12 * 1.1 + 1e6
    need = per_ckpt * (cfg.save_total_limit + 1) + trainable * 4  # + the final adapter
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    free = require_disk(paths.checkpoints, need, f"{cfg.save_total_limit + 1} checkpoints of {per_ckpt / 1e9:.2f} GB "
                        "and the adapter", "free space or lower SAVE_TOTAL_LIMIT")
    log(f"[train] disk: about {need / 1e9:.2f} GB needed for checkpoints and the adapter, {free / 1e9:.1f} GB free")


def count_params(model) -> tuple[int, int]:
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    total = sum(x.numel() for x in model.parameters())
    return trainable, total


def banner(cfg: RunConfig, p: TrainPlan, trainable: int, total: int, paths: RunPaths) -> str:
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
        f" replay loss {p.replay_loss if cfg.replay_fraction > 0 else 'off'};"
        f" checkpoints every {cfg.save_steps} steps in {paths.checkpoints}",
        *[f"[train] {n}" for n in p.notes],
        *(["[train] padding-free batches: rows concatenated, no pad tokens"] if p.padding_free and not cfg.packing else []),
        "[train] ---------------------------------------------------------------",
    ])


def _save_adapter(cfg: RunConfig, paths: RunPaths, trainer, tok, p: TrainPlan, is_main: bool = True) -> Path:
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
        portable.name_adapter_base(tmp, cfg)
        portable.for_transformers4(tmp)
        info = {"base_model_name": cfg.base_model_name, "global_step": trainer.state.global_step,
                "effective_batch": p.effective_batch, "world_size": p.world_size, "backend": p.backend,
                "replay_loss": p.replay_loss, "config": cfg.public_dict()}
        (tmp / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(staging, ignore_errors=True)
    return paths.adapters
