#!/usr/bin/env bash
# Issue 7, operations on a 2-GPU machine, in one call:
#  (1) ZeRO-3 with QLoRA (4-bit weights stored as bf16 so ZeRO-3 can shard them): 6 steps of the multi_gpu.sh
#      workload; its losses compare with the ZeRO-2 run of bench/results/multi_gpu_2xh200.json.
#  (2) the whole job through `NUM_GPUS=2 ./run.sh` on the bundled KorQuAD sample: SIGTERM to run.sh mid-training
#      (expect exit 75 and a sealed checkpoint), then `JOB=resume_training NUM_GPUS=2 ./run.sh` (finishes, merges
#      with the parity gate, evaluates) on a random Llama-3.1-8B-architecture model with the SmolLM2 tokenizer.
# Usage: bench/multi_gpu_ops.sh OUTDIR      (needs .whl with the DeepSpeed sdist, and .bench_tok)
set -u
OUTDIR="${1:-${OUT:-/tmp/mgo_logs}}"; mkdir -p "$OUTDIR"
source "$(dirname "$0")/multi_gpu_setup.sh"
export RAPA_NO_VENV=1 PYTHON=python3 BASE_MODEL_NAME=$M REPLAY_FRACTION=0 RETENTION_SET=none BACKEND=hf REPORT_TO=none \
  HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 LORA_DROPOUT=0

# (1) ZeRO-3 + QLoRA
( export DATA_PATH=/tmp/mg_data.jsonl MAX_STEPS=6 SAVE_STEPS=100 MAX_SEQ_LENGTH=2048 BATCH_SIZE=8 GRAD_ACCUM=1 \
    DEEPSPEED_CONFIG=configs/deepspeed/zero3.json BASE_SAVE_PATH=/tmp/z3/out CHECKPOINT_PATH=/tmp/z3/ckpt
  python3 prepare_data.py > "$OUTDIR/z3_prep.log" 2>&1
  t0=$(date +%s)
  timeout 300 python3 -m torch.distributed.run --nproc_per_node 2 --master_port 29611 train.py > "$OUTDIR/z3_train.log" 2>&1
  echo "[z3] rc=$? wall=$(( $(date +%s) - t0 ))s"
  grep -h "effective batch\|ZeRO\|zero\|Error\|error" "$OUTDIR/z3_train.log" | grep -v "it/s\]" | tail -6 | cut -c1-300
  cp /tmp/z3/out/llama8b_mg/3/metrics.jsonl "$OUTDIR/metrics_z3.jsonl" 2>/dev/null; cut -c1-110 "$OUTDIR/metrics_z3.jsonl"
  ls -la /tmp/z3/ckpt/checkpoint-6 2>/dev/null | head -20 )

# (2) the whole job through run.sh on 2 GPUs: SIGTERM, then resume
export DATA_PATH=data/sample/korquad_sample.json MAX_STEPS=16 SAVE_STEPS=100 BASE_SAVE_PATH=/tmp/rs2/out \
  CHECKPOINT_PATH=/tmp/rs2/ckpt EVAL_MAX_QUESTIONS=4 EVAL_MAX_NEW_TOKENS=8 NUM_GPUS=2 MASTER_PORT=29622
METRICS=/tmp/rs2/out/llama8b_mg/3/metrics.jsonl
t0=$(date +%s)
./run.sh > "$OUTDIR/rs2_1_train.log" 2>&1 &
PID=$!
until [[ -f $METRICS && $(wc -l < $METRICS) -ge 6 ]] || ! kill -0 $PID 2>/dev/null; do sleep 0.5; done
kill -TERM $PID; echo "[rs2] SIGTERM to run.sh after $(wc -l < $METRICS 2>/dev/null) logged steps"
wait $PID; echo "[rs2] train rc=$? (expect 75) after $(( $(date +%s) - t0 ))s"
ls /tmp/rs2/ckpt
t1=$(date +%s)
JOB=resume_training MASTER_PORT=29623 ./run.sh > "$OUTDIR/rs2_2_resume.log" 2>&1
echo "[rs2] resume_training rc=$? after $(( $(date +%s) - t1 ))s"
grep -h "\[train\]\|\[resume\]\|\[merge\]\|\[evaluate\]\|SIGTERM\|launching\|^error" "$OUTDIR"/rs2_*.log | grep -v "it/s" | cut -c1-250 | head -40
cut -c1-110 $METRICS
cat /tmp/rs2/out/llama8b_mg/3/*_merged/merge_parity.json 2>/dev/null | head -30
