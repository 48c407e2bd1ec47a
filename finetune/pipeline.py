"""Runs the stages a JOB names (the table is finetune/jobs.py) and maps failures to exit codes.

    chat | generate | serve   the run's model in use (finetune/use.py)

Exit codes: 0 ok, 2 configuration, 3 data, 4 out of memory or disk, 75 interrupted (resumable), 1 anything else.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from pathlib import Path

from finetune import config as config_lib
from finetune.config import SECRETS, RunConfig, describe
from finetune.dist import Dist
from finetune.errors import ConfigError, DataError, PipelineError, ResourceError
from finetune.jobs import JOBS
from finetune.paths import OutputLock, RunPaths, check_writable, find_run, followup
from finetune.runlog import RunLog

STAGES = {name: job.stages for name, job in JOBS.items() if job.runner == "pipeline"}
USE = ("chat", "generate", "serve")  # the trained model in use (finetune/use.py)


def main(only: tuple[str, ...] | None = None) -> int:
    """Run JOB's stages (or just `only`, for the thin per-stage scripts); return the exit code."""
    try:
        settings = config_lib.load()
        cfg = settings.config
        if only is None and cfg.job not in STAGES:
            raise ConfigError(f"JOB={cfg.job} is not a pipeline job: run it as ./run.sh {cfg.job}")
    except ConfigError as e:
        return _fail(e)
    for key, value in settings.library_env.items():  # .env's HF_TOKEN, WANDB_*, ...: where the libraries look
        os.environ.setdefault(key, value)
    dist = Dist.from_env(os.environ)  # set per process by the launcher, not settings of ours
    _quiet_libraries()
    stages = only or STAGES[cfg.job]
    lock = OutputLock(cfg, cfg.job)
    try:  # the user's errors before anything heavy: output folders, the lock, the model, the run, the data's size
        check_writable(cfg)
        if dist.is_main and stages[0] not in USE:  # using a model only reads the run (chat, serve: for hours)
            lock.acquire()
        dist.init(cfg.dist_timeout_minutes)
        cfg, base, backend, preset = _resolve(cfg, settings.explicit, stages, dist)
    except PipelineError as e:
        return _fail(e)
    _setup_tracking(cfg, stages)
    if dist.is_main:
        print(f"[config] JOB={cfg.job}\n{describe(cfg)}\n{preset}", flush=True)
    paths = RunPaths.from_config(cfg)
    runlog = RunLog(cfg, paths, enabled=dist.is_main)
    try:
        run(cfg, paths, runlog, only, dist, base=base, backend=backend, explicit=settings.explicit)
    except PipelineError as e:
        runlog.finish(e.exit_code, str(e))
        return _fail(e)
    except (MemoryError, OSError) as e:
        if isinstance(e, MemoryError) or getattr(e, "errno", None) == 28:
            err = ResourceError(f"{'out of memory' if isinstance(e, MemoryError) else 'disk full'}: {e}")
            runlog.finish(4, str(err))
            return _fail(err)
        runlog.finish(1, repr(e))
        return _fail(PipelineError(f"{type(e).__name__}: {e} (trace below)"), trace=True)
    except Exception as e:  # noqa: BLE001 - last line of defence: one clear line, the trace after it
        runlog.finish(1, repr(e))
        return _fail(PipelineError(f"unexpected {type(e).__name__}: {e} (trace below)"), trace=True)
    finally:
        lock.release()
    runlog.finish(0, "ok")
    return 0


def _resolve(cfg: RunConfig, explicit: frozenset, stages: tuple[str, ...], dist: Dist) -> tuple:
    """The automatic values and the run folder, before any path is used: a follow-up job takes the run it finds
    (finetune/paths.find_run); a training job resolves from the model's size and the data's rows
    (finetune/defaults.py). Returns (config, local base folder, backend, the banner's [preset] line)."""
    from finetune import defaults, model as model_lib

    if "prepare" in stages and not Path(cfg.data_path).exists():
        raise DataError(f"DATA_PATH={cfg.data_path}: no such file or folder")
    if "generate" in stages and not Path(cfg.prompts_path).is_file():
        raise ConfigError(f"PROMPTS_PATH={cfg.prompts_path}: no such file")
    note = ""
    if "prepare" not in stages:  # a follow-up job: the run's own resolved values, unless set now
        found = find_run(cfg, explicit, cfg.job)
        # Everything the run trained with, so a follow-up needs only the variables that locate it.
        fields = {f.name for f in dataclasses.fields(RunConfig)} - {"job", "rapa_cache", "overwrite"}
        keep = {k: v for k, v in found.config.items() if k in fields and k not in explicit}
        if _is_number(found.run_dir.name):
            keep["num_epochs"] = float(found.run_dir.name)
        cfg = dataclasses.replace(cfg, **keep)
        note = found.note
    base = model_lib.resolve_base(cfg) if dist.is_main else None
    dist.wait_for_main()  # the embedded model is converted once, by rank 0
    base = base or model_lib.resolve_base(cfg)
    # Unsloth (on a GPU) must be imported before transformers, which the structure check below imports.
    backend = model_lib.choose_backend(cfg, dist.world_size) if stages[0] not in USE else None
    facts = model_lib.inspect_base(base, cfg)
    if note:
        return cfg, base, backend, note
    cfg, model_reason = defaults.resolve_model(cfg, explicit, facts.params)
    counted = "prepare" in stages and "num_epochs" not in explicit and cfg.max_steps <= 0  # only where it decides
    rows, variants = _count_rows(cfg) if counted else (0, 0)
    cfg, epochs_reason = defaults.resolve_epochs(cfg, explicit, rows, _replay_pool(cfg, base), variants)
    return cfg, base, backend, defaults.preset_line(model_reason, epochs_reason)


def _count_rows(cfg: RunConfig) -> tuple[int, int]:
    """Rows in DATA_PATH as read (before the gate), and the question variants they will add (QUESTION_VARIANTS):
    cheap next to tokenising them."""
    from finetune.data import variants
    from finetune.data.readers import iter_raw_rows

    on, rows, added = variants.enabled(cfg), 0, 0
    for row in iter_raw_rows(cfg.data_path):
        rows += 1
        added += variants.count(cfg, row.raw) if on else 0
    return rows, added


def _replay_pool(cfg: RunConfig, base: str) -> int:
    """Replay rows available: the cached pool's size when it exists, else every prompt (an upper bound)."""
    if cfg.replay_fraction <= 0:
        return 0
    from finetune.replay import pool_size

    return pool_size(cfg, base)


def _is_number(s: str) -> bool:
    try:
        return float(s) > 0
    except ValueError:
        return False


def _quiet_libraries() -> None:
    """Third-party notices that read like a broken install are switched off where they are made, once, at the edge:
    bitsandbytes' "pip install kernels" (an optional CPU kernel; the plain path runs), DeepSpeed's "unable to detect"
    accelerator warning (told the device here), wandb's offline chatter (WANDB_SILENT), and trl's padding-free
    notice about flash attention (on a CPU our padding-free batches pass position ids, which SDPA honours; checked
    by tests/test_packing.py). Our own lines are never filtered."""
    import logging

    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda_device() else "cpu")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("trl.trainer.sft_trainer").addFilter(
        lambda record: "Padding-free training is enabled, but the attention" not in record.getMessage())


def _has_cuda_device() -> bool:
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl"))


def run(cfg: RunConfig, paths: RunPaths, runlog: RunLog, only: tuple[str, ...] | None = None,
        dist: Dist = Dist(), base: str | None = None, backend=None, explicit: frozenset = frozenset()) -> None:
    """The table of contents of a job. With several processes, rank 0 does everything but training alone."""
    from finetune import model as model_lib

    stages = only or STAGES[cfg.job]
    if stages[0] in USE:
        return _use(cfg, paths, runlog, stages[0])
    if cfg.job == "resume_training" and _finished(paths):
        print(f"[resume] the run in {paths.run_dir} already finished (adapter, merged model and report exist): nothing to do")
        return
    _preflight(cfg, paths, stages, explicit)
    dist.init(cfg.dist_timeout_minutes)
    if base is None:  # called from code without main's resolution
        base = model_lib.resolve_base(cfg) if dist.is_main else None
        dist.wait_for_main()  # the embedded model is converted once, by rank 0
        base = base or model_lib.resolve_base(cfg)
    backend = backend or model_lib.choose_backend(cfg, dist.world_size)
    if dist.is_main:
        print(f"[model] base {cfg.base_model_name} -> {base}; backend {backend.name} ({backend.why})", flush=True)
    if not dist.is_main:
        stages = tuple(s for s in stages if s == "train")

    if "prepare" in stages:
        with runlog.stage("prepare"):
            from finetune.data.prepare import prepare, summary

            tok, notes = model_lib.load_tokenizer(base, cfg)
            print("\n".join(f"[prepare] {n}" for n in notes))
            stats = prepare(cfg, paths, tok)
            print(summary(stats, paths), flush=True)
            runlog.artefact("data", paths.data_dir)
    if "replay" in stages and cfg.replay_fraction > 0:
        with runlog.stage("replay"):
            from finetune.replay import build_replay

            build_replay(cfg, paths, base, backend.device)
    dist.wait_for_main()  # the other ranks read the prepared data rank 0 just wrote
    if "train" in stages:
        with runlog.stage("train") as record:
            from finetune.train import replay_loss_of, train

            tok, _ = model_lib.load_tokenizer(base, cfg)
            replay_loss = replay_loss_of(cfg, base, backend)
            with model_lib.training_switches(backend, needs_logits=replay_loss == "kl" or cfg.preference):
                adapters = train(cfg, paths, base, tok, backend, resume=cfg.job == "resume_training",
                                 world_size=dist.world_size, is_main=dist.is_main,
                                 resume_command=followup(cfg, "resume_training"))
            record["replay_loss"] = replay_loss  # as the plan resolved it
            runlog.artefact("adapters", adapters)
    if not dist.is_main:
        return
    if "merge" in stages:
        with runlog.stage("merge"):
            from finetune.merge import merge

            runlog.artefact("merged", merge(cfg, paths, base, backend.device))
    if "evaluate" in stages:
        with runlog.stage("evaluate"):
            from finetune.evaluate import evaluate

            evaluate(cfg, paths, base, backend.device)
            runlog.artefact("report", paths.report_json)
    if "export" in stages and (cfg.job == "export" or cfg.export_gguf):
        with runlog.stage("export"):
            from finetune.export import export

            runlog.artefact("gguf", export(cfg, paths, device=backend.device))
    _print_done(cfg, paths, stages)


def _print_done(cfg: RunConfig, paths: RunPaths, stages: tuple[str, ...]) -> None:
    """Name what this job's stages wrote, and nothing they did not."""
    made = {"prepare": paths.data_dir, "train": paths.adapters, "merge": paths.merged,
            "evaluate": paths.eval_dir / "report.md", "export": paths.gguf}
    ran = [made[s] for s in stages if s in made and (s != "export" or cfg.job == "export" or cfg.export_gguf)]
    outputs = "  ".join(f"{p.relative_to(paths.run_dir)}{'/' if p.is_dir() else ''}" for p in ran if p.exists())
    print(f"[done] outputs in {paths.run_dir}:  {outputs}", flush=True)


def _use(cfg: RunConfig, paths: RunPaths, runlog: RunLog, job: str) -> None:
    """The run's model in use: no training machinery; the base is resolved only for an adapter not yet merged."""
    from finetune import use

    if job == "chat":  # interactive: nothing to record beyond the job's own line in run.json
        use.chat(cfg, paths)
        return
    with runlog.stage(job):
        if job == "generate":
            runlog.artefact("answers", use.generate_file(cfg, paths))
        else:
            use.serve(cfg, paths)


def _preflight(cfg: RunConfig, paths: RunPaths, stages: tuple[str, ...], explicit: frozenset = frozenset()) -> None:
    """Cheap checks before anything heavy loads, so a wrong path fails in a second, not after model loading."""
    from pathlib import Path

    from finetune.errors import DataError

    if "prepare" in stages and not Path(cfg.data_path).exists():
        raise DataError(f"DATA_PATH={cfg.data_path}: no such file or folder")
    if cfg.job == "train" and "train" in stages and not cfg.overwrite:
        from finetune.checkpoints import refuse_to_clobber

        refuse_to_clobber(paths.checkpoints, followup(cfg, "resume_training"))


def _finished(paths: RunPaths) -> bool:
    return all(p.exists() for p in (paths.adapters / "adapter_config.json", paths.merged / "config.json", paths.report_json))


def _setup_tracking(cfg: RunConfig, stages: tuple[str, ...]) -> None:
    """The tracking libraries read their settings from the environment; set them here, at the edge, once."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.report_to == "wandb" and "train" in stages:  # only training logs to wandb
        os.environ["WANDB_PROJECT"] = cfg.wandb_project
        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        # One wandb run per output run: a resume continues it instead of starting another.
        import hashlib

        ident = f"{cfg.base_save_path}|{cfg.model_slug}|{cfg.run_label}|{cfg.adapter_kind}"
        os.environ.setdefault("WANDB_RUN_ID", hashlib.sha1(ident.encode()).hexdigest()[:12])
        os.environ.setdefault("WANDB_RESUME", "allow")
        os.environ.setdefault("WANDB_DIR", str(RunPaths.from_config(cfg).run_dir))
        os.makedirs(os.environ["WANDB_DIR"], exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")


def _fail(e: PipelineError, trace: bool = False) -> int:
    """The one line on stderr; for a bug in us (exit 1), the trace after it."""
    msg = str(e)
    for name in SECRETS:  # a secret must never reach the terminal, even inside an error message
        val = os.environ.get(name)
        if val:
            msg = msg.replace(val, f"<{name}>")
    print(f"error: {msg}", file=sys.stderr, flush=True)
    if trace:
        traceback.print_exc()
    return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
