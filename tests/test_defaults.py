"""The automatic values: one rule for every model and dataset (finetune/defaults.py), never over a value set."""

import re
import shutil
from pathlib import Path

import pytest

from finetune import config as config_lib
from finetune import defaults
from finetune.config import RunConfig
from finetune.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def resolved(env: dict, params: int, rows: int, pool: int = 65):
    s = config_lib.load(env, None)
    cfg, model_reason = defaults.resolve_model(s.config, s.explicit, params)
    cfg, epochs_reason = defaults.resolve_epochs(cfg, s.explicit, rows, pool)
    return cfg, defaults.preset_line(model_reason, epochs_reason)


def test_the_bundled_demo_resolves_to_its_measured_settings():
    # docs/QUALITY.md D13: 40 rows, 64 replay, batch 8, 9 epochs (117 steps) at 1e-3, LoRA without 4-bit
    cfg, line = resolved({}, params=134_515_008, rows=40)
    assert (cfg.num_epochs, cfg.lr, cfg.use_qlora, cfg.replay_fraction) == (9, 1e-3, False, 1.6)
    assert line.startswith("[preset] LoRA without 4-bit at lr 0.001 because 135M parameters") and "\n" not in line
    assert "NUM_EPOCHS auto -> 9" in line


def test_a_small_file_gets_at_least_the_minimum_steps_and_a_large_one_the_seeds_three_epochs():
    small, _ = resolved({"DATA_PATH": "x.jsonl"}, params=134_515_008, rows=24)
    per_epoch = -(-(24 + 38) // 8)
    assert small.num_epochs * per_epoch >= defaults.MIN_STEPS > (small.num_epochs - 1) * per_epoch
    large, _ = resolved({"DATA_PATH": "x.jsonl"}, params=134_515_008, rows=50_000)
    assert large.num_epochs == 3


def test_question_variants_count_as_passes_not_as_steps():
    """As measured (docs/QUALITY.md): a small file keeps its epochs, so its variants add steps; on a large file, where
    the seed's three passes decide, the variants count as passes and the run does not grow 3x."""
    s = config_lib.load({"DATA_PATH": "x.jsonl"}, None)
    cfg, _ = defaults.resolve_model(s.config, s.explicit, 134_515_008)
    plain, _ = defaults.resolve_epochs(cfg, s.explicit, 15, 65)
    varied, line = defaults.resolve_epochs(cfg, s.explicit, 15, 65, variants=34)
    assert plain.num_epochs == varied.num_epochs == 22 and "34 question variants count as passes" in line
    large, line = defaults.resolve_epochs(cfg, s.explicit, 50_000, 65, variants=115_000)
    assert large.num_epochs == 1 and "at least 1 epoch;" in line


def test_the_row_count_includes_the_variants_the_rows_will_add():
    from finetune.pipeline import _count_rows

    island = str(ROOT / "data/heldout/island.json")
    assert _count_rows(RunConfig(data_path=island, question_variants="on")) == (15, 34)
    assert _count_rows(RunConfig(data_path=island)) == (15, 0)  # auto: off


def test_a_large_model_gets_qlora_at_the_unsloth_rate():
    cfg, line = resolved({"BASE_MODEL_NAME": "/m/Llama-3.1-8B"}, params=8_030_261_248, rows=1000)
    assert cfg.use_qlora is True and cfg.lr == 2e-4 and "QLoRA (NF4) at lr 0.0002 because 8.0B parameters" in line


def test_an_explicit_value_is_never_overridden():
    env = {"NUM_EPOCHS": "1.5", "LEARNING_RATE": "5e-6", "USE_QLORA": "true"}
    cfg, line = resolved(env, params=134_515_008, rows=24)
    assert (cfg.num_epochs, cfg.lr, cfg.use_qlora) == (1.5, 5e-6, True)
    assert "NUM_EPOCHS=1.5 as set" in line and "USE_QLORA, LEARNING_RATE as set" in line
    assert cfg.epochs_label == "1.5"


def test_max_steps_decides_the_length_and_the_folder_keeps_the_seeds_label():
    cfg, line = resolved({"MAX_STEPS": "3"}, params=134_515_008, rows=8)
    assert cfg.num_epochs == 3 and "MAX_STEPS=3 decides" in line


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_num_epochs_must_be_positive_or_auto(value):
    with pytest.raises(ConfigError, match="NUM_EPOCHS=.*or auto"):
        RunConfig.from_env({"NUM_EPOCHS": value}, None)


def test_copying_env_example_to_env_changes_nothing(tmp_path):
    env_file = tmp_path / ".env"
    shutil.copyfile(ROOT / ".env.example", env_file)
    # and with every line uncommented: each shows the value the run takes when the variable is unset
    uncommented = tmp_path / "all.env"
    lines = [l[2:] for l in (ROOT / ".env.example").read_text().splitlines() if re.fullmatch(r"# [A-Z][A-Z_]*=\S*", l)]
    uncommented.write_text("\n".join(lines) + "\n")
    for env in ({}, {"DATA_PATH": "x.jsonl"}):
        plain = resolved(env, params=134_515_008, rows=24)
        for f in (env_file, uncommented):
            s = config_lib.load(env, f)
            cfg, m = defaults.resolve_model(s.config, s.explicit, 134_515_008)
            cfg, e = defaults.resolve_epochs(cfg, s.explicit, 24, 65)
            assert cfg.public_dict() | {"rapa_cache": ""} == plain[0].public_dict() | {"rapa_cache": ""}
