"""MERGE_MODE=sharded: the streamed merge equals PEFT's merge_and_unload and keeps the base's shard layout."""

import json
import shutil

import pytest

from finetune.errors import ParityError, PipelineError
from finetune.merge_stream import INDEX, check_tensors, merge_sharded


@pytest.fixture(scope="module")
def lora(tmp_path_factory, smollm2_dir):
    """A random LoRA (r=8 on q_proj, v_proj, down_proj; lora_B non-zero) on SmolLM2, with the reference logits
    of PEFT's own merge_and_unload."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(adapter)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.save_pretrained(adapter)
    ids = torch.tensor([[1, 502, 3012, 288, 260, 1345, 28, 2683, 314, 40, 17]])
    merged = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        reference = merged(input_ids=ids).logits
    del merged, peft_model, model
    return adapter, ids, reference


def _logits(folder, ids):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_sharded_merge_matches_merge_and_unload(lora, smollm2_dir, tmp_path):
    adapter, ids, reference = lora
    out = tmp_path / "merged"
    summary = merge_sharded(smollm2_dir, adapter, out, log=lambda *_: None)
    assert summary["shards"] == ["model.safetensors"]
    assert len(summary["merged"]) == 3 * 30  # three targets in each of SmolLM2-135M's 30 layers
    assert summary["scale"] == 2.0
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    got = _logits(out, ids)
    assert float((got - reference).abs().max()) < 1e-4
    assert check_tensors(smollm2_dir, adapter, out) < 1e-5


def test_multi_shard_layout_and_index_are_kept(lora, smollm2_dir, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    adapter, ids, reference = lora
    sharded = tmp_path / "base-sharded"
    AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).save_pretrained(sharded, max_shard_size="100MB")
    base_index = json.loads((sharded / INDEX).read_text())
    shards = sorted(set(base_index["weight_map"].values()))
    assert len(shards) > 2

    out = tmp_path / "merged"
    summary = merge_sharded(sharded, adapter, out, log=lambda *_: None)
    assert summary["shards"] == shards
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    out_index = json.loads((out / INDEX).read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    assert out_index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    for shard in shards:  # each output shard holds exactly the tensors of its input shard
        with safe_open(str(sharded / shard), "pt") as a, safe_open(str(out / shard), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
    assert summary["largest_shard_bytes"] < 0.5 * summary["total_bytes"]
    assert float((_logits(out, ids) - reference).abs().max()) < 1e-4


def test_wrong_base_raises(lora, tiny_llama_dir, tmp_path):
    adapter, _, _ = lora
    with pytest.raises(ParityError, match="match no base tensor"):
        merge_sharded(tiny_llama_dir, adapter, tmp_path / "merged", log=lambda *_: None)


def test_modules_to_save_is_refused(lora, smollm2_dir, tmp_path):
    adapter, _, _ = lora
    other = tmp_path / "adapter"
    shutil.copytree(adapter, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["embed_tokens"]
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="modules_to_save.*MERGE_MODE=sharded"):
        merge_sharded(smollm2_dir, other, tmp_path / "merged", log=lambda *_: None)


def test_merge_mode_resolution(smollm2_dir, monkeypatch):
    from types import SimpleNamespace

    import finetune.merge_stream as ms
    from finetune.merge import _merge_mode

    cfg = SimpleNamespace(merge_mode="auto", use_qlora=False, qlora_merge_base="original")
    assert _merge_mode(cfg, str(smollm2_dir), log=lambda *_: None) == "whole"   # 540 MB fits in 24 GB
    monkeypatch.setattr(ms, "available_ram", lambda: 600_000_000)
    assert _merge_mode(cfg, str(smollm2_dir), log=lambda *_: None) == "sharded"
    dq = SimpleNamespace(merge_mode="sharded", use_qlora=True, qlora_merge_base="dequantized")
    assert _merge_mode(dq, str(smollm2_dir), log=lambda *_: None) == "whole"
