"""Issue 23's search for a recipe, with its selection rule fixed before any number came in (a GPU machine with
many cores runs the cells side by side; every cell is bench/knowledge_sweep.py's, in float32 as on a CPU).

    python bench/knowledge_search.py singles   # every candidate alone on the two tuning files x two seeds, and
                                               # the defaults and the memorising preset on every file
    python bench/knowledge_search.py combos    # the best three of them together (read from the singles' results)
    python bench/knowledge_search.py finals    # the chosen recipe and its memorising preset on every file,
                                               # data/heldout/island.json included, two seeds each

The set-aside file's cells (the defaults and the memorising preset in `singles`, the chosen recipe in `finals`) are
never read to choose: `scores` reads the tuning files' cells only.
Device results of 2026-12-02 (third session): bench/results/knowledge_search_h200.jsonl.
Selection: a recipe's score is its mean paraphrase accuracy plus its mean retention over the tuning cells, and it
must keep the trained questions at >= 95 % on average; ties go to fewer levers. Results: $SWEEP_DIR/results.jsonl.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import knowledge_sweep  # noqa: E402

TUNING = ("harbour", "crafts")
ALL = ("island", "harbour", "crafts")
SEEDS = (42, 7)
# REPLAY_LOSS=kl: what REPLAY_LOSS=auto means on a CPU, and now for a model under 1B on a GPU (QUALITY.md, issue 23)
COMMON = "FP32=1;USE_QLORA=false;REPLAY_LOSS=kl;QUESTION_VARIANTS=off"  # the search ran before QUESTION_VARIANTS
MEMORISING = "NUM_EPOCHS=30;LEARNING_RATE=1e-3"
# Each candidate: name -> the variables it sets (product settings, or bench/knowledge_levers.py's LEVER_...).
SINGLES = {
    "base": "",
    "ep12": "NUM_EPOCHS=12",
    "rf4": "REPLAY_FRACTION=4",
    "rw3": "REPLAY_WEIGHT=3",
    "dropout": "LORA_DROPOUT=0.1",
    "perms": "LEVER_PERMS=4",
    "openbook": "LEVER_OPENBOOK=1",
}
# Run beside the singles so the finals need only the chosen recipe: the defaults and the memorising preset on
# every file (the set-aside one's results are never read to choose).
BASELINE = {"base": "", "base+memorising": MEMORISING}


def cells(recipes: dict[str, str], files, seeds) -> list[str]:
    return [f"{name}@{f}-s{s}:DATA={f};SEED={s};{COMMON};{body}".rstrip(";")
            for s in seeds for f in files for name, body in recipes.items()]


def results() -> list[dict]:
    f = knowledge_sweep.SWEEP_DIR / "results.jsonl"
    return [json.loads(l) for l in open(f, encoding="utf-8")] if f.is_file() else []


def scores(rows: list[dict]) -> dict[str, dict]:
    """Per recipe over the tuning files: mean trained, paraphrase, retention, and the selection score."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        name, _, where = r["name"].partition("@")
        if where.split("-s")[0] in TUNING and r.get("rc") == 0 and r.get("trained") is not None:
            by.setdefault(name, []).append(r)
    out = {}
    for name, rs in by.items():
        m = {k: sum(r[k] for r in rs) / len(rs) for k in ("trained", "paraphrase", "retention")}
        m["cells"] = len(rs)
        m["score"] = m["paraphrase"] + m["retention"] if m["trained"] >= 0.95 else float("-inf")
        out[name] = m
    return out


def recipe_of(name: str) -> str:
    return ";".join(SINGLES[p] for p in name.split("+") if SINGLES[p])


def ranked(rows: list[dict], full: int) -> list[tuple[str, dict]]:
    s = {k: v for k, v in scores(rows).items() if v["cells"] == full}
    return sorted(s.items(), key=lambda kv: (-kv[1]["score"], kv[0].count("+")))


def main(stage: str, jobs: int, deadline: float) -> None:
    full = len(TUNING) * len(SEEDS)
    if stage == "singles":
        todo = cells(BASELINE, ("island",), SEEDS) + cells({"base+memorising": MEMORISING}, TUNING, SEEDS) + \
            cells(SINGLES, TUNING, SEEDS)
    elif stage == "combos":
        base = scores(results()).get("base", {}).get("score", float("-inf"))
        better = [n for n, m in ranked(results(), full) if n != "base" and "+" not in n and m["score"] > base][:3]
        combos = ["+".join(better[:k]) for k in (2, 3) if len(better) >= k]
        print(f"[search] singles better than base: {better}; combos: {combos}", flush=True)
        todo = cells({c: recipe_of(c) for c in combos}, TUNING, SEEDS)
    elif stage == "finals":
        best = ranked(results(), full)[0][0]
        print(f"[search] chosen: {best} = {recipe_of(best) or '(the defaults)'}", flush=True)
        if best == "base":  # the singles stage ran it everywhere already
            return
        todo = cells({best: recipe_of(best), f"{best}+memorising": ";".join([recipe_of(best), MEMORISING])}, ALL, SEEDS)
    else:
        sys.exit(f"unknown stage {stage}: singles | combos | finals")
    knowledge_sweep.main(todo, jobs, deadline)
    print(json.dumps(ranked(results(), full), indent=None), flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("stage")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--deadline", type=float, default=0)
    a = ap.parse_args()
    main(a.stage, a.jobs, a.deadline)
