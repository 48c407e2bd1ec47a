"""The output contract: every path a stage reads or writes is named here and nowhere else."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import fcntl
import json
import shlex

from finetune.config import RunConfig
from finetune.errors import ConfigError, ResourceError


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path          # <BASE_SAVE_PATH>/<model>/<epochs> (<objective>-<epochs> for dpo/orpo)
    checkpoints: Path      # <CHECKPOINT_PATH> or checkpoints/<model>/<epochs>/<qlora|lora>
    kind: str              # qlora | lora

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "RunPaths":
        run_dir = Path(cfg.base_save_path) / cfg.model_slug / cfg.run_label
        ckpt = Path(cfg.checkpoint_path) if cfg.checkpoint_path else (
            Path("checkpoints") / cfg.model_slug / cfg.run_label / cfg.adapter_kind)
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
        if not _alive(stale.name.rsplit("-", 1)[-1]):  # another live process's folder is not stale
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


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


# ---- the output tree: writable, one run at a time, and the run a follow-up job means ---------------------------
def check_writable(cfg: RunConfig) -> None:
    """BASE_SAVE_PATH and CHECKPOINT_PATH must be folders we can write: made (they would be anyway) and probed with a
    file, before anything runs. access() alone would pass root on a read-only filesystem."""
    for name, value in (("BASE_SAVE_PATH", cfg.base_save_path), ("CHECKPOINT_PATH", cfg.checkpoint_path or "checkpoints")):
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{name}={value}: not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"{name}={value}: cannot write there ({e.strerror or type(e).__name__}"
                              f"{': ' + str(e.filename) if e.filename else ''})") from None


class OutputLock:
    """One run at a time on an output tree (<BASE_SAVE_PATH>/<model>): an flock on a file there. The kernel drops
    it when the process ends, however it ends (kill -9 too), so it can never be left stuck."""

    def __init__(self, cfg: RunConfig, job: str):
        self.path = Path(cfg.base_save_path) / cfg.model_slug / ".lock"
        self.job = job
        self._fh = None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another run"
            fh.close()
            raise ConfigError(f"{self.path.parent} is in use by {holder}: wait for it to finish, or set "
                              "BASE_SAVE_PATH to another folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"JOB={self.job} (pid {os.getpid()}, started {_now()})\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class FoundRun:
    run_dir: Path
    config: dict   # the run's recorded configuration (run.json), as resolved when it trained
    note: str      # which run, and why this one


def runs_of(cfg: RunConfig) -> list[tuple[Path, dict, str]]:
    """The runs of BASE_MODEL_NAME under BASE_SAVE_PATH that trained: (run folder, recorded config, when it last
    trained)."""
    out = []
    for record in sorted((Path(cfg.base_save_path) / cfg.model_slug).glob("*/run.json")):
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        trained = [j.get("started") or "" for j in data.get("jobs", []) if j.get("job") in ("train", "resume_training")]
        if trained:  # a run that only prepared data has nothing for a follow-up job
            out.append((record.parent, data.get("config", {}), max(trained)))
    return out


def find_run(cfg: RunConfig, explicit: frozenset, job: str) -> FoundRun:
    """The run a follow-up job (resume_training, merge, evaluate, export, chat, ...) works on, from the variables
    that identify a run: BASE_MODEL_NAME and, when set, DATA_PATH, NUM_EPOCHS and USE_QLORA. The newest run that
    matches; ConfigError with the list when runs on different data match, or none does."""
    runs = runs_of(cfg)
    wanted = []
    if "num_epochs" in explicit:
        runs = [r for r in runs if r[0].name == cfg.epochs_label]
        wanted.append(f"NUM_EPOCHS={cfg.epochs_label}")
    if "data_path" in explicit:
        runs = [r for r in runs if _same_path(r[1].get("data_path", ""), cfg.data_path)]
        wanted.append(f"DATA_PATH={shlex.quote(cfg.data_path)}")
    if "use_qlora" in explicit:
        runs = [r for r in runs if bool(r[1].get("use_qlora")) == cfg.use_qlora]
        wanted.append(f"USE_QLORA={str(cfg.use_qlora).lower()}")
    where = Path(cfg.base_save_path) / cfg.model_slug
    if not runs:
        train = "".join(f"{w} " for w in wanted if not w.startswith("NUM_EPOCHS"))
        raise ConfigError(f"JOB={job}: no trained run of {cfg.model_slug} in {where}" + (f" with {', '.join(wanted)}" if wanted else "")
                          + f"; train one first: {_prefix(cfg, explicit)}{train}./run.sh")
    runs.sort(key=lambda r: r[2])
    datas = {str(r[1].get("data_path", "")) for r in runs}
    if len(datas) > 1:
        listing = "; ".join(f"{r[0]} ({r[1].get('data_path', '?')}, trained {r[2]}): "
                            f"{_prefix(cfg, explicit)}NUM_EPOCHS={r[0].name} JOB={job} ./run.sh" for r in runs)
        raise ConfigError(f"JOB={job}: {len(runs)} runs of {cfg.model_slug} on different data match; pick one: {listing}")
    newest = runs[-1]
    others = f" (newest of {len(runs)}; NUM_EPOCHS=<folder> picks another)" if len(runs) > 1 else ""
    return FoundRun(newest[0], newest[1], f"[run] JOB={job} on {newest[0]}: {newest[1].get('data_path', '?')}, "
                    f"trained {newest[2]}{others}")


def followup(cfg: RunConfig, job: str, data: bool = False) -> str:
    """A command that runs `job` on this run as printed: the variables that locate it (and DATA_PATH for a job that
    reads the data), then the job."""
    data_part = f"DATA_PATH={shlex.quote(cfg.data_path)} " if data else ""
    return f"{_prefix(cfg)}{data_part}NUM_EPOCHS={cfg.epochs_label} JOB={job} ./run.sh"


def start_over(cfg: RunConfig) -> str:
    """A command that trains this run again from the start, as printed."""
    return followup(cfg, "train", data=True).replace(" JOB=train", " OVERWRITE=1 JOB=train")


def _prefix(cfg: RunConfig, explicit: frozenset = frozenset()) -> str:
    """The locating variables that differ from their defaults (or were set): the model and the output folders."""
    names = ("base_model_name", "base_save_path", "checkpoint_path")
    default = RunConfig()
    return "".join(f"{n.upper()}={shlex.quote(str(getattr(cfg, n)))} " for n in names
                   if n in explicit or getattr(cfg, n) != getattr(default, n))


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b
