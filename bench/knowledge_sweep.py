"""Issue 23 measurements: trained questions, the same facts asked in other words (EVAL_PATH), and retention.

Each argument is one cell, "name:VAR=value;VAR=value" (no spaces); DATA=<stem> picks data/knowledge/<stem>.json,
data/heldout/<stem>.json or the bundled sample (DATA=sample) and its paraphrase file as EVAL_PATH. Cells run one
after another (2 cores: in parallel they only slow each other), each with fresh output folders under $SWEEP_DIR, through
the pipeline's own stages prepare -> replay -> train -> evaluate (no merge: the bundled model trains plain LoRA, whose
merge is exact to 2e-4 in logits, docs/QUALITY.md; evaluate loads the adapter on the base). One JSON line per cell is
appended to $SWEEP_DIR/results.jsonl and printed.

    flock /tmp/rapa-cpu.lock .venv/bin/python bench/knowledge_sweep.py \
        "h-off:DATA=harbour;PASSAGE_ROWS=off;NUM_EPOCHS=30;LEARNING_RATE=1e-3"
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWEEP_DIR = Path(os.environ.get("SWEEP_DIR", "/tmp/knowledge_sweep"))
STAGE_RUNNER = """
import os, sys
sys.path.insert(0, "bench")
import knowledge_levers
print("[levers]", knowledge_levers.apply(os.environ), flush=True)
from finetune.pipeline import main
sys.exit(main(only=("prepare", "replay", "train", "evaluate")))  # main resolves the automatic values, as ./run.sh does
"""

def data_paths(stem: str) -> tuple[str, str]:
    if stem == "sample":
        return "data/sample/korquad_sample.json", "data/sample/korquad_sample_paraphrases.json"
    for folder in ("data/knowledge", "data/heldout"):
        if (ROOT / folder / f"{stem}.json").is_file():
            return f"{folder}/{stem}.json", f"{folder}/{stem}_paraphrases.json"
    sys.exit(f"DATA={stem}: no such file in data/knowledge or data/heldout")


def cell(spec: str) -> dict:
    name, _, body = spec.partition(":")
    run_dir = SWEEP_DIR / name
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    env = {**os.environ, "REPORT_TO": "none", "BASE_SAVE_PATH": str(run_dir / "out"), "CHECKPOINT_PATH": str(run_dir / "ckpt")}
    for kv in filter(None, body.split(";")):
        k, _, v = kv.partition("=")
        if k == "DATA":
            env["DATA_PATH"], env["EVAL_PATH"] = data_paths(v)
        else:
            env[k] = v
    t0 = time.time()
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.run([sys.executable, "-c", STAGE_RUNNER], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    out = {"name": name, "vars": body, "rc": rc, "seconds": round(time.time() - t0)}
    for f in (run_dir / "out").glob("*/*/eval/report.json"):
        r = json.loads(f.read_text())
        ret, ev = r.get("retention") or {}, r.get("eval_set") or {}
        stats = json.loads(next((run_dir / "out").glob("*/*/data/data_stats.json")).read_text())
        out.update(trained=r["finetuned"]["contains_match"], trained_base=r["base"]["contains_match"],
                   paraphrase=(ev.get("finetuned") or {}).get("contains_match"),
                   paraphrase_base=(ev.get("base") or {}).get("contains_match"),
                   retention=ret.get("fraction"), kept=ret.get("kept"), of=ret.get("of"), lost=ret.get("lost"),
                   steps=r["training"].get("steps"), last_loss=r["training"].get("last_loss"),
                   passage_rows=stats.get("passage_rows", 0),
                   trained_missed=[(e["question"], e["finetuned"][:60]) for e in r["examples"] if not e["finetuned_ok"]],
                   paraphrase_missed=[(e["question"], e["answer"], e["finetuned"][:60]) for e in ev.get("examples", [])
                                      if not e["finetuned_ok"]])
    return out


def main(specs: list[str], jobs: int = 1, deadline: float = 0) -> None:
    """jobs > 1 runs that many cells at once (a GPU machine with many cores; on 2 cores they only slow each other);
    deadline (seconds from the start, 0 = none): cells not started by then are skipped and reported so."""
    from concurrent.futures import ThreadPoolExecutor

    SWEEP_DIR.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def one(spec: str) -> None:
        if deadline and time.time() - t0 > deadline:
            out = {"name": spec.partition(":")[0], "vars": spec.partition(":")[2], "skipped": "deadline"}
        else:
            out = cell(spec)
        line = json.dumps(out, ensure_ascii=False)
        with open(SWEEP_DIR / "results.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        print(line, flush=True)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(one, specs))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cells", nargs="+")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=0)
    a = ap.parse_args()
    main(a.cells, a.jobs, a.deadline)
