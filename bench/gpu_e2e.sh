#!/usr/bin/env bash
# GPU end-to-end (issue 5): train -> SIGTERM after ~15 steps (exit 75, sealed checkpoint) -> JOB=resume_training
# (finishes training, merges with the parity gate, evaluates), on a random Llama-3.1-8B-architecture model with
# the SmolLM2 tokenizer and chat template (vocab 49152), Unsloth backend, the bundled KorQuAD sample.
#   bench/gpu_e2e.sh [OUTDIR]      (needs .bench_tok/ with the SmolLM2 tokenizer files; logs go to OUTDIR)
set -u
OUTDIR="${1:-${OUT:-/tmp/e2e_logs}}"; mkdir -p "$OUTDIR"
M=/tmp/llama8b_e2e
[[ -f $M/config.json ]] || python3 bench/gpu_speed.py build --model $M --tokenizer .bench_tok --vocab 49152
export RAPA_NO_VENV=1 PYTHON=python3 BASE_MODEL_NAME=$M DATA_PATH=data/sample/korquad_sample.json MAX_STEPS=30 \
  SAVE_STEPS=10 REPLAY_FRACTION=0 RETENTION_SET=none BACKEND=unsloth REPORT_TO=none BASE_SAVE_PATH=/tmp/e2e_out \
  CHECKPOINT_PATH=/tmp/e2e_ckpt EVAL_MAX_QUESTIONS=8 MERGE_PARITY=on HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
METRICS=/tmp/e2e_out/llama8b_e2e/3/metrics.jsonl
t0=$(date +%s)
./run.sh >"$OUTDIR/e2e_1_train.log" 2>&1 &
PID=$!   # run.sh execs python, so this is the trainer's pid
sent=0
while kill -0 $PID 2>/dev/null; do
  if [[ $sent == 0 && -f $METRICS ]] && grep -q '"step": 15,' "$METRICS"; then kill -TERM $PID; sent=1; echo "[e2e] SIGTERM at step 15 ($(( $(date +%s) - t0 ))s)"; fi
  sleep 1
done
wait $PID; rc1=$?
echo "[e2e] train rc=$rc1 (expect 75) after $(( $(date +%s) - t0 ))s"
ls /tmp/e2e_ckpt; for c in /tmp/e2e_ckpt/checkpoint-*; do echo "$c: $(ls $c | tr '\n' ' ')"; done
t1=$(date +%s)
JOB=resume_training ./run.sh >"$OUTDIR/e2e_2_resume.log" 2>&1; rc2=$?
echo "[e2e] resume_training rc=$rc2 after $(( $(date +%s) - t1 ))s"
if [[ $rc2 != 0 ]] && grep -q "merge rejected" "$OUTDIR/e2e_2_resume.log"; then
  t2=$(date +%s)
  JOB=merge MERGE_PARITY_TOL=0.05 ./run.sh >"$OUTDIR/e2e_3_merge_tol.log" 2>&1; rc3=$?
  echo "[e2e] JOB=merge MERGE_PARITY_TOL=0.05 rc=$rc3 after $(( $(date +%s) - t2 ))s"
  JOB=evaluate ./run.sh >>"$OUTDIR/e2e_3_merge_tol.log" 2>&1; echo "[e2e] JOB=evaluate rc=$?"
fi
R=/tmp/e2e_out/llama8b_e2e/3
grep -h "\[train\]\|\[resume\]\|\[merge\]\|SIGTERM\|error\|exit\|Traceback" "$OUTDIR"/e2e_*.log | grep -v "it/s" | head -60
cat $R/metrics.jsonl | cut -c1-150
cat $R/*_merged/merge_parity.json 2>/dev/null
python3 -c "import json;d=json.load(open('$R/run.json'));print(json.dumps({k:d[k] for k in ('jobs','stages') if k in d},indent=0)[:3000])" 2>&1
ls -la $R $R/* 2>/dev/null | head -40
