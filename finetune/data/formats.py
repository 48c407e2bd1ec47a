"""Recognising the shape of a row and normalising it to one form.

A normalised row is either a conversation `{"messages": [{"role", "content"}, ...]}` or plain text `{"text"}`.
Files are read by finetune/data/readers.py; this module sees one parsed row (a dict) at a time.

Question/answer rows are found by their column names (`QA_COLUMNS`, matched without regard to case, as
spreadsheet headers vary) or mapped explicitly with DATA_COLUMNS.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from finetune.data.readers import RawRow, iter_raw_rows  # noqa: F401  (callers that read and normalise import both here)

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}
# (question column, answer column) pairs in the order they are tried. instruction/output rows are alpaca, and
# auto-detection calls input/output rows seed 003's input_output first; DATA_FORMAT=qa reads them here too.
QA_COLUMNS = (("question", "answer"), ("prompt", "response"), ("prompt", "completion"), ("query", "response"),
              ("input", "output"))
CONTEXT_COLUMNS = ("context", "passage")


class RowError(ValueError):
    """A row that cannot be used; the message is the reason recorded in rejected.jsonl, `kind` its category."""

    @property
    def kind(self) -> str:
        msg = str(self.args[0]) if self.args else ""
        for marker in ("missing field", "must be a string", "is empty", "unknown role", "no assistant turn",
                       "system message", "must be a non-empty list", "must be an object", "expected a JSON object",
                       "no question/answer columns"):
            if marker in msg:
                return marker
        return msg


# ----------------------------------------------------------------------------------------------------
def detect(row: Any) -> str | None:
    """The format of one row, from its keys; None when nothing fits."""
    if not isinstance(row, dict):
        return None
    if row.get("__squad__"):
        return "korquad"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        conv = row["conversations"]
        if isinstance(conv, list) and conv and isinstance(conv[0], dict) and "from" in conv[0]:
            return "sharegpt"
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "input" in row and "output" in row:
        return "input_output"
    if "question" in row and "context" in row and isinstance(row.get("answers"), (dict, list)):
        return "korquad"  # a flattened SQuAD/KorQuAD row, as the Hugging Face squad datasets store them
    if qa_columns(row):
        return "qa"
    if "text" in row:
        return "text"
    return None


def format_of(row: Any, data_format: str, columns: dict[str, str] | None) -> str | None:
    """A row's format as the run reads it: DATA_COLUMNS means qa, DATA_FORMAT=auto detects, else DATA_FORMAT."""
    return "qa" if columns else detect(row) if data_format == "auto" else data_format


def qa_columns(row: dict) -> dict[str, str] | None:
    """{"question": key, "answer": key[, "context": key]} for the first common pair of names the row has."""
    by_lower = {k.strip().lower(): k for k in row if isinstance(k, str)}
    for q, a in QA_COLUMNS:
        if q in by_lower and a in by_lower:
            cols = {"question": by_lower[q], "answer": by_lower[a]}
            ctx = next((by_lower[c] for c in CONTEXT_COLUMNS if c in by_lower), None)
            return {**cols, "context": ctx} if ctx else cols
    return None


def normalise(row: Any, fmt: str, qa_with_context: bool, columns: dict[str, str] | None = None) -> dict:
    """Turn one raw row of format `fmt` into `{"messages": [...]}` or `{"text": ...}`; raise RowError.
    `columns` (format qa) is DATA_COLUMNS' mapping; without it the common names are looked up in the row."""
    if not isinstance(row, dict):
        raise RowError(f"row is a {type(row).__name__}, expected a JSON object")
    if fmt == "korquad":
        question = _text(row, "question")
        answers = row.get("answers")
        if isinstance(answers, dict) and isinstance(answers.get("text"), list):  # {"text": [...], "answer_start": [...]}
            answers = [{"text": t} for t in answers["text"]]
        if not isinstance(answers, list) or not answers or not isinstance(answers[0], dict):
            raise RowError("field 'answers' must be a non-empty list of {text, answer_start}")
        answer = _text(answers[0], "text", "answers[0].text")
        context = row.get("context") if isinstance(row.get("context"), str) else ""
        prompt = f"{context.strip()}\n\n{question}" if qa_with_context else question
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    if fmt == "qa":
        cols = columns or qa_columns(row)
        if cols is None:
            names = " or ".join(f"{q}/{a}" for q, a in QA_COLUMNS)
            raise RowError(f"no question/answer columns (fields: {', '.join(map(str, list(row)[:6]))}; "
                           f"looked for {names}); name them with DATA_COLUMNS")
        question, answer = _text(row, cols["question"]), _text(row, cols["answer"])
        if qa_with_context and cols.get("context"):
            question = f"{_text(row, cols['context'])}\n\n{question}"
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if fmt == "input_output":
        return {"messages": [{"role": "user", "content": _text(row, "input")},
                             {"role": "assistant", "content": _text(row, "output")}]}
    if fmt == "alpaca":
        instruction = _text(row, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise RowError(f"field 'input' must be a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra.strip()}" if extra.strip() else instruction
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]}
    if fmt == "sharegpt":
        turns = _turns(row, "conversations")
        msgs = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise RowError(f"conversations[{i}] must be an object with 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                raise RowError(f"conversations[{i}]: unknown role {t['from']!r} (allowed: {', '.join(sorted(SHAREGPT_ROLES))})")
            msgs.append({"role": role, "content": _content(t["value"], f"conversations[{i}].value")})
        return {"messages": _check_conversation(msgs)}
    if fmt == "messages":
        key = "messages" if "messages" in row else "conversations"
        turns = _turns(row, key)
        msgs = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or "role" not in t or "content" not in t:
                raise RowError(f"{key}[{i}] must be an object with 'role' and 'content'")
            if t["role"] not in ROLES:
                raise RowError(f"{key}[{i}]: unknown role {t['role']!r} (allowed: system, user, assistant)")
            msgs.append({"role": t["role"], "content": _content(t["content"], f"{key}[{i}].content")})
        return {"messages": _check_conversation(msgs)}
    if fmt == "text":
        return {"text": _text(row, "text")}
    raise RowError(f"unknown format {fmt!r}")


def row_key(norm: dict) -> bytes:
    """The identity of a normalised row: two rows with one key train the same tokens."""
    return hashlib.blake2b(json.dumps(norm, sort_keys=True, ensure_ascii=False).encode(), digest_size=16).digest()


def _text(row: dict, key: str, name: str | None = None) -> str:
    name = name or key
    if key not in row or row[key] is None:
        raise RowError(f"missing field '{name}'")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"field '{name}' is empty")
    return value.strip()


def _content(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _turns(row: dict, key: str) -> list:
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field '{key}' must be a non-empty list")
    return turns


def _check_conversation(msgs: list[dict]) -> list[dict]:
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError("conversation has no assistant turn to learn from")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError(f"assistant turn {i} is empty")
        if m["role"] == "system" and i != 0:
            raise RowError(f"system message at turn {i}: only the first turn may be a system message")
    return msgs
