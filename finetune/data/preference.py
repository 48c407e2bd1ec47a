"""Preference pairs (TRAINING_OBJECTIVE=dpo|orpo): format detection, the row gate, the prepared files.

Three shapes are read, the two of TRL's preference formats plus its implicit-prompt one:

    {"prompt": "...", "chosen": "...", "rejected": "..."}                          standard (strings)
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}           conversational
    {"chosen": [messages], "rejected": [messages]}                                 implicit prompt (shared prefix)

Every pair is normalised to the conversational form (a string prompt is one user turn, a string answer one
assistant turn: the chat template renders them as it renders SFT rows) and written as
`{"id", "format", "prompt", "chosen", "rejected", "messages"}`, where `messages` = prompt + chosen, so the stages
that read conversations (merge's parity prompts, evaluate's greedy answers) read pairs unchanged.
The gate keeps the SFT contract: every row is kept or rejected with its place and reason, kept + rejected = input.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from finetune.config import RunConfig
from finetune.data.formats import ROLES, RowError
from finetune.data.readers import Source
from finetune.data.tokenize import TemplateError, render
from finetune.errors import ConfigError, DataError
from finetune.paths import RunPaths, atomic_dir

FORMATS = ("preference_standard", "preference_conversational", "preference_implicit")


def detect(row: Any) -> str | None:
    """The preference format of one raw row, or None when it is not a preference row."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        return None
    if "prompt" not in row:
        return "preference_implicit"
    return "preference_conversational" if isinstance(row.get("prompt"), list) else "preference_standard"


def normalise(row: dict, fmt: str) -> dict:
    """`{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`; raise RowError with the reason."""
    if fmt == "preference_implicit":
        chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if chosen == rejected:
            raise RowError("chosen and rejected are identical")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise RowError("chosen and rejected share no prompt (their first turns differ); give a 'prompt' field")
    elif fmt == "preference_conversational":
        prompt, chosen, rejected = _messages(row, "prompt"), _messages(row, "chosen"), _messages(row, "rejected")
    elif fmt == "preference_standard":
        prompt = [{"role": "user", "content": _string(row, "prompt")}]
        chosen = [{"role": "assistant", "content": _string(row, "chosen", empty_ok=True)}]
        rejected = [{"role": "assistant", "content": _string(row, "rejected", empty_ok=True)}]
    else:
        raise RowError(f"unknown preference format {fmt!r}")
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs or any(m["role"] != "assistant" for m in msgs):
            raise RowError(f"{side} must be assistant turns after the prompt")
        if not any(m["content"].strip() for m in msgs):
            raise RowError(f"{side} answer is empty")
    if prompt[-1]["role"] == "assistant":
        raise RowError("the prompt ends with an assistant turn; the answers must follow a user turn")
    if any(m["role"] == "system" for m in prompt[1:]):
        raise RowError("system message after the first turn")
    if _plain(chosen) == _plain(rejected):
        raise RowError("chosen and rejected are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _plain(msgs: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"].strip()) for m in msgs]


def _string(row: dict, key: str, empty_ok: bool = False) -> str:
    if key not in row or row[key] is None:
        raise RowError(f"missing field '{key}'")
    if not isinstance(row[key], str):
        raise RowError(f"field '{key}' must be a string like the prompt, got {type(row[key]).__name__}")
    if not empty_ok and not row[key].strip():
        raise RowError(f"field '{key}' is empty")
    return row[key].strip()


def _messages(row: dict, key: str) -> list[dict]:
    value = row.get(key)
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{key}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{key}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowError(f"{key}[{i}]: unknown role {m['role']!r} (allowed: system, user, assistant)")
        if not isinstance(m["content"], str):
            raise RowError(f"{key}[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def pair_ids(tok, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected token ids as TRL's DPOTrainer builds them: the prompt rendered with the
    generation header, each answer the rest of the rendered conversation (from where the renders diverge)."""
    prompt = _ids(tok, render(tok, pair["prompt"], add_generation_prompt=True))
    chosen = _ids(tok, render(tok, pair["prompt"] + pair["chosen"]))
    rejected = _ids(tok, render(tok, pair["prompt"] + pair["rejected"]))
    n = min(_common(prompt, chosen), _common(prompt, rejected))
    return prompt[:n], chosen[n:], rejected[n:]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ----------------------------------------------------------------------------------------------------
def prepare(cfg: RunConfig, paths: RunPaths, tok) -> dict:
    """The prepare stage for preference data: the gate, then train/eval/rejected JSONL and data_stats.json."""
    from finetune.data import prepare as sft  # its split, gate and summary are the same for pairs

    seen: dict[bytes, str] = {}
    formats: Counter = Counter()
    reasons: Counter = Counter()
    lengths, completion = [], []
    n_in = n_train = n_eval = truncated = 0
    with atomic_dir(paths.data_dir) as tmp:
        files = {name: open(tmp / f"{name}.jsonl", "w", encoding="utf-8") for name in ("train", "eval", "rejected")}

        def reject(row, reason: str, kind: str | None = None) -> None:
            reasons[kind or reason] += 1
            files["rejected"].write(json.dumps({"line": row.where, "reason": reason, "raw": row.text}, ensure_ascii=False) + "\n")
            if cfg.data_strict:
                raise DataError(f"{row.where}: {reason} (DATA_STRICT=1 stops at the first bad row)")

        source = Source.open(cfg.data_path)
        for row in source.rows():
            n_in += 1
            if row.error:
                reject(row, row.error, row.error.split(" (")[0])
                continue
            fmt = detect(row.raw)
            if fmt is None:
                keys = ", ".join(sorted(row.raw)[:6]) if isinstance(row.raw, dict) else type(row.raw).__name__
                reject(row, f"not a preference pair (fields: {keys}); TRAINING_OBJECTIVE={cfg.training_objective} needs "
                            "prompt/chosen/rejected (README 'Preference training')", "not a preference pair")
                continue
            try:
                pair = normalise(row.raw, fmt)
                p_ids, c_ids, r_ids = pair_ids(tok, pair)
            except RowError as e:
                reject(row, str(e), e.kind)
                continue
            except TemplateError as e:
                raise ConfigError(f"{row.where}: {e}") from None
            if len(p_ids) >= cfg.max_seq_length:
                reject(row, f"the prompt alone has {len(p_ids)} tokens: no room for an answer under MAX_SEQ_LENGTH="
                            f"{cfg.max_seq_length}", "prompt leaves no room under MAX_SEQ_LENGTH")
                continue
            key = hashlib.blake2b(json.dumps(pair, sort_keys=True, ensure_ascii=False).encode(), digest_size=16).digest()
            if key in seen:
                reject(row, f"exact duplicate of {seen[key]}", "exact duplicate")
                continue
            seen[key] = row.where
            longest = len(p_ids) + max(len(c_ids), len(r_ids))
            if longest > cfg.max_seq_length:
                if cfg.max_length_policy == "fail":
                    raise DataError(f"{row.where}: {longest} tokens > MAX_SEQ_LENGTH={cfg.max_seq_length} "
                                    "(MAX_LENGTH_POLICY=fail); raise MAX_SEQ_LENGTH or use truncate/drop")
                if cfg.max_length_policy == "drop":
                    reject(row, f"too long: {longest} tokens > MAX_SEQ_LENGTH={cfg.max_seq_length}",
                           "too long (MAX_LENGTH_POLICY=drop)")
                    continue
                truncated += 1  # the answers' ends are cut, as the trainer's collator does (keep_start)
            formats[fmt] += 1
            lengths.append(longest)
            completion.append(len(c_ids) + len(r_ids))
            record = json.dumps({"id": row.where, "format": fmt, **pair, "messages": pair["prompt"] + pair["chosen"]},
                                ensure_ascii=False) + "\n"
            if sft._is_eval(key, cfg):
                n_eval += 1
                files["eval"].write(record)
            else:
                n_train += 1
                files["train"].write(record)
                if cfg.eval_fraction == 0:
                    files["eval"].write(record)
        for fh in files.values():
            fh.close()
        tally = sft._Tally(n_in=n_in, n_train=n_train, n_eval=n_eval, truncated=truncated, formats=formats,
                           reasons=reasons, lengths=lengths, supervised=completion)
        stats = sft._stats(cfg, source, tally)
        stats["format"], stats["format_from"] = "preference", "TRAINING_OBJECTIVE"
        stats["objective"] = cfg.training_objective
        stats["preference_formats"] = dict(formats)
        stats["answer_tokens_per_pair"] = stats.pop("supervised_tokens_per_row")
        (tmp / "data_stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n")
        sft._gate(cfg, stats, reasons)
        if n_train == 0:
            raise DataError(f"DATA_PATH={cfg.data_path}: every kept pair went to the held-out split "
                            f"(EVAL_FRACTION={cfg.eval_fraction:g}); lower it or add pairs")
    return stats
