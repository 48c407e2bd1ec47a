"""Batched greedy generation under the chat template, shared by evaluate and replay."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm


def generate(model, tok, items: list[dict], max_new_tokens: int, device: str, desc: str = "generate",
             batch: int = 16) -> tuple[list[str], list[bool]]:
    """Greedy answers for `items` ({"messages": [...]}) and whether each ended with EOS."""
    import torch

    tok.padding_side = "left"
    texts, done = [], []
    prompts = [tok.apply_chat_template(it["messages"], tokenize=False, add_generation_prompt=True) for it in items]
    for i in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch", leave=False):
        enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
        for row in g[:, enc["input_ids"].shape[1]:]:
            done.append(bool((row == tok.eos_token_id).any()))
            texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts, done



@dataclass(frozen=True)
class Sampling:
    temperature: float  # 0 = greedy (no sampling)
    top_p: float
    repetition_penalty: float
    max_new_tokens: int = 256


# Seed 004's presets (section 8), the one table every consumer reads (the Ollama Modelfile's PARAMETER lines here).
PRESETS: dict[str, Sampling] = {
    "greedy": Sampling(temperature=0.0, top_p=1.0, repetition_penalty=1.0),
    "factual": Sampling(temperature=0.1, top_p=0.9, repetition_penalty=1.0),
    "balanced": Sampling(temperature=0.5, top_p=0.9, repetition_penalty=1.1),
    "creative": Sampling(temperature=0.8, top_p=0.95, repetition_penalty=1.15),
}
