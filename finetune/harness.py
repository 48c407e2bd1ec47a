"""lm-evaluation-harness on the run's merged model, as part of JOB=evaluate when LM_EVAL_TASKS names tasks.

`run_eval` is a local task that ships with the product (finetune/lm_eval_task/): the run's own eval split, written
as the task's data into <run>/eval/harness/, scored with the same exact and contains match as our evaluation, so
the harness and JOB=evaluate can be compared. Other names are the harness's own tasks (they fetch their data from
the Hugging Face hub) or paths of YAML task files of the user's.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from finetune.config import RunConfig
from finetune.errors import ConfigError, PipelineError
from finetune.paths import RunPaths, atomic_write_text

TASK_DIR = Path(__file__).parent / "lm_eval_task"
LOCAL_TASK = "run_eval"
HINT = "pip install lm-eval==0.4.13 (it is in requirements.txt)"


def task_names(value: str) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))


def write_local_task(questions: list[dict], out: Path, max_new_tokens: int) -> Path:
    """<out>/run_eval.yaml + utils.py + run_eval.jsonl (question, answer) from the eval questions."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{LOCAL_TASK}.jsonl"
    rows = [{"id": q["id"], "question": q["messages"][-1]["content"], "answer": q["answers"][0]} for q in questions]
    atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    text = (TASK_DIR / f"{LOCAL_TASK}.yaml").read_text(encoding="utf-8")
    text = text.replace("RUN_EVAL_JSONL", json.dumps(str(data.resolve())))
    text = text.replace("max_gen_toks: 32", f"max_gen_toks: {int(max_new_tokens)}")
    yaml.safe_load(text.replace("!function", ""))  # still YAML after the edits
    atomic_write_text(out / f"{LOCAL_TASK}.yaml", text)
    shutil.copy2(TASK_DIR / "utils.py", out / "utils.py")
    return out / f"{LOCAL_TASK}.yaml"


def run(cfg: RunConfig, paths: RunPaths, base: str, device: str = "cpu", log=print) -> dict:
    """Run the LM_EVAL_TASKS on the merged model (or the adapter on its base); return {task: metrics}."""
    from finetune.evaluate import questions_from_eval

    names = task_names(cfg.lm_eval_tasks)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise PipelineError(f"LM_EVAL_TASKS={cfg.lm_eval_tasks} needs lm-evaluation-harness ({e}): {HINT}") from None
    work = paths.eval_dir / "harness"
    include, tasks = [], []
    for name in names:
        if name == LOCAL_TASK:
            qs = questions_from_eval(paths, cfg.eval_max_questions)
            if not qs:
                raise ConfigError(f"LM_EVAL_TASKS={LOCAL_TASK}: no eval questions in {paths.eval_file} (run JOB=prepare)")
            from transformers import AutoTokenizer

            from finetune.evaluate import token_budget

            tok = AutoTokenizer.from_pretrained(paths.merged if paths.merged.is_dir() else base)
            include.append(write_local_task(qs, work, token_budget(cfg, tok, qs)).parent)
            tasks.append(LOCAL_TASK)
        elif name.endswith((".yaml", ".yml")):
            p = Path(name)
            if not p.is_file():
                raise ConfigError(f"LM_EVAL_TASKS: {name}: no such YAML task file")
            import yaml

            include.append(p.resolve().parent)
            tasks.append(yaml.safe_load(p.read_text(encoding="utf-8").replace("!function", ""))["task"])
        else:
            tasks.append(name)
    manager = TaskManager(include_path=[str(p) for p in dict.fromkeys(include)] or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"LM_EVAL_TASKS: unknown harness task(s) {', '.join(unknown)} (the bundled local task is "
                          f"{LOCAL_TASK}; `lm-eval ls tasks` lists the harness's own)")
    if (paths.merged / "config.json").is_file():
        model_args = {"pretrained": str(paths.merged)}
    elif (paths.adapters / "adapter_config.json").is_file():
        model_args = {"pretrained": base, "peft": str(paths.adapters)}
    else:
        raise ConfigError(f"LM_EVAL_TASKS: no merged model in {paths.merged} and no adapter in {paths.adapters}")
    model_args.update(dtype="float32" if device == "cpu" else "bfloat16", device=device)
    t0 = time.time()
    out = simple_evaluate(model="hf", model_args=model_args, tasks=tasks, task_manager=manager,
                          apply_chat_template=True, batch_size=8, log_samples=False, random_seed=0,
                          numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    results = {t: {k: v for k, v in out["results"][t].items() if "," in k} for t in tasks}  # metric,filter keys
    record = {"tasks": tasks, "model_args": model_args, "results": results, "n_samples": out.get("n-samples"),
              "lm_eval": _version(), "seconds": round(time.time() - t0, 1)}
    atomic_write_text(paths.eval_dir / "harness.json", json.dumps(record, indent=1, ensure_ascii=False, default=str) + "\n")
    for t, metrics in results.items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.3f}" for k, v in metrics.items()
                          if isinstance(v, (int, float)) and "stderr" not in k)
        log(f"[evaluate] lm-eval-harness {t}: {shown}")
    return record


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm_eval")
