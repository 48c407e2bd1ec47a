"""Runs the stages a JOB names (the table is finetune/jobs.py) and maps failures to exit codes.

    chat | generate | serve   the run's model in use (finetune/use.py)

Exit codes: 0 ok, 2 configuration, 3 data, 4 out of memory or disk, 75 interrupted (resumable), 1 anything else.
"""

from __future__ import annotations

import os
import sys
import traceback

from finetune import config as config_lib
from finetune.config import SECRETS, RunConfig, describe
from finetune.dist import Dist
from finetune.errors import ConfigError, PipelineError, ResourceError
from finetune.jobs import JOBS
from finetune.paths import RunPaths
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
    _setup_tracking(cfg)
    if dist.is_main:
        print(f"[config] JOB={cfg.job}\n{describe(cfg)}", flush=True)
    paths = RunPaths.from_config(cfg)
    runlog = RunLog(cfg, paths, enabled=dist.is_main)
    try:
        run(cfg, paths, runlog, only, dist)
    except PipelineError as e:
        runlog.finish(e.exit_code, str(e))
        return _fail(e)
    except (MemoryError, OSError) as e:
        if isinstance(e, MemoryError) or getattr(e, "errno", None) == 28:
            err = ResourceError(f"{'out of memory' if isinstance(e, MemoryError) else 'disk full'}: {e}")
            runlog.finish(4, str(err))
            return _fail(err)
        runlog.finish(1, repr(e))
        traceback.print_exc()
        return _fail(PipelineError(f"{type(e).__name__}: {e}"))
    except Exception as e:  # noqa: BLE001 - last line of defence: one clear line, the trace above it
        runlog.finish(1, repr(e))
        traceback.print_exc()
        return _fail(PipelineError(f"unexpected {type(e).__name__}: {e} (trace above)"))
    runlog.finish(0, "ok")
    return 0


def run(cfg: RunConfig, paths: RunPaths, runlog: RunLog, only: tuple[str, ...] | None = None,
        dist: Dist = Dist()) -> None:
    """The table of contents of a job. With several processes, rank 0 does everything but training alone."""
    from finetune import model as model_lib

    stages = only or STAGES[cfg.job]
    if stages[0] in USE:
        return _use(cfg, paths, runlog, stages[0])
    if cfg.job == "resume_training" and _finished(paths):
        print(f"[resume] the run in {paths.run_dir} already finished (adapter, merged model and report exist): nothing to do")
        return
    _preflight(cfg, paths, stages)
    dist.init(cfg.dist_timeout_minutes)
    base = model_lib.resolve_base(cfg) if dist.is_main else None
    dist.wait_for_main()  # the embedded model is converted once, by rank 0
    base = base or model_lib.resolve_base(cfg)
    backend = model_lib.choose_backend(cfg, dist.world_size)
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
            from finetune.plan import resolve_replay_loss
            from finetune.train import train

            tok, _ = model_lib.load_tokenizer(base, cfg)
            replay_loss = resolve_replay_loss(cfg, backend.device)
            with model_lib.training_switches(backend, needs_logits=replay_loss == "kl" or cfg.preference):
                adapters = train(cfg, paths, base, tok, backend, resume=cfg.job == "resume_training",
                                 world_size=dist.world_size, is_main=dist.is_main)
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


def _preflight(cfg: RunConfig, paths: RunPaths, stages: tuple[str, ...]) -> None:
    """Cheap checks before anything heavy loads, so a wrong path fails in a second, not after model loading."""
    from pathlib import Path

    from finetune.errors import DataError

    if "prepare" in stages and not Path(cfg.data_path).exists():
        raise DataError(f"DATA_PATH={cfg.data_path}: no such file or folder")
    if cfg.job == "train" and "train" in stages and not cfg.overwrite:
        from finetune.checkpoints import refuse_to_clobber

        refuse_to_clobber(paths.checkpoints)


def _finished(paths: RunPaths) -> bool:
    return all(p.exists() for p in (paths.adapters / "adapter_config.json", paths.merged / "config.json", paths.report_json))


def _setup_tracking(cfg: RunConfig) -> None:
    """The tracking libraries read their settings from the environment; set them here, at the edge, once."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.report_to == "wandb":
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


def _fail(e: PipelineError) -> int:
    msg = str(e)
    for name in SECRETS:  # a secret must never reach the terminal, even inside an error message
        val = os.environ.get(name)
        if val:
            msg = msg.replace(val, f"<{name}>")
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
