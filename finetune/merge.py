"""The merge stage: adapter + unquantised base -> a plain Hugging Face model, accepted only through the parity gate.

The gate compares the adapter applied to the base (what merging must reproduce) with the merged model as
reloaded from disk: max |logit difference| and identical greedy continuations. For QLoRA it also reports the
gap to the adapter on the 4-bit base (what was trained), which merging into full precision cannot remove.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune import model as model_lib
from finetune import portable
from finetune.config import RunConfig
from finetune.data.tokenize import prompt_text
from finetune.errors import ConfigError, ParityError
from finetune.paths import RunPaths, atomic_dir, require_disk, followup


@dataclass
class Parity:
    max_abs_logit_diff: float
    tolerance: float
    greedy_identical: int
    prompts: int
    stops_at_eos: bool
    qlora_gap: float | None = None   # max |logit diff|, adapter on the 4-bit base (as trained) vs merged
    qlora_gap_scale: float | None = None  # the largest |logit| of the adapter on the 4-bit base: the gap's yardstick
    fp8_gap: float | None = None     # BASE_PRECISION=fp8: adapter on the FP8 round trip of the base vs merged

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.greedy_identical == self.prompts


def merge(cfg: RunConfig, paths: RunPaths, base: str, device: str = "cpu", log=print) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    if not (paths.adapters / "adapter_config.json").is_file():
        raise ConfigError(f"no finished adapter in {paths.adapters}: finish training first: {followup(cfg, 'resume_training')}")
    _check_disk(base, paths.merged.parent)
    tok = AutoTokenizer.from_pretrained(paths.adapters)  # the tokenizer and chat template used in training
    # The merge and its parity gate run in float32 on every device: a bf16 merge adds one rounding of every merged
    # weight, which on a GPU moved logits past any tolerance that still catches a wrong merge. The result is stored
    # in the base's own dtype once the gate has passed.
    dtype = torch.float32
    store = _stored_dtype(base)
    prompts = _parity_prompts(paths, tok)
    if _merge_mode(cfg, base, log) == "sharded":
        return _merge_sharded(cfg, paths, base, tok, prompts, device, dtype, log)

    into = "the NF4-dequantised base" if cfg.use_qlora and cfg.qlora_merge_base == "dequantized" else "the unquantised base"
    log(f"[merge] loading {base} as {into} ({str(dtype).replace('torch.', '')}) and the adapter {paths.adapters}")
    plain = model_lib.load_plain(base, tok, device, dtype)
    if cfg.use_qlora and cfg.qlora_merge_base == "dequantized":
        _dequantized_weights_into(plain, base, device)
    peft_model = PeftModel.from_pretrained(plain, str(paths.adapters)).eval()
    reference = _logits(peft_model, tok, prompts, device)
    ref_greedy = _greedy(peft_model, tok, prompts, device)
    merged = peft_model.merge_and_unload()
    merged.generation_config.eos_token_id = tok.eos_token_id
    merged.generation_config.pad_token_id = tok.pad_token_id

    with atomic_dir(paths.merged) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        tok.save_pretrained(tmp)
        del merged, peft_model, plain  # free the float32 model before the gate loads the saved one
        if device == "cuda":
            torch.cuda.empty_cache()
        if cfg.merge_parity == "on":
            _parity_gate(cfg, base, paths, tok, prompts, reference, ref_greedy, tmp, device, dtype, log)
        else:
            log("[merge] MERGE_PARITY=off: parity gate skipped")
        if store != torch.float32:
            _restore_dtype(tmp, store, log)
        portable.for_transformers4(tmp)  # after the last save_pretrained, which writes transformers 5's keys only
    log(f"[merge] merged model written to {paths.merged}")
    return paths.merged


def _stored_dtype(base: str):
    import torch

    c = json.loads((Path(base) / "config.json").read_text())
    name = c.get("dtype") or c.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name).replace("torch.", ""), torch.float32)


def _restore_dtype(folder: Path, store, log) -> None:
    """Re-save the gated float32 merge in the base's dtype (what a user serves), shard files replaced in place."""
    from transformers import AutoModelForCausalLM

    log(f"[merge] storing the merged weights as {str(store).replace('torch.', '')}, the base's dtype")
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=store)
    for f in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        f.unlink()
    m.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")


def _merge_mode(cfg: RunConfig, base: str, log=print) -> str:
    """MERGE_MODE resolved: whole or sharded (auto: sharded when the base is larger than half the free RAM)."""
    from finetune.merge_stream import available_ram, base_size, fits_in_memory

    mode = getattr(cfg, "merge_mode", "auto")
    if mode == "auto":
        mode = "whole" if fits_in_memory(Path(base)) else "sharded"
        if mode == "sharded":
            log(f"[merge] MERGE_MODE=auto: base {base_size(Path(base)) / 1e9:.1f} GB > half the free RAM "
                f"({available_ram() / 1e9:.1f} GB available): merging shard by shard")
    if mode == "sharded" and cfg.use_qlora and cfg.qlora_merge_base == "dequantized":
        log("[merge] QLORA_MERGE_BASE=dequantized needs the whole model (NF4 round trip): using MERGE_MODE=whole")
        mode = "whole"
    return mode


def _merge_sharded(cfg: RunConfig, paths: RunPaths, base: str, tok, prompts, device, dtype, log=print) -> Path:
    """Stream base shards through the adapter; gate with logits if the model fits in memory, else per tensor."""
    from finetune.merge_stream import check_tensors, fits_in_memory, merge_sharded

    base_cfg = json.loads((Path(base) / "config.json").read_text())
    if len(tok) > base_cfg.get("vocab_size", len(tok)):
        raise ConfigError(f"the training tokenizer has {len(tok)} tokens but the base {base_cfg['vocab_size']}: "
                          f"resized embeddings are not supported by MERGE_MODE=sharded (use MERGE_MODE=whole)")
    gate = cfg.merge_parity == "on" and fits_in_memory(Path(base))
    reference = ref_greedy = None
    if gate:  # the adapter on the base, what merging must reproduce (the model fits: it was checked above)
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model_lib.load_plain(base, tok, device, dtype), str(paths.adapters)).eval()
        reference = _logits(peft_model, tok, prompts, device)
        ref_greedy = _greedy(peft_model, tok, prompts, device)
        del peft_model
    log(f"[merge] MERGE_MODE=sharded: streaming {base} shard by shard through the adapter {paths.adapters}")
    with atomic_dir(paths.merged) as tmp:
        summary = merge_sharded(Path(base), paths.adapters, tmp, dtype=None, log=log)
        tok.save_pretrained(tmp)
        for name in ("config.json", "generation_config.json"):  # as _match_vocab sets them on the whole path
            f = tmp / name
            if f.is_file():
                c = json.loads(f.read_text())
                c["eos_token_id"], c["pad_token_id"] = tok.eos_token_id, tok.pad_token_id
                f.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
        if cfg.merge_parity == "off":
            log("[merge] MERGE_PARITY=off: parity gate skipped")
        elif gate:
            _parity_gate(cfg, base, paths, tok, prompts, reference, ref_greedy, tmp, device, dtype, log)
        else:
            log("[merge] parity gate skipped: model larger than memory; per-tensor check instead")
            worst = check_tensors(Path(base), paths.adapters, tmp)
            (tmp / "merge_parity.json").write_text(json.dumps(
                {"mode": "per-tensor", "max_abs_weight_diff": worst, "merged_tensors": len(summary["merged"])},
                indent=1) + "\n")
            log(f"[merge] per-tensor check: max |weight diff| {worst:.2e} over sampled merged tensors")
        portable.for_transformers4(tmp)
    log(f"[merge] merged model written to {paths.merged}")
    return paths.merged


def _dequantized_weights_into(plain, base: str, device: str) -> None:
    """Replace each quantised projection of `plain` by its NF4 round trip, the weights the adapter was trained on.

    QLORA_MERGE_BASE=dequantized: the merged model then reproduces adapter-on-4-bit-base (what was trained) instead
    of moving the adapter onto weights it never saw. Small models lose the most to NF4, and gain the most here.
    """
    import bitsandbytes.functional as bnbf
    import torch
    from transformers import AutoModelForCausalLM

    q = AutoModelForCausalLM.from_pretrained(base, quantization_config=model_lib.bnb_config(device),
                                             dtype=model_lib.compute_dtype(device))
    targets = dict(plain.named_modules())
    with torch.no_grad():
        for name, mod in q.named_modules():
            if hasattr(mod, "weight") and getattr(mod.weight, "quant_state", None) is not None:
                w = bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
                targets[name].weight.copy_(w.to(targets[name].weight.dtype).reshape(targets[name].weight.shape))
    del q


def _parity_prompts(paths: RunPaths, tok, n: int = 4) -> list[str]:
    rows = [json.loads(l) for l in open(paths.eval_file, encoding="utf-8")] if paths.eval_file.is_file() else []
    prompts = [prompt_text(tok, r["messages"]) for r in rows if "messages" in r][:n]
    return prompts or [tok.apply_chat_template([{"role": "user", "content": "Hello!"}], tokenize=False, add_generation_prompt=True)]


def _logits(model, tok, prompts: list[str], device: str):
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False).to(device)
            out.append(model(**ids).logits.float().cpu())
    return out


def _greedy(model, tok, prompts: list[str], device: str, n: int = 24) -> list[list[int]]:
    import torch

    res = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False).to(device)
            g = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
            res.append(g[0, ids["input_ids"].shape[1]:].tolist())
    return res


def _parity_gate(cfg, base: str, paths: RunPaths, tok, prompts, reference, ref_greedy, folder: Path, device, dtype,
                 log=print) -> Parity:
    """The gate, written into `folder` as merge_parity.json: the reloaded merge must reproduce the adapter on the
    base (`reference`, `ref_greedy`), else ParityError. For QLoRA the gap to what was trained is logged too."""
    parity = _gate(cfg, folder, tok, prompts, reference, ref_greedy, device, dtype)
    if cfg.use_qlora:
        parity.qlora_gap, parity.qlora_gap_scale = _qlora_gap(cfg, base, paths, tok, prompts, folder, device)
    elif cfg.base_precision == "fp8":
        parity.fp8_gap = _fp8_gap(base, paths, tok, prompts, folder, device)
    (folder / "merge_parity.json").write_text(json.dumps(asdict(parity), indent=1) + "\n")
    log(f"[merge] parity: max |logit diff| {parity.max_abs_logit_diff:.2e} (tolerance {parity.tolerance:.1e}); "
        f"greedy identical {parity.greedy_identical}/{parity.prompts}; stops at EOS: {parity.stops_at_eos}"
        + (f"\n{gap_line(cfg, parity)}" if parity.qlora_gap is not None else "")
        + (f"; FP8 gap (FP8 base vs merged) {parity.fp8_gap:.3f} logits" if parity.fp8_gap is not None else ""))
    if not parity.ok:
        raise ParityError(f"merge rejected: max |logit diff| {parity.max_abs_logit_diff:.3e} vs tolerance "
                          f"{parity.tolerance:.1e}, greedy identical {parity.greedy_identical}/{parity.prompts}; "
                          f"the adapter in {paths.adapters} is not reproduced by the merged weights")
    return parity


def gap_line(cfg, parity: Parity) -> str:
    """The QLoRA gap with its unit and what it means: how far the merged model is from what was trained."""
    where = ("the NF4 round trip of the base, exactly what was trained" if cfg.qlora_merge_base == "dequantized"
             else "the unquantised base, which the adapter never saw; QLORA_MERGE_BASE=dequantized merges into the NF4 "
                  "round trip instead")
    share = f" ({parity.qlora_gap / parity.qlora_gap_scale:.0%} of the largest logit, {parity.qlora_gap_scale:.1f})" \
        if parity.qlora_gap_scale else ""
    return (f"[merge] QLoRA gap {parity.qlora_gap:.3f} logits{share}: the most any next-token logit of the merged model "
            f"differs from the adapter on the 4-bit base it trained on; merged into {where}")


def _gate(cfg, folder: Path, tok, prompts, reference, ref_greedy, device, dtype) -> Parity:
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    got = _logits(reloaded, tok, prompts, device)
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, got))
    scale = max(float(r.abs().max()) for r in reference)
    # fp32 merges agree to rounding; bf16 rounds the merged weight once more (about 3 significant digits).
    rel = cfg.merge_parity_tol if dtype == torch.float32 else max(cfg.merge_parity_tol, 2e-2)
    greedy = _greedy(reloaded, tok, prompts, device)
    same = sum(a == b for a, b in zip(ref_greedy, greedy))
    stops = _stops_at_eos(reloaded, tok, prompts, device)
    return Parity(diff, rel * max(1.0, scale), same, len(prompts), stops)


def _stops_at_eos(model, tok, prompts, device, n: int = 128) -> bool:
    """Generation under the saved chat template ends with the template's end-of-turn within `n` tokens."""
    out = _greedy(model, tok, prompts[:2], device, n)
    return all(tok.eos_token_id in seq for seq in out)


def _qlora_gap(cfg, base, paths, tok, prompts, merged_dir: Path, device) -> tuple[float | None, float | None]:
    """Max |logit diff| between the adapter on the 4-bit base (as trained) and the merged model, and the largest
    |logit| of the former (the scale the gap is read against)."""
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        q = AutoModelForCausalLM.from_pretrained(base, quantization_config=model_lib.bnb_config(device),
                                                 dtype=model_lib.compute_dtype(device))
        q = PeftModel.from_pretrained(q, str(paths.adapters)).eval()
        a = _logits(q, tok, prompts, device)
        m = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=model_lib.compute_dtype(device)).to(device).eval()
        b = _logits(m, tok, prompts, device)
        return max(float((x - y).abs().max()) for x, y in zip(a, b)), max(float(x.abs().max()) for x in a)
    except Exception as e:  # informational only; the gate itself has already passed
        print(f"[merge] could not measure the QLoRA gap: {type(e).__name__}: {e}")
        return None, None


def _fp8_gap(base, paths, tok, prompts, merged_dir: Path, device) -> float | None:
    """Max |logit diff| between the adapter on the FP8 round trip of the base (what BASE_PRECISION=fp8 trained on:
    its targeted projections through e4m3 with row scales) and the merged model."""
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from finetune import fp8

        targets = json.loads((paths.adapters / "adapter_config.json").read_text()).get("target_modules")
        q = model_lib.load_plain(base, tok, device)
        fp8.round_trip_(q, None if isinstance(targets, str) else targets)  # a string is all-linear (or a pattern)
        q = PeftModel.from_pretrained(q, str(paths.adapters)).eval()
        a = _logits(q, tok, prompts, device)
        m = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=model_lib.compute_dtype(device)).to(device).eval()
        b = _logits(m, tok, prompts, device)
        return max(float((x - y).abs().max()) for x, y in zip(a, b))
    except Exception as e:  # informational only; the gate itself has already passed
        print(f"[merge] could not measure the FP8 gap: {type(e).__name__}: {e}")
        return None


def _check_disk(base: str, dest: Path) -> None:
    need = sum(f.stat().st_size for f in Path(base).glob("*.safetensors")) * 1.1
    dest.mkdir(parents=True, exist_ok=True)
    require_disk(dest, need, "the merged model")
