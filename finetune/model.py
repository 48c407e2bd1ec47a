"""The one place that knows Unsloth vs Hugging Face, 4-bit vs full precision, and the LoRA targets.

Unsloth is imported only here and only when the backend resolves to it (a CUDA GPU and an importable unsloth);
CPU machines never import it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from finetune import embedded
from finetune.config import RunConfig
from finetune.errors import ConfigError


def resolve_base(cfg: RunConfig) -> str:
    """A local folder for BASE_MODEL_NAME: the folder itself, the embedded model, or a hub cache hit."""
    name = cfg.base_model_name
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ConfigError(f"BASE_MODEL_NAME={name}: folder has no config.json (not a Hugging Face model folder)")
        return str(Path(name))
    if name == embedded.NAME:
        return str(embedded.materialize())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, no token: all the same to the user
        raise ConfigError(f"BASE_MODEL_NAME={name}: not a local folder and could not be fetched from the hub "
                          f"({type(e).__name__}); point it at a downloaded model folder") from None


@dataclass(frozen=True)
class Backend:
    name: str      # "unsloth" | "hf"
    why: str
    device: str    # "cuda" | "cpu"


def choose_backend(cfg: RunConfig, world_size: int = 1) -> Backend:
    """Unsloth when a CUDA GPU is there and unsloth imports (BACKEND=auto), else Hugging Face.

    Unsloth patches transformers, trl and peft when it is imported, so it is imported here, before any of them
    (the pipeline calls this first); a failed import falls back to HF under BACKEND=auto.
    """
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cfg.backend == "hf":
        return Backend("hf", "BACKEND=hf", device)
    if not cuda:
        if cfg.backend == "unsloth":
            raise ConfigError("BACKEND=unsloth needs a CUDA GPU (none visible); use BACKEND=auto or hf")
        return Backend("hf", "auto: no CUDA GPU", device)
    if world_size > 1:
        # Open-source Unsloth trains on one GPU; several processes go through HF + DeepSpeed.
        if cfg.backend == "unsloth":
            raise ConfigError(f"BACKEND=unsloth supports one GPU; this run has {world_size} processes: use BACKEND=auto or hf")
        return Backend("hf", f"auto: {world_size} processes (Unsloth trains on one GPU), HF + DeepSpeed", device)
    problem = _import_unsloth()
    if problem is None:
        return Backend("unsloth", "BACKEND=unsloth" if cfg.backend == "unsloth" else "auto: CUDA GPU and unsloth present",
                       device)
    if cfg.backend == "unsloth":
        raise ConfigError(f"BACKEND=unsloth: unsloth does not import ({problem}); pip install -r requirements-gpu.txt, "
                          "or use BACKEND=hf")
    return Backend("hf", f"auto: unsloth unavailable ({problem})", device)


def _import_unsloth() -> str | None:
    """Import unsloth (first, for its patches); return why it failed, or None."""
    import sys

    if "unsloth" in sys.modules:
        return None
    if importlib.util.find_spec("unsloth") is None:
        return "not installed"
    late = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
    try:
        import unsloth  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means: train without it
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if late:
        print(f"[model] note: {', '.join(late)} imported before unsloth; some of its patches may be missing", flush=True)
    return None


def load_tokenizer(base: str, cfg: RunConfig):
    from transformers import AutoTokenizer

    from finetune.data.tokenize import setup_tokenizer

    tok = AutoTokenizer.from_pretrained(base)
    notes = setup_tokenizer(tok, cfg.chat_template)
    return tok, notes


def compute_dtype(device: str):
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def target_modules(cfg: RunConfig, model=None) -> list[str] | str:
    if cfg.target_modules != "all-linear":
        return [m.strip() for m in cfg.target_modules.split(",")]
    if model is None:
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return "all-linear"


def lora_config(cfg: RunConfig, model=None):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=target_modules(cfg, model))


def bnb_config(device: str):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(device),
                              bnb_4bit_quant_storage=torch.bfloat16 if device == "cuda" else torch.float32)


def load_for_training(cfg: RunConfig, base: str, tok, backend: Backend, grad_ckpt: str, keep_layers: int = 0, *,
                      lora_kernels: str):
    """The base (4-bit when USE_QLORA) with fresh LoRA adapters, ready for SFTTrainer.

    grad_ckpt: off | on | offload | stream | partial (keep_layers decoder layers keep their activations; Unsloth only).
    lora_kernels: fast | unsloth, the plan's choice (Unsloth backend only).
    """
    # --- BASE_PRECISION=fp8 (issue 21): the base loads in bf16, then its LoRA-wrapped projections become FP8.
    precision, why = base_precision(cfg, backend)
    if precision == "fp8" and grad_ckpt == "stream":
        raise ConfigError("BASE_PRECISION=fp8 does not fit this GPU's memory plan (only streamed weights fit, and FP8 "
                          "weights stay on the GPU): use BASE_PRECISION=nf4 (QLoRA) here")
    if precision == "fp8":
        lora_kernels = "fast"  # the FP8 GEMMs live in fast_lora's routed Functions (finetune/fp8.py)
    model = _load_peft(cfg, base, tok, backend, grad_ckpt, keep_layers, lora_kernels)
    if precision == "fp8":
        from finetune import fp8

        n = fp8.quantize_lora_bases(model)
        print(f"[model] FP8 base: {n['layers']} projections quantised to e4m3 (row scales), "
              f"{n['bf16_bytes'] / 2**30:.2f} GiB bf16 -> {n['fp8_bytes'] / 2**30:.2f} GiB (weights + K-major copies)",
              flush=True)
    elif cfg.base_precision == "fp8":
        print(f"[model] {why}", flush=True)
    return model
    # --- end BASE_PRECISION=fp8


def base_precision(cfg: RunConfig, backend: Backend) -> tuple[str, str]:
    """(nf4 | bf16 | fp8, why) for this run: BASE_PRECISION=fp8 falls back to bf16 where FP8 GEMMs cannot run."""
    from finetune import fp8

    return fp8.resolve(cfg.base_precision, cfg.use_qlora, backend.device)


def _load_peft(cfg: RunConfig, base: str, tok, backend: Backend, grad_ckpt: str, keep_layers: int,
               lora_kernels: str):
    if backend.name == "unsloth":
        return _load_unsloth(cfg, base, tok, grad_ckpt, keep_layers, lora_kernels)
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    ckpt = grad_ckpt != "off"  # HF has no partial or offloaded checkpointing: both mean every layer
    kwargs = {"dtype": compute_dtype(backend.device)}
    if cfg.use_qlora:
        kwargs["quantization_config"] = bnb_config(backend.device)
    if backend.device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
        kwargs["attn_implementation"] = "sdpa"
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    _match_vocab(model, tok)
    # No KV cache in training: it is useless there, and its presence turns off transformers' block-diagonal
    # masking of packed rows (PACKING / padding-free would then attend across row boundaries).
    model.config.use_cache = False
    if cfg.use_qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(cfg, model))


def _load_unsloth(cfg: RunConfig, base: str, tok, grad_ckpt: str, keep_layers: int,
                  lora_kernels: str):  # pragma: no cover - GPU
    from unsloth import FastLanguageModel

    if cfg.replay_loss == "kl":  # the KL replay loss needs logits; Unsloth's fused loss skips them otherwise
        os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")

    # off: every layer keeps its activations; on: standard recompute; offload/partial: Unsloth's offloaded
    # checkpointing, with `keep_layers` layers exempt from it under partial.
    ckpt = {"off": False, "on": True, "offload": "unsloth", "partial": "unsloth", "stream": "unsloth"}[grad_ckpt]
    # stream: every decoder layer loads straight into host RAM and is copied to the GPU as it runs (Unsloth's block
    # swap, two layers prefetched); the input embedding's looked-up rows are all that cross from it.
    stream = {"offload_layers": _num_layers(base), "offload_embedding": True} if grad_ckpt == "stream" else {}
    model, _ = FastLanguageModel.from_pretrained(
        model_name=base, max_seq_length=cfg.max_seq_length, dtype=None, load_in_4bit=cfg.use_qlora,
        load_in_16bit=not cfg.use_qlora, use_gradient_checkpointing=ckpt, random_state=cfg.seed,
        local_files_only=Path(base).is_dir(), **stream)
    _match_vocab(model, tok)
    from finetune import fast_lora

    fast = lora_kernels == "fast"
    fast_lora.install() if fast else fast_lora.uninstall()
    extra = {"checkpoint_skip_layers": keep_layers} if grad_ckpt == "partial" and keep_layers > 0 else {}
    # fast_lora's kernels run in eager decoder blocks. On torch >= 2.11 Unsloth torch.compiles every block, and with
    # the router in the traced code every block compile failed and fell back to eager (docs/BENCHMARKS.md, run 10).
    with _unsloth_block_compile(on=not fast):
        return FastLanguageModel.get_peft_model(
            model, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
            target_modules=target_modules(cfg), use_gradient_checkpointing=ckpt, random_state=cfg.seed,
            max_seq_length=cfg.max_seq_length, **extra)


@contextlib.contextmanager
def _unsloth_block_compile(on: bool):
    """Unsloth reads this switch when get_peft_model patches the model: "0" keeps its decoder blocks uncompiled."""
    key = "UNSLOTH_BLOCK_COMPILE_LEGACY"
    old = os.environ.get(key)
    if not on:
        os.environ[key] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _num_layers(base: str) -> int:
    c = json.loads((Path(base) / "config.json").read_text())
    return c.get("text_config", c)["num_hidden_layers"]


def _match_vocab(model, tok) -> None:
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id


def load_plain(base: str, tok, device: str = "cpu", dtype=None):
    """The base unquantised, for merge, evaluation and replay generation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or compute_dtype(device))
    _match_vocab(model, tok)
    return model.to(device).eval()


def model_identity(base: str) -> str:
    """What identifies a base model's weights for caches: its config and its weight files' names and sizes."""
    cfgf = Path(base) / "config.json"
    weights = sorted(Path(base).glob("*.safetensors"))
    stamp = "".join(f"{w.name}:{w.stat().st_size}" for w in weights)
    return (cfgf.read_text() if cfgf.is_file() else base) + stamp
