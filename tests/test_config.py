"""Configuration: parsed once, validated up front, every problem in one error, typos caught."""

from pathlib import Path

import pytest

from finetune.config import RunConfig, env_example
from finetune.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_follow_seed_003():
    cfg = RunConfig()
    assert (cfg.use_qlora, cfg.num_epochs, cfg.lora_rank, cfg.lora_alpha) == (True, 3, 16, 32)
    assert cfg.base_save_path == "final_model" and cfg.wandb_project == "RAPA" and cfg.job == "train"
    assert cfg.lr == 1e-4
    assert RunConfig(use_qlora=False).lr == 5e-6


def test_environment_values_are_typed_and_the_environment_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("LORA_RANK=8\nNUM_EPOCHS=2\nUSE_QLORA=false\n")
    cfg = RunConfig.from_env({"LORA_RANK": "32", "BASE_MODEL_NAME": "/m/Llama-3.1-8B"}, env_file)
    assert cfg.lora_rank == 32 and cfg.num_epochs == 2 and cfg.use_qlora is False
    assert cfg.model_slug == "Llama-3.1-8B" and cfg.adapter_kind == "lora"


def test_every_problem_is_reported_at_once_naming_variable_and_value():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_env({"LORA_RANK": "abc", "NUM_EPOCHS": "-1", "USE_QLORA": "maybe", "JOB": "fly"}, None)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    for part in ("LORA_RANK='abc'", "USE_QLORA='maybe'", "JOB='fly'", "allowed values are train"):
        assert part in msg


def test_range_errors_after_types():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_env({"LORA_RANK": "0", "LEARNING_RATE": "5", "EVAL_STEPS": "10"}, None)
    msg = str(e.value)
    assert "LORA_RANK=0" in msg and "LEARNING_RATE=5" in msg and "EVAL_STEPS=10 needs a held-out split" in msg


def test_misspelled_variable_in_dotenv_is_an_error_with_a_suggestion(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("LORA_RNAK=8\n")
    with pytest.raises(ConfigError, match=r"LORA_RNAK: unknown variable in .*\(did you mean LORA_RANK\?\)"):
        RunConfig.from_env({}, env_file)


def test_misspelled_variable_in_environment_is_an_error_but_unrelated_ones_are_not():
    with pytest.raises(ConfigError, match="NUM_EPOCH: unknown variable in the environment"):
        RunConfig.from_env({"NUM_EPOCH": "3", "PATH": "/bin", "HOME": "/root"}, None)
    RunConfig.from_env({"PATH": "/bin", "HOME": "/root", "WANDB_API_KEY": "x"}, None)


def test_demo_preset_only_when_model_and_data_are_the_embedded_defaults():
    demo = RunConfig.from_env({}, None)
    assert demo.num_epochs == 9 and demo.learning_rate == 1e-3 and demo.batch_size == "auto"
    assert demo.use_qlora is False and demo.replay_fraction == 1.6
    user = RunConfig.from_env({"DATA_PATH": "my.json"}, None)
    assert user.num_epochs == 3 and user.use_qlora is False and user.lr == 5e-6  # the bundled model: plain LoRA
    own_model = RunConfig.from_env({"BASE_MODEL_NAME": "/models/llama", "DATA_PATH": "my.json"}, None)
    assert own_model.use_qlora is True and own_model.lr == 1e-4  # seed 003's default for any other model
    assert RunConfig.from_env({"USE_QLORA": "true"}, None).use_qlora is True
    explicit = RunConfig.from_env({"NUM_EPOCHS": "7"}, None)
    assert explicit.num_epochs == 7


def test_config_is_frozen():
    with pytest.raises(Exception):
        RunConfig().lora_rank = 3  # type: ignore[misc]


def test_env_example_lists_every_variable_and_is_in_sync():
    committed = (ROOT / ".env.example").read_text()
    assert committed == env_example(), "regenerate: python -m finetune.config --env-example > .env.example"
    import dataclasses

    for f in dataclasses.fields(RunConfig):
        assert f"# {f.name.upper()}=" in committed


def test_secrets_are_not_config_fields():
    names = {f.upper() for f in RunConfig().public_dict()}
    assert "WANDB_API_KEY" not in names and "HF_TOKEN" not in names
