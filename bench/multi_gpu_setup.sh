# Sourced by bench/multi_gpu.sh and bench/multi_gpu_ops.sh: DeepSpeed from the carried sdist, the random
# Llama-3.1-8B-architecture model in $M (SmolLM2 tokenizer, vocab 49152), and 128 text rows of >2048 tokens.
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz
M=/tmp/llama8b_mg
[[ -f $M/config.json ]] || python3 bench/gpu_speed.py build --model $M --tokenizer .bench_tok --vocab 49152
python3 - <<'PY'
import json, random
r = random.Random(0); w = "the of and to in a is that for it as with was on be by this are from at".split()
with open("/tmp/mg_data.jsonl", "w") as f:
    for i in range(128):
        f.write(json.dumps({"text": " ".join(r.choice(w) for _ in range(2100))}) + "\n")
PY
