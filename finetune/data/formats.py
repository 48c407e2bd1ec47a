"""Reading every input format the seeds use and normalising rows to one shape.

A normalised row is either a conversation `{"messages": [{"role", "content"}, ...]}` or plain text `{"text"}`.
Each raw row carries where it came from (`where`: file and line or item) so rejections can point at it.
Reading streams: JSONL is read line by line; a JSON array or a KorQuAD document is parsed whole (it is one
JSON value), then walked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from finetune.errors import DataError

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}


@dataclass
class RawRow:
    where: str              # "file.jsonl:12" or "file.json item 3"
    raw: Any                # the parsed JSON value, or None when it did not parse
    error: str = ""         # why it could not be read (bad JSON, not UTF-8)
    text: str = ""          # the start of the raw line, for rejected.jsonl


class RowError(ValueError):
    """A row that cannot be used; the message is the reason recorded in rejected.jsonl, `kind` its category."""

    @property
    def kind(self) -> str:
        msg = str(self.args[0]) if self.args else ""
        for marker in ("missing field", "must be a string", "is empty", "unknown role", "no assistant turn",
                       "system message", "must be a non-empty list", "must be an object", "expected a JSON object"):
            if marker in msg:
                return marker
        return msg


# ----------------------------------------------------------------------------------------------------
def iter_raw_rows(path: str | Path, qa_with_context: bool = False) -> Iterator[RawRow]:
    """Yield every row under `path`: a JSON/JSONL file, a folder of them, or a `datasets.save_to_disk` folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"DATA_PATH={path}: no such file or folder")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            yield from _iter_saved_dataset(path)
            return
        files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise DataError(f"DATA_PATH={path}: folder holds no .json or .jsonl files")
        for f in files:
            yield from _iter_file(f)
        return
    yield from _iter_file(path)


def _iter_file(path: Path) -> Iterator[RawRow]:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    is_document = head[:1] == b"[" or (head[:1] == b"{" and not _first_line_is_object(path))
    if is_document:
        try:
            doc = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: JSON does not parse ({e.msg}, column {e.colno})") from None
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            yield from _iter_squad(doc, path)
        elif isinstance(doc, list):
            for i, item in enumerate(doc, 1):
                yield RawRow(f"{path.name} item {i}", item, text=_preview(item))
        else:
            raise DataError(f"{path}: a JSON document must be an array of rows or a KorQuAD/SQuAD object with 'data'")
        return
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(where, None, f"not UTF-8 ({e.reason} at byte {e.start})", line[:200].decode("utf-8", "replace"))
                continue
            try:
                yield RawRow(where, json.loads(text), text=text[:200])
            except json.JSONDecodeError as e:
                yield RawRow(where, None, f"JSON does not parse ({e.msg}, column {e.colno})", text[:200])


def _first_line_is_object(path: Path) -> bool:
    """A file starting with '{' is JSONL when its first line alone is a complete JSON row (a one-line
    KorQuAD/SQuAD document, with its 'data' list, is a document, not a row)."""
    with open(path, "rb") as fh:
        first = fh.readline()
    try:
        value = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return not (isinstance(value, dict) and isinstance(value.get("data"), list))


def _iter_squad(doc: dict, path: Path) -> Iterator[RawRow]:
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            context = para.get("context", "") if isinstance(para, dict) else ""
            for q, qa in enumerate(para.get("qas", []) if isinstance(para, dict) else []):
                where = f"{path.name} data[{a}].paragraphs[{p}].qas[{q}]"
                row = {"__squad__": True, "context": context, **qa} if isinstance(qa, dict) else qa
                yield RawRow(where, row, text=_preview(qa))


def _iter_saved_dataset(path: Path) -> Iterator[RawRow]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    for i, row in enumerate(ds, 1):
        yield RawRow(f"{path.name} row {i}", row, text=_preview(row))


def _preview(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)[:200]
    except (TypeError, ValueError):
        return str(value)[:200]


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
    if "text" in row:
        return "text"
    return None


def normalise(row: Any, fmt: str, qa_with_context: bool) -> dict:
    """Turn one raw row of format `fmt` into `{"messages": [...]}` or `{"text": ...}`; raise RowError."""
    if not isinstance(row, dict):
        raise RowError(f"row is a {type(row).__name__}, expected a JSON object")
    if fmt == "korquad":
        question = _text(row, "question")
        answers = row.get("answers")
        if not isinstance(answers, list) or not answers or not isinstance(answers[0], dict):
            raise RowError("field 'answers' must be a non-empty list of {text, answer_start}")
        answer = _text(answers[0], "text", "answers[0].text")
        prompt = f"{row['context'].strip()}\n\n{question}" if qa_with_context else question
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
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
