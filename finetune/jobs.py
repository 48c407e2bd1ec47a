"""The jobs a run can do: one table, the single source for the config's JOB choices, `pipeline.run`'s stages,
run.sh's argument check and `--help`.

Standard library only: `run.sh --help` reads it on a bare machine. Adding a job is one entry here (and, if it runs
something other than stages, its branch in `pipeline.main`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    help: str
    stages: tuple[str, ...] = ()  # the pipeline stages it runs, in order
    gpus: bool = False  # trains: run.sh may launch one process per GPU (torchrun) or per node (HOSTFILE)
    runner: str = "pipeline"  # pipeline: python -m finetune; pytest: run.sh runs the test suite instead


JOBS: dict[str, Job] = {
    "train": Job("prepare -> replay -> train -> merge -> evaluate (-> export when EXPORT_GGUF)",
                 ("prepare", "replay", "train", "merge", "evaluate", "export"), gpus=True),
    "resume_training": Job("train from the newest complete checkpoint -> merge -> evaluate (-> export)",
                           ("train", "merge", "evaluate", "export"), gpus=True),
    "prepare": Job("validate and tokenise DATA_PATH into <run>/data", ("prepare",)),
    "merge": Job("merge the saved adapter into the base (parity-checked)", ("merge",)),
    "evaluate": Job("score base and fine-tuned model on the questions and retention probes", ("evaluate",)),
    "export": Job("write GGUF files and a Modelfile from the merged model (EXPORT_GGUF; empty: f16,q8_0)", ("export",)),
    "chat": Job("talk to the run's model in the terminal (merged, or the adapter on its base); /reset, /exit", ("chat",)),
    "generate": Job("answer every prompt in PROMPTS_PATH into <run>/answers.jsonl, batched", ("generate",)),
    "serve": Job("an OpenAI-compatible endpoint for the run's model (transformers serve) on SERVE_HOST:SERVE_PORT",
                 ("serve",)),
    "test": Job("the test suite (pytest; extra arguments after the job go to pytest)", runner="pytest"),
}


def names() -> tuple[str, ...]:
    return tuple(JOBS)


def summary() -> str:
    """One line a job, for --help."""
    return "\n".join(f"  {name:<16} {job.help}" for name, job in JOBS.items())
