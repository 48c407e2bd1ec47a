"""The output contract: every path a stage reads or writes is named here and nowhere else."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune.config import RunConfig
from finetune.errors import ResourceError


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path          # <BASE_SAVE_PATH>/<model>/<epochs>
    checkpoints: Path      # <CHECKPOINT_PATH> or checkpoints/<model>/<epochs>/<qlora|lora>
    kind: str              # qlora | lora

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "RunPaths":
        run_dir = Path(cfg.base_save_path) / cfg.model_slug / cfg.epochs_label
        ckpt = Path(cfg.checkpoint_path) if cfg.checkpoint_path else (
            Path("checkpoints") / cfg.model_slug / cfg.epochs_label / cfg.adapter_kind)
        return cls(run_dir=run_dir, checkpoints=ckpt, kind=cfg.adapter_kind)

    # --- prepared data (prepare -> train, evaluate)
    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def train_file(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def eval_file(self) -> Path:
        return self.data_dir / "eval.jsonl"

    @property
    def rejected_file(self) -> Path:
        return self.data_dir / "rejected.jsonl"

    @property
    def data_stats(self) -> Path:
        return self.data_dir / "data_stats.json"

    # --- training outputs (train -> merge, evaluate)
    @property
    def adapters(self) -> Path:
        return self.run_dir / f"{self.kind}_adapters"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    # --- merge / export
    @property
    def merged(self) -> Path:
        return self.run_dir / f"{self.kind}_merged"

    @property
    def gguf(self) -> Path:
        return self.run_dir / f"{self.kind}_gguf"

    # --- evaluation and operations
    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"

    @property
    def report_json(self) -> Path:
        return self.eval_dir / "report.json"

    @property
    def run_json(self) -> Path:
        return self.run_dir / "run.json"

    @property
    def replay_file(self) -> Path:
        return self.data_dir / "replay.jsonl"


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling folder; rename it onto `final` only if the block finishes.

    A crash leaves `final` as it was (absent or the previous version) plus a `.tmp-*` folder that the next run
    removes. The rename is atomic on one filesystem.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def require_disk(where: Path, need: float, what: str, hint: str = "") -> float:
    """Refuse to start (ResourceError, exit 4) when the filesystem holding `where` (or its nearest existing parent)
    has less than `need` bytes free for `what`; return the free bytes. Train, merge and export check this way."""
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise ResourceError(f"not enough disk at {probe} for {what}: about {need / 1e9:.2f} GB needed, "
                            f"{free / 1e9:.2f} GB free" + (f"; {hint}" if hint else ""))
    return free
