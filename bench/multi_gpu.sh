#!/usr/bin/env bash
# Issue 7 on a 2-GPU machine, in one call: the same effective batch (8) on 2 GPUs and on 1 GPU (loss curves and
# steady-state throughput), then a 2-GPU run stopped by SIGTERM and resumed (JOB=resume_training), compared with
# the uninterrupted 2-GPU run. HF backend (+ DeepSpeed ZeRO-2 on 2 GPUs), a random Llama-3.1-8B-architecture model
# (SmolLM2 tokenizer, vocab 49152), QLoRA r=16, rows of 2048 tokens. Each arm is launched as run.sh launches the
# train stage (`torchrun --nproc_per_node N`). Results: $OUTDIR/multi_gpu.json (+ logs).
# Usage: bench/multi_gpu.sh OUTDIR      (needs .whl with the DeepSpeed sdist, and .bench_tok)
set -u
OUTDIR="${1:-${OUT:-/tmp/mg_logs}}"; mkdir -p "$OUTDIR"
STEPS=${MG_STEPS:-12}
source "$(dirname "$0")/multi_gpu_setup.sh"
export RAPA_NO_VENV=1 PYTHON=python3 BASE_MODEL_NAME=$M DATA_PATH=/tmp/mg_data.jsonl MAX_STEPS=$STEPS SAVE_STEPS=100 \
  REPLAY_FRACTION=0 RETENTION_SET=none BACKEND=hf REPORT_TO=none MAX_SEQ_LENGTH=2048 BATCH_SIZE=8 GRAD_ACCUM=1 \
  HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 LORA_DROPOUT=0
nvidia-smi topo -m > "$OUTDIR/topo.txt" 2>&1

arm() {  # arm NAME NPROC [extra env...]: prepare + train; echoes the exit code
  local name=$1 n=$2; shift 2
  export BASE_SAVE_PATH=/tmp/mg_$name/out CHECKPOINT_PATH=/tmp/mg_$name/ckpt
  [[ -f /tmp/mg_$name/out/llama8b_mg/3/data/train.jsonl ]] || python3 prepare_data.py > "$OUTDIR/prep_$name.log" 2>&1
  env "$@" python3 -m torch.distributed.run --nproc_per_node "$n" --master_port $((29500 + RANDOM % 400)) train.py \
    > "$OUTDIR/train_$name.log" 2>&1 &
  local pid=$!
  if [[ -n "${KILL_AT:-}" ]]; then  # SIGTERM to the launcher once KILL_AT steps are logged (as `docker stop` would)
    local m=/tmp/mg_$name/out/llama8b_mg/3/metrics.jsonl
    until [[ -f $m && $(wc -l < "$m") -ge $KILL_AT ]] || ! kill -0 $pid 2>/dev/null; do sleep 0.5; done
    kill -TERM $pid
  fi
  wait $pid; local rc=$?
  echo "[mg] $name n=$n rc=$rc $(grep -h 'effective batch' "$OUTDIR/train_$name.log" | head -1 | cut -c1-200)"
  grep -h "Error\|error\|exit\|checkpoint" "$OUTDIR/train_$name.log" | grep -v "it/s\]" | tail -4 | cut -c1-300
  cp /tmp/mg_$name/out/llama8b_mg/3/metrics.jsonl "$OUTDIR/metrics_$name.jsonl" 2>/dev/null
  ls /tmp/mg_$name/ckpt 2>/dev/null | tr '\n' ' '; echo
  echo $rc > "$OUTDIR/rc_$name"
}

t0=$(date +%s)
arm two 2
arm one 1
if [[ "$(cat "$OUTDIR/rc_one")" != 0 ]]; then rm -rf /tmp/mg_one; arm one 1 GRADIENT_CHECKPOINTING=on; fi
KILL_AT=5 arm cut 2
cp "$OUTDIR/metrics_cut.jsonl" "$OUTDIR/metrics_cut_before.jsonl" 2>/dev/null
arm cut 2 JOB=resume_training
echo "[mg] all arms in $(( $(date +%s) - t0 ))s"

python3 - "$OUTDIR" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def curve(name):
    p = out / f"metrics_{name}.jsonl"
    return [json.loads(l) for l in open(p)] if p.exists() else []
def tok_s(c, skip=3):  # steady state: from the end of step `skip` to the last step; 8 rows x 2048 tokens a step
    c = [r for r in c if "loss" in r]
    if len(c) <= skip + 1: return None
    dt = c[-1]["time"] - c[skip - 1]["time"]; steps = c[-1]["step"] - c[skip - 1]["step"]
    return round(steps * 8 * 2048 / dt, 1)
two, one, cut = curve("two"), curve("one"), curve("cut")
l2 = {r["step"]: r["loss"] for r in two if "loss" in r}; l1 = {r["step"]: r["loss"] for r in one if "loss" in r}
lc = {r["step"]: r["loss"] for r in cut if "loss" in r}
common = sorted(set(l1) & set(l2))
res = {"rc": {n: (out / f"rc_{n}").read_text().strip() for n in ("two", "one", "cut") if (out / f"rc_{n}").exists()},
       "loss_1gpu": [l1[s] for s in common], "loss_2gpu": [l2[s] for s in common],
       "max_abs_loss_diff_1v2": max((abs(l1[s] - l2[s]) for s in common), default=None),
       "max_rel_loss_diff_1v2": max((abs(l1[s] - l2[s]) / abs(l1[s]) for s in common), default=None),
       "tok_s_1gpu": tok_s(one), "tok_s_2gpu": tok_s(two),
       "loss_cut_resumed": lc, "max_abs_loss_diff_resumed_vs_uninterrupted": max((abs(lc[s] - l2[s]) for s in lc if s in l2), default=None)}
if res["tok_s_1gpu"] and res["tok_s_2gpu"]:
    res["scaling"] = round(res["tok_s_2gpu"] / res["tok_s_1gpu"], 3)
(out / "multi_gpu.json").write_text(json.dumps(res, indent=1))
print(json.dumps({k: v for k, v in res.items() if k not in ("loss_cut_resumed",)}, indent=1))
PY
