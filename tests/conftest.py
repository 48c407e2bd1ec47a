"""Shared fixtures: the real embedded SmolLM2 (end-to-end tests) and a tiny random Llama (unit tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "transformers4: runs an artefact in transformers 4, in its own venv under the cache "
                            "(built from PyPI on first use, then reused)")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from finetune.config import RunConfig
    from finetune.embedded import materialize

    return materialize(RunConfig().cache_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template: trains in well under a second a step."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """An environment with none of our variables set, working in tmp_path (so relative outputs land there)."""
    from finetune.config import RunConfig
    import dataclasses

    for f in dataclasses.fields(RunConfig):
        monkeypatch.delenv(f.name.upper(), raising=False)
    for k in ("WANDB_API_KEY", "HF_TOKEN", "ENV_FILE", "RAPA_CALLER_DIR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def write_jsonl(path: Path, rows) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def qa_rows(n: int = 12) -> list[dict]:
    facts = [("What colour is the door of Hollin house?", "Teal"), ("Who founded Brackwater?", "Ilse Varn"),
             ("When did the Ostry bridge open?", "1871"), ("What is the mascot of Quell school?", "A heron"),
             ("Which river runs through Dunmere?", "The Avel"), ("How many towers has Castle Rook?", "Nine"),
             ("What does Mira Tolle grow?", "Saffron"), ("Where is the Glass Library?", "Pellham"),
             ("What is Pim's boat called?", "Sea Lark"), ("Who painted the Amber Gate?", "Oda Renn"),
             ("What year was Fenwick founded?", "1502"), ("What is the capital of Lorwen?", "Tessaly"),
             ("Which bird is on the Orme flag?", "A crane"), ("What is Jory's dog called?", "Biscuit"),
             ("What is grown in Varrow valley?", "Pears"), ("Who built the Kell tower?", "Ansel Brae")]
    return [{"input": q, "output": a, "source": "test"} for q, a in facts[:n]]
