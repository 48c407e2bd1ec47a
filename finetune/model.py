"""The one place that knows Unsloth vs Hugging Face, 4-bit vs full precision, and the LoRA targets.

Everything that differs between the two backends lives on `Backend` (below): the gradient checkpointing modes each
offers, the constants of the memory model the planner (finetune/plan.py) sizes micro-batches with, which LoRA
kernels run, whether frozen weights can be streamed from host RAM, and the loader (`load_for_training`).
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
from typing import TYPE_CHECKING

from finetune import embedded
from finetune.config import RunConfig
from finetune.errors import ConfigError
from finetune.plan import shape_from_config

if TYPE_CHECKING:
    from finetune.plan import TrainPlan


def resolve_base(cfg: RunConfig) -> str:
    """A local folder for BASE_MODEL_NAME: the folder itself, the embedded model, or a hub cache hit."""
    name = cfg.base_model_name
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ConfigError(f"BASE_MODEL_NAME={name}: folder has no config.json (not a Hugging Face model folder)")
        return str(Path(name))
    if name == embedded.NAME:
        return str(embedded.materialize(cfg.cache_dir))
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, no token: all the same to the user
        raise ConfigError(f"BASE_MODEL_NAME={name}: not a local folder and could not be fetched from the hub "
                          f"({type(e).__name__}); point it at a downloaded model folder") from None


# Saved activations per token per decoder layer, in bf16 values: a*hidden + b*intermediate. Unsloth, measured on
# Llama-3.1-8B (H100): 120 KB per token per layer with LoRA dropout 0 (1.83 GiB per kept layer at 8 x 2048
# tokens), plus ~37 KB of dropout masks (one byte per LoRA input element) with dropout > 0.
# HF: raised after an H200 run (docs/BENCHMARKS.md, issue 7) where the old (10, 4) estimated 102 GiB for
# 8 x 2048 tokens without checkpointing and the run needed more than 126 GiB; not yet calibrated precisely.
ACT = {"unsloth": (4.8, 2.8), "hf": (16.0, 6.4)}

# LORA_KERNELS=auto: fast_lora (eager decoder blocks) from this hidden size up, Unsloth's kernels in its compiled
# blocks below: the eager blocks pay off only where the LoRA passes outweigh compiling the blocks' elementwise
# work (measurements in docs/BENCHMARKS.md: faster at hidden 4096, slower at 1024, nothing measured between).
FAST_LORA_MIN_HIDDEN = 3072


@dataclass(frozen=True)
class Backend:
    name: str      # "unsloth" | "hf"
    why: str
    device: str    # "cuda" | "cpu"

    # ---- what the planner asks: the Unsloth/HF differences, answered here and nowhere else ------------------
    @property
    def unsloth(self) -> bool:
        return self.name == "unsloth"

    def checkpoint_modes(self, asked: str, offload_weights: str) -> list[str]:
        """Gradient checkpointing modes worth sizing for GRADIENT_CHECKPOINTING=`asked`, leanest last."""
        if not self.unsloth:
            # HF has no partial or offloaded checkpointing: plain checkpointing is the leanest it has.
            return ["off", "on"] if asked == "auto" else ["on" if asked == "offload" else asked]
        if offload_weights == "on":
            return ["stream"]
        modes = ["off", "partial", "offload"] if asked == "auto" else [asked]
        if offload_weights == "auto" and "offload" in modes:
            modes.append("stream")  # slower than offload: chosen only when nothing before it fits
        return modes

    @property
    def streams_weights(self) -> bool:
        """OFFLOAD_WEIGHTS: frozen layers in host RAM, copied in as each runs (Unsloth's block swap)."""
        return self.unsloth

    @property
    def activation_values(self) -> tuple[float, float]:
        return ACT["unsloth" if self.unsloth else "hf"]

    @property
    def saves_dropout_masks(self) -> bool:
        return self.unsloth

    @property
    def recompute_share(self) -> float:
        """Share of a layer's activations alive while it is recomputed in backward."""
        return 0.5 if self.unsloth else 1.0

    @property
    def logit_bytes_per_token_vocab(self) -> float:
        # Unsloth: fused, chunked cross-entropy. HF: bf16 logits, their fp32 upcast and its gradient.
        return 0.25 if self.unsloth else 10.0

    def lora_kernels(self, cfg: RunConfig, shape: dict) -> tuple[str, str] | None:
        """(fast | unsloth, why) on the Unsloth backend; None where there is no choice (HF)."""
        if not self.unsloth:
            return None
        if cfg.lora_kernels != "auto":
            return cfg.lora_kernels, f"LORA_KERNELS={cfg.lora_kernels}"
        if shape["hidden"] >= FAST_LORA_MIN_HIDDEN:
            return "fast", f"auto: hidden size {shape['hidden']} >= {FAST_LORA_MIN_HIDDEN}"
        return "unsloth", f"auto: hidden size {shape['hidden']} < {FAST_LORA_MIN_HIDDEN}, compiled blocks gain more"

    def gpu_memory(self) -> float | None:
        """The card's memory in bytes (None off a GPU): the planner's budget before MAX_GPU_MEMORY and its margin."""
        if self.device != "cuda":
            return None
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ModelFacts:
    params: int                 # parameters of the base as built from its config
    linear_names: tuple         # the names of its Linear modules (what TARGET_MODULES may list), output head excluded


def inspect_base(base: str, cfg: RunConfig) -> ModelFacts:
    """The base's structure from its config alone (built on the meta device: no weights read, a second or two),
    and the checks that need it: config.json, the tokenizer files, TARGET_MODULES. ConfigError names the file."""
    folder = Path(base)
    config_file = folder / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise ConfigError(f"BASE_MODEL_NAME={cfg.base_model_name}: {config_file} is missing") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"BASE_MODEL_NAME={cfg.base_model_name}: {config_file} is not valid JSON ({e})") from None
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"BASE_MODEL_NAME={cfg.base_model_name}: no tokenizer in {folder} (expected one of "
                          f"{', '.join(TOKENIZER_FILES)})")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        mc = AutoConfig.from_pretrained(base)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(mc)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"BASE_MODEL_NAME={cfg.base_model_name}: {config_file} does not describe a causal language "
                          f"model transformers can build ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head})
    if cfg.target_modules != "all-linear":
        missing = [t for t in target_modules(cfg) if t.rsplit(".", 1)[-1] not in names]
        if missing:
            raise ConfigError(f"TARGET_MODULES={cfg.target_modules}: {', '.join(missing)} not in {cfg.model_slug}; its "
                              f"Linear modules are {', '.join(names)} (or use all-linear)")
    return ModelFacts(params, tuple(names))


def model_shape(base: str) -> dict:
    """The base's shape as the planner's memory model reads it, from its config.json."""
    return shape_from_config(json.loads((Path(base) / "config.json").read_text()))


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


def load_for_training(cfg: RunConfig, base: str, tok, backend: Backend, p: TrainPlan):
    """The base (4-bit when USE_QLORA) with fresh LoRA adapters, ready for SFTTrainer, as the plan `p` says:

    p.grad_ckpt: off | on | offload | stream | partial (p.keep_layers decoder layers keep their activations; Unsloth
    only); p.lora_kernels: fast | unsloth (Unsloth only); p.replay_loss: kl needs the logits.
    """
    grad_ckpt, lora_kernels = p.grad_ckpt, p.lora_kernels
    # BASE_PRECISION=fp8: the base loads in bf16, then its LoRA-wrapped projections become FP8 (finetune/fp8.py).
    precision, why = base_precision(cfg, backend)
    if precision == "fp8" and grad_ckpt == "stream":
        raise ConfigError("BASE_PRECISION=fp8 does not fit this GPU's memory plan (only streamed weights fit, and FP8 "
                          "weights stay on the GPU): use BASE_PRECISION=nf4 (QLoRA) here")
    if precision == "fp8":
        lora_kernels = "fast"  # the FP8 GEMMs live in fast_lora's routed Functions (finetune/fp8.py)
    model = _load_peft(cfg, base, tok, backend, grad_ckpt, p.keep_layers, lora_kernels)
    if precision == "fp8":
        from finetune import fp8

        n = fp8.quantize_lora_bases(model)
        print(f"[model] FP8 base: {n['layers']} projections quantised to e4m3 (row scales), "
              f"{n['bf16_bytes'] / 2**30:.2f} GiB bf16 -> {n['fp8_bytes'] / 2**30:.2f} GiB (weights + K-major copies)",
              flush=True)
    elif cfg.base_precision == "fp8":
        print(f"[model] {why}", flush=True)
    return model


def base_precision(cfg: RunConfig, backend: Backend) -> tuple[str, str]:
    """(nf4 | bf16 | fp8, why) for this run: BASE_PRECISION=fp8 falls back to bf16 where FP8 GEMMs cannot run."""
    from finetune import fp8

    return fp8.resolve(cfg.base_precision, cfg.use_qlora, backend.device)


def _load_peft(cfg: RunConfig, base: str, tok, backend: Backend, grad_ckpt: str, keep_layers: int,
               lora_kernels: str):
    if backend.unsloth:
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

    # off: every layer keeps its activations; on: standard recompute; offload/partial: Unsloth's offloaded
    # checkpointing, with `keep_layers` layers exempt from it under partial.
    ckpt = {"off": False, "on": True, "offload": "unsloth", "partial": "unsloth", "stream": "unsloth"}[grad_ckpt]
    # stream: every decoder layer loads straight into host RAM and is copied to the GPU as it runs (Unsloth's block
    # swap, two layers prefetched); the input embedding's looked-up rows are all that cross from it.
    stream = {"offload_layers": model_shape(base)["layers"], "offload_embedding": True} if grad_ckpt == "stream" else {}
    model, _ = FastLanguageModel.from_pretrained(
        model_name=base, max_seq_length=cfg.max_seq_length, dtype=None, load_in_4bit=cfg.use_qlora,
        load_in_16bit=not cfg.use_qlora, use_gradient_checkpointing=ckpt, random_state=cfg.seed,
        local_files_only=Path(base).is_dir(), **stream)
    _match_vocab(model, tok)
    from finetune import fast_lora

    fast = lora_kernels == "fast"
    fast_lora.install() if fast else fast_lora.uninstall()
    if fast:  # measured in fast_lora's eager blocks; Unsloth's compiled blocks keep its own choice
        print(f"[model] padding-free attention: {lean_varlen_attention()}", flush=True)
    extra = {"checkpoint_skip_layers": keep_layers} if grad_ckpt == "partial" and keep_layers > 0 else {}
    # fast_lora's kernels run in eager decoder blocks. On torch >= 2.11 Unsloth torch.compiles every block, and with
    # the router in the traced code every block compile failed and fell back to eager (docs/BENCHMARKS.md, run 10).
    with _unsloth_block_compile(on=not fast):
        return FastLanguageModel.get_peft_model(
            model, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
            target_modules=target_modules(cfg), use_gradient_checkpointing=ckpt, random_state=cfg.seed,
            max_seq_length=cfg.max_seq_length, **extra)


def lean_varlen_attention() -> str:  # pragma: no cover - GPU
    """Padding-free batches attend through one flash varlen call per layer, as Unsloth does on torch >= 2.12.

    Unsloth takes that path only where torch's varlen_attn has enable_gqa (torch 2.12+); below it, its gate is
    closed and every layer runs one cuDNN SDPA per row of the batch, each padded to a multiple of 128: about 150
    small copies and 80 fills per layer and step, which left the GPU idle half of a steady step on variable-length
    rows (docs/BENCHMARKS.md, run I21-8). Its own varlen Function (`_LeanFlashVarlen`: the aten flash forward and
    backward with cu_seqlens, in torch since 2.5) needs nothing from 2.12, so the gate is opened with it: 1.62x the
    useful tokens/s on the bench's variable rows, losses within 2e-4 (run I21-9). Unsloth still decides per call
    whether varlen applies (dtype, head size, sliding window, the int32 guard). Opened only with fast_lora's eager
    decoder blocks, where it was measured (under Unsloth's compiled blocks the traced path differs), and only where
    Unsloth would otherwise run the per-row path: flash-attn or xformers installed, Unsloth's own switches
    (UNSLOTH_TORCH_VARLEN=0, UNSLOTH_LEAN_VARLEN=0) or a card without a flash kernel keep its choice. Sliding-window
    layers take the Function's window as on torch 2.12; measured here on Llama only. Returns the banner's note."""
    import torch

    try:
        import unsloth.utils.attention_dispatch as ad

        lean = ad._LeanFlashVarlen
        gate = ad._TORCH_VARLEN_ATTN
        kernels = (ad.HAS_FLASH_ATTENTION, ad.HAS_XFORMERS, ad._SDPA_PACKED_SEGMENTS)
    except (ImportError, AttributeError) as e:
        return f"Unsloth's own choice (its attention dispatch has changed: {type(e).__name__})"
    if gate is not None:
        return "one flash varlen call per layer (this torch has varlen_attn)"
    if kernels[0]:
        return "flash-attn's varlen kernel (installed), Unsloth's own choice"
    if kernels[1]:
        return "xformers (installed), Unsloth's own choice"
    if not kernels[2]:
        return "one SDPA call with a block mask (UNSLOTH_SDPA_PACKED_SEGMENTS is off)"
    off = [k for k in ("UNSLOTH_TORCH_VARLEN", "UNSLOTH_LEAN_VARLEN")
           if os.environ.get(k, "1").lower() in ("0", "false", "no", "off")]  # Unsloth's own switches, respected
    if off:
        return f"one SDPA call per row ({off[0]}=0)"
    if not torch.backends.cuda.is_flash_attention_available() or torch.cuda.get_device_capability()[0] < 8:
        return "one SDPA call per row (no flash kernel for this torch build or card)"

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        # Reached only while torch.compile traces: eagerly Unsloth calls the lean Function itself.
        return lean.apply(q, k, v, cu_q, max_q, tuple(window_size) == (-1, 0), scale, window_size[0], window_size[1])

    ad._TORCH_VARLEN_ATTN, ad._LEAN_VARLEN = varlen, True
    ad._varlen_can_use_cudnn = lambda *a, **k: False
    return f"one flash varlen call per layer (Unsloth's torch 2.12 path, opened on torch {torch.__version__.split('+')[0]})"


def _unsloth_block_compile(on: bool):
    """Unsloth reads this switch when get_peft_model patches the model: "0" keeps its decoder blocks uncompiled."""
    return _env_switch("UNSLOTH_BLOCK_COMPILE_LEGACY", None if on else "0")


def training_switches(backend: Backend, needs_logits: bool):
    """Library switches read from the environment while a model trains; the train stage runs inside this and the
    process environment is as it was afterwards. Unsloth's fused loss returns no logits unless told, and the KL
    replay loss and the DPO/ORPO losses need them (Unsloth reads the switch at every forward, so it stays set for
    the whole stage)."""
    return _env_switch("UNSLOTH_RETURN_LOGITS", "1" if backend.name == "unsloth" and needs_logits else None)


@contextlib.contextmanager
def _env_switch(key: str, value: str | None):
    """Set environment variable `key` to `value` (None: leave it as it is) for the block, then restore it."""
    old = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


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
