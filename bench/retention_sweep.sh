#!/usr/bin/env bash
# Issue 9 experiments: learn the user's data vs keep what the model knew, on the embedded SmolLM2 (CPU).
# Each argument is one run: "name:VAR=value;VAR=value" (no spaces). Runs are sequential (2 cores: parallel runs
# only slow each other); each gets fresh output and checkpoint folders under $SWEEP_DIR, and one line with its
# learned / retention numbers is appended to $SWEEP_DIR/results.jsonl.
#   bench/retention_sweep.sh "lora_r1:USE_QLORA=false;REPLAY_FRACTION=1" "aggr:DATA=small15;NUM_EPOCHS=30;LEARNING_RATE=1e-3"
# DATA=small15 trains on the first 15 questions of the bundled sample (the "small QA file" of issue 9); without
# DATA the embedded demo runs (its preset applies unless the run sets those variables).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
SWEEP_DIR=${SWEEP_DIR:-/tmp/retention_sweep}
mkdir -p "$SWEEP_DIR"
PY=${PY:-.venv/bin/python}

small15="$SWEEP_DIR/small15.json"
"$PY" - "$small15" <<'EOF'
import json, sys
d = json.load(open("data/sample/korquad_sample.json", encoding="utf-8"))
rows = [{"instruction": qa["question"], "output": qa["answers"][0]["text"]}
        for doc in d["data"] for para in doc["paragraphs"] for qa in para["qas"]][:15]
json.dump(rows, open(sys.argv[1], "w", encoding="utf-8"), ensure_ascii=False, indent=1)
EOF

for spec in "$@"; do
  name=${spec%%:*}; vars=${spec#*:}; [[ "$spec" == *:* ]] || vars=""
  run="$SWEEP_DIR/$name"; rm -rf "$run"; mkdir -p "$run"
  env_args=(REPORT_TO=none BASE_SAVE_PATH="$run/out" CHECKPOINT_PATH="$run/ckpt")
  IFS=';' read -r -a kv <<<"$vars"
  for a in "${kv[@]}"; do
    [[ -z "$a" ]] && continue
    if [[ "$a" == DATA=small15 ]]; then env_args+=(DATA_PATH="$small15"); else env_args+=("$a"); fi
  done
  echo "=== $name: ${env_args[*]}"
  start=$(date +%s)
  if env "${env_args[@]}" ./run.sh >"$run/log.txt" 2>&1; then rc=0; else rc=$?; fi
  secs=$(( $(date +%s) - start ))
  "$PY" - "$run" "$name" "$vars" "$rc" "$secs" >>"$SWEEP_DIR/results.jsonl" <<'EOF'
import glob, json, sys
run, name, vars, rc, secs = sys.argv[1:]
out = {"name": name, "vars": vars, "rc": int(rc), "seconds": int(secs)}
for f in glob.glob(f"{run}/out/*/*/eval/report.json"):
    r = json.load(open(f))
    out.update(learned=r["finetuned"]["contains_match"], base=r["base"]["contains_match"],
               retention=(r.get("retention") or {}).get("fraction"), kept=(r.get("retention") or {}).get("kept"),
               of=(r.get("retention") or {}).get("of"), steps=r["training"]["steps"], last_loss=r["training"]["last_loss"],
               lost=(r.get("retention") or {}).get("lost"))
print(json.dumps(out, ensure_ascii=False))
EOF
  tail -1 "$SWEEP_DIR/results.jsonl"
done
