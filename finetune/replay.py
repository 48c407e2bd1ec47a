"""Self-distilled replay: the base model's own greedy answers to general prompts, mixed into training.

Training on them alongside the user's data anchors the model to what it already did well (it learns the user's
facts without drifting elsewhere). Generated once per base model and prompt set, cached, then copied into the
run's prepared data as `replay.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from finetune import model as model_lib
from finetune.config import RunConfig
from finetune.paths import RunPaths, atomic_write_text

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "retention" / "replay_prompts.json"


def _cache_file(cfg: RunConfig, base: str, max_new_tokens: int = 128, prompts_file: Path = PROMPTS) -> tuple[Path, list]:
    prompts = json.loads(Path(prompts_file).read_text(encoding="utf-8"))
    key = hashlib.sha256((json.dumps(prompts) + model_lib.model_identity(base) + cfg.chat_template + str(max_new_tokens)).encode()).hexdigest()[:16]
    return cfg.cache_dir / "replay" / f"{cfg.model_slug}-{key}.jsonl", prompts


def pool_size(cfg: RunConfig, base: str) -> int:
    """Replay rows there are to draw from: the cached pool's rows, or every prompt before the pool is made."""
    cached, prompts = _cache_file(cfg, base)
    if cached.is_file():
        with open(cached, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    return len(prompts)


def build_replay(cfg: RunConfig, paths: RunPaths, base: str, device: str = "cpu", max_new_tokens: int = 128,
                 prompts_file: Path = PROMPTS) -> Path:
    cached, prompts = _cache_file(cfg, base, max_new_tokens, prompts_file)
    if not cached.is_file():
        from finetune.generation import generate

        tok, _ = model_lib.load_tokenizer(base, cfg)
        model = model_lib.load_plain(base, tok, device)
        items = [{"messages": [{"role": "user", "content": p}]} for p in prompts]
        answers = generate(model, tok, items, max_new_tokens, device, desc="replay")
        rows = [{"id": f"replay:{i}", "format": "replay", "messages": [{"role": "user", "content": p},
                                                                        {"role": "assistant", "content": a}]}
                for i, (p, a, done) in enumerate(zip(prompts, *answers)) if done and a.strip()]
        atomic_write_text(cached, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"[replay] {len(rows)} of {len(prompts)} base-model answers kept (finished within {max_new_tokens} tokens); cached {cached}")
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, paths.replay_file)
    return paths.replay_file
