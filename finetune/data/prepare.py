"""The prepare stage: raw rows -> gate -> normalised train/eval JSONL, rejected.jsonl and data_stats.json.

Every input row ends up either kept (train or eval) or in rejected.jsonl with its place and reason:
kept + rejected = input, always. Output is written to a temporary folder and renamed into place; when the gate
stops the run, what is renamed into place is the evidence alone (rejected.jsonl, data_stats.json).
Memory stays flat: rows stream to disk; only a 16-byte hash and a few integers per row stay in memory.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from finetune.config import RunConfig
from finetune.data.formats import RowError, format_of, normalise, qa_columns, row_key
from finetune.data.passages import Passages
from finetune.data.readers import Source
from finetune.data.variants import Variants
from finetune.data.tokenize import TemplateError, encode
from finetune.errors import ConfigError, DataError
from finetune.paths import RunPaths, atomic_dir


@dataclass
class _Tally:
    n_in: int = 0
    n_train: int = 0
    n_eval: int = 0
    truncated: int = 0
    formats: Counter = field(default_factory=Counter)             # kept rows per format
    columns: Counter = field(default_factory=Counter)             # kept qa rows per column mapping
    first_at: dict = field(default_factory=dict)                  # format -> where its first rows are
    reasons: Counter = field(default_factory=Counter)
    lengths: list = field(default_factory=list)
    supervised: list = field(default_factory=list)


def prepare(cfg: RunConfig, paths: RunPaths, tok) -> dict:
    """Run the gate over DATA_PATH with tokenizer `tok`; return the stats written to data_stats.json.

    When the gate stops the run, data/ holds the evidence (rejected.jsonl, data_stats.json with the reason) and
    no train/eval files, so no later stage can train on data that failed the gate."""
    if cfg.preference:  # pairs have their own gate (finetune/data/preference.py)
        from finetune.data import preference

        return preference.prepare(cfg, paths, tok)
    source = Source.open(cfg.data_path)
    tally = _Tally()
    passages = Passages(cfg)
    stop: DataError | None = None
    with atomic_dir(paths.data_dir) as tmp:
        variants = Variants(cfg, tmp)
        eval_questions = _eval_questions(cfg) if variants.on else set()  # EVAL_PATH's own errors, before any row
        files = {name: open(tmp / f"{name}.jsonl", "w", encoding="utf-8") for name in ("train", "eval", "rejected")}
        try:
            _filter_rows(cfg, tok, source, files, tally, passages, variants)
            n_passages = _added_rows(cfg, tok, passages.rows(), files["train"], tally)
            n_variants = _added_rows(cfg, tok, variants.rows(eval_questions), files["train"], tally, optional=True)
        except DataError as e:
            stop, n_passages, n_variants = e, 0, 0
        finally:
            for fh in files.values():
                fh.close()
            variants.close()
        stats = _stats(cfg, source, tally)
        stats["passage_rows"], stats["variant_rows"] = n_passages, n_variants
        if stop is None:
            try:
                _check_mixed_formats(tally.formats, tally.first_at)
                _gate(cfg, stats, tally.reasons)
            except DataError as e:
                stop = e
        if stop is not None:
            stats["stopped"] = str(stop).split("\n")[0]
            for name in ("train", "eval"):
                (tmp / f"{name}.jsonl").unlink()
        (tmp / "data_stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n")
    if stop is not None:
        first, _, rest = str(stop).partition("\n")
        raise DataError(f"{first}\n  every rejected row with its place and reason: {paths.rejected_file}"
                        f"\n  counts: {paths.data_stats}" + (f"\n{rest}" if rest else "")) from None
    return stats


def _filter_rows(cfg: RunConfig, tok, source: Source, files: dict, t: _Tally, passages: Passages,
                 variants: Variants) -> None:
    """Every row to train, eval or rejected; raises DataError where a setting says to stop."""
    seen: dict[bytes, str] = {}

    def reject(row, reason: str, kind: str | None = None) -> None:
        t.reasons[kind or reason] += 1
        files["rejected"].write(json.dumps({"line": row.where, "reason": reason, "raw": row.text}, ensure_ascii=False) + "\n")
        if cfg.data_strict:
            raise DataError(f"{row.where}: {reason} (DATA_STRICT=1 stops at the first bad row)")

    for row in tqdm(source.rows(), desc="prepare", unit="row", mininterval=2):
        t.n_in += 1
        if row.error:
            reject(row, row.error, row.error.split(" (")[0])
            continue
        if not isinstance(row.raw, dict):
            reject(row, f"row is a {type(row.raw).__name__}, expected a JSON object", "expected a JSON object")
            continue
        row_fmt = format_of(row.raw, cfg.data_format, cfg.columns)
        if row_fmt is None and {"chosen", "rejected"} <= set(row.raw):
            reject(row, "a preference pair (chosen/rejected): set TRAINING_OBJECTIVE=dpo or orpo",
                   "preference pair (set TRAINING_OBJECTIVE=dpo or orpo)")
            continue
        if row_fmt is None:
            keys = ", ".join(map(str, sorted(row.raw, key=str)[:6]))
            reject(row, f"unrecognised row (fields: {keys}); see README 'Data formats' (or set DATA_COLUMNS)", "unrecognised row")
            continue
        columns = (cfg.columns or qa_columns(row.raw)) if row_fmt == "qa" else None
        try:
            norm = normalise(row.raw, row_fmt, cfg.qa_with_context, columns)
            enc = encode(tok, norm, cfg.max_seq_length, cfg.train_on_inputs)
        except RowError as e:
            reject(row, str(e), e.kind)
            continue
        except TemplateError as e:
            raise ConfigError(f"{row.where}: {e}") from None
        key = row_key(norm)
        if key in seen:
            reject(row, f"exact duplicate of {seen[key]}", "exact duplicate")
            continue
        seen[key] = row.where
        if enc.full_length > cfg.max_seq_length:
            if cfg.max_length_policy == "fail":
                raise DataError(f"{row.where}: {enc.full_length} tokens > MAX_SEQ_LENGTH={cfg.max_seq_length} "
                                "(MAX_LENGTH_POLICY=fail); raise MAX_SEQ_LENGTH or use truncate/drop")
            if cfg.max_length_policy == "drop":
                reject(row, f"too long: {enc.full_length} tokens > MAX_SEQ_LENGTH={cfg.max_seq_length}", "too long (MAX_LENGTH_POLICY=drop)")
                continue
            if enc.supervised == 0:
                reject(row, f"no supervised tokens left after truncation to MAX_SEQ_LENGTH={cfg.max_seq_length}", "answer cut off by MAX_SEQ_LENGTH")
                continue
            t.truncated += 1
        if enc.supervised == 0:
            reject(row, "no supervised tokens (nothing for the model to learn)")
            continue
        t.formats[row_fmt] += 1
        if columns:
            t.columns[", ".join(f"{k}={v}" for k, v in columns.items())] += 1
        if len(t.first_at.setdefault(row_fmt, [])) < 5:
            t.first_at[row_fmt].append(row.where)
        t.lengths.append(enc.full_length)
        t.supervised.append(enc.supervised)
        variants.kept(norm)
        record = json.dumps({"id": row.where, "format": row_fmt, **norm}, ensure_ascii=False) + "\n"
        if _is_eval(key, cfg):
            t.n_eval += 1
            files["eval"].write(record)
        else:
            t.n_train += 1
            files["train"].write(record)
            passages.add(row.raw)
            variants.add(row.raw, row_fmt, columns, row.where)
            if cfg.eval_fraction == 0:
                files["eval"].write(record)  # seed 000: evaluate on the training questions


def _added_rows(cfg: RunConfig, tok, rows, train, t: _Tally, optional: bool = False) -> int:
    """Rows the pipeline adds to the training rows (PASSAGE_ROWS' passages, QUESTION_VARIANTS' rewordings). Not input
    rows: training only, counted apart (data_stats.json `passage_rows`, `variant_rows`). `optional` rows that would
    lose their answer to MAX_SEQ_LENGTH, or break MAX_LENGTH_POLICY=drop/fail, are left out."""
    n = 0
    for prow in rows:
        enc = encode(tok, {k: v for k, v in prow.items() if k in ("text", "messages")}, cfg.max_seq_length, cfg.train_on_inputs)
        long = enc.full_length > cfg.max_seq_length
        if optional and (enc.supervised == 0 or (long and cfg.max_length_policy != "truncate")):
            continue
        t.truncated += long
        train.write(json.dumps(prow, ensure_ascii=False) + "\n")
        n += 1
    return n


def _eval_questions(cfg: RunConfig) -> set[str]:
    """EVAL_PATH's questions: what the report scores as not trained, so no variant may train one."""
    if not cfg.eval_set_path:
        return set()
    from finetune.evaluate import eval_set

    return {m["content"].strip() for item in eval_set(cfg)[0] for m in item["messages"] if m["role"] == "user"}


def _is_eval(key: bytes, cfg: RunConfig) -> bool:
    # A hash split is deterministic and needs no second pass over the data.
    if cfg.eval_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key + str(cfg.seed).encode(), digest_size=8).digest(), "big")
    return (h % 1_000_000) < cfg.eval_fraction * 1_000_000


def _check_mixed_formats(formats: Counter, first_at: dict[str, list[str]]) -> None:
    # input/output rows are one question and one answer, as qa rows are: files of both may share a folder.
    if len(formats) > 1 and set(formats) != {"input_output", "qa"}:
        major = formats.most_common(1)[0][0]
        others = "; ".join(f"{k} at {', '.join(first_at[k])}" for k in formats if k != major)
        raise DataError(f"DATA_PATH mixes formats: mostly {major}, but {others}. Split the file or set DATA_FORMAT")


def _pct(xs: list[int], q: float) -> int:
    if not xs:
        return 0
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _stats(cfg: RunConfig, source: Source, t: _Tally) -> dict:
    p95 = _pct(t.lengths, 0.95)
    lengths, supervised = t.lengths, t.supervised
    if cfg.columns:
        fmt, how = "qa", "DATA_COLUMNS"
    elif cfg.data_format != "auto":
        fmt, how = cfg.data_format, "DATA_FORMAT"
    else:
        fmt, how = (t.formats.most_common(1)[0][0] if t.formats else "none"), "auto-detected"
    return {
        "data_path": str(cfg.data_path),
        "format": fmt,
        "format_from": how,
        "columns": dict(t.columns.most_common()),
        "readers": sorted({f.reader for f in source.read}),
        **source.report(),
        "rows_in": t.n_in,
        "kept": t.n_train + t.n_eval,
        "rejected": sum(t.reasons.values()),
        "train": t.n_train,
        "eval": t.n_eval if cfg.eval_fraction > 0 else t.n_train,
        "eval_is_train": cfg.eval_fraction == 0,
        "truncated": t.truncated,
        "rejected_by_reason": dict(t.reasons.most_common()),
        "tokens": {"min": min(lengths, default=0), "median": int(statistics.median(lengths)) if lengths else 0,
                   "p95": p95, "p99": _pct(lengths, 0.99), "max": max(lengths, default=0), "total": sum(lengths)},
        "supervised_tokens_per_row": {"min": min(supervised, default=0), "median": int(statistics.median(supervised)) if supervised else 0,
                                      "max": max(supervised, default=0)},
        "max_seq_length": cfg.max_seq_length,
        "recommended_max_seq_length": max(64, -(-p95 // 64) * 64),
    }


def _gate(cfg: RunConfig, stats: dict, reasons: Counter) -> None:
    n_in, n_rej = stats["rows_in"], stats["rejected"]
    if stats["kept"] == 0:
        raise DataError(f"DATA_PATH={cfg.data_path}: no usable rows ({n_in} read, {n_rej} rejected){_table(reasons)}")
    if n_in and n_rej / n_in > cfg.data_max_reject_fraction:
        raise DataError(f"DATA_PATH={cfg.data_path}: {n_rej} of {n_in} rows rejected ({n_rej / n_in:.0%} > "
                        f"DATA_MAX_REJECT_FRACTION={cfg.data_max_reject_fraction:g}){_table(reasons)}")


def _table(reasons: Counter) -> str:
    return "".join(f"\n    {n:>7}  {r}" for r, n in reasons.most_common())


def summary(stats: dict, paths: RunPaths) -> str:
    t = stats["tokens"]
    columns = "; " + " | ".join(stats["columns"]) if stats["columns"] else ""
    lines = [f"[prepare] format: {stats['format']} ({stats['format_from']}{columns}), reader: {', '.join(stats['readers'])}"]
    for f in stats["files"][:5]:
        how = ", ".join(x for x in (f["reader"], f["encoding"], f["compression"]) if x)
        lines.append(f"[prepare]   read {f['file']} ({how}): {f['rows']} rows")
    if len(stats["files"]) > 5:
        lines.append(f"[prepare]   ... and {len(stats['files']) - 5} more files (data_stats.json lists them)")
    for s in stats["skipped"][:10]:
        lines.append(f"[prepare]   skipped {s['file']}: {s['why']}")
    if len(stats["skipped"]) > 10:
        lines.append(f"[prepare]   ... and {len(stats['skipped']) - 10} more skipped (data_stats.json lists them)")
    lines += [
        f"[prepare] {stats['rows_in']} rows read = {stats['kept']} kept + {stats['rejected']} rejected;"
        f" train {stats['train']}, eval {stats['eval']}" + (" (the training questions)" if stats["eval_is_train"] else "")
        + (f"; plus {stats['passage_rows']} passage rows (PASSAGE_ROWS)" if stats.get("passage_rows") else "")
        + (f"; plus {stats['variant_rows']} question variants (QUESTION_VARIANTS)" if stats.get("variant_rows") else ""),
        f"[prepare] tokens per row: min {t['min']}  median {t['median']}  p95 {t['p95']}  p99 {t['p99']}  max {t['max']};"
        f" truncated {stats['truncated']}; recommended MAX_SEQ_LENGTH {stats['recommended_max_seq_length']}",
    ]
    if stats["rejected"]:
        lines.append(f"[prepare] rejected rows are listed in {paths.rejected_file}:{_table(Counter(stats['rejected_by_reason']))}")
    return "\n".join(lines)
