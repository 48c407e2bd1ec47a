"""Artefacts that load right where users take them: transformers 4 as well as 5, and an adapter that names its base
by a name that means something on another machine.

transformers 5 writes the RoPE base only inside `rope_parameters` and names the tokenizer class
`TokenizersBackend`; transformers 4 (which many serving stacks pin) then fails to load the tokenizer and, worse,
loads the model with RoPE base 10000 instead of the stored one, silently answering wrong. Both versions read the
legacy keys written here, and transformers 5 still prefers its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune import embedded
from finetune.config import RunConfig

# The bundled model's home on the Hugging Face hub: what our cache folder is a copy of.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# A class transformers 4 and 5 both know and that loads tokenizer.json as it is (in 5 it is TokenizersBackend).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def for_transformers4(folder: Path) -> None:
    """Add the keys transformers 4 reads to a model or adapter folder written by transformers 5."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        c = json.loads(cfg_file.read_text())
        for sub in (c, c.get("text_config")):
            if isinstance(sub, dict):
                _legacy_rope(sub)
        cfg_file.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    tok_file = folder / "tokenizer_config.json"
    if tok_file.is_file():
        t = json.loads(tok_file.read_text())
        if t.get("tokenizer_class") in (None, "TokenizersBackend") and (folder / "tokenizer.json").is_file():
            t["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
            # transformers 4's generic fast tokenizer would also return token_type_ids, which generate() refuses.
            t.setdefault("model_input_names", ["input_ids", "attention_mask"])
        tok_file.write_text(json.dumps(t, indent=2, ensure_ascii=False) + "\n")


def _legacy_rope(c: dict) -> None:
    rp = c.get("rope_parameters")
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        return
    c.setdefault("rope_theta", rp["rope_theta"])
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        c.setdefault("rope_scaling", scaling)


def portable_base_name(cfg: RunConfig) -> str:
    """The base as another machine can find it: the hub id for the bundled model, else the user's BASE_MODEL_NAME
    (a local folder made absolute, never our cache)."""
    if cfg.base_model_name == embedded.NAME:
        return EMBEDDED_HUB_ID
    p = Path(cfg.base_model_name)
    return str(p.resolve()) if p.is_dir() else cfg.base_model_name


def name_adapter_base(adapter_dir: Path, cfg: RunConfig) -> None:
    """Point adapter_config.json's base_model_name_or_path at the portable name (PEFT writes the local path it was
    trained from). Our own stages pass the resolved local base explicitly and never read this field."""
    f = Path(adapter_dir) / "adapter_config.json"
    a = json.loads(f.read_text())
    a["base_model_name_or_path"] = portable_base_name(cfg)
    f.write_text(json.dumps(a, indent=2, sort_keys=True) + "\n")
