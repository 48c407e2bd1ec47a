#!/usr/bin/env bash
# Issue 22 on nvidia-h200-x8, in one device call: bench/scaling.py's parts (scale, loss, sigterm, nodes) on the
# random Llama-3.1-8B-architecture model of bench/multi_gpu_setup.sh (SmolLM2 tokenizer, vocab 49152), rows of 2,048
# tokens, BACKEND=hf. Results: $OUTDIR/scaling.json (rewritten after every arm) and one log per arm.
# Usage: bench/scaling.sh OUTDIR [bench/scaling.py options, e.g. --parts loss,sigterm,nodes --deadline 560]
#        (carry .whl with the DeepSpeed sdist, and .bench_tok; see docs/BENCHMARKS.md)
set -u
OUTDIR="${1:-${OUT:-/tmp/scaling_logs}}"; shift || true
mkdir -p "$OUTDIR"
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then  # the pinned wheels, where the image lacks them (../shared/tools/device-wheels.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
source "$(dirname "$0")/multi_gpu_setup.sh"   # DeepSpeed into /tmp/site, the model in $M
nvidia-smi topo -m > "$OUTDIR/topo.txt" 2>&1
python3 bench/scaling.py --out "$OUTDIR" --model "$M" "$@"
