"""Benchmark (issue 6): peak resident memory of the whole-model merge vs MERGE_MODE=sharded.

    .venv/bin/python bench/merge_memory.py [--cap-gb 3.0] [--workdir /tmp/merge-bench]

Writes a random 1.1B-parameter Llama (float32, about 4.4 GB, 500 MB shards) and a random r=16 LoRA on
q_proj/v_proj/down_proj straight to disk (the builder never holds more than one shard), then merges it in a fresh
process per path: (a) whole: from_pretrained + PeftModel + merge_and_unload + save_pretrained; (b) merge_sharded;
(c) merge_sharded again under an address-space cap (RLIMIT_AS, like `ulimit -v`) smaller than the model.
Peak RSS is the child's own ru_maxrss. The multi-GB files are deleted at the end.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV = 2048, 5632, 22, 32000, 32, 4
SHARD = 500 * 1000 * 1000


def build(base: Path, adapter: Path) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    base.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV, tie_word_embeddings=False,
                      max_position_embeddings=2048, torch_dtype="float32")
    cfg.save_pretrained(base)
    kv = HIDDEN // HEADS * KV
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
                   (p + "self_attn.v_proj.weight", (kv, HIDDEN)), (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                   (p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                   (p + "mlp.down_proj.weight", (HIDDEN, INTER)), (p + "input_layernorm.weight", (HIDDEN,)),
                   (p + "post_attention_layernorm.weight", (HIDDEN,))]
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    groups, cur, size = [], [], 0
    for name, shape in shapes:
        n = 4 * int(torch.Size(shape).numel())
        if cur and size + n > SHARD:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    groups.append(cur)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02) for n, s in group}
        save_file(tensors, str(base / fname), metadata={"format": "pt"})
        for n in tensors:
            weight_map[n] = fname
        total += sum(t.numel() * 4 for t in tensors.values())
        del tensors
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    r, targets = 16, ["q_proj", "v_proj", "down_proj"]
    LoraConfig(r=r, lora_alpha=32, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM").save_pretrained(adapter)
    lora = {}
    for name, shape in shapes:
        if any(f".{t}." in name for t in targets):
            mod = "base_model.model." + name[: -len(".weight")]
            lora[mod + ".lora_A.weight"] = torch.randn(r, shape[1], generator=g) * 0.01
            lora[mod + ".lora_B.weight"] = torch.randn(shape[0], r, generator=g) * 0.01
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})


def child(mode: str, base: Path, adapter: Path, out: Path) -> None:
    import torch

    t = time.time()
    if mode == "whole":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True, max_shard_size="500MB")
    else:
        from finetune.merge_stream import merge_sharded

        merge_sharded(base, adapter, out, log=lambda *_: None)
    print(json.dumps({"mode": mode, "seconds": round(time.time() - t, 1),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


def run(mode: str, base: Path, adapter: Path, out: Path, cap: int | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    pre = (lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))) if cap else None
    p = subprocess.run([sys.executable, __file__, "--child", mode, str(base), str(adapter), str(out)],
                       capture_output=True, text=True, preexec_fn=pre, cwd=ROOT)
    if p.returncode != 0:
        return {"mode": mode, "cap_gb": cap and cap / 1e9, "failed": p.stderr.strip().splitlines()[-1:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["cap_gb"] = cap and cap / 1e9
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=4)
    ap.add_argument("--cap-gb", type=float, default=3.0)
    ap.add_argument("--workdir", default="/tmp/merge-bench")
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], *map(Path, a.child[1:]))
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    base, adapter, out = work / "base", work / "adapter", work / "out"
    try:
        t = time.time()
        build(base, adapter)
        shards = sorted(base.glob("*.safetensors"))
        info = {"model_gb": round(sum(f.stat().st_size for f in shards) / 1e9, 2), "shards": len(shards),
                "largest_shard_mb": max(f.stat().st_size for f in shards) // 10**6,
                "adapter_mb": (adapter / "adapter_model.safetensors").stat().st_size // 10**6,
                "build_seconds": round(time.time() - t, 1)}
        print(json.dumps(info), flush=True)
        for mode, cap in (("sharded", None), ("sharded", int(a.cap_gb * 1e9)), ("whole", None)):
            print(json.dumps(run(mode, base, adapter, out, cap)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
