"""The KL replay loss (REPLAY_LOSS=kl): replay tokens are marked in padded and padding-free batches, and the loss is
cross-entropy on the user's tokens plus KL(base || tuned) on the replay tokens."""

import pytest
import torch

from finetune.trainer import ReplayMaskCollator, replay_kl_loss


def _examples():
    # A user row (label on its last two tokens) and a replay row (labels on its last three).
    return [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "replay": 0},
            {"input_ids": [9, 10, 11, 12, 13], "labels": [-100, -100, 11, 12, 13], "replay": 1}]


@pytest.mark.parametrize("padding_free", [False, True])
def test_the_collator_marks_exactly_the_replay_rows_label_tokens(padding_free):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    batch = ReplayMaskCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free))(_examples())
    mask = batch["replay_mask"]
    assert mask.shape == batch["labels"].shape and "replay" not in batch
    if padding_free:
        assert mask[0].tolist() == [False] * 4 + [False, False, True, True, True]
    else:
        assert mask.tolist() == [[False] * 5, [False, False, True, True, True]]


def _tiny_peft(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _drifted(tiny_llama_dir):
    """A tiny model whose adapter has moved away from the base (B != 0), and a marked batch."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _tiny_peft(tiny_llama_dir)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    batch = ReplayMaskCollator(DataCollatorForLanguageModeling(pad_token_id=0))(_examples())
    return model, batch, batch.pop("replay_mask")


def test_with_the_adapter_still_zero_the_replay_part_is_zero(tiny_llama_dir):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _tiny_peft(tiny_llama_dir)  # B = 0: tuned == base, so KL = 0 and only the user's CE remains
    batch = ReplayMaskCollator(DataCollatorForLanguageModeling(pad_token_id=0))(_examples())
    mask = batch.pop("replay_mask")
    loss, out = replay_kl_loss(model, batch, mask)
    logp = out.logits[:, :-1].float().log_softmax(-1)
    tgt = batch["labels"][:, 1:]
    user = (tgt != -100) & ~mask[:, 1:]
    ce = -logp[user].gather(-1, tgt[user][:, None]).sum()
    assert loss.item() == pytest.approx((ce / (tgt != -100).sum()).item(), rel=1e-5)


def test_a_drifted_adapter_pays_kl_on_replay_tokens_and_gets_a_gradient(tiny_llama_dir):
    model, batch, mask = _drifted(tiny_llama_dir)
    only_user = replay_kl_loss(model, batch, torch.zeros_like(mask))[0]  # every label token counted as the user's
    loss, _ = replay_kl_loss(model, batch, mask)
    assert loss.item() != pytest.approx(only_user.item())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)


def test_auto_takes_kl_where_it_was_measured_to_keep_more(tmp_path):
    from finetune.config import RunConfig
    from finetune.plan import resolve_replay_loss, shape_from_config

    small, large = shape_from_config(SMOLLM2), shape_from_config(LLAMA_8B)
    cfg = RunConfig(base_model_name=str(tmp_path), report_to="none")
    assert cfg.replay_loss == "auto"
    assert resolve_replay_loss(cfg, "cpu") == "kl"
    assert resolve_replay_loss(cfg, "cuda", small) == "kl"    # measured on the H200: 78-80 % kept against 46 %
    assert resolve_replay_loss(cfg, "cuda", large) == "sft"   # not measured there; kl's logits cost memory
    assert resolve_replay_loss(RunConfig(base_model_name=str(tmp_path), report_to="none", replay_loss="kl"),
                               "cuda", large) == "kl"
    fp8 = RunConfig(base_model_name=str(tmp_path), report_to="none", base_precision="fp8")
    assert resolve_replay_loss(fp8, "cuda", small) == "sft"   # the FP8 kernels cannot run the base adapter-off
    no_replay = RunConfig(base_model_name=str(tmp_path), report_to="none", replay_fraction=0)
    assert resolve_replay_loss(no_replay, "cpu") == "sft"


def test_an_fp8_base_refuses_the_kl_replay_loss(tmp_path):
    from finetune.config import RunConfig
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="BASE_PRECISION=fp8: REPLAY_LOSS=kl"):
        RunConfig.from_env({"BASE_MODEL_NAME": str(tmp_path), "BASE_PRECISION": "fp8", "REPLAY_LOSS": "kl"},
                           env_file=None)
    RunConfig.from_env({"BASE_MODEL_NAME": str(tmp_path), "BASE_PRECISION": "fp8", "REPLAY_LOSS": "kl",
                        "REPLAY_FRACTION": "0"}, env_file=None)  # no replay rows: nothing to score


def test_replay_weight_scales_only_the_replay_part(tiny_llama_dir):
    model, batch, mask = _drifted(tiny_llama_dir)
    l0, l1, l3 = (replay_kl_loss(model, batch, mask, weight=w)[0].item() for w in (1e-9, 1.0, 3.0))
    kl = l1 - l0
    assert kl > 0 and l3 == pytest.approx(l0 + 3 * kl, rel=1e-4)


def test_replay_weight_is_refused_where_the_replay_loss_is_sft(tmp_path):
    from finetune.config import RunConfig
    from finetune.errors import ConfigError
    from finetune.plan import resolve_replay_loss

    with pytest.raises(ConfigError, match="REPLAY_WEIGHT=2.*REPLAY_LOSS=sft"):
        RunConfig.from_env({"BASE_MODEL_NAME": str(tmp_path), "REPLAY_WEIGHT": "2", "REPLAY_LOSS": "sft"}, env_file=None)
    from finetune.plan import shape_from_config

    cfg = RunConfig(base_model_name=str(tmp_path), report_to="none", replay_weight=2.0)
    assert resolve_replay_loss(cfg, "cpu") == "kl"
    with pytest.raises(ConfigError, match="REPLAY_WEIGHT=2.*REPLAY_LOSS=kl"):
        resolve_replay_loss(cfg, "cuda", shape_from_config(LLAMA_8B))
