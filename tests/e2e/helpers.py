"""Running run.sh as a user would: a subprocess with an environment, in a scratch folder."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def env_for(tmp: Path, **overrides) -> dict:
    """The parent environment minus our variables, plus outputs under `tmp` and `overrides`."""
    from finetune.config import RunConfig
    import dataclasses

    # RAPA_CACHE stays: the tests share the user's cache of the converted bundled model and base-model answers.
    ours = ({f.name.upper() for f in dataclasses.fields(RunConfig)} - {"RAPA_CACHE"}) | {"ENV_FILE",
                                                                                        "WANDB_API_KEY", "HF_TOKEN"}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(BASE_SAVE_PATH=str(tmp / "final_model"), CHECKPOINT_PATH=str(tmp / "ckpt"), REPORT_TO="none",
               ENV_FILE=str(tmp / ".env"), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_sh(tmp: Path, *args, timeout=900, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "run.sh"), *args], cwd=ROOT, env=env_for(tmp, **env), capture_output=True,
                          text=True, timeout=timeout)


def start_run_sh(tmp: Path, *args, **env) -> subprocess.Popen:
    return subprocess.Popen([str(ROOT / "run.sh"), *args], cwd=ROOT, env=env_for(tmp, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(l) for l in open(p, encoding="utf-8")]


def probe_file(tmp: Path, n: int = 4) -> Path:
    probes = json.loads((ROOT / "data/retention/probes.json").read_text())[:n]
    p = tmp / "probes.json"
    p.write_text(json.dumps(probes, ensure_ascii=False))
    return p


TRANSFORMERS4 = "4.57.6"  # the latest transformers 4, which many serving stacks still pin


def transformers4_python() -> Path:
    """A Python with transformers 4 and the CPU torch, in its own venv under the cache: made once (a minute, from
    PyPI), then reused. A lock keeps two test processes from building it at once."""
    import fcntl
    import sys

    from finetune.config import default_cache_dir

    venv = default_cache_dir(os.environ) / "venvs" / f"transformers-{TRANSFORMERS4}"
    python = venv / "bin" / "python"
    if (venv / ".ready").is_file():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".ready").is_file():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            # torch as pinned in requirements.txt (pip's configuration finds the CPU wheel, as for .venv);
            # transformers 4 brings its own tokenizers and hub client.
            r = subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0",
                                f"transformers=={TRANSFORMERS4}"], capture_output=True, text=True)
            assert r.returncode == 0, f"could not build the transformers {TRANSFORMERS4} venv:\n{r.stderr[-3000:]}"
            (venv / ".ready").write_text(TRANSFORMERS4 + "\n")
    return python
