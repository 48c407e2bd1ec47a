#!/usr/bin/env python3
"""GPU speed benchmark (issue 5): HF QLoRA baseline vs raw Unsloth vs this pipeline's train stage, on a
random-initialised Llama-3.1-8B-architecture model, fixed-length and variable-length workloads.

    python3 bench/gpu_speed.py all --model /tmp/llama8b --out $OUT       # build the model if missing, run every arm
    python3 bench/gpu_speed.py build --model /tmp/llama8b --tokenizer DIR
    python3 bench/gpu_speed.py arm ours --model /tmp/llama8b --json x.json  (one arm, in this process)

Every arm runs in its own process (Unsloth patches transformers/trl/peft on import, so the HF baseline must never
share a process with it). All arms train on the same token ids with the same seed and effective batch 8 (the
memory-lean arm too), so their first losses must agree; tokens/s is taken over the steps after the first three
(warm-up, kernel compilation), with the GPU synchronised at every step end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_31_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", initializer_range=0.02)
SEQ = 2048
WARMUP = 3            # steps excluded from the timing
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)    # the pipeline's defaults, used by every arm
SEED = 42

# name -> (kind, environment for "ours" arms)
ARMS = {
    "hf": ("hf", {}),
    "unsloth_raw": ("unsloth_raw", {}),
    "ours": ("ours", {}),
    "ours_24g": ("ours", {"MAX_GPU_MEMORY": "24"}),
    "ours_offload": ("ours", {"BATCH_SIZE": "4", "GRAD_ACCUM": "2", "GRADIENT_CHECKPOINTING": "offload"}),
    # the memory-lean mode: offloaded checkpointing with the frozen weights streamed from host RAM
    "ours_stream": ("ours", {"BATCH_SIZE": "4", "GRAD_ACCUM": "2", "GRADIENT_CHECKPOINTING": "offload",
                             "OFFLOAD_WEIGHTS": "on"}),
    "ours_unsloth_kernels": ("ours", {"LORA_KERNELS": "unsloth"}),   # Unsloth's own LoRA kernels (the old default)
    "ours_fast_kernels": ("ours", {"LORA_KERNELS": "fast"}),         # fast_lora in eager blocks, whatever the size
    "ours_8bit": ("ours", {"OPTIM": "adamw_8bit"}),                  # the old default optimizer
    "ours_12g": ("ours", {"MAX_GPU_MEMORY": "12"}),
    "ours_mb4": ("ours", {"BATCH_SIZE": "4", "GRAD_ACCUM": "2"}),            # micro-batch capped at 4
    "ours_d005": ("ours", {"LORA_DROPOUT": "0.05"}),
    # Experiments: keys starting with "_" are bench switches, not pipeline settings.
    # _PADDING_FREE: padding-free batches whatever the data (the plan before it chose padded ones for equal rows);
    # _DEQUANT: the 4-bit bases swapped for their dequantized bf16 weights (same math, no per-pass dequantization).
    "ours_pf": ("ours", {"_PADDING_FREE": "1"}),
    "ours_mb4_pf": ("ours", {"BATCH_SIZE": "4", "GRAD_ACCUM": "2", "_PADDING_FREE": "1"}),
    "ours_mb4_pf_deq": ("ours", {"BATCH_SIZE": "4", "GRAD_ACCUM": "2", "_PADDING_FREE": "1", "_DEQUANT": "1"}),
    "ours_deq": ("ours", {"_DEQUANT": "1"}),
    "ours_mb4_deq": ("ours", {"BATCH_SIZE": "4", "GRAD_ACCUM": "2", "_DEQUANT": "1"}),
    "ours_lora16": ("ours", {"USE_QLORA": "false", "BATCH_SIZE": "4", "GRAD_ACCUM": "2"}),
    # _NOGUARD: no finiteness check of the loss (it syncs the host every micro-batch).
    "ours_noguard": ("ours", {"_NOGUARD": "1"}),
    # _BLOCK_COMPILE=0: no per-block torch.compile (UNSLOTH_BLOCK_COMPILE_LEGACY=0), everything eager.
    "ours_eager": ("ours", {"_BLOCK_COMPILE": "0"}),
    "unsloth_eager": ("unsloth_raw", {"_BLOCK_COMPILE": "0"}),
    # Issue 21. Unsloth tuned as a user would: checkpointing off, the largest micro-batch the effective batch allows
    # (8 x 1; it fits an 80 GB+ card), its padding-free default. _BF16: LoRA on a bf16 base instead of 4-bit.
    "unsloth_tuned": ("unsloth_raw", {"_CKPT": "off", "_MICRO": "8"}),
    "unsloth_tuned_bf16": ("unsloth_raw", {"_CKPT": "off", "_MICRO": "8", "_BF16": "1"}),
    # The FP8 base against the bf16 base, same learning rate; _STEPS: 33 steps so 30 losses can be compared.
    "ours_bf16": ("ours", {"USE_QLORA": "false", "LEARNING_RATE": "1e-4", "_STEPS": "33"}),
    "ours_fp8": ("ours", {"BASE_PRECISION": "fp8", "LEARNING_RATE": "1e-4", "_STEPS": "33"}),
    # Variable-length rows packed into MAX_SEQ_LENGTH sequences (PACKING=true; TRL's packing, rows kept apart by
    # position ids), and tuned Unsloth with the same switch, so the packing lever is compared with packing.
    "ours_packing": ("ours", {"PACKING": "true"}),
    "ours_fp8_var": ("ours", {"BASE_PRECISION": "fp8", "LEARNING_RATE": "1e-4"}),
    "unsloth_tuned_packing": ("unsloth_raw", {"_CKPT": "off", "_MICRO": "8", "_PACK": "1"}),
    # MAX_GPU_MEMORY=24 with the model loaded by the variable rows' own plan (the "ours_24g" arm loads it by the
    # fixed rows' plan and sizes the variable run inside that checkpointing: not what a run on such data gets).
    "ours_24g_var": ("ours", {"MAX_GPU_MEMORY": "24", "_VARPLAN": "1"}),
    # planned from the constants the arms before it measured on this card (finetune/calibrate.py)
    "ours_measured": ("ours", {"_MEASURED": "1"}),
    "ours_24g_var_measured": ("ours", {"MAX_GPU_MEMORY": "24", "_VARPLAN": "1", "_MEASURED": "1"}),
    # Variable rows' host stalls (issue 21): the caching allocator with expandable segments (fewer cudaMalloc/Free
    # as the token count changes step to step).
    "ours_expseg": ("ours", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    "unsloth_tuned_expseg": ("unsloth_raw", {"_CKPT": "off", "_MICRO": "8",
                                             "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    # The product's padding-free attention is one flash varlen call per layer (finetune.model.lean_varlen_attention);
    # _SEGMENTS=1 keeps Unsloth's torch-2.11 path (one padded cuDNN SDPA per row), what ours ran before run I21-9.
    # _VARLEN=1 gives Unsloth the varlen path it takes itself on torch >= 2.12.
    "ours_segments": ("ours", {"_SEGMENTS": "1"}),
    "unsloth_tuned_varlen": ("unsloth_raw", {"_CKPT": "off", "_MICRO": "8", "_VARLEN": "1"}),
}
DEFAULT_ARMS = "hf,unsloth_raw,unsloth_tuned,unsloth_tuned_bf16,ours,ours_bf16,ours_fp8"


# ----------------------------------------------------------------------------------------------------------
def build(model_dir: Path, tokenizer_dir: Path | None, vocab: int = 128256) -> float:
    """A random Llama-3.1-8B-architecture model in bf16 safetensors (initialised on the GPU: seconds)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    tok_files = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
    extra = {}
    if tokenizer_dir:
        tc = json.loads((tokenizer_dir / "config.json").read_text()) if (tokenizer_dir / "config.json").is_file() else {}
        extra = {k: tc[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in tc}
    layers = int(os.environ.get("BENCH_LAYERS", LLAMA_31_8B["num_hidden_layers"]))  # fewer: quick diagnostics
    cfg = LlamaConfig(**{**LLAMA_31_8B, "vocab_size": vocab, "num_hidden_layers": layers}, **extra)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.config.torch_dtype = torch.bfloat16
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="4GB")
    if tokenizer_dir:
        for f in tok_files:
            if (tokenizer_dir / f).is_file():
                shutil.copy(tokenizer_dir / f, tmp / f)
    tmp.rename(model_dir)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    print(f"[build] {model_dir}: {n / 1e9:.2f}B parameters, vocab {vocab}, in {time.time() - t0:.0f}s", flush=True)
    return time.time() - t0


def datasets_for(vocab: int, fixed_rows: int, var_rows: int):
    """Same ids for every arm: fixed rows of SEQ tokens; variable rows log-normal (median ~300, cap SEQ)."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(SEED)
    lo = 16  # skip the lowest ids (special tokens of the tokenizer that rides along)
    fixed = [rng.integers(lo, vocab, SEQ).tolist() for _ in range(fixed_rows)]
    lengths = np.clip(np.round(rng.lognormal(np.log(300), 1.0, var_rows)), 32, SEQ).astype(int)
    var = [rng.integers(lo, vocab, int(n)).tolist() for n in lengths]
    mk = lambda rows: Dataset.from_dict({"input_ids": rows, "labels": [list(r) for r in rows]})
    return mk(fixed), mk(var), {"var_mean_len": float(lengths.mean()), "var_median_len": float(np.median(lengths)),
                                "var_max_len": int(lengths.max()), "var_rows": var_rows}


def dequantize_lora_bases(model) -> int:
    """Swap each 4-bit base under a LoRA adapter for a plain Linear holding its dequantized weight.

    The forward and backward then compute with exactly the weights QLoRA would dequantize on the fly, minus the
    dequantization on every pass; the price is 2 bytes per base parameter instead of ~0.5. Returns the bytes added."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    added = 0
    for mod in list(model.modules()):
        base = getattr(mod, "base_layer", None)
        if not isinstance(base, bnb.nn.Linear4bit):
            continue
        w = dequantize_4bit(base.weight.data, base.weight.quant_state)  # in the quant state's dtype, as QLoRA
        lin = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=w.device,
                              dtype=w.dtype)
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        if base.bias is not None:
            lin.bias = torch.nn.Parameter(base.bias.data.to(w.dtype), requires_grad=False)
        added += w.numel() * w.element_size() - base.weight.data.numel() * base.weight.data.element_size()
        mod.base_layer = lin
    torch.cuda.empty_cache()
    return added


def count_attention_calls() -> dict:
    """How the padding-free attention ran: calls of Unsloth's varlen path and of its per-segment SDPA path."""
    import unsloth.utils.attention_dispatch as ad

    info = {"varlen": 0, "segments": 0}
    for name, key in (("_torch_varlen_packed", "varlen"), ("_sdpa_packed_segments", "segments")):
        fn = getattr(ad, name)

        def counted(*a, _fn=fn, _key=key, **k):
            info[_key] += 1
            return _fn(*a, **k)
        setattr(ad, name, counted)
    return info


# ----------------------------------------------------------------------------------------------------------
class Meter:
    """Per optimizer step: wall time (GPU synchronised), tokens fed and non-pad tokens, logged loss."""

    def __init__(self):
        self.times, self.tokens, self.useful, self.losses = [], [], [], []
        self.cur = [0, 0]

    def callback(self):
        import torch
        from transformers import TrainerCallback

        meter = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                torch.cuda.synchronize()
                meter.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize()
                meter.times.append(time.perf_counter())
                meter.tokens.append(meter.cur[0])
                meter.useful.append(meter.cur[1])
                meter.cur = [0, 0]

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    meter.losses.append(round(float(logs["loss"]), 5))
        return CB()

    def attach(self, trainer):
        orig = trainer.training_step

        def counting(model, inputs, *a, **k):
            ids = inputs["input_ids"]
            am = inputs.get("attention_mask")
            self.cur[0] += ids.numel()
            self.cur[1] += int(am.sum()) if am is not None else ids.numel()
            return orig(model, inputs, *a, **k)

        trainer.training_step = counting
        trainer.add_callback(self.callback())

    def summary(self) -> dict:
        import torch

        n = len(self.times)
        out = {"steps": n, "losses_first3": self.losses[:3], "losses": self.losses,
               "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
               "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
               "step_s": [round(b - a, 3) for a, b in zip([self.t0] + self.times[:-1], self.times)]}
        if n > WARMUP:
            dt = self.times[-1] - self.times[WARMUP - 1]
            tok = sum(self.tokens[WARMUP:])
            use = sum(self.useful[WARMUP:])
            out.update(timed_steps=f"{WARMUP + 1}..{n}", seconds=round(dt, 3), tokens=tok, useful_tokens=use,
                       tokens_per_s=round(tok / dt, 1), useful_tokens_per_s=round(use / dt, 1),
                       pad_fraction=round(1 - use / max(tok, 1), 4))
        return out


def profiler_callback(out: Path, arm_name: str, last: int, span: int = 1):
    """Profile the last `span` optimizer steps: kernel table by GPU time, GPU busy share of the wall."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class CB(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == last - span:
                torch.cuda.synchronize()
                self.t0 = time.perf_counter()
                self.deep = bool(os.environ.get("BENCH_PROFILE_STACK"))
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=self.deep,
                                    with_stack=self.deep)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is None or state.global_step < last:
                return
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            ka = self.prof.key_averages()
            # kernels only: operator rows repeat their kernels' time
            busy = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
            out.mkdir(parents=True, exist_ok=True)
            head = f"{arm_name}: {span} step(s), wall {wall:.3f}s, GPU kernel time {busy:.3f}s ({busy / wall:.0%} busy)\n"
            (out / f"profile_{arm_name}.txt").write_text(
                head + ka.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=70))
            if self.deep:  # where the copies and elementwise kernels come from
                (out / f"profile_{arm_name}_stacks.txt").write_text(self.prof.key_averages(group_by_stack_n=8).table(
                    sort_by="self_device_time_total", row_limit=40, max_name_column_width=60, max_src_column_width=400))
                (out / f"profile_{arm_name}_shapes.txt").write_text(self.prof.key_averages(group_by_input_shape=True).table(
                    sort_by="self_device_time_total", row_limit=60, max_name_column_width=60, max_shapes_column_width=200))
            if os.environ.get("BENCH_TRACE"):  # where the GPU waits: the gaps between kernels, and the host ops then
                (out / f"profile_{arm_name}_gaps.txt").write_text(head + gap_report(self.prof))
                trace = out / f"trace_{arm_name}.json"
                self.prof.export_chrome_trace(str(trace))
                subprocess.run(["gzip", "-f", str(trace)], check=False)
            print(head, flush=True)
            self.prof = None
    return CB()


def gap_report(prof, min_gap_us: float = 50.0, top: int = 30) -> str:
    """GPU idle intervals of a profiled step and the host (CPU) ops running during them, largest first."""
    import collections

    import torch

    evs = prof.events()
    cuda_t = torch.autograd.DeviceType.CUDA
    ks = sorted((e.time_range.start, e.time_range.end) for e in evs if e.device_type == cuda_t)
    cpu = [e for e in evs if e.device_type != cuda_t]
    if not ks:
        return "no kernels\n"
    t_begin = min(e.time_range.start for e in cpu) if cpu else ks[0][0]
    t_end = max(e.time_range.end for e in cpu) if cpu else ks[-1][1]
    gaps, cur_s, cur_e = [], ks[0][0], ks[0][1]
    if ks[0][0] - t_begin > min_gap_us:
        gaps.append((t_begin, ks[0][0]))
    for s, e in ks[1:]:
        if s > cur_e + min_gap_us:
            gaps.append((cur_e, s))
        cur_e = max(cur_e, e)
    if t_end - cur_e > min_gap_us:
        gaps.append((cur_e, t_end))
    total = sum(b - a for a, b in gaps)
    by_name = collections.Counter()
    lines = [f"GPU idle: {total / 1e3:.1f} ms in {len(gaps)} gaps > {min_gap_us:.0f} us "
             f"(profiled span {(t_end - t_begin) / 1e3:.1f} ms)\n"]
    detail = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        ov = collections.Counter()
        for e in cpu:
            o = min(b, e.time_range.end) - max(a, e.time_range.start)
            if o > 0:
                ov[e.name] += o
        detail.append(f"gap {(b - a) / 1e3:8.2f} ms at +{(a - t_begin) / 1e3:8.1f} ms: " + "; ".join(
            f"{n[:60]} {v / 1e3:.2f}" for n, v in ov.most_common(10)))
    for a, b in gaps:
        for e in cpu:
            o = min(b, e.time_range.end) - max(a, e.time_range.start)
            if o > 0:
                by_name[e.name] += o
    lines.append("host ops overlapping the gaps, summed (ms; nested ops count in each level):")
    lines += [f"  {v / 1e3:9.2f}  {n[:100]}" for n, v in by_name.most_common(40)]
    lines.append("\nlargest gaps (host ops overlapping each, ms):")
    return "\n".join(lines + detail) + "\n"


def count_lora_paths() -> dict:
    """Which fused LoRA Functions run, and why Unsloth's router declines one (diagnostic, BENCH_COUNT_LORA=1)."""
    import collections

    import torch
    import unsloth.kernels.fast_lora as ufl

    counts: dict = collections.Counter()
    for cls in (ufl.LoRA_QKV, ufl.LoRA_MLP, ufl.LoRA_W):
        fwd = cls.forward

        def counted(ctx, *a, _f=fwd, _n=cls.__name__):
            out = _f(ctx, *a)
            # The router sets _rapa_fast (True: fast_lora ran); without LORA_KERNELS=fast there is no router.
            counts[_n + (" fast_lora" if getattr(ctx, "_rapa_fast", False) else " unsloth's own")] += 1
            return out
        cls.forward = staticmethod(counted)
    route, mismatch = ufl._lora_dropout_and_bias, ufl._autocast_dtype_mismatch

    def routed(projs, X):
        r = route(projs, X)
        counts[f"router {len(projs)} projs -> {'peft' if r is None else 'fused'}; X {X.dtype}, autocast "
               f"{torch.is_autocast_enabled('cuda')} {torch.get_autocast_dtype('cuda')}"] += 1
        return r

    def mism(X):
        r = mismatch(X)
        counts[f"autocast dtype mismatch {r}"] += 1
        return r
    ufl._lora_dropout_and_bias, ufl._autocast_dtype_mismatch = routed, mism
    return counts


def sft_args(out_dir: str, steps: int, micro: int, accum: int, **kw):
    from trl import SFTConfig

    return SFTConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=micro,
                     gradient_accumulation_steps=accum, learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0,
                     weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                     save_strategy="no", seed=SEED, data_seed=SEED, report_to=[], max_length=SEQ,
                     dataloader_num_workers=0, disable_tqdm=True, **{"optim": "adamw_8bit", "bf16": True, **kw})


def run_workloads(make_trainer, fixed_ds, var_ds, steps: int, var_steps: int, result: dict, dump,
                  var_repeats: int = 1) -> None:
    """Each workload on a fresh trainer over the loaded model; the variable one `var_repeats` times (issue 21: one
    run of 16 steps swung 30 %): every run kept ("var_runs", then the last as "var"), the median run as "var_median"."""
    import torch

    jobs = [("fixed", fixed_ds, steps)] + [("var", var_ds, var_steps)] * max(1, var_repeats)
    if os.environ.get("BENCH_PROFILE_VAR") and var_steps > 0:  # one more, untimed run: its last steps profiled
        jobs.append(("var_prof", var_ds, min(var_steps, WARMUP + 2 + int(os.environ["BENCH_PROFILE_VAR"]))))
    for name, ds, n in jobs:
        if n <= 0:
            continue
        if name == "var" and "var" in result:  # keep each finished run once, in order
            result.setdefault("var_runs", []).append(result.pop("var"))
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        meter = Meter()
        try:
            trainer = make_trainer(ds, n)
            meter.attach(trainer)
            profiled = name == "fixed" and os.environ.get("BENCH_PROFILE") and n > WARMUP + 2
            if profiled:
                trainer.add_callback(profiler_callback(Path(os.environ["BENCH_PROFILE"]), result.get("arm", "arm"), n))
            if name == "var_prof":  # BENCH_PROFILE_VAR=K: the last K steps of a variable run, with the GPU's gaps
                k = int(os.environ["BENCH_PROFILE_VAR"])
                trainer.add_callback(profiler_callback(Path(os.environ.get("BENCH_PROFILE", "/tmp")),
                                                       result.get("arm", "arm") + "_var", n, span=k))
            trainer.train()
            if profiled:  # the profiled (last) step is slower: keep it out of the timing
                for xs in (meter.times, meter.tokens, meter.useful):
                    xs.pop()
            result[name] = meter.summary()
        except Exception as e:  # noqa: BLE001 - record and go on with the next workload
            import traceback

            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}", **(meter.summary() if meter.times else {})}
        trainer = None
        if name == "var":
            runs = result.get("var_runs", []) + [result["var"]]
            ok = sorted((r for r in runs if r.get("useful_tokens_per_s")), key=lambda r: r["useful_tokens_per_s"])
            result["var_useful_tokens_per_s_runs"] = [r.get("useful_tokens_per_s") for r in runs]
            result["var_median"] = ok[len(ok) // 2] if ok else result["var"]
        dump()


def arm(name: str, model_dir: Path, json_path: Path, steps: int, var_steps: int, var_repeats: int = 1) -> None:
    kind, env = ARMS[name]
    steps = int(env.get("_STEPS", steps))
    result: dict = {"arm": name, "kind": kind, "env": env}
    dump = lambda: json_path.write_text(json.dumps(result, indent=1))
    t0 = time.time()
    os.environ.update({k: v for k, v in env.items() if k.startswith("PYTORCH_")})  # before torch is imported
    work = f"/tmp/bench_{name}"
    if "_BLOCK_COMPILE" in env:  # read by Unsloth when it loads a model
        os.environ["UNSLOTH_BLOCK_COMPILE_LEGACY"] = env["_BLOCK_COMPILE"]
    if kind == "ours":
        # The pipeline's own order: the config, then the backend choice (which imports unsloth first).
        from finetune import model as model_lib
        from finetune.config import RunConfig

        environ = {"BASE_MODEL_NAME": str(model_dir), "MAX_SEQ_LENGTH": str(SEQ), "REPORT_TO": "none",
                   "REPLAY_FRACTION": "0", "RETENTION_SET": "", "SAVE_STEPS": "100000", "BASE_SAVE_PATH": work,
                   "CHECKPOINT_PATH": work + "/ckpt", "OVERWRITE": "1", "MAX_STEPS": str(max(steps, var_steps, 1)), "WARMUP_RATIO": "0",
                   "SEED": str(SEED), **env}
        cfg = RunConfig.from_env({k: v for k, v in environ.items() if not k.startswith("_")}, env_file=None)
        backend = model_lib.choose_backend(cfg)
    elif kind == "unsloth_raw":
        import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)
    import torch

    from finetune.data.tokenize import setup_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    setup_tokenizer(tok)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    fixed_ds, var_ds, info = datasets_for(vocab, 8 * steps + 8, 8 * var_steps + 8)
    result.update(info)
    result["device"] = torch.cuda.get_device_name(0)

    if kind == "hf":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        from trl import SFTTrainer

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map={"": 0}, attn_implementation="sdpa")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(**LORA, bias="none", task_type="CAUSAL_LM", target_modules=TARGETS))
        result["plan"] = {"micro_batch": 4, "grad_accum": 2, "grad_ckpt": "on", "padding_free": False}
        make = lambda ds, n: SFTTrainer(model=model, args=sft_args(work, n, 4, 2, gradient_checkpointing=True),
                                        train_dataset=ds, processing_class=tok)
    elif kind == "unsloth_raw":
        from unsloth import FastLanguageModel
        from trl import SFTTrainer

        bf16 = bool(env.get("_BF16"))
        ckpt = {"off": False, "on": True}.get(env.get("_CKPT", "unsloth"), "unsloth")
        micro = int(env.get("_MICRO", 4))
        model, _ = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=SEQ, load_in_4bit=not bf16,
                                                     load_in_16bit=bf16, dtype=None, local_files_only=True)
        model = FastLanguageModel.get_peft_model(model, **LORA, bias="none", target_modules=TARGETS,
                                                 use_gradient_checkpointing=ckpt, random_state=SEED)
        result["plan"] = {"micro_batch": micro, "grad_accum": 8 // micro, "grad_ckpt": ckpt,
                          "padding_free": "unsloth default", "base": "bf16" if bf16 else "nf4"}
        pack = {"packing": True} if env.get("_PACK") else {}
        make = lambda ds, n: SFTTrainer(model=model, args=sft_args(work, n, micro, 8 // micro, **pack), train_dataset=ds,
                                        processing_class=tok)
    else:
        import dataclasses

        from finetune import calibrate, plan as plan_lib, train as train_lib
        from finetune.paths import RunPaths
        from finetune.trainer import build_trainer

        # The train stage's own pieces, in its order: memory cap, the base's shape and the card's memory measured
        # once, the plan, the model, then build_trainer (what the stage calls). Rows come from the synthetic
        # workloads instead of a prepared file, and nothing is resumed or saved.
        train_lib.cap_gpu_memory(cfg)
        base = model_lib.resolve_base(cfg)
        shape, memory = model_lib.model_shape(base), backend.gpu_memory()
        # Every ours arm records what it measures for the planner (finetune/calibrate.py), in the card's record of
        # this machine's cache; _MEASURED=1 plans from what the arms before it recorded.
        record = calibrate.record_path(cfg, backend, shape)
        if any(k in env for k in ("_DEQUANT", "_NOGUARD", "_BLOCK_COMPILE", "_SEGMENTS")) or any(k.startswith("PYTORCH_") for k in env) \
                or os.environ.get("BENCH_PROFILE"):
            record = None  # a path the product does not run (or a profiled one) must not teach the product's planner
        measured = calibrate.measured_constants(record, cfg.use_qlora) if env.get("_MEASURED") else None
        if env.get("_MEASURED"):
            result["measured_constants"] = plan_lib.describe_constants(measured) if measured else "none recorded"
        p = plan_lib.plan(cfg, backend, len(fixed_ds), lengths=[len(x) for x in fixed_ds["input_ids"]], shape=shape,
                          gpu_memory=memory, measured=measured)
        # The variable-length workload is planned from its own lengths, with the loaded model's checkpointing.
        forced = dataclasses.replace(cfg, gradient_checkpointing="offload", offload_weights="on") \
            if p.grad_ckpt == "stream" else dataclasses.replace(cfg, gradient_checkpointing=p.grad_ckpt)
        var_lengths = [len(x) for x in var_ds["input_ids"]]
        p_var = plan_lib.plan(forced, backend, len(var_ds), lengths=var_lengths, shape=shape, gpu_memory=memory,
                              measured=measured)
        if p.grad_ckpt == "partial":  # the loaded model keeps exactly p.keep_layers layers' activations
            c = plan_lib.choose_micro_batch(
                forced, p_var.micro_batch * p_var.grad_accum, 1, "partial", backend, shape,
                plan_lib.budget_bytes(forced, memory), max_micro=None if cfg.batch_size == "auto" else int(cfg.batch_size),
                lengths=var_lengths, padding_free=p_var.padding_free, keep_fixed=p.keep_layers, k=measured)
            p_var = dataclasses.replace(p_var, micro_batch=c.micro_batch, grad_accum=c.grad_accum, keep_layers=c.keep_layers,
                                        est_bytes=c.est_bytes / (measured.mem_scale if measured else 1.0))
        if env.get("_VARPLAN"):  # loaded as a run on the variable rows alone would load it (their own checkpointing)
            p = p_var = plan_lib.plan(cfg, backend, len(var_ds), lengths=var_lengths, shape=shape, gpu_memory=memory,
                                      measured=measured)
        if env.get("_PADDING_FREE"):
            p = dataclasses.replace(p, padding_free=True, notes=[n for n in p.notes if "padded" not in n])
        show = lambda q: {"backend": backend.name, "why": backend.why, "micro_batch": q.micro_batch,
                          "grad_accum": q.grad_accum, "grad_ckpt": q.grad_ckpt, "keep_layers": q.keep_layers,
                          "padding_free": q.padding_free, "lora_kernels": q.lora_kernels, "notes": q.notes,
                          "effective_batch": q.effective_batch}
        result["plan"], result["plan_var"] = show(p), show(p_var)
        from transformers import set_seed

        set_seed(cfg.seed)
        if env.get("_SEGMENTS"):  # the attention path ours ran before run I21-9
            model_lib.lean_varlen_attention = lambda: "one SDPA call per row (bench arm _SEGMENTS: Unsloth's torch 2.11 path)"
        model = model_lib.load_for_training(cfg, base, tok, backend, p)
        if env.get("_DEQUANT"):
            result["dequant_added_gib"] = round(dequantize_lora_bases(model) / 2**30, 2)
        paths = RunPaths.from_config(cfg)
        if os.environ.get("BENCH_COUNT_LORA"):
            result["lora_paths"] = count_lora_paths()
        print(train_lib.banner(cfg, p, *train_lib.count_params(model), paths), flush=True)

        def make(ds, n):
            c = dataclasses.replace(cfg, max_steps=n)
            q = p_var if ds is var_ds else p
            t = build_trainer(c, paths, model, tok, q, ds, record=record)
            if env.get("_NOGUARD"):  # without the per-micro-batch finiteness check (a host sync)
                from trl import SFTTrainer
                t.compute_loss = SFTTrainer.compute_loss.__get__(t)
            return t
    if env.get("_VARLEN"):  # Unsloth's own arms: the path it takes on torch >= 2.12
        from finetune import model as model_lib

        result["attention"] = model_lib.lean_varlen_attention()
    if os.environ.get("BENCH_COUNT_ATTN") and "unsloth" in sys.modules:  # opt-in: under compiled blocks it is traced
        result["attention_calls"] = count_attention_calls()
    result["load_s"] = round(time.time() - t0, 1)
    result["gpu_mem_after_load_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    flops, peak = _model_flops(model, kind, env, result)
    dump()
    run_workloads(make, fixed_ds, var_ds, steps, var_steps, result, dump, var_repeats)
    runs = [("fixed", result.get("fixed", {}))] + [("var", r) for r in result.get("var_runs", []) + [result.get("var", {})]]
    for w, r in runs:  # model-FLOPs utilisation (finetune/mfu.py) from the measured tokens/s
        tps = r.get("tokens_per_s")
        if tps and flops.get(w) and peak:
            r["model_tflops"] = round(tps * flops[w] / 1e12, 1)
            r["mfu"] = round(tps * flops[w] / (peak * 1e12), 4)
    dump()
    if isinstance(result.get("lora_paths"), dict):
        result["lora_paths"] = dict(result["lora_paths"])
    result["total_s"] = round(time.time() - t0, 1)
    dump()


def _model_flops(model, kind: str, env: dict, result: dict):
    """FLOPs per token of each workload (attention span from its lengths) and the peak of the arm's precision."""
    import numpy as np
    import torch

    from finetune import mfu

    rng = np.random.default_rng(SEED)  # the variable workload's lengths, as datasets_for draws them
    lengths = np.clip(np.round(rng.lognormal(np.log(300), 1.0, 4096)), 32, SEQ)
    spans = {"fixed": float(SEQ), "var": mfu.attention_span([int(x) for x in lengths])}
    flops = {w: mfu.model_flops_per_token(model, s) for w, s in spans.items()}
    precision = "fp8" if env.get("BASE_PRECISION") == "fp8" else "bf16"
    peak = mfu.peak_tflops(torch.cuda.get_device_name(0), precision)
    result["flops_per_token_g"] = {w: round(f / 1e9, 2) for w, f in flops.items()}
    result["peak_tflops"] = {"precision": precision, "tflops": peak}
    return flops, peak


# ----------------------------------------------------------------------------------------------------------
def run_all(model_dir: Path, out: Path, arms: list[str], steps: int, var_steps: int, deadline_s: float,
            tokenizer_dir: Path | None, arm_timeout: float = 220, var_repeats: int = 1) -> None:
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "arms.log", "a")
    summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "arms": {}}
    if not (model_dir / "config.json").is_file():
        summary["build_s"] = round(build(model_dir, tokenizer_dir), 1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "UNSLOTH_DISABLE_STATISTICS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in arms:
        left = deadline_s - (time.time() - start)
        if left < 60:
            summary["arms"][name] = {"skipped": f"only {left:.0f}s left"}
            continue
        jp = Path("/tmp") / f"bench_{name}.json"
        jp.unlink(missing_ok=True)
        log.write(f"\n===== {name} =====\n")
        log.flush()
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, __file__, "arm", name, "--model", str(model_dir), "--json", str(jp),
                                   "--steps", str(steps), "--var-steps", str(var_steps),
                                   "--var-repeats", str(var_repeats)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, timeout=min(left - 10, arm_timeout),
                                  cwd=ROOT)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        res = json.loads(jp.read_text()) if jp.is_file() else {}
        res.update(rc=rc, wall_s=round(time.time() - t0, 1))
        summary["arms"][name] = res
        (out / "gpu_speed.json").write_text(json.dumps(summary, indent=1))
        print(f"[bench] {name}: rc={rc} in {time.time() - t0:.0f}s", flush=True)
    (out / "gpu_speed.json").write_text(json.dumps(summary, indent=1))
    print(table(summary))


def _var(arm_result: dict) -> dict:
    """The variable workload's figure of an arm: the median run where it ran several times."""
    return arm_result.get("var_median") or arm_result.get("var", {})


def table(summary: dict) -> str:
    arms = summary["arms"]
    base = arms.get("hf", {}).get("fixed", {}).get("tokens_per_s")
    base_v = _var(arms.get("hf", {})).get("useful_tokens_per_s")
    raw = arms.get("unsloth_raw", {}).get("fixed", {}).get("tokens_per_s")
    tuned = arms.get("unsloth_tuned", {}).get("fixed", {}).get("tokens_per_s")
    tuned_v = _var(arms.get("unsloth_tuned", {})).get("useful_tokens_per_s")
    rows = [f"{'arm':<18} {'plan':<40} {'fixed tok/s':>11} {'xHF':>5} {'xUns':>5} {'xTun':>5} {'MFU':>5} {'peakA/R GiB':>12} "
            f"{'var useful/s':>12} {'xHF':>5} {'xTun':>5} {'peakA':>6}  first-3 losses (fixed)"]
    for name, r in arms.items():
        if "skipped" in r:
            rows.append(f"{name:<13} skipped: {r['skipped']}")
            continue
        p = r.get("plan", {})
        plan = f"mb{p.get('micro_batch')}x{p.get('grad_accum')} ckpt={p.get('grad_ckpt')}" + (
            f"/{p.get('keep_layers')}" if p.get("grad_ckpt") == "partial" else "") + (" pf" if p.get("padding_free") is True else "")
        pv = r.get("plan_var")
        if pv and pv.get("micro_batch") != p.get("micro_batch"):
            plan += f" var:mb{pv['micro_batch']}x{pv['grad_accum']}"
        f, v = r.get("fixed", {}), _var(r)
        ft, vt = f.get("tokens_per_s"), v.get("useful_tokens_per_s")
        x = lambda a, b: f"{a / b:.2f}" if a and b else "-"
        mf = f"{f['mfu']:.1%}" if f.get("mfu") else "-"
        rows.append(f"{name:<18} {plan:<40} {ft or f.get('error', '-')[:11] if f else '-':>11} {x(ft, base):>5} {x(ft, raw):>5} "
                    f"{x(ft, tuned):>5} {mf:>5} "
                    f"{str(f.get('peak_alloc_gib', '-')) + '/' + str(f.get('peak_reserved_gib', '-')):>12} "
                    f"{vt or '-':>12} {x(vt, base_v):>5} {x(vt, tuned_v):>5} {str(v.get('peak_alloc_gib', '-')):>6}  "
                    f"{f.get('losses_first3')}  rc={r.get('rc')}")
    a, b = (arms.get(k, {}).get("fixed", {}).get("losses") or [] for k in ("ours_fp8", "ours_bf16"))
    n = min(len(a), len(b), 30)
    if n:
        d = [abs(x - y) / abs(y) for x, y in zip(a[:n], b[:n])]
        rows.append(f"ours_fp8 vs ours_bf16, first {n} losses: largest relative difference {max(d):.4%} "
                    f"(step {d.index(max(d)) + 1}), mean {sum(d) / n:.4%}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["all", "build", "arm", "table"])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--model", type=Path, default=Path("/tmp/llama8b"))
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".bench_tok")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--arms", default=DEFAULT_ARMS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--var-steps", type=int, default=8)
    ap.add_argument("--var-repeats", type=int, default=1, help="runs of the variable workload per arm; the median is kept")
    ap.add_argument("--deadline", type=float, default=540, help="seconds for the whole `all` run")
    ap.add_argument("--arm-timeout", type=float, default=220, help="seconds for one arm")
    a = ap.parse_args()
    tokdir = a.tokenizer if a.tokenizer and a.tokenizer.is_dir() else None
    if a.cmd == "build":
        build(a.model, tokdir, a.vocab)
    elif a.cmd == "arm":
        arm(a.name, a.model, a.json, a.steps, a.var_steps, a.var_repeats)
    elif a.cmd == "table":
        print(table(json.loads(Path(a.name).read_text())))
    else:
        run_all(a.model, a.out, a.arms.split(","), a.steps, a.var_steps, a.deadline, tokdir, a.arm_timeout, a.var_repeats)


if __name__ == "__main__":
    main()
