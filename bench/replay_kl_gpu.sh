#!/usr/bin/env bash
# Function check of REPLAY_LOSS=kl on a GPU through the pipeline (docs/BENCHMARKS.md, "The KL replay loss on a GPU").
# Here, once:  ../shared/tools/device-wheels.sh .i21/whl   and   bash bench/replay_kl_gpu.sh build   (writes .tiny/,
# a 2-layer random Llama with the SmolLM2 tokenizer from RAPA_CACHE's converted model);
# on the device (carry .i21 and .tiny):  bash bench/replay_kl_gpu.sh run
set -Eeuo pipefail
if [[ "${1:-}" == build ]]; then
  .venv/bin/python - <<'PY'
import shutil, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from finetune.config import RunConfig
src = Path(RunConfig().cache_dir) / "models" / "SmolLM2-135M-Instruct"
out = Path(".tiny"); shutil.rmtree(out, ignore_errors=True)
c = LlamaConfig.from_pretrained(src)
c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim = 256, 512, 2, 4, 2, 64
torch.manual_seed(0)
LlamaForCausalLM(c).to(torch.bfloat16).save_pretrained(out)
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    shutil.copy(src / f, out / f)
PY
  grep -qx "/.tiny/" .git/info/exclude || echo "/.tiny/" >> .git/info/exclude
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .i21/whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 REPORT_TO=none RAPA_CACHE=/tmp/rc \
  DATA_PATH=data/knowledge/harbour.json BASE_MODEL_NAME=$PWD/.tiny MAX_STEPS=12 SAVE_STEPS=100 RETENTION_SET=none \
  BASE_SAVE_PATH=/tmp/o_kl CHECKPOINT_PATH=/tmp/c_kl
# A random model finishes none of its replay answers within 128 tokens: give the pool fixed answers, so replay rows
# exist and the kl path runs (the check is of the loss path, not of the answers).
python3 -c "from finetune.pipeline import main; main(only=('prepare', 'replay'))" >/dev/null 2>&1 || true
python3 - <<'PY'
import glob, json
f = glob.glob("/tmp/rc/replay/.tiny-*.jsonl")[0]
prompts = json.load(open("data/retention/replay_prompts.json"))
open(f, "w").write("".join(json.dumps({"id": f"replay:{i}", "format": "replay", "messages": [
    {"role": "user", "content": p}, {"role": "assistant", "content": "I think the answer is simple."}]}) + "\n"
    for i, p in enumerate(prompts)))
PY
OVERWRITE=1 python3 -c "import sys; from finetune.pipeline import main; sys.exit(main(only=('prepare', 'replay', 'train')))" 2>&1 \
  | grep -E "rows|replay loss|estimated peak|tokens/s|'loss'|Error|error"
