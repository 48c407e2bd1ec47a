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
