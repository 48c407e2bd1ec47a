"""Candidate levers for issue 23, tried by bench/knowledge_sweep.py before any of them enters the product.

Each lever is a cell variable (`LEVER_...=value`) that this module applies to the pipeline's own functions in the
cell's process, so a lever costs no product code until a measurement says it helps; the ones that do are then
built into finetune/ properly (and leave this file). `FP32=1` makes a CUDA run hold and multiply the model in
float32, as a CPU run does, so that GPU cells measure the recipe the CPU demo runs.

- LEVER_PERMS=k        each passage row also trained as k copies with its sentences in a shuffled order
- LEVER_OPENBOOK=1     each QA row with a passage also trained with the passage in the prompt (closed-book kept)
- LEVER_QDROP=p:k      each QA row also trained as k copies of its question with each word dropped with chance p
- LEVER_NEFTUNE=alpha  NEFTune noise on the input embeddings (transformers' neftune_noise_alpha)
- LEVER_QRULES=1       each QA row also trained as the rule-written rewordings of its question (`reword`: Korean
                       particles, genitive and polite ending; English wh-words and a framing), written from grammar,
                       not from the paraphrase files
"""

from __future__ import annotations

import json
import random
import re

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text.strip()) if s]


_HANGUL0, _HANGUL1 = 0xAC00, 0xD7A3


def _batchim(ch: str) -> int:
    """The final consonant index of a Hangul syllable (0: none; -1: not a syllable)."""
    o = ord(ch)
    return (o - _HANGUL0) % 28 if _HANGUL0 <= o <= _HANGUL1 else -1


def _polite_formal(q: str) -> str | None:
    """'...나요?' / '...인가요?' -> the formal '...습니까?' / '...ㅂ니까?' / '...입니까?'."""
    m = re.search(r"(\S*?)(인가요|나요|가요)\?\s*$", q)
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
    if b == 0:  # no final consonant: it takes ㅂ
        stem = stem[:-1] + chr(ord(last) + 17)
        return q[:m.start(1)] + stem + "니까?"
    return q[:m.start(1)] + stem + "습니까?"


def reword(q: str) -> list[str]:
    """Rule-written rewordings of a question (none that equal it)."""
    out = []
    if re.search(r"[\uac00-\ud7a3]", q):
        swap = {"은": "이", "는": "가", "이": "은", "가": "는"}
        words = q.split()
        for i, w in enumerate(words[:-1]):  # the first topic/subject particle of a word of two or more syllables
            if len(w) >= 3 and w[-1] in swap and _batchim(w[-2]) >= 0 and \
                    (w[-1] in "은이") == (_batchim(w[-2]) > 0):
                words = words[:i] + [w[:-1] + swap[w[-1]]] + words[i + 1:]
                break
        a = re.sub(r"(\S{2,})의 ", r"\1 ", " ".join(words))
        out.append(a)
        formal = _polite_formal(q)
        if formal:
            out.append(formal)
        out.append(f"궁금한 게 있어요. {q}")
    else:
        a = re.sub(r"^In what year\b", "When", q)
        a = re.sub(r"^What year\b", "In which year", a) if a == q else a
        a = re.sub(r"^Which\b", "What", a) if a == q else a
        a = re.sub(r"^What\b(?! year)", "Which", a) if a == q else a
        out.append(a)
        out.append(f"Do you know this? {q}")
    seen, res = {q}, []
    for x in out:
        if x not in seen:
            seen.add(x)
            res.append(x)
    return res


def apply(env: dict) -> list[str]:
    """Patch the pipeline for the levers set in `env`; returns what was applied (printed into the cell's log)."""
    applied = []
    if env.get("FP32") == "1":
        import torch

        from finetune import model, trainer

        model.compute_dtype = lambda device: torch.float32
        args = trainer.trainer_args
        trainer.trainer_args = lambda *a, **k: {**args(*a, **k), "bf16": False}
        applied.append("fp32")
    if env.get("LEVER_NEFTUNE"):
        from finetune import trainer

        alpha = float(env["LEVER_NEFTUNE"])
        args2 = trainer.trainer_args
        trainer.trainer_args = lambda *a, **k: {**args2(*a, **k), "neftune_noise_alpha": alpha}
        applied.append(f"neftune {alpha}")
    perms = int(env.get("LEVER_PERMS") or 0)
    openbook = env.get("LEVER_OPENBOOK") == "1"
    qdrop = env.get("LEVER_QDROP") or ""
    qrules = env.get("LEVER_QRULES") == "1"
    if perms or openbook or qdrop or qrules:
        _patch_rows(perms, openbook, qdrop, applied, qrules)
    return applied


def _patch_rows(perms: int, openbook: bool, qdrop: str, applied: list[str], qrules: bool = False) -> None:
    from finetune.data import passages as P
    from finetune.data import prepare

    p_drop, k_drop = (float(qdrop.split(":")[0]), int(qdrop.split(":")[1])) if qdrop else (0.0, 0)
    rng = random.Random(1234)
    extra: list[dict] = []
    add0 = P.Passages.add

    def add(self, raw):
        add0(self, raw)
        ctx, q = P.context_of(raw), raw.get("question") if isinstance(raw, dict) else None
        answers = raw.get("answers") if isinstance(raw, dict) else None
        if not (isinstance(q, str) and isinstance(answers, list) and answers):
            return
        a = answers[0]["text"]
        if openbook and ctx:
            extra.append({"format": "qa", "messages": [{"role": "user", "content": f"{ctx}\n\n{q}"},
                                                      {"role": "assistant", "content": a}]})
        for v in reword(q) if qrules else []:
            extra.append({"format": "qa", "messages": [{"role": "user", "content": v},
                                                      {"role": "assistant", "content": a}]})
        for _ in range(k_drop):
            words = q.split()
            kept = [w for w in words if rng.random() >= p_drop] or words
            extra.append({"format": "qa", "messages": [{"role": "user", "content": " ".join(kept)},
                                                      {"role": "assistant", "content": a}]})

    def rows(self):
        n = 0
        for text in self._seen.values():
            n += 1
            yield {"id": f"passage:{n}", "format": "passage", "text": text}
            sents = _sentences(text)
            for _ in range(perms if len(sents) > 1 else 0):
                order = sents[:]
                while order == sents:
                    rng.shuffle(order)
                n += 1
                yield {"id": f"passage:{n}", "format": "passage", "text": " ".join(order)}
        for i, r in enumerate(extra, 1):
            yield {"id": f"augment:{i}", **r}

    def passage_rows(cfg, tok, passages, train, t):
        n = 0
        for prow in passages.rows():
            train.write(json.dumps(prow, ensure_ascii=False) + "\n")
            n += 1
        return n

    P.Passages.add, P.Passages.rows = add, rows
    prepare._passage_rows = passage_rows
    applied.append(f"rows: perms {perms}, openbook {openbook}, qdrop {qdrop or '-'}, qrules {qrules}")
