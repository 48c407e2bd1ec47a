"""Question variants (issue 23): each trained question also trained in rule-written rewordings, same answer.

Trained on each question in one wording, a small model learns the wording: asked the same fact in other words it
answers a neighbouring fact. With `QUESTION_VARIANTS=on` every question/answer training row (KorQuAD/SQuAD, qa
columns) is also trained as up to three rewordings written by grammar rules, not by a model (the bundled base,
asked to reword, copied or garbled 14 of 15 questions: docs/QUALITY.md):
- Korean: a topic particle of the first two words made the subject (은 -> 이, 는 -> 가; compound particles such as 에는
  and quotatives such as 라는 left alone) with the genitive 의 dropped (not from nouns ending in 의); the polite
  question ending made formal (세워졌나요 -> 세워졌습니까, 누구인가요 -> 누구입니까); a framing sentence before the question.
- English: a wh-word swapped (In what year -> When, What year -> In which year, Which <-> What); a framing sentence.
Questions in other languages get no variants.

The variants are training rows only, counted apart (data_stats.json `variant_rows`), like PASSAGE_ROWS.
NUM_EPOCHS=auto chooses the epochs from the input rows, as measured, so on a small file the variants add steps (2.7x
on the invented-fact files); on a large file, where the seed's three passes decide, they count as passes
(finetune/defaults.py). A variant that asks any input row's question (a held-out one included, whatever its answer)
or a question of EVAL_PATH is not trained: it would train a question the report scores as unseen, or teach one
question two answers. A variant that would lose its answer to
MAX_SEQ_LENGTH, or break MAX_LENGTH_POLICY=drop/fail, is left out (it never stops a run).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

from finetune.config import RunConfig
from finetune.data.formats import format_of, normalise, qa_columns

# What QUESTION_VARIANTS=auto means; measured in docs/QUALITY.md (issue 23).
AUTO = "off"
# The formats whose rows are one question and one answer, and the raw field that holds the question.
QUESTION_FORMATS = ("korquad", "qa")
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_HANGUL0, _HANGUL1 = 0xAC00, 0xD7A3
_ENGLISH_WH = re.compile(r"(?i)\b(what|which|when|who|whom|whose|where|why|how)\b")
_TOPIC = {"은": "이", "는": "가"}  # topic -> subject marker (the reverse would also hit nouns ending in 이/가)
_COMPOUND = set("에서라로도")         # 에는, 에서는, 라는, 으로는, 도는: compound particles and quotatives, left alone
# Nouns that end in 의 (the genitive is not dropped from them): 주의, 회의, 정의, 의의, ...
_UI_NOUNS = ("주의", "회의", "정의", "의의", "동의", "강의", "토의", "논의", "합의", "결의", "예의", "상의", "하의",
             "모의", "건의", "신의", "창의", "편의", "협의", "본의", "민의", "호의", "적의", "열의")


def enabled(cfg: RunConfig) -> bool:
    if cfg.question_variants == "auto":  # the bundled demo's numbers were measured without variants
        from finetune.data.passages import _is_bundled_sample

        return AUTO == "on" and not _is_bundled_sample(cfg.data_path)
    return cfg.question_variants == "on"


def _batchim(ch: str) -> int:
    """The final consonant index of a Hangul syllable (0: none; -1: not a syllable)."""
    o = ord(ch)
    return (o - _HANGUL0) % 28 if _HANGUL0 <= o <= _HANGUL1 else -1


def _drop_genitive(w: str) -> str:
    """'X의' -> 'X' for a word of two or more syllables before the genitive, unless the word is a noun ending in 의."""
    return w[:-1] if len(w) >= 3 and w.endswith("의") and not w.endswith(_UI_NOUNS) else w


def _polite_formal(q: str) -> str | None:
    """'...나요?' / '...인가요?' -> the formal '...습니까?' / '...ㅂ니까?' / '...입니까?' (an adjective's '...ㄴ가요?' is
    left alone: its formal form needs the stem)."""
    m = re.search(r"(\S*?)(인가요|나요)\?\s*$", q)
    if not m:
        return None
    stem, end = m.group(1), m.group(2)
    if end == "인가요":
        return q[:m.start(2)] + "입니까?"
    if not stem:
        return None
    last = stem[-1]
    b = _batchim(last)
    if b < 0:
        return None
    if b == 0:  # no final consonant: the ending takes ㅂ (17 code points on in the syllable block)
        return q[:m.start(1)] + stem[:-1] + chr(ord(last) + 17) + "니까?"
    return q[:m.start(1)] + stem + "습니까?"


def reword(q: str) -> list[str]:
    """Rule-written rewordings of question `q`, none equal to it or to each other (empty for other languages)."""
    out = []
    if _HANGUL.search(q):
        words = q.split()
        for i, w in enumerate(words[:2]):  # the sentence's topic: its first or second word (a two-word name)
            if i < len(words) - 1 and len(w) >= 3 and w[-1] in _TOPIC and w[-2] not in _COMPOUND and \
                    (w[-1] == "은") == (_batchim(w[-2]) > 0):
                words = words[:i] + [w[:-1] + _TOPIC[w[-1]]] + words[i + 1:]
                break
        out.append(" ".join(_drop_genitive(w) if i < len(words) - 1 else w for i, w in enumerate(words)))
        out.append(_polite_formal(q))
        out.append(f"궁금한 게 있어요. {q}")
    elif _ENGLISH_WH.search(q):
        a = re.sub(r"^In what year\b", "When", q)
        a = re.sub(r"^What year\b", "In which year", a) if a == q else a
        a = re.sub(r"^Which\b", "What", a) if a == q else a
        a = re.sub(r"^What\b(?! year)", "Which", a) if a == q else a
        out += [a, f"Do you know this? {q}"]
    seen, res = {q}, []
    for x in out:
        if x and x not in seen:
            seen.add(x)
            res.append(x)
    return res


def count(cfg: RunConfig, raw: Any) -> int:
    """The variants a raw row will add, before the gate (the epoch rule counts them: finetune/defaults.py)."""
    fmt = format_of(raw, cfg.data_format, cfg.columns) if isinstance(raw, dict) else None
    q = raw.get(_question_field(fmt, cfg.columns or qa_columns(raw))) if fmt in QUESTION_FORMATS else None
    return len(reword(q.strip())) if isinstance(q, str) else 0


def _question_field(fmt: str, columns: dict | None) -> str:
    """The raw field that holds a question/answer row's question."""
    return (columns or {}).get("question", "question") if fmt == "qa" else "question"


def _question(norm: dict) -> bytes | None:
    """A 16-byte hash of a normalised row's first user turn (its question), or None for text rows."""
    user = next((m["content"] for m in norm.get("messages", ()) if m["role"] == "user"), None)
    return None if user is None else hashlib.blake2b(user.strip().encode(), digest_size=16).digest()


class Variants:
    """Collects the variants of the training rows' questions, in the order the rows came, in a spool file in
    `spool_dir` (the prepare stage keeps its memory flat whatever the file's size: a hash per input question)."""

    def __init__(self, cfg: RunConfig, spool_dir: Path):
        self.on = enabled(cfg)
        self.qa_with_context = cfg.qa_with_context
        self._questions: set[bytes] = set()  # every kept row's question, trained or held out
        self._path = spool_dir / "variants.spool"
        self._spool = open(self._path, "w+", encoding="utf-8") if self.on else None

    def kept(self, norm: dict) -> None:
        """A row the gate kept (for training or held out): no variant may ask its question."""
        if self.on and (h := _question(norm)) is not None:
            self._questions.add(h)

    def add(self, raw: Any, fmt: str, columns: dict | None, where: str) -> None:
        """A training row: its question's variants are spooled."""
        if not self.on or fmt not in QUESTION_FORMATS or not isinstance(raw, dict):
            return
        field = _question_field(fmt, columns)
        q = raw.get(field)
        if not isinstance(q, str):
            return
        for v in reword(q.strip()):
            norm = normalise({**raw, field: v}, fmt, self.qa_with_context, columns)
            self._spool.write(json.dumps({"where": where, "format": fmt, **norm}, ensure_ascii=False) + "\n")

    def rows(self, eval_questions: set[str] = frozenset()) -> Iterator[dict]:
        """Normalised training rows `{"id", "format", "messages"}`, leaving out any that asks an input row's
        question (trained or held out), an earlier variant's, or a question of the evaluation file
        (`eval_questions`: EVAL_PATH's, which the report scores as not trained)."""
        if self._spool is None:
            return
        seen = self._questions | {_question({"messages": [{"role": "user", "content": q}]}) for q in eval_questions}
        try:
            self._spool.seek(0)
            for i, line in enumerate(self._spool, 1):
                r = json.loads(line)
                where, fmt = r.pop("where"), r.pop("format")
                h = _question(r)
                if h not in seen:
                    seen.add(h)
                    yield {"id": f"variant:{i} of {where}", "format": fmt, **r}
        finally:
            self.close()

    def close(self) -> None:
        """Remove the spool (idempotent): it must not be renamed into data/ with the prepared files."""
        if self._spool is not None:
            self._spool.close()
            self._path.unlink(missing_ok=True)
