"""The checkpoint format: what makes a `checkpoint-<step>/` trustworthy, and which one to resume.

The trainer (HF Trainer) writes the adapter, optimizer, scheduler, RNG states and trainer_state.json. After it
returns we fsync every file, write `manifest.json` (sizes and sha256 of every file, config and data
fingerprints, library versions, step, epoch) and only then the `COMPLETE` marker. Resume takes the newest
checkpoint, by step number parsed from the name (never mtime), whose marker exists and whose files match the
manifest; every one skipped is named with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from finetune.errors import ConfigError

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def sha256(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize(ckpt: Path, meta: dict) -> None:
    """Seal a checkpoint folder the trainer has just written: fsync, manifest, then the marker."""
    files = {}
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name not in (MANIFEST, MARKER)):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(ckpt))] = {"size": f.stat().st_size, "sha256": sha256(f)}
    manifest = {**meta, "files": files}
    tmp = ckpt / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, ckpt / MANIFEST)
    _fsync_dir(ckpt)
    with open(ckpt / MARKER, "w") as fh:
        fh.write("ok\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(ckpt)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """All `checkpoint-<step>` folders, newest first; anything else in the folder is ignored."""
    if not Path(root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(root).iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def refuse_to_clobber(root: Path, resume_command: str = "JOB=resume_training ./run.sh") -> None:
    """JOB=train over an earlier run's checkpoints: refuse, pointing at resume (or OVERWRITE=1 to start over)."""
    existing = list_checkpoints(root)
    if existing:
        raise ConfigError(f"CHECKPOINT_PATH={root} already holds {len(existing)} checkpoint(s) of an earlier run: "
                          f"continue it with {resume_command}, or start over with OVERWRITE=1")


def verify(ckpt: Path) -> str | None:
    """None when the checkpoint is complete and intact, else why not."""
    if not (ckpt / MARKER).is_file():
        return f"no {MARKER} marker (the save did not finish)"
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"manifest unreadable ({type(e).__name__})"
    for rel, want in manifest.get("files", {}).items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["size"]:
            return f"{rel} has {f.stat().st_size} bytes, manifest says {want['size']}"
        if sha256(f) != want["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def read_manifest(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / MANIFEST).read_text())


def newest_complete(root: Path, log=print) -> Path | None:
    for step, ckpt in list_checkpoints(root):
        why = verify(ckpt)
        if why is None:
            return ckpt
        log(f"[resume] skipping {ckpt}: {why}")
    return None


def rotate(root: Path, keep: int, log=print) -> None:
    """Delete the oldest complete checkpoints beyond `keep`; never the newest complete one, never a partial
    newer than it (it may be the one being written)."""
    complete = [(s, p) for s, p in list_checkpoints(root) if (p / MARKER).is_file()]
    for step, ckpt in complete[max(1, keep):]:
        log(f"[checkpoint] rotating out {ckpt.name} (SAVE_TOTAL_LIMIT={keep})")
        shutil.rmtree(ckpt, ignore_errors=True)
    newest = complete[0][0] if complete else None
    for step, ckpt in list_checkpoints(root):
        if newest is not None and step < newest and not (ckpt / MARKER).is_file():
            shutil.rmtree(ckpt, ignore_errors=True)  # a partial left behind by a crash, older than a good one


def check_compatible(saved: dict, now: dict) -> list[str]:
    """Field-by-field differences between the fingerprint a checkpoint was made with and the current one."""
    keys = sorted(set(saved) | set(now))
    return [f"{k}: checkpoint has {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def require_compatible(ckpt: Path, fingerprint: dict, start_over: str = "JOB=train OVERWRITE=1 ./run.sh") -> None:
    diff = check_compatible(read_manifest(ckpt).get("fingerprint", {}), fingerprint)
    if diff:
        raise ConfigError(f"cannot resume from {ckpt}: the run changed since it was saved:\n  - " + "\n  - ".join(diff)
                          + f"\n  restore those values, or start over: {start_over}")


def fingerprint(cfg, p, paths) -> dict:
    """What must not change across a resume: the training fields of the config, the REPLAY_LOSS the plan resolved,
    the effective batch and the data. (cfg: RunConfig, p: plan.TrainPlan, paths: RunPaths.)"""
    return {**cfg.fingerprint_fields(), "replay_loss": p.replay_loss, "effective_batch": p.effective_batch,
            "data": data_fingerprint(paths)}


def data_fingerprint(paths) -> str:
    return "+".join(sha256(p) for p in (paths.train_file, paths.replay_file) if p.is_file())


def versions() -> dict:
    """The library versions a checkpoint (and run.json) records."""
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "unsloth"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
