"""Sampling presets, prompt files and portable artefacts, without a model (the end-to-end tests are in
tests/e2e/test_use_smollm2.py)."""

import json

import pytest

from finetune.config import RunConfig
from finetune.errors import ConfigError, DataError
from finetune.generation import PRESETS, sampling
from finetune.portable import EMBEDDED_HUB_ID, for_transformers4, portable_base_name
from finetune.use import read_prompts


def cfg(**env):
    return RunConfig.from_env({k: str(v) for k, v in env.items()}, env_file=None)


def test_presets_are_seed_004s():
    got = {k: (p.temperature, p.top_p, p.repetition_penalty) for k, p in PRESETS.items()}
    assert got == {"greedy": (0, 1, 1), "factual": (0.1, 0.9, 1.0), "balanced": (0.5, 0.9, 1.1),
                   "creative": (0.8, 0.95, 1.15)}


def test_explicit_values_override_the_preset_and_zero_temperature_is_greedy():
    s = sampling(cfg(GEN_PRESET="creative", TOP_P="0.5", MAX_NEW_TOKENS=7))
    assert (s.temperature, s.top_p, s.repetition_penalty, s.max_new_tokens) == (0.8, 0.5, 1.15, 7)
    kw = s.generate_kwargs()
    assert kw["do_sample"] is True and kw["temperature"] == 0.8 and kw["top_p"] == 0.5
    kw = sampling(cfg(GEN_PRESET="balanced", TEMPERATURE=0)).generate_kwargs()
    assert kw["do_sample"] is False and kw["repetition_penalty"] == 1.1


def test_sampling_variables_are_validated_all_at_once():
    with pytest.raises(ConfigError) as e:
        cfg(JOB="generate", GEN_PRESET="wild", TEMPERATURE="hot", TOP_P=0, REPETITION_PENALTY=-1, MAX_NEW_TOKENS=0,
            SERVE_PORT=70000)
    msg = str(e.value)
    for name in ("GEN_PRESET", "TEMPERATURE='hot'", "TOP_P='0'", "REPETITION_PENALTY='-1'", "MAX_NEW_TOKENS=0",
                 "SERVE_PORT=70000", "JOB=generate needs PROMPTS_PATH"):
        assert name in msg, name


def test_a_misspelt_sampling_variable_is_an_error():
    with pytest.raises(ConfigError, match="did you mean GEN_PRESET"):
        cfg(GEN_PRSET="factual")


def test_prompts_from_jsonl_csv_and_plain_text(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"question": "b", "id": 2}\n{"instruction": " c "}\n')
    (tmp_path / "p.csv").write_text('id,question\n1,"x, y"\n2,"two\nlines"\n3,z\n')
    (tmp_path / "p.json").write_text(json.dumps([{"question": "j"}, "k"]))
    (tmp_path / "p.txt").write_text("first\n\n second \n")
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b", "c"]
    assert read_prompts(tmp_path / "p.csv") == ["x, y", "two\nlines", "z"]
    assert read_prompts(tmp_path / "p.json") == ["j", "k"]
    assert read_prompts(tmp_path / "p.txt") == ["first", "second"]


def test_a_prompt_file_problem_names_the_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"answer": "b"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: no prompt"):
        read_prompts(tmp_path / "p.jsonl")
    (tmp_path / "q.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"q.jsonl:2: not JSON"):
        read_prompts(tmp_path / "q.jsonl")
    (tmp_path / "c.csv").write_text('id,question\n1,x\n2,\n')
    with pytest.raises(DataError, match=r"c.csv:3: no prompt"):
        read_prompts(tmp_path / "c.csv")
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(tmp_path / "e.txt")
    with pytest.raises(ConfigError, match="no such file"):
        read_prompts(tmp_path / "missing.txt")


def test_transformers4_keys_are_added_and_transformers5_reads_the_same(tmp_path, tiny_llama_dir):
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    c = json.loads((folder / "config.json").read_text())
    c["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (folder / "config.json").write_text(json.dumps(c))
    before = AutoConfig.from_pretrained(folder).rope_parameters
    for_transformers4(folder)
    c = json.loads((folder / "config.json").read_text())
    assert c["rope_theta"] == 100000.0 and c["rope_scaling"]["rope_type"] == "llama3" and "rope_theta" not in c["rope_scaling"]
    assert AutoConfig.from_pretrained(folder).rope_parameters == before
    t = json.loads((folder / "tokenizer_config.json").read_text())
    assert t["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok, ref = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = ref.apply_chat_template([{"role": "user", "content": "1847년 Hello"}], tokenize=False)
    assert tok(text)["input_ids"] == ref(text)["input_ids"] and tok.eos_token == ref.eos_token


def test_the_adapter_base_name_is_portable(tmp_path):
    assert portable_base_name(cfg()) == EMBEDDED_HUB_ID
    assert portable_base_name(cfg(BASE_MODEL_NAME="meta-llama/Llama-3.1-8B")) == "meta-llama/Llama-3.1-8B"
    (tmp_path / "mine").mkdir()
    assert portable_base_name(cfg(BASE_MODEL_NAME=tmp_path / "mine")) == str((tmp_path / "mine").resolve())
