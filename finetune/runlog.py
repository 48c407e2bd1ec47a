"""run.json: what ran, when, how it ended, what it produced (with sha256), on which versions, at what memory."""

from __future__ import annotations

import contextlib
import json
import resource
import time
from pathlib import Path

from finetune.checkpoints import sha256, versions
from finetune.config import RunConfig
from finetune.paths import RunPaths, atomic_write_text


class RunLog:
    def __init__(self, cfg: RunConfig, paths: RunPaths, enabled: bool = True):
        self.path = paths.run_json
        self.enabled = enabled  # only rank 0 writes
        prev = json.loads(self.path.read_text()) if self.path.is_file() else {}
        # "config" is what the run trained with (follow-up jobs take it from here: finetune/paths.find_run); a
        # follow-up job's own settings go with its entry in "jobs".
        trains = cfg.job in ("train", "resume_training", "prepare") or "config" not in prev
        self.data = {"config": cfg.public_dict() if trains else prev["config"], "jobs": prev.get("jobs", []),
                     "stages": prev.get("stages", {}), "artefacts": prev.get("artefacts", {})}
        self.data["jobs"].append({"job": cfg.job, "started": _now(), "ended": None, "exit_code": None,
                                  **({} if trains else {"config": cfg.public_dict()})})

    @contextlib.contextmanager
    def stage(self, name: str):
        rec = {"status": "running", "started": _now(), "ended": None}
        self.data["stages"][name] = rec
        self._write()
        _reset_gpu_peak()
        t0 = time.time()
        try:
            yield rec  # the stage may add facts of its own (the train stage: the resolved REPLAY_LOSS)
            rec["status"] = "ok"
        except BaseException as e:
            rec["status"] = "failed"
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            raise
        finally:
            rec.update(ended=_now(), seconds=round(time.time() - t0, 2), peak_cpu_rss_mb=_rss_mb(), peak_gpu_mb=_gpu_peak_mb())
            self._write()

    def artefact(self, name: str, path: Path) -> None:
        if not self.enabled:
            return
        path = Path(path)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        root = path.parent if path.is_file() else path
        self.data["artefacts"][name] = {"path": str(path),
                                        "files": {str(f.relative_to(root)): sha256(f) for f in files}}
        self._write()

    def finish(self, code: int, message: str) -> None:
        self.data["jobs"][-1].update(ended=_now(), exit_code=code, message=message[:500])
        try:
            self.data["versions"] = versions()
        except Exception:  # noqa: BLE001 - a missing package must not hide the real result
            pass
        self._write()

    def _write(self) -> None:
        if not self.enabled:
            return
        atomic_write_text(self.path, json.dumps(self.data, indent=1, ensure_ascii=False, default=str) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _reset_gpu_peak() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_mb() -> float | None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None
