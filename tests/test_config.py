"""Configuration: parsed once, validated up front, every problem in one error, typos caught."""

from pathlib import Path

import pytest

from finetune import config as config_lib
from finetune.config import RunConfig, env_example
from finetune.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_follow_seed_003():
    cfg = RunConfig()
    # NUM_EPOCHS and USE_QLORA are resolved by finetune/defaults.py (tests/test_defaults.py): 3 epochs or more, 4-bit from 1B
    assert (cfg.use_qlora, cfg.num_epochs, cfg.lora_rank, cfg.lora_alpha) == (True, 0, 16, 32)
    assert cfg.base_save_path == "final_model" and cfg.wandb_project == "RAPA" and cfg.job == "train"
    assert cfg.lr == 2e-4  # unresolved (a config built in code): the rule's rate for a large model


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


def test_dpo_on_an_fp8_base_is_refused_orpo_is_not():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_env({"TRAINING_OBJECTIVE": "dpo", "BASE_PRECISION": "fp8", "REPLAY_FRACTION": "0"}, None)
    assert "BASE_PRECISION=fp8" in str(e.value) and "adapter off" in str(e.value)
    assert RunConfig.from_env({"TRAINING_OBJECTIVE": "orpo", "BASE_PRECISION": "fp8", "REPLAY_FRACTION": "0"},
                              None).base_precision == "fp8"


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


@pytest.mark.parametrize("name", ["LORA_RNAK", "LORA_RANKK", "BATCHSIZE", "RANK_LORA", "LEARNING_RAT", "SEEED"])
def test_near_misses_of_our_names_in_the_environment_stop_the_job(name):
    with pytest.raises(ConfigError, match=f"{name}: unknown variable in the environment"):
        RunConfig.from_env({name: "8"}, None)


def test_other_tools_variables_in_the_environment_are_left_alone():
    # each of these ended a job with exit 2 when every DATA_*/NUM_*/SAVE_*/USE_* name was taken for ours
    others = {"DATA_DIR": "/data", "NUM_THREADS": "8", "SAVE_DIR": "/s", "USE_CUDA": "1", "MAX_JOBS": "4",
              "NUM_WORKERS": "2", "EVAL_DIR": "/e", "TRAIN_FILE": "t", "PYTHONHASHSEED": "0", "CUDA_HOME": "/cuda",
              "MASTER_PORT": "29501", "LOCAL_RANK": "0", "RAPA_NO_VENV": "1"}
    RunConfig.from_env(others, None)


def test_dotenv_is_ours_unknown_names_there_stay_errors(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("DATA_DIR=/data\n")
    with pytest.raises(ConfigError, match="DATA_DIR: unknown variable in"):
        RunConfig.from_env({}, env_file)


@pytest.mark.parametrize("name", ["RAPA_NO_VENV", "ENV_FILE", "PYTHON", "VENV"])
def test_run_sh_only_variables_are_refused_in_dotenv_not_ignored(tmp_path, name):
    env_file = tmp_path / ".env"
    env_file.write_text(f"{name}=1\n")
    with pytest.raises(ConfigError, match=f"{name} in .*run.sh reads it before the file is found"):
        RunConfig.from_env({}, env_file)
    RunConfig.from_env({name: "1"}, None)  # in the environment, where run.sh reads it, it is fine


def test_launch_settings_come_from_dotenv_and_the_environment_wins(tmp_path):
    from finetune.config import load

    env_file = tmp_path / ".env"
    env_file.write_text("NNODES=2\nNODE_RANK=1\nMASTER_ADDR=10.0.0.1\nHF_TOKEN=hf_x\n")
    s = load({"MASTER_ADDR": "10.0.0.9"}, env_file)
    assert s.launch == {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29500", "HOSTFILE": ""}
    assert s.library_env == {"HF_TOKEN": "hf_x"}  # exported by the pipeline, where huggingface_hub looks
    with pytest.raises(ConfigError, match="NODE_RANK=2 with NNODES=2"):
        load({"NNODES": "2", "NODE_RANK": "2"}, None)
    with pytest.raises(ConfigError, match="HOSTFILE=/nonexistent/hosts: no such file"):
        load({"HOSTFILE": "/nonexistent/hosts"}, None)


def test_launch_plan_is_shell_assignments_run_sh_can_eval(tmp_path):
    import subprocess

    from finetune.config import launch_plan, load

    plan = launch_plan(load({"JOB": "resume_training", "NUM_GPUS": "2", "MASTER_ADDR": "a b;echo x"}, None))
    out = subprocess.run(["bash", "-c", f'eval "$1"; echo "$JOB|$JOB_GPUS|$NUM_GPUS|$MASTER_ADDR|$NNODES"', "_", plan],
                         capture_output=True, text=True, check=True).stdout
    assert out == "resume_training|1|2|a b;echo x|1\n"
    assert "JOB_RUNNER=pytest" in launch_plan(load({"JOB": "test"}, None))


def test_one_job_table_feeds_the_config_the_pipeline_and_help():
    from finetune import config, jobs, pipeline

    assert config.JOBS == tuple(jobs.JOBS)
    assert set(pipeline.STAGES) == {n for n, j in jobs.JOBS.items() if j.runner == "pipeline"}
    text = config.help_text()
    assert all(f"  {name} " in text for name in jobs.JOBS)


def test_a_job_that_is_not_a_pipeline_job_is_one_line_and_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "JOB": "test", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "finetune"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: JOB=test is not a pipeline job: run it as ./run.sh test"]


@pytest.mark.parametrize("env,needle", [({"JOB": "tst"}, "JOB='tst': allowed values are"),
                                        ({"LORA_RANK": "x"}, "LORA_RANK='x': expected an integer")])
def test_run_sh_stops_on_a_bad_configuration_with_one_line_before_launching(tmp_path, env, needle):
    import os
    import subprocess

    base = {k: v for k, v in os.environ.items() if k not in {"JOB", "LORA_RANK", "ENV_FILE"}}
    r = subprocess.run([str(ROOT / "run.sh")], cwd=ROOT, env={**base, **env, "ENV_FILE": str(tmp_path / ".env")},
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: configuration: {needle}"), r.stderr
    assert "[config]" not in r.stdout  # it stopped before the job started


def test_export_gguf_is_normalised_by_the_config():
    cfg = RunConfig.from_env({"EXPORT_GGUF": " Q8-0, f16 ,q8_0"}, None)
    assert cfg.export_gguf == "q8_0,f16"
    with pytest.raises(ConfigError, match=r"EXPORT_GGUF='q3': unknown format\(s\) q3"):
        RunConfig.from_env({"EXPORT_GGUF": "Q3"}, None)


def test_the_cache_folder_is_resolved_by_the_config(tmp_path):
    assert RunConfig.from_env({"RAPA_CACHE": str(tmp_path)}, None).cache_dir == tmp_path
    assert RunConfig.from_env({"XDG_CACHE_HOME": str(tmp_path)}, None).cache_dir == tmp_path / "rapa"
    assert RunConfig.from_env({"HOME": str(tmp_path)}, None).rapa_cache  # resolved, never left empty


def test_no_preset_appears_or_vanishes_with_which_variables_are_set():
    """The automatic values are left for finetune/defaults.py whatever else is set: the demo, own data, own model."""
    for env in ({}, {"DATA_PATH": "my.json"}, {"BASE_MODEL_NAME": "/models/llama", "DATA_PATH": "my.json"}):
        s = config_lib.load(env, None)
        assert (s.config.num_epochs, s.config.learning_rate, s.config.eval_max_new_tokens) == (0, 0, 0)
        assert s.config.replay_fraction == 1.6
        assert not s.explicit & {"num_epochs", "learning_rate", "use_qlora", "eval_max_new_tokens"}
    s = config_lib.load({"USE_QLORA": "true", "NUM_EPOCHS": "7", "LEARNING_RATE": "auto"}, None)
    assert s.config.use_qlora is True and s.config.num_epochs == 7
    assert s.explicit >= {"use_qlora", "num_epochs"} and "learning_rate" not in s.explicit


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


@pytest.mark.parametrize("raw", ["0", "-1", "2000"])
def test_dist_timeout_must_be_positive_and_at_most_a_day(raw):
    with pytest.raises(ConfigError, match=f"DIST_TIMEOUT_MINUTES={raw}: must be in"):
        RunConfig.from_env({"DIST_TIMEOUT_MINUTES": raw}, None)


def test_dist_timeout_takes_fractions_and_nccl_settings_are_allowed_in_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("NCCL_SOCKET_IFNAME=eth0\nNCCL_IB_DISABLE=1\nTORCH_NCCL_ASYNC_ERROR_HANDLING=3\n")
    assert RunConfig.from_env({"DIST_TIMEOUT_MINUTES": "0.5"}, env_file).dist_timeout_minutes == 0.5
