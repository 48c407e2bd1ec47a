"""llama.cpp itself, for the export: its quantiser (`llama-quantize`) and its server (`llama-server`), which loads a
GGUF and answers over HTTP on localhost.

PyPI has no llama.cpp binary that runs here: llama-cpp-python ships only source, and the one prebuilt CPU wheel
(llama-cpp-py-sync 0.11739) needs glibc 2.38 where Debian 12 has 2.36. So the two tools are built once from the
llama.cpp source that llama-cpp-python's sdist vendors (a pinned PyPI download), into the cache, and reused:

    python -m finetune.llamacpp build        # what the export does on first use; .ci/run may call it up front

The build is portable on purpose: GGML_NATIVE=OFF with an AVX2/FMA/F16C baseline. A `-march=native` build crashed with
SIGILL on a CPU that advertises AMX it cannot run (issue 19), and the cache may be shared by machines of another CPU.
Only the two targets are built, linked statically, without the web UI, TLS or downloads. LLAMA_CPP_DIR points at a
llama.cpp the user already has (a folder with both programs) and skips the build.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import ConfigError, PipelineError

SOURCE = ("llama-cpp-python", "0.3.36")  # its sdist vendors llama.cpp's source under vendor/llama.cpp
TARGETS = ("llama-server", "llama-quantize")
# A portable x86-64 build: AVX2 baseline, nothing the build machine happens to have beyond it.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",
    "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
BUILD_KEY = f"{SOURCE[0]}-{SOURCE[1]}-avx2"


@dataclass(frozen=True)
class Tools:
    server: Path
    quantize: Path
    origin: str  # where they came from, for export.json


def build_dir(cache: Path) -> Path:
    return Path(cache) / "llama.cpp" / BUILD_KEY


def tools(llama_cpp_dir: str, cache: Path, build: bool = True, log=print) -> Tools:
    """llama.cpp's server and quantiser: from LLAMA_CPP_DIR when set, else the build in the cache folder (RAPA_CACHE),
    made now if missing."""
    if llama_cpp_dir:
        folder = Path(llama_cpp_dir)
        found = {t: _find_in(folder, t) for t in TARGETS}
        missing = [t for t, p in found.items() if p is None]
        if missing:
            raise ConfigError(f"LLAMA_CPP_DIR={llama_cpp_dir}: no {' or '.join(missing)} there (or in its bin/ or "
                              "build/bin/); leave it empty to build llama.cpp into the cache")
        return Tools(found["llama-server"], found["llama-quantize"], f"LLAMA_CPP_DIR={llama_cpp_dir}")
    out = build_dir(cache)
    if not _complete(out):
        if not build:
            raise PipelineError(f"llama.cpp is not built in {out}: python -m finetune.llamacpp build")
        _build(out, log)
    info = json.loads((out / "build.json").read_text(encoding="utf-8"))
    return Tools(out / "bin" / "llama-server", out / "bin" / "llama-quantize",
                 f"llama.cpp vendored by {info['source']}, built here with {info['cpu_baseline']} ({out})")


def _find_in(folder: Path, name: str) -> Path | None:
    for sub in ("", "bin", "build/bin"):
        p = folder / sub / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def _complete(out: Path) -> bool:
    return (out / "build.json").is_file() and all((out / "bin" / t).is_file() for t in TARGETS)


# ----------------------------------------------------------------------------------------------------
def _build(out: Path, log=print) -> None:
    """Download the pinned sdist, configure portably, build the two targets, keep only the binaries. One process at
    a time per cache (a file lock); the folder appears complete or not at all."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise PipelineError(f"building llama.cpp here is set up for x86-64 only (this is {platform.machine()}); "
                            "point LLAMA_CPP_DIR at a llama.cpp build with llama-server and llama-quantize")
    cmake = shutil.which("cmake") or _beside_python("cmake")
    if cmake is None or shutil.which("c++") is None:
        raise PipelineError("building llama.cpp needs cmake and a C++ compiler (pip install cmake; apt-get install "
                            "build-essential), or LLAMA_CPP_DIR pointing at an existing llama.cpp build")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same thing: wait for it
        if _complete(out):
            return
        t0 = time.time()
        log(f"[llama.cpp] building {', '.join(TARGETS)} once from {SOURCE[0]}=={SOURCE[1]}'s vendored llama.cpp "
            f"into {out} (portable AVX2; about 10 minutes on 2 cores)")
        with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
            tmp = Path(tmp)
            src = _fetch_source(tmp, log)
            build_dir = tmp / "build"
            ninja = shutil.which("ninja") or _beside_python("ninja")
            gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
            _run([cmake, "-S", str(src), "-B", str(build_dir), *gen, *CMAKE_FLAGS], tmp / "configure.log", "configure")
            jobs = str(os.cpu_count() or 2)
            _run([cmake, "--build", str(build_dir), "--target", *TARGETS, "-j", jobs], tmp / "build.log", "build")
            stage = tmp / "result"
            (stage / "bin").mkdir(parents=True)
            for t in TARGETS:
                shutil.copy2(build_dir / "bin" / t, stage / "bin" / t)
            info = {"source": f"{SOURCE[0]} {SOURCE[1]} (sdist, vendor/llama.cpp)", "targets": list(TARGETS),
                    "cmake_flags": list(CMAKE_FLAGS), "cpu_baseline": "AVX2+FMA+F16C (GGML_NATIVE=OFF)",
                    "seconds": round(time.time() - t0), "jobs": int(jobs)}
            (stage / "build.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
            if out.exists():
                shutil.rmtree(out)
            stage.rename(out)
        log(f"[llama.cpp] built in {time.time() - t0:.0f} s: {out / 'bin'}")


def _beside_python(name: str) -> str | None:
    p = Path(sys.executable).parent / name
    return str(p) if p.is_file() else None


def _fetch_source(tmp: Path, log=print) -> Path:
    dl = tmp / "sdist"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", SOURCE[0], "-d", str(dl),
           f"{SOURCE[0]}=={SOURCE[1]}"]
    _run(cmd, tmp / "download.log", f"pip download {SOURCE[0]}=={SOURCE[1]}")
    archive = next(dl.glob("*.tar.gz"))
    prefix = f"{archive.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(tmp / "src", members=members, filter="data")
    archive.unlink()
    return tmp / "src" / prefix


def _run(cmd: list[str], log_file: Path, what: str) -> None:
    with open(log_file, "w", encoding="utf-8") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        tail = "\n".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise PipelineError(f"llama.cpp {what} failed (exit {rc}); its last lines:\n{tail}")


# ----------------------------------------------------------------------------------------------------
def quantize(t: Tools, src: Path, out: Path, fmt: str, log_file: Path) -> list[str]:
    """`llama-quantize src out FMT`; return the lines that say a tensor got a fallback type."""
    threads = str(os.cpu_count() or 1)
    with open(log_file, "w", encoding="utf-8") as fh:
        rc = subprocess.run([str(t.quantize), str(src), str(out), fmt.upper(), threads], stdout=fh,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    text = log_file.read_text(encoding="utf-8", errors="replace")
    if rc != 0 or not out.is_file():
        tail = "\n".join(text.splitlines()[-10:])
        raise PipelineError(f"llama-quantize to {fmt} failed (exit {rc}); its last lines:\n{tail}")
    return [line.strip() for line in text.splitlines() if "fallback" in line.lower()]


class Server:
    """`llama-server` on a free localhost port for one GGUF, stopped on exit. Only the native endpoints are used:
    /tokenize and /completion with greedy sampling, which report token ids, log-probabilities and why it stopped."""

    def __init__(self, t: Tools, model: Path, log_file: Path, n_ctx: int = 2048, threads: int | None = None):
        self.cmd = [str(t.server), "-m", str(model), "--host", "127.0.0.1", "--port", "0", "-c", str(n_ctx),
                    "-t", str(threads or os.cpu_count() or 1), "-np", "1", "--no-webui", "--no-warmup"]
        self.model, self.log_file = model, log_file
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "Server":
        port = _free_port()
        self.cmd[self.cmd.index("--port") + 1] = str(port)
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(self.log_file, "w", encoding="utf-8")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._stop()
                raise PipelineError(f"llama-server exited ({self.proc.returncode}) loading {self.model.name}; "
                                    f"its last lines:\n{self._tail()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.2)
        self._stop()
        raise PipelineError(f"llama-server did not become ready for {self.model.name} in 300 s:\n{self._tail()}")

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()

    def _tail(self, n: int = 12) -> str:
        text = self.log_file.read_text(encoding="utf-8", errors="replace") if self.log_file.is_file() else ""
        return "\n".join(text.splitlines()[-n:])

    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise PipelineError(f"llama-server {path} answered {e.code}: {e.read()[:300]!r}") from e

    def tokenize(self, text: str) -> list[int]:
        return self.post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]

    def greedy(self, prompt: list[int], n_predict: int, n_probs: int = 0) -> dict:
        """Greedy continuation of the token ids `prompt`: content, tokens, stop_type (eos | limit) and, with
        n_probs, the top log-probabilities before sampling at every step."""
        body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "top_k": 1, "samplers": ["top_k"],
                "repeat_penalty": 1.0, "cache_prompt": False, "return_tokens": True, "n_probs": n_probs,
                "post_sampling_probs": False, "seed": 0}
        return self.post("/completion", body)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    if argv[:1] != ["build"]:
        print("usage: python -m finetune.llamacpp build", file=sys.stderr)
        return 2
    from finetune.config import RunConfig

    try:
        cfg = RunConfig.from_env(env_file=os.environ.get("ENV_FILE", ".env"))
        t = tools(cfg.llama_cpp_dir, cfg.cache_dir)
    except (PipelineError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"[llama.cpp] {t.server}\n[llama.cpp] {t.quantize}\n[llama.cpp] {t.origin}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
