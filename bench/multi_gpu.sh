#!/usr/bin/env bash
# Issue 7 on a 2-GPU machine: the same effective batch (8) on 2 and on 1 GPU, HF backend + DeepSpeed ZeRO-2 for 2,
# a random Llama-3.1-8B-architecture model (SmolLM2 tokenizer, vocab 49152), QLoRA r=16, rows of ~2000 tokens.
# Prints each run's per-step losses and the trainer's runtime. Usage: bench/multi_gpu.sh OUTDIR
set -u
OUTDIR="${1:-${OUT:-/tmp/mg_logs}}"; mkdir -p "$OUTDIR"
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz
M=/tmp/llama8b_mg
[[ -f $M/config.json ]] || python3 bench/gpu_speed.py build --model $M --tokenizer .bench_tok --vocab 49152
python3 - <<'PY'
import json, random
r = random.Random(0); w = "the of and to in a is that for it as with was on be by this are from at".split()
with open("/tmp/mg_data.jsonl", "w") as f:
    for i in range(64):
        f.write(json.dumps({"text": " ".join(r.choice(w) for _ in range(1900))}) + "\n")
PY
export RAPA_NO_VENV=1 PYTHON=python3 BASE_MODEL_NAME=$M DATA_PATH=/tmp/mg_data.jsonl MAX_STEPS=6 SAVE_STEPS=3 \
  REPLAY_FRACTION=0 RETENTION_SET=none BACKEND=hf REPORT_TO=none MAX_SEQ_LENGTH=2048 BATCH_SIZE=8 GRAD_ACCUM=1 \
  HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 LORA_DROPOUT=0
for n in 2 1; do
  export BASE_SAVE_PATH=/tmp/mg_out_$n CHECKPOINT_PATH=/tmp/mg_ckpt_$n
  python3 prepare_data.py > "$OUTDIR/mg_prep_$n.log" 2>&1 || { echo "prepare n=$n failed"; tail -5 "$OUTDIR/mg_prep_$n.log"; }
  t0=$(date +%s)
  python3 -m torch.distributed.run --nproc_per_node $n --master_port 2950$n train.py > "$OUTDIR/mg_train_$n.log" 2>&1
  echo "[mg] n=$n rc=$? wall=$(( $(date +%s) - t0 ))s"
  grep -h "effective batch\|backend\|train_runtime\|Error\|error" "$OUTDIR/mg_train_$n.log" | grep -v "it/s" | cut -c1-300 | head -8
  cut -c1-120 /tmp/mg_out_$n/llama8b_mg/3/metrics.jsonl 2>/dev/null
  ls /tmp/mg_ckpt_$n 2>/dev/null
done
