"""Using the trained model: JOB=chat (a conversation in the terminal), JOB=generate (a prompts file ->
answers.jsonl), JOB=serve (an OpenAI-compatible endpoint from `transformers serve`).

Each finds the run's model as the other follow-up jobs do (finetune/paths.py): the merged folder, or before a merge
the adapter on its base. Sampling comes from GEN_PRESET and its overrides (finetune/generation.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from finetune import model as model_lib
from finetune.config import RunConfig
from finetune.errors import ConfigError, DataError, PipelineError
from finetune.generation import Sampling, generate_batched, sampling
from finetune.paths import RunPaths, atomic_write_text, followup

PROMPT_FIELDS = ("prompt", "question", "input", "instruction", "text")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_run_model(cfg: RunConfig, paths: RunPaths, dev: str):
    """(model, tokenizer, description): the merged model, or the adapter on its base before a merge."""
    from transformers import AutoTokenizer

    if (paths.merged / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(paths.merged)
        return model_lib.load_plain(str(paths.merged), tok, dev), tok, f"merged model {paths.merged}"
    if (paths.adapters / "adapter_config.json").is_file():
        from peft import PeftModel

        base = model_lib.resolve_base(cfg)
        tok = AutoTokenizer.from_pretrained(paths.adapters)  # the training chat template travels with the adapter
        model = PeftModel.from_pretrained(model_lib.load_plain(base, tok, dev), str(paths.adapters)).eval()
        return model, tok, f"adapter {paths.adapters} on {base} (not merged yet)"
    raise ConfigError(f"no trained model in {paths.run_dir} (neither {paths.merged.name}/ nor {paths.adapters.name}/): "
                      "train first (./run.sh), or set BASE_SAVE_PATH / BASE_MODEL_NAME / NUM_EPOCHS / USE_QLORA as for "
                      "the training run")


def conversation(cfg: RunConfig, turns: list[dict]) -> list[dict]:
    """SYSTEM_PROMPT, when set, before the turns; unset, the chat template adds its own default as in training."""
    return ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + turns


# ---- JOB=generate ------------------------------------------------------------------------------------------------
def read_prompts(path: Path) -> list[str]:
    """Prompts from JSONL or a JSON array (a prompt/question/input/instruction/text field, or a string), CSV (a
    column of those names) or plain text (one prompt a line). Raise DataError naming the line that has none."""
    if not path.is_file():
        raise ConfigError(f"PROMPTS_PATH={path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):  # a JSON array of the same rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
        prompts = [_field(row, path, n) for n, row in enumerate(rows, 1)]
    elif path.suffix.lower() in (".jsonl", ".json"):
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg}); one object a line is expected") from None
            prompts.append(_field(row, path, n))
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        prompts = [_field(row, path, reader.line_num) for row in reader]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"PROMPTS_PATH={path}: no prompts in it")
    return prompts


def _field(row, path: Path, n: int) -> str:
    if isinstance(row, str) and row.strip():
        return row.strip()
    if isinstance(row, dict):
        for k in PROMPT_FIELDS:
            if isinstance(row.get(k), str) and row[k].strip():
                return row[k].strip()
    raise DataError(f"{path}:{n}: no prompt; give one of the fields {', '.join(PROMPT_FIELDS)}")


def generate_file(cfg: RunConfig, paths: RunPaths, log=print) -> Path:
    """Answer every prompt of PROMPTS_PATH into <run>/answers.jsonl: prompt, answer, tokens, seconds, stopped."""
    prompts = read_prompts(Path(cfg.prompts_path))
    dev = device()
    model, tok, what = load_run_model(cfg, paths, dev)
    sample = sampling(cfg)
    log(f"[generate] {len(prompts)} prompts, {what}; {sample.describe()}")
    _seed(cfg)
    rows, batch = [], 16
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        t0 = time.time()
        answers = generate_batched(model, tok, [conversation(cfg, [{"role": "user", "content": p}]) for p in chunk],
                                   dev, "generate", batch, sample)
        per = (time.time() - t0) / len(chunk)  # a batch's time, shared by its prompts
        rows += [{"prompt": p, "answer": a["answer"], "tokens": a["tokens"], "seconds": round(per, 3),
                  "stopped": a["stopped"]} for p, a in zip(chunk, answers)]
    out = paths.run_dir / "answers.jsonl"
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    unstopped = sum(not r["stopped"] for r in rows)
    log(f"[generate] {len(rows)} answers in {out}" + (f"; {unstopped} reached MAX_NEW_TOKENS={cfg.max_new_tokens} "
                                                      "before the end of their turn" if unstopped else ""))
    return out


def _seed(cfg: RunConfig) -> None:
    import torch

    torch.manual_seed(cfg.seed)  # sampled answers repeat from run to run with the same SEED


# ---- JOB=chat ----------------------------------------------------------------------------------------------------
HELP = "/reset starts a new conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer"


def chat(cfg: RunConfig, paths: RunPaths) -> None:
    """A conversation in the terminal: the chat template, the whole conversation each turn, the answer streamed."""
    import readline  # noqa: F401 - line editing and history for input()

    out = sys.stdout
    dev = device()
    model, tok, what = load_run_model(cfg, paths, dev)
    sample = sampling(cfg)
    _seed(cfg)
    print(f"[chat] {what}\n[chat] {sample.describe()}" + (f"; system prompt: {cfg.system_prompt!r}" if cfg.system_prompt
                                                          else "") + f"\n[chat] {HELP}", file=out, flush=True)
    turns: list[dict] = []
    while True:
        line = _ask()
        if line is None or line.strip() in ("/exit", "/quit"):
            print("", file=out, flush=True)
            return
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            turns = []
            print("[chat] new conversation", file=out, flush=True)
            continue
        if line.startswith("/"):
            print(f"[chat] unknown command {line}; {HELP}", file=out, flush=True)
            continue
        turns.append({"role": "user", "content": line})
        turns = _fit(tok, model, cfg, turns, sample)
        answer = _stream(model, tok, conversation(cfg, turns), sample, dev, out)
        turns.append({"role": "assistant", "content": answer})


def _ask() -> str | None:
    """The user's next line; None at end of input (Ctrl-D) or Ctrl-C at the prompt."""
    try:
        return input("you> ")
    except (EOFError, KeyboardInterrupt):
        return None


def _fit(tok, model, cfg: RunConfig, turns: list[dict], sample: Sampling) -> list[dict]:
    """Drop the oldest exchanges while the conversation and the answer would not fit the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    while len(turns) > 1:
        ids = tok.apply_chat_template(conversation(cfg, turns), add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        if len(ids) + sample.max_new_tokens <= limit:
            break
        turns = turns[2:]
    return turns


def _stream(model, tok, messages: list[dict], sample: Sampling, dev: str, out) -> str:
    """Generate in a thread and print the tokens as they come; Ctrl-C stops this answer, not the chat."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop = threading.Event()

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(dev)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kw = dict(**enc, **sample.generate_kwargs(), streamer=streamer, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, stopping_criteria=StoppingCriteriaList([_Stop()]))
    worker = threading.Thread(target=_generate_quietly, args=(model, kw), daemon=True)
    worker.start()
    print("model> ", end="", file=out, flush=True)
    pieces = []
    try:
        for piece in streamer:
            pieces.append(piece)
            print(piece, end="", file=out, flush=True)
    except KeyboardInterrupt:
        stop.set()
        for piece in streamer:  # drain what was already produced
            pieces.append(piece)
        print(" [stopped]", end="", file=out)
    worker.join()
    print("", file=out, flush=True)
    return "".join(pieces).strip()


def _generate_quietly(model, kw: dict) -> None:
    import torch

    with torch.no_grad():
        model.generate(**kw)


# ---- JOB=serve ---------------------------------------------------------------------------------------------------
def serve(cfg: RunConfig, paths: RunPaths, log=print) -> int:
    """`transformers serve` on the merged model, in the foreground until SIGTERM/SIGINT; return its exit code.

    The server is transformers' own (OpenAI-compatible: /v1/chat/completions, /v1/completions, /v1/models). It runs
    as our child in its own process group, so one signal reaches it once, from us; we wait for its clean shutdown.
    llama.cpp's server for a GGUF would be a second entry in _SERVERS.
    """
    check_serve_available()
    if not (paths.merged / "config.json").is_file():
        raise ConfigError(f"JOB=serve serves the merged model and there is none in {paths.merged}: "
                          f"merge first: {followup(cfg, 'merge')}")
    sample = sampling(cfg)
    with tempfile.TemporaryDirectory(prefix="rapa-serve-") as view:
        model_id = _serving_view(paths.merged, Path(view), sample)
        cmd, env = _SERVERS["transformers"](cfg, model_id)
        log(f"[serve] {paths.merged} at http://{cfg.serve_host}:{cfg.serve_port}/v1 as model {model_id!r} "
            f"(OpenAI-compatible); defaults {sample.describe().rsplit(',', 1)[0]}, a request's own values win; "
            "stop with Ctrl-C or SIGTERM")
        return _foreground(subprocess.Popen(cmd, cwd=view, env=env, start_new_session=True), log)


def _serving_view(merged: Path, view: Path, sample: Sampling) -> str:
    """A folder of links to the merged model whose generation_config.json carries GEN_PRESET: transformers serve
    takes its defaults from there and samples only where it says do_sample (a request's temperature alone does not
    switch sampling on). The merged artefact itself is left as it is. Returns the model id clients send."""
    folder = view / merged.name
    folder.mkdir()
    for f in merged.iterdir():
        if f.name != "generation_config.json":
            (folder / f.name).symlink_to(f.resolve())
    gen_file = merged / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    kw = sample.generate_kwargs()
    gen.update({k: v for k, v in kw.items() if k != "max_new_tokens" and v is not None})
    if not kw["do_sample"]:
        for k in ("temperature", "top_p", "top_k"):
            gen.pop(k, None)
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return folder.name


def _foreground(child: subprocess.Popen, log) -> int:
    """Wait for the server; SIGTERM, SIGINT and SIGHUP reach it once, from us, and it shuts down cleanly."""
    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
        if child.poll() is None:
            child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        code = child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if forwarded and code in (0, -signal.SIGTERM, -signal.SIGINT):
        log("[serve] stopped")
        return 0
    if code != 0:
        raise PipelineError(f"transformers serve exited with code {code} (its messages are above)")
    return code


def _transformers_serve(cfg: RunConfig, model_id: str) -> tuple[list[str], dict]:
    # The model id clients send is the folder's name relative to the server's working directory: `transformers
    # serve` pins the model it preloads and refuses requests naming another.
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model_id, "--host", cfg.serve_host,
           "--port", str(cfg.serve_port), "--log-level", "info"]
    # The model is a local folder: no hub look-ups (an offline machine would otherwise wait on them).
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return cmd, env


_SERVERS = {"transformers": _transformers_serve}


def check_serve_available() -> None:
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ConfigError("JOB=serve needs transformers' serving extras: pip install -r requirements.txt "
                          "(openai, fastapi, uvicorn)")
