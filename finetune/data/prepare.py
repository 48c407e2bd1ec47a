"""The prepare stage: raw rows -> gate -> normalised train/eval JSONL, rejected.jsonl and data_stats.json.

Every input row ends up either kept (train or eval) or in rejected.jsonl with its place and reason:
kept + rejected = input, always. Output is written to a temporary folder and renamed into place.
Memory stays flat: rows stream to disk; only a 16-byte hash and a few integers per row stay in memory.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from tqdm import tqdm

from finetune.config import RunConfig
from finetune.data.formats import RowError, detect, iter_raw_rows, normalise
from finetune.data.passages import Passages
from finetune.data.tokenize import TemplateError, encode
from finetune.errors import ConfigError, DataError
from finetune.paths import RunPaths, atomic_dir


def prepare(cfg: RunConfig, paths: RunPaths, tok) -> dict:
    """Run the gate over DATA_PATH with tokenizer `tok`; return the stats written to data_stats.json."""
    fmt = cfg.data_format
    seen: dict[bytes, str] = {}
    formats: Counter = Counter()             # kept rows per format
    first_at: dict[str, list[str]] = {}      # format -> where its first rows are (to name a mixed file's lines)
    reasons: Counter = Counter()
    lengths, supervised = [], []
    n_in = n_train = n_eval = truncated = 0
    passages = Passages(cfg)
    with atomic_dir(paths.data_dir) as tmp:
        files = {name: open(tmp / f"{name}.jsonl", "w", encoding="utf-8") for name in ("train", "eval", "rejected")}

        def reject(row, reason: str, kind: str | None = None) -> None:
            reasons[kind or reason] += 1
            files["rejected"].write(json.dumps({"line": row.where, "reason": reason, "raw": row.text}, ensure_ascii=False) + "\n")
            if cfg.data_strict:
                raise DataError(f"{row.where}: {reason} (DATA_STRICT=1 stops at the first bad row)")

        for row in tqdm(iter_raw_rows(cfg.data_path), desc="prepare", unit="row", mininterval=2):
            n_in += 1
            if row.error:
                reject(row, row.error, row.error.split(" (")[0])
                continue
            if not isinstance(row.raw, dict):
                reject(row, f"row is a {type(row.raw).__name__}, expected a JSON object", "expected a JSON object")
                continue
            row_fmt = detect(row.raw) if fmt == "auto" else fmt
            if row_fmt is None:
                keys = ", ".join(sorted(row.raw)[:6])
                reject(row, f"unrecognised row (fields: {keys}); see README 'Data formats'", "unrecognised row")
                continue
            try:
                norm = normalise(row.raw, row_fmt, cfg.qa_with_context)
                enc = encode(tok, norm, cfg.max_seq_length, cfg.train_on_inputs)
            except RowError as e:
                reject(row, str(e), e.kind)
                continue
            except TemplateError as e:
                raise ConfigError(f"{row.where}: {e}") from None
            key = hashlib.blake2b(json.dumps(norm, sort_keys=True, ensure_ascii=False).encode(), digest_size=16).digest()
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
                truncated += 1
            if enc.supervised == 0:
                reject(row, "no supervised tokens (nothing for the model to learn)")
                continue
            formats[row_fmt] += 1
            if len(first_at.setdefault(row_fmt, [])) < 5:
                first_at[row_fmt].append(row.where)
            lengths.append(enc.full_length)
            supervised.append(enc.supervised)
            record = json.dumps({"id": row.where, "format": row_fmt, **norm}, ensure_ascii=False) + "\n"
            if _is_eval(key, cfg):
                n_eval += 1
                files["eval"].write(record)
            else:
                n_train += 1
                files["train"].write(record)
                passages.add(row.raw)
                if cfg.eval_fraction == 0:
                    files["eval"].write(record)  # seed 000: evaluate on the training questions
        n_passages = 0
        for prow in passages.rows():  # not input rows: training only, counted apart
            enc = encode(tok, {"text": prow["text"]}, cfg.max_seq_length, cfg.train_on_inputs)
            truncated += enc.full_length > cfg.max_seq_length
            files["train"].write(json.dumps(prow, ensure_ascii=False) + "\n")
            n_passages += 1
        for fh in files.values():
            fh.close()

        n_rej = sum(reasons.values())
        _check_mixed_formats(formats, first_at)
        stats = _stats(cfg, fmt, n_in, n_train, n_eval, n_rej, truncated, reasons, lengths, supervised)
        stats["passage_rows"] = n_passages
        (tmp / "data_stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n")
        _gate(cfg, stats, reasons)
    return stats


def _is_eval(key: bytes, cfg: RunConfig) -> bool:
    # A hash split is deterministic and needs no second pass over the data.
    if cfg.eval_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key + str(cfg.seed).encode(), digest_size=8).digest(), "big")
    return (h % 1_000_000) < cfg.eval_fraction * 1_000_000


def _check_mixed_formats(formats: Counter, first_at: dict[str, list[str]]) -> None:
    if len(formats) > 1:
        major = formats.most_common(1)[0][0]
        others = "; ".join(f"{k} at {', '.join(first_at[k])}" for k in formats if k != major)
        raise DataError(f"DATA_PATH mixes formats: mostly {major}, but {others}. Split the file or set DATA_FORMAT")


def _pct(xs: list[int], q: float) -> int:
    if not xs:
        return 0
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _stats(cfg, fmt, n_in, n_train, n_eval, n_rej, truncated, reasons, lengths, supervised) -> dict:
    p95 = _pct(lengths, 0.95)
    return {
        "data_path": str(cfg.data_path),
        "format": fmt,
        "rows_in": n_in,
        "kept": n_train + n_eval,
        "rejected": n_rej,
        "train": n_train,
        "eval": n_eval if cfg.eval_fraction > 0 else n_train,
        "eval_is_train": cfg.eval_fraction == 0,
        "truncated": truncated,
        "rejected_by_reason": dict(reasons.most_common()),
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
    lines = [
        f"[prepare] {stats['rows_in']} rows read = {stats['kept']} kept + {stats['rejected']} rejected"
        f" (format {stats['format']}); train {stats['train']}, eval {stats['eval']}"
        + (" (the training questions)" if stats["eval_is_train"] else "")
        + (f"; plus {stats['passage_rows']} passage rows (PASSAGE_ROWS)" if stats.get("passage_rows") else ""),
        f"[prepare] tokens per row: min {t['min']}  median {t['median']}  p95 {t['p95']}  p99 {t['p99']}  max {t['max']};"
        f" truncated {stats['truncated']}; recommended MAX_SEQ_LENGTH {stats['recommended_max_seq_length']}",
    ]
    if stats["rejected"]:
        lines.append(f"[prepare] rejected rows are listed in {paths.data_dir / 'rejected.jsonl'}:{_table(Counter(stats['rejected_by_reason']))}")
    return "\n".join(lines)
