"""MERGE_MODE=sharded: merge a LoRA adapter into a base model one safetensors shard at a time.

Peak memory is about the largest shard plus the adapter, so bases larger than RAM can be merged. Each targeted
weight becomes W + scale * (B @ A), computed in float32 and cast back to the stored dtype; the output keeps the
base's shard names and index. Anything PEFT's `merge_and_unload` would do beyond that (DoRA, modules_to_save,
biases, LoRA on tied embeddings) is refused with a clear error rather than merged approximately.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from finetune.errors import ConfigError, ParityError, PipelineError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")
UNSUPPORTED = "not supported by MERGE_MODE=sharded (use MERGE_MODE=whole)"


def available_ram() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 when unknown)."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def base_size(base_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(base_dir).glob("*.safetensors"))


def fits_in_memory(base_dir: Path) -> bool:
    """The auto rule: the whole model is loaded only when it is at most half the free RAM."""
    free = available_ram()
    return free == 0 or base_size(base_dir) <= free / 2


def shard_layout(base_dir: Path) -> tuple[list[str], dict | None]:
    """(shard file names in order, the index json or None for a single model.safetensors)."""
    base_dir = Path(base_dir)
    if (base_dir / INDEX).is_file():
        index = json.loads((base_dir / INDEX).read_text())
        return sorted(set(index["weight_map"].values())), index
    if (base_dir / SINGLE).is_file():
        return [SINGLE], None
    raise ConfigError(f"{base_dir} has neither {INDEX} nor {SINGLE}: MERGE_MODE=sharded needs safetensors weights")


def load_adapter(adapter_dir: Path) -> tuple[dict, dict]:
    """(adapter_config, {module path: (A, B, scale, kind)}) with kind "linear" or "embedding"."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"no {ADAPTER_WEIGHTS} in {adapter_dir}: MERGE_MODE=sharded reads safetensors adapters only")
    if acfg.get("peft_type", "LORA") != "LORA":
        raise PipelineError(f"adapter type {acfg.get('peft_type')} is {UNSUPPORTED}")
    if acfg.get("use_dora"):
        raise PipelineError(f"DoRA adapters are {UNSUPPORTED}")
    if acfg.get("modules_to_save"):
        raise PipelineError(f"adapters with modules_to_save ({acfg['modules_to_save']}, e.g. resized embeddings) "
                            f"are {UNSUPPORTED}")
    if acfg.get("bias", "none") != "none":
        raise PipelineError(f"adapters with trained biases (bias={acfg['bias']}) are {UNSUPPORTED}")
    if acfg.get("alpha_pattern"):
        raise PipelineError(f"adapters with an alpha_pattern are {UNSUPPORTED}")
    if acfg.get("fan_in_fan_out"):
        raise PipelineError(f"fan_in_fan_out adapters (Conv1D bases) are {UNSUPPORTED}")
    alpha = float(acfg["lora_alpha"])
    rslora = bool(acfg.get("use_rslora"))

    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    parts: dict[str, dict] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise PipelineError(f"adapter key {key!r} does not start with {PREFIX!r}: {UNSUPPORTED}")
        rest = key[len(PREFIX):]
        for suffix, kind, slot in ((".lora_A.weight", "linear", "A"), (".lora_B.weight", "linear", "B"),
                                   (".lora_embedding_A", "embedding", "A"), (".lora_embedding_B", "embedding", "B")):
            if rest.endswith(suffix):
                module = rest[: -len(suffix)]
                entry = parts.setdefault(module, {"kind": kind})
                entry[slot] = t
                break
        else:
            raise PipelineError(f"adapter tensor {key!r} (not a LoRA A/B matrix) is {UNSUPPORTED}")
    loras = {}
    for module, e in parts.items():
        if "A" not in e or "B" not in e:
            raise PipelineError(f"adapter module {module} has lora_A or lora_B missing: the adapter is incomplete")
        r = e["A"].shape[0]   # per-module rank (rank_pattern included)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        loras[module + ".weight"] = (e["A"], e["B"], scale, e["kind"])
    return acfg, loras


def delta(A, B, scale: float, kind: str):
    """scale * B @ A in float32, shaped like the base weight."""
    import torch

    d = B.to(torch.float32) @ A.to(torch.float32)
    if kind == "embedding":  # lora_embedding_A is (r, vocab), lora_embedding_B (dim, r): PEFT transposes
        d = d.T
    return d * scale


def merge_sharded(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype=None, log=print) -> dict:
    """Write base + adapter into `out_dir`, reading and writing one shard at a time.

    dtype: None keeps each tensor's stored dtype; a floating torch dtype casts every floating tensor to it.
    Returns a summary: shards, merged tensor names, largest shard bytes, total bytes, scale(s).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    acfg, loras = load_adapter(adapter_dir)
    shards, index = shard_layout(base_dir)
    config = json.loads((base_dir / "config.json").read_text()) if (base_dir / "config.json").is_file() else {}

    # Every adapter target must name a base tensor; otherwise this is the wrong base.
    where: dict[str, str] = {}
    if index is not None:
        where = dict(index["weight_map"])
    else:
        with safe_open(str(base_dir / SINGLE), framework="pt") as f:
            where = {k: SINGLE for k in f.keys()}
    missing = sorted(k for k in loras if k not in where)
    if missing:
        tied = [k for k in missing if k.endswith("lm_head.weight")]
        if tied and config.get("tie_word_embeddings", False):
            raise PipelineError(f"LoRA on lm_head of a model with tied embeddings is {UNSUPPORTED}")
        raise ParityError(f"adapter {adapter_dir} does not fit the base {base_dir}: {len(missing)} adapter target(s) "
                          f"match no base tensor (e.g. {missing[0]}); is BASE the model the adapter was trained on?")
    if config.get("tie_word_embeddings", False) and any(v[3] == "embedding" or "embed_tokens" in k
                                                        for k, v in loras.items()):
        raise PipelineError(f"LoRA on the embeddings of a model with tied embeddings is {UNSUPPORTED}")

    merged_names, largest, total = [], 0, 0
    for shard in shards:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(base_dir / shard), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            for name in f.keys():
                w = f.get_tensor(name)
                target = w.dtype if dtype is None or not w.is_floating_point() else dtype
                if name in loras:
                    A, B, scale, kind = loras[name]
                    d = delta(A, B, scale, kind)
                    if tuple(d.shape) != tuple(w.shape):
                        raise ParityError(f"adapter for {name} has shape {tuple(d.shape)} but the base tensor is "
                                          f"{tuple(w.shape)}: wrong base for this adapter")
                    w = (w.to(torch.float32) + d).to(target)
                    merged_names.append(name)
                    del d
                elif w.dtype != target:
                    w = w.to(target)
                out[name] = w.contiguous()
        size = sum(t.numel() * t.element_size() for t in out.values())
        largest, total = max(largest, size), total + size
        save_file(out, str(out_dir / shard), metadata=metadata)
        log(f"[merge] sharded: {shard} written ({size / 1e6:.0f} MB, "
            f"{sum(1 for n in out if n in loras)} tensor(s) merged)")
        del out

    if index is not None:
        new_index = dict(index)
        new_index["metadata"] = {**index.get("metadata", {}), "total_size": total}
        (out_dir / INDEX).write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")

    if config:
        if dtype is not None:
            name = str(dtype).replace("torch.", "")
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = name
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")
    for name in TOKENIZER_FILES:  # the adapter folder holds the tokenizer and chat template used in training
        src = adapter_dir / name if (adapter_dir / name).is_file() else base_dir / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)
    scales = sorted({v[2] for v in loras.values()})
    return {"shards": shards, "merged": merged_names, "largest_shard_bytes": largest, "total_bytes": total,
            "scale": scales[0] if len(scales) == 1 else scales, "rank": acfg.get("r")}


def check_tensors(base_dir: Path, adapter_dir: Path, merged_dir: Path, n: int = 4, tol: float | None = None) -> float:
    """Cheap parity for models too large to load: for `n` targeted tensors, recompute base + scale*B@A
    independently (from the original shard and adapter files) and compare with the merged file.
    Returns the max abs difference; raises ParityError above `tol` (default: 1e-5 fp32, 1e-2 for 16-bit)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    base_dir, adapter_dir, merged_dir = Path(base_dir), Path(adapter_dir), Path(merged_dir)
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    ad = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    a_keys = sorted(k for k in ad if k.endswith(".lora_A.weight"))
    if not a_keys:
        raise ParityError(f"no lora_A tensors in {adapter_dir}: nothing to check")
    step = max(1, len(a_keys) // n)
    picked = a_keys[::step][:n]
    _, base_index = shard_layout(base_dir)
    _, merged_index = shard_layout(merged_dir)
    worst = 0.0
    for ka in picked:
        module = ka[len(PREFIX): -len(".lora_A.weight")]
        name = module + ".weight"
        A, B = ad[ka].double(), ad[ka.replace(".lora_A.", ".lora_B.")].double()
        r = A.shape[0]
        scale = acfg["lora_alpha"] / (math.sqrt(r) if acfg.get("use_rslora") else r)
        bshard = base_index["weight_map"][name] if base_index else SINGLE
        mshard = merged_index["weight_map"][name] if merged_index else SINGLE
        with safe_open(str(base_dir / bshard), framework="pt") as f:
            w = f.get_tensor(name)
        with safe_open(str(merged_dir / mshard), framework="pt") as f:
            m = f.get_tensor(name)
        expect = (w.double() + scale * torch.einsum("or,ri->oi", B, A)).to(m.dtype)
        worst = max(worst, float((expect.double() - m.double()).abs().max()))
        limit = tol if tol is not None else (1e-5 if m.dtype == torch.float32 else 1e-2) * max(1.0, float(w.abs().max()))
        if worst > limit:
            raise ParityError(f"merged tensor {name} differs from base + scale*B@A by {worst:.3e} (limit {limit:.1e})")
        del w, m, expect
    return worst
