"""Generation under the chat template: the sampling presets, batched answers (evaluate, replay, JOB=generate).

The presets are seed 004's (section 8) and the one table every consumer reads: JOB=chat and JOB=generate through
GEN_PRESET, the Ollama Modelfile's PARAMETER lines. `greedy` is ours: no sampling, what evaluation uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.config import RunConfig


@dataclass(frozen=True)
class Sampling:
    temperature: float          # 0 = greedy (no sampling)
    top_p: float
    repetition_penalty: float
    max_new_tokens: int = 256

    def generate_kwargs(self) -> dict:
        """Keyword arguments for transformers' `generate`: sampling only where the temperature asks for it."""
        kw = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def describe(self) -> str:
        if self.temperature == 0:
            return f"greedy, repetition_penalty {self.repetition_penalty:g}, max {self.max_new_tokens} new tokens"
        return (f"temperature {self.temperature:g}, top_p {self.top_p:g}, repetition_penalty {self.repetition_penalty:g}, "
                f"max {self.max_new_tokens} new tokens")


PRESETS: dict[str, Sampling] = {
    "greedy": Sampling(temperature=0.0, top_p=1.0, repetition_penalty=1.0),
    "factual": Sampling(temperature=0.1, top_p=0.9, repetition_penalty=1.0),
    "balanced": Sampling(temperature=0.5, top_p=0.9, repetition_penalty=1.1),
    "creative": Sampling(temperature=0.8, top_p=0.95, repetition_penalty=1.15),
}


def sampling(cfg: "RunConfig") -> Sampling:
    """GEN_PRESET with the explicit TEMPERATURE / TOP_P / REPETITION_PENALTY / MAX_NEW_TOKENS over it."""
    s = replace(PRESETS[cfg.gen_preset], max_new_tokens=cfg.max_new_tokens)
    explicit = {k: float(v) for k, v in (("temperature", cfg.temperature), ("top_p", cfg.top_p),
                                         ("repetition_penalty", cfg.repetition_penalty)) if v != ""}
    return replace(s, **explicit)


def generate(model, tok, items: list[dict], max_new_tokens: int, device: str, desc: str = "generate",
             batch: int = 16, sample: Sampling | None = None) -> tuple[list[str], list[bool]]:
    """Answers for `items` ({"messages": [...]}) and whether each ended with EOS; greedy unless `sample` says."""
    answers = generate_batched(model, tok, [it["messages"] for it in items], device, desc, batch,
                               sample or replace(PRESETS["greedy"], max_new_tokens=max_new_tokens))
    return [a["answer"] for a in answers], [a["stopped"] for a in answers]


def generate_batched(model, tok, conversations: list[list[dict]], device: str, desc: str = "generate",
                     batch: int = 16, sample: Sampling = PRESETS["greedy"]) -> list[dict]:
    """One answer per conversation, `batch` at a time (left padding): answer, tokens, stopped (ended at EOS)."""
    import torch
    from tqdm import tqdm

    tok.padding_side = "left"
    out = []
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    for i in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch", leave=False):
        enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            g = model.generate(**enc, **sample.generate_kwargs(), eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
        for row in g[:, enc["input_ids"].shape[1]:]:
            ends = (row == tok.eos_token_id).nonzero()
            n = int(ends[0]) + 1 if len(ends) else int((row != tok.pad_token_id).sum())
            out.append({"answer": tok.decode(row, skip_special_tokens=True).strip(), "tokens": n,
                        "stopped": bool(len(ends))})
    return out
