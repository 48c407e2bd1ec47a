"""Benchmark: the prepare stage on N synthetic alpaca rows (time, rows/s, peak RSS), to show it streams.

    .venv/bin/python bench/prepare_stream.py 100000
    .venv/bin/python bench/prepare_stream.py 10000 csv      # the same rows as CSV (or parquet, jsonl.zst)
Runs in a fresh process per size so peak RSS is that size's alone.
"""

import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make(path: Path, n: int) -> None:
    rnd = random.Random(0)
    words = "the model learns a new fact about rivers cities music 한국어 문장 데이터 학습 and numbers".split()
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            ins = " ".join(rnd.choice(words) for _ in range(rnd.randint(5, 40)))
            out = " ".join(rnd.choice(words) for _ in range(rnd.randint(5, 80)))
            fh.write(json.dumps({"instruction": f"{i}: {ins}", "input": "", "output": out}, ensure_ascii=False) + "\n")


def convert(path: Path, kind: str) -> Path:
    """The JSONL rows saved as another file type, as a user's tool would write them."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([json.loads(l) for l in open(path, encoding="utf-8")])
    out = path.with_name("alpaca." + kind)
    if kind == "csv":
        pacsv.write_csv(table, out)
    elif kind == "parquet":
        pq.write_table(table, out)
    elif kind == "jsonl.zst":
        with pa.CompressedOutputStream(str(out), "zstd") as fh:
            fh.write(path.read_bytes())
    return out


def main(n: int, kind: str = "jsonl") -> dict:
    from finetune.config import RunConfig
    from finetune.data.prepare import prepare
    from finetune.embedded import materialize
    from finetune.model import load_tokenizer
    from finetune.paths import RunPaths

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "alpaca.jsonl"
    make(data, n)
    if kind != "jsonl":
        data = convert(data, kind)
    cfg = RunConfig(data_path=str(data), base_save_path=str(tmp / "out"), eval_fraction=0.01)
    tok, _ = load_tokenizer(str(materialize(cfg.cache_dir)), cfg)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.time()
    stats = prepare(cfg, RunPaths.from_config(cfg), tok)
    dt = time.time() - t
    return {"file": data.name, "rows": n, "seconds": round(dt, 1), "rows_per_s": round(n / dt), "kept": stats["kept"],
            "rss_before_mb": round(rss0), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), *sys.argv[2:3])))
