"""The evaluate stage: greedy answers from the base and the fine-tuned model, scored, plus retention.

Scores: exact match and contains match on the evaluation questions (by default the training questions, as
seed 000 does), ROUGE-1/2/L, and retention: of the general-knowledge probes the base answers right, the
fraction the fine-tuned model still answers right. With EVAL_PATH, a separate file of questions that were not
trained (for example the same facts asked in other words) is scored beside them: recall versus generalisation.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from finetune import model as model_lib
from finetune.config import RunConfig
from finetune.errors import ConfigError, DataError
from finetune.generation import generate
from finetune.paths import RunPaths, atomic_write_text, followup


def normalise(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).lower()
    # Punctuation becomes a space, except a point or comma inside a number ("-18.0", "1,000"): splitting those
    # would turn "-18.0°C" into a stand-alone "0".
    s = re.sub(r"(?<![0-9])[.,]|[.,](?![0-9])", " ", s)
    s = re.sub(r"[\s\"'`!?;:()\[\]{}<>«»“”‘’、。]+", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, answers: list[str]) -> bool:
    p = normalise(pred)
    return any(p == normalise(a) for a in answers)


def contains_match(pred: str, answers: list[str]) -> bool:
    """The answer appears in the prediction as whole words and whole numbers."""
    p = f" {normalise(pred)} "
    for a in answers:
        a = normalise(a)
        if not a:
            continue
        # Not inside a longer word or number: "8" is not in "18", "0" not in "-18.0", "four" not in "twenty-four".
        if re.search(r"(?<![0-9a-z.,-])" + re.escape(a) + r"(?![0-9a-z]|[.,][0-9])", p):
            return True
    return False


def rouge(preds: list[str], refs: list[str]) -> dict:
    from rouge_score import rouge_scorer

    # Character-level tokens work for Korean and English alike; the default tokenizer drops Hangul.
    class _Chars:
        def tokenize(self, text):
            return [c for c in normalise(text) if not c.isspace()]

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Chars())
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(preds, refs):
        for k, v in scorer.score(r, p).items():
            totals[k] += v.fmeasure
    n = max(len(preds), 1)
    return {k: round(v / n, 4) for k, v in totals.items()}


def questions_from_eval(paths: RunPaths, limit: int = 0) -> list[dict]:
    rows = [json.loads(l) for l in open(paths.eval_file, encoding="utf-8")] if paths.eval_file.is_file() else []
    qs = []
    for r in rows:
        if "messages" not in r:
            continue
        last = max(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
        qs.append({"id": r["id"], "messages": r["messages"][:last], "answers": [r["messages"][last]["content"]]})
    return qs[:limit] if limit else qs


def probes(cfg: RunConfig) -> list[dict]:
    if cfg.retention_set.lower() in ("", "none", "off"):
        return []
    p = Path(cfg.retention_set)
    if not p.is_file():
        raise ConfigError(f"RETENTION_SET={p}: no such file (set RETENTION_SET=none to turn retention off)")
    try:
        items = json.loads(p.read_text(encoding="utf-8"))
        return [{"id": x["id"], "messages": [{"role": "user", "content": x["question"]}], "answers": list(x["answers"])}
                for x in items]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"RETENTION_SET={p}: expected a JSON list of {{id, question, answers}} ({e})") from None


def eval_set(cfg: RunConfig) -> tuple[list[dict], list[str]]:
    """EVAL_PATH's questions (any supported format, detected per row) and the reasons for rows it could not use."""
    from finetune.data.formats import RowError, detect, iter_raw_rows, normalise

    path = cfg.eval_set_path
    if not path:
        return [], []
    if not Path(path).exists():
        raise ConfigError(f"EVAL_PATH={path}: no such file or folder (EVAL_PATH=none turns it off)")
    items, skipped = [], []
    for row in iter_raw_rows(path):
        fmt = None if row.error else detect(row.raw)
        try:
            if fmt is None:
                raise RowError(row.error or "unrecognised row")
            msgs = normalise(row.raw, fmt, cfg.qa_with_context).get("messages")
            if not msgs:
                raise RowError("a text row has no question to ask")
        except RowError as e:
            skipped.append(f"{row.where}: {e}")
            continue
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        answers = [msgs[last]["content"]]
        if fmt == "korquad":  # SQuAD-style rows may accept several answers
            answers += [a["text"].strip() for a in row.raw["answers"][1:] if isinstance(a, dict) and isinstance(a.get("text"), str)]
        items.append({"id": row.where, "messages": msgs[:last], "answers": answers})
    if not items:
        raise DataError(f"EVAL_PATH={path}: no usable question/answer rows ({len(skipped)} skipped; first: "
                        f"{skipped[0] if skipped else 'none'})")
    return items, skipped


def score(items: list[dict], preds: list[str]) -> dict:
    em = [exact_match(p, it["answers"]) for p, it in zip(preds, items)]
    cm = [contains_match(p, it["answers"]) for p, it in zip(preds, items)]
    n = max(len(items), 1)
    return {"n": len(items), "exact_match": round(sum(em) / n, 4), "contains_match": round(sum(cm) / n, 4),
            "rouge": rouge(preds, [it["answers"][0] for it in items]), "_cm": cm}


def retention(probe_items: list[dict], base_ok: list[bool], tuned_ok: list[bool],
              base_preds: list[str] | None = None, tuned_preds: list[str] | None = None) -> dict:
    known = [i for i, ok in enumerate(base_ok) if ok]
    kept = [i for i in known if tuned_ok[i]]
    lost = [i for i in known if not tuned_ok[i]]
    out = {"kept": len(kept), "of": len(known), "fraction": round(len(kept) / len(known), 4) if known else None,
           "lost": [probe_items[i]["messages"][0]["content"] for i in lost],
           "gained": sum(1 for i, ok in enumerate(tuned_ok) if ok and not base_ok[i])}
    if base_preds is not None and tuned_preds is not None:  # what it said instead: forgetting has a shape
        out["lost_answers"] = [{"question": probe_items[i]["messages"][0]["content"], "base": base_preds[i][:200],
                                "finetuned": tuned_preds[i][:200]} for i in lost]
    return out


def evaluate(cfg: RunConfig, paths: RunPaths, base: str, device: str = "cpu", log=print) -> dict:
    """Write eval/report.json, report.md and the loss curve; return the report."""
    from transformers import AutoTokenizer

    tuned_dir = paths.merged if (paths.merged / "config.json").is_file() else None
    if tuned_dir is None and not (paths.adapters / "adapter_config.json").is_file():
        raise ConfigError(f"nothing to evaluate: no merged model in {paths.merged} and no adapter in {paths.adapters}")
    tok = AutoTokenizer.from_pretrained(tuned_dir or paths.adapters)
    qs = questions_from_eval(paths, cfg.eval_max_questions)
    if not qs:
        raise ConfigError(f"no evaluation questions in {paths.eval_file}: prepare them first: "
                          f"{followup(cfg, 'prepare', data=True)}")
    pr = probes(cfg)
    extra, skipped = eval_set(cfg)

    results = {}
    for label in ("base", "finetuned"):
        # One generation pass over both sets (batched together); without EVAL_PATH the cache key is unchanged.
        preds, probe_preds = _answers(label, cfg, base, tuned_dir, paths, tok, qs + extra, pr, device)
        preds, extra_preds = preds[:len(qs)], preds[len(qs):]
        results[label] = {"scores": score(qs, preds), "preds": preds,
                          "probe_ok": [contains_match(p, it["answers"]) for p, it in zip(probe_preds, pr)],
                          "probe_preds": probe_preds}
        if extra:
            results[label].update(extra_scores=score(extra, extra_preds), extra_preds=extra_preds)

    report = _report(cfg, paths, qs, pr, results)
    if cfg.preference:  # issue 20: held-out pairs, base and fine-tuned
        from finetune.preference import pair_metrics

        report["preference"] = pair_metrics(cfg, paths, base, device, log)
    if cfg.lm_eval_tasks:  # lm-evaluation-harness beside our own scores
        from finetune import harness

        report["harness"] = harness.run(cfg, paths, base, device, log)
    if extra:
        report["eval_set"] = _eval_set_report(cfg, extra, skipped, results)
    _write(paths, report)
    log(summary(report, paths))
    return report


AUTO_TOKENS_MIN, AUTO_TOKENS_MARGIN, AUTO_TOKENS_MAX = 32, 16, 256


def token_budget(cfg: RunConfig, tok, items: list[dict]) -> int:
    """Greedy tokens per answer: EVAL_MAX_NEW_TOKENS, or auto: the longest reference answer in this tokenizer plus
    a margin (a sentence answer of 40-80 tokens cut at 32 cannot contain-match), at least 32, at most 256."""
    if cfg.eval_max_new_tokens > 0:
        return cfg.eval_max_new_tokens
    longest = max((len(tok(a, add_special_tokens=False)["input_ids"]) for it in items for a in it["answers"]), default=0)
    return min(AUTO_TOKENS_MAX, max(AUTO_TOKENS_MIN, longest + AUTO_TOKENS_MARGIN))


def _answers(label, cfg, base, tuned_dir, paths, tok, qs, pr, device) -> tuple[list[str], list[str]]:
    """Greedy answers to the questions and probes. The base model's are cached: they depend only on the base,
    the prompts and the generation length, and every run of the same base would otherwise recompute them."""
    import hashlib

    key = None
    if label == "base":
        ident = json.dumps([model_lib.model_identity(base), tok.chat_template, token_budget(cfg, tok, qs),
                            token_budget(cfg, tok, pr), [q["messages"] for q in qs],
                            [p["messages"] for p in pr], device], ensure_ascii=False)
        key = cfg.cache_dir / "eval" / (hashlib.sha256(ident.encode()).hexdigest()[:20] + ".json")
        if key.is_file():
            cached = json.loads(key.read_text(encoding="utf-8"))
            return cached["preds"], cached["probe_preds"]
    model = _load(label, base, tuned_dir, paths, tok, device)
    preds, _ = generate(model, tok, qs, token_budget(cfg, tok, qs), device, f"evaluate {label}")
    probe_preds, _ = generate(model, tok, pr, token_budget(cfg, tok, pr), device, f"retention {label}") if pr else ([], [])
    if key is not None:
        atomic_write_text(key, json.dumps({"preds": preds, "probe_preds": probe_preds}, ensure_ascii=False))
    return preds, probe_preds


def _load(label, base, tuned_dir, paths, tok, device):
    if label == "base":
        return model_lib.load_plain(base, tok, device)
    if tuned_dir is not None:
        return model_lib.load_plain(str(tuned_dir), tok, device)
    from peft import PeftModel

    return PeftModel.from_pretrained(model_lib.load_plain(base, tok, device), str(paths.adapters)).eval()


def _report(cfg, paths, qs, pr, results) -> dict:
    b, f = results["base"], results["finetuned"]
    report = {"model": cfg.base_model_name, "adapter": str(paths.adapters),
              "finetuned_from": str(paths.merged if (paths.merged / "config.json").is_file() else paths.adapters),
              "base": {k: v for k, v in b["scores"].items() if not k.startswith("_")},
              "finetuned": {k: v for k, v in f["scores"].items() if not k.startswith("_")},
              "examples": [{"id": q["id"], "question": q["messages"][-1]["content"][:200], "answer": q["answers"][0],
                            "base": bp[:200], "finetuned": fp[:200], "base_ok": bo, "finetuned_ok": fo}
                           for q, bp, fp, bo, fo in zip(qs, b["preds"], f["preds"], b["scores"]["_cm"], f["scores"]["_cm"])]}
    if pr:
        report["retention"] = retention(pr, b["probe_ok"], f["probe_ok"], b["probe_preds"], f["probe_preds"])
    report["training"] = _training_summary(paths)
    return report


def _eval_set_report(cfg, extra, skipped, results) -> dict:
    b, f = results["base"], results["finetuned"]
    return {"path": cfg.eval_set_path, "skipped": skipped[:20], "n_skipped": len(skipped),
            "base": {k: v for k, v in b["extra_scores"].items() if not k.startswith("_")},
            "finetuned": {k: v for k, v in f["extra_scores"].items() if not k.startswith("_")},
            "examples": [{"id": q["id"], "question": q["messages"][-1]["content"][:200], "answer": q["answers"][0],
                          "base": bp[:200], "finetuned": fp[:200], "base_ok": bo, "finetuned_ok": fo}
                         for q, bp, fp, bo, fo in zip(extra, b["extra_preds"], f["extra_preds"],
                                                      b["extra_scores"]["_cm"], f["extra_scores"]["_cm"])]}


def _training_summary(paths: RunPaths) -> dict:
    if not paths.metrics.is_file():
        return {}
    recs = [json.loads(l) for l in open(paths.metrics, encoding="utf-8")]
    losses = [r for r in recs if r.get("loss") is not None]
    evals = [r for r in recs if r.get("eval_loss") is not None]
    out = {"steps": losses[-1]["step"] if losses else 0}
    if losses:
        out.update(first_loss=losses[0]["loss"], last_loss=losses[-1]["loss"])
    if evals:
        out.update(last_eval_loss=evals[-1]["eval_loss"], best_eval_loss=min(e["eval_loss"] for e in evals))
    return out


def _write(paths: RunPaths, report: dict) -> None:
    from finetune.report import loss_curve, markdown

    paths.eval_dir.mkdir(parents=True, exist_ok=True)
    png = loss_curve(paths.metrics, paths.eval_dir / "loss_curve.png")
    atomic_write_text(paths.report_json, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(paths.eval_dir / "report.md", markdown(report, png))


def summary(report: dict, paths: RunPaths) -> str:
    b, f = report["base"], report["finetuned"]
    lines = [f"[evaluate] {b['n']} questions: contains match {b['contains_match']:.0%} (base) -> {f['contains_match']:.0%} "
             f"(fine-tuned); exact match {b['exact_match']:.0%} -> {f['exact_match']:.0%}"]
    e = report.get("eval_set")
    if e:
        lines.append(f"[evaluate] EVAL_PATH, {e['base']['n']} questions not trained on: contains match "
                     f"{e['base']['contains_match']:.0%} (base) -> {e['finetuned']['contains_match']:.0%} (fine-tuned)"
                     + (f"; {e['n_skipped']} rows skipped" if e["n_skipped"] else ""))
    r = report.get("retention")
    if r and r["of"]:
        lines.append(f"[evaluate] retention: {r['kept']}/{r['of']} general questions the base knew are still right "
                     f"({r['fraction']:.0%})")
    if report.get("preference"):
        from finetune.preference import summary as preference_summary

        lines.append(preference_summary(report["preference"]))
    lines.append(f"[evaluate] report: {paths.eval_dir / 'report.md'}")
    return "\n".join(lines)
