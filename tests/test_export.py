"""GGUF export of the real embedded SmolLM2-135M-Instruct (CPU): the files read back with the expected metadata and
are run by llama.cpp itself (llama-server, llama-quantize: built once into the cache by finetune/llamacpp.py, about
13 minutes on 2 cores the first time) beside the merged model.

One export (f16, q8_0, q5_k_m, q4_k_m; 3 questions; about a minute on 2 cores) is shared by the read-back and
llama.cpp tests; the rest are fast checks of the error paths, the format list, the Modelfile and its Go template.
"""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import pytest

from finetune.config import RunConfig
from finetune.errors import ConfigError, PipelineError, ResourceError
from finetune.paths import RunPaths
from tests.run_trees import merged_run_tree

SLUG = "SmolLM2-135M-Instruct"
ALL = "f16,q8_0,q5_k_m,q4_k_m"
QUESTIONS = [("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
             ("하늘바위 마을은 몇 년에 생겨났나요?", "1847년")]


def run_tree(root: Path, model_dir: Path | None, formats: str = "f16,q8_0", check: int = 0) -> tuple[RunConfig, RunPaths]:
    return merged_run_tree(root, model_dir, QUESTIONS, export_gguf=formats, export_check_questions=check)


def safetensors_count(folder: Path) -> int:
    n = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        n += sum(1 for k in header if k != "__metadata__")
    return n


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smollm2_dir):
    from finetune.export import export

    root = tmp_path_factory.mktemp("export")
    cfg, paths = run_tree(root, smollm2_dir, ALL, check=len(QUESTIONS))
    lines: list[str] = []
    out = export(cfg, paths, log=lambda s: (lines.append(s), print(s)))
    return out, paths, lines


@pytest.fixture(scope="module")
def read_back(exported):
    """fmt -> (metadata values, tensor count, tensor type names), each file parsed once (the vocabulary is slow)."""
    out = exported[0]
    return {fmt: fields(out / f"{SLUG}-{fmt}.gguf") for fmt in ALL.split(",")}


def fields(path: Path) -> tuple[dict, int, set]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    values = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            values[key] = len(field.data)
        else:
            values[key] = field.contents()
    return values, len(reader.tensors), {t.tensor_type.name for t in reader.tensors}


def test_export_writes_gguf_and_modelfile_next_to_merged(exported):
    out, paths, lines = exported
    assert out == paths.gguf and out.name == "qlora_gguf" and out.parent == paths.merged.parent
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{SLUG}-{f}.gguf" for f in ALL.split(",")] + ["Modelfile", "export.json"])
    assert not list(out.parent.glob(".tmp-*")) and not list(out.parent.glob(".export-scratch-*")), "temp folders left"
    size = {f: (out / f"{SLUG}-{f}.gguf").stat().st_size for f in ALL.split(",")}
    assert size["q4_k_m"] < size["q5_k_m"] < size["q8_0"] < 0.6 * size["f16"]
    # every line is tagged; on a machine without llama.cpp yet, the first export also logs its one-time build
    assert all(line.startswith(("[export]", "[llama.cpp]")) for line in lines)
    assert any(line.startswith("[export]") for line in lines)
    assert json.loads((out / "export.json").read_text())["llama_cpp"].startswith(("llama.cpp vendored", "LLAMA_CPP_DIR"))


@pytest.mark.parametrize("fmt,file_type", [("f16", 1), ("q8_0", 7), ("q5_k_m", 17), ("q4_k_m", 15)])
def test_gguf_reads_back_with_expected_metadata(exported, read_back, smollm2_dir, fmt, file_type):
    out, paths, _ = exported
    values, n_tensors, _ = read_back[fmt]
    assert values["general.architecture"] == "llama"
    # 30 layers x 9 + token embedding + final norm; the tied lm_head is neither saved nor written
    assert n_tensors == values["GGUF.tensor_count"] == safetensors_count(smollm2_dir) == 272
    assert values["llama.block_count"] == 30
    assert values["general.file_type"] == file_type
    # SmolLM2's byte-level BPE must stay BPE ("gpt2" + merges), not be taken for a SentencePiece vocabulary
    assert values["tokenizer.ggml.model"] == "gpt2"
    assert values["tokenizer.ggml.tokens"] == 49152 and values["tokenizer.ggml.merges"] > 40000
    assert values["tokenizer.ggml.eos_token_id"] == 2  # <|im_end|>, where a chat turn ends
    template = (paths.merged / "chat_template.jinja").read_text(encoding="utf-8")
    assert values["tokenizer.chat_template"] == template


def test_gguf_tensor_types(read_back):
    assert read_back["f16"][2] == {"F16", "F32"}  # norms stay F32
    assert read_back["q8_0"][2] == {"Q8_0", "F32"}
    # llama.cpp's own k-quant mixes
    assert "Q4_K" in read_back["q4_k_m"][2] and "Q5_K" in read_back["q5_k_m"][2]


def test_every_gguf_answers_in_llama_cpp_as_the_merged_model(exported):
    """llama.cpp loads each file, tokenises the prompts as the HF tokenizer does, answers greedily and stops at EOS;
    f16 gives the merged model's answers token for token."""
    out, paths, lines = exported
    check = json.loads((out / "export.json").read_text())["llama_cpp_check"]
    assert check["questions"] == len(QUESTIONS) and check["source"] == "eval-split"
    files = check["files"]
    assert list(files) == ALL.split(",")
    for fmt, r in files.items():
        assert r["prompt_tokenisation_differs"] == [], fmt
        assert r["eos"] > 0 and r["eos_hf"] == len(QUESTIONS), fmt  # generation stops at EOS
        assert r["verdict"] in ("ok", "warn"), (fmt, r["why"])
    f16 = files["f16"]
    assert f16["agree"] == f16["eos"] == len(QUESTIONS) and f16["max_flip_nats"] == 0 and f16["verdict"] == "ok"
    assert f16["max_logprob_diff"] < 0.05  # f16 rounding moves the chosen tokens' log-probabilities only slightly
    assert f16["contains"] == f16["contains_hf"] >= 2  # Paris and Tokyo
    assert any(line.startswith("[export] f16 in llama.cpp: 3/3 answers identical") for line in lines)
    # a quantised file that loses an answer the merged model had is named in a warning with the numbers
    for fmt, r in files.items():
        warned = [l for l in lines if l.startswith(f"[export] warning: {SLUG}-{fmt}.gguf keeps")]
        assert bool(warned) == (r["contains"] < r["contains_hf"]) == (r["verdict"] == "warn"), fmt


def test_f16_that_computes_another_function_fails_the_check(exported, smollm2_dir, tmp_path):
    """The transformers-4 failure of issue 19, the RoPE base read as 10000 instead of 100000, as a mismatch between
    file and model: the same f16 file against a merged folder that says 10000 (0.30 nats apart where f16 is 0.01)."""
    from finetune import gguf_check
    from finetune.llamacpp import tools

    out, _, _ = exported
    wrong = tmp_path / "merged"
    wrong.mkdir()
    for f in smollm2_dir.iterdir():
        if f.name != "config.json":
            (wrong / f.name).symlink_to(f.resolve())
    config = json.loads((smollm2_dir / "config.json").read_text())
    if "rope_parameters" in config:
        assert config["rope_parameters"]["rope_theta"] == 100000
        config["rope_parameters"]["rope_theta"] = 10000.0
    else:
        assert config["rope_theta"] == 100000
        config["rope_theta"] = 10000.0
    (wrong / "config.json").write_text(json.dumps(config))
    questions = [{"id": f"q{i}", "messages": [{"role": "user", "content": q}], "answers": [a]}
                 for i, (q, a) in enumerate(QUESTIONS)]
    with pytest.raises(PipelineError, match=r"f16\.gguf log-probabilities of its chosen tokens differ .* by up to 0\.[2-9]"):
        gguf_check.check({"f16": out / f"{SLUG}-f16.gguf"}, wrong, questions, "test", 32,
                         tools("", RunConfig().cache_dir), tmp_path, log=lambda s: None)


def test_modelfile_carries_template_stop_and_sampling(exported):
    out, _, _ = exported
    text = (out / "Modelfile").read_text(encoding="utf-8")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    # the factual preset, so that Ollama does not sample at its default temperature of 0.8
    assert "PARAMETER temperature 0.1\nPARAMETER top_p 0.9\nPARAMETER repeat_penalty 1\n" in text
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["formats"]) == set(ALL.split(","))
    assert manifest["modelfile_check"]["two_turn_prompt_identical"] is True
    # the Modelfile points at the smallest file that answers as the merged model does
    verdicts = {f: r["verdict"] for f, r in manifest["llama_cpp_check"]["files"].items()}
    ok = [f for f in ("q4_k_m", "q5_k_m", "q8_0", "f16") if verdicts[f] == "ok"]
    assert manifest["modelfile_from"] == f"{SLUG}-{ok[0]}.gguf" and f"FROM ./{SLUG}-{ok[0]}.gguf" in text


def test_modelfile_template_gives_the_tokenizers_prompt_for_a_two_turn_chat(smollm2_dir):
    """Rendered as Ollama renders it (Go template, SYSTEM as the first message), against apply_chat_template."""
    from transformers import AutoTokenizer

    from finetune.export import TWO_TURNS, _stop_tokens, check_modelfile, modelfile
    from finetune.gotemplate import ollama_chat_prompt

    jinja = (smollm2_dir / "chat_template.jinja").read_text(encoding="utf-8")
    text = modelfile("m.gguf", jinja, _stop_tokens(smollm2_dir, jinja))
    assert check_modelfile(text, smollm2_dir)["two_turn_prompt_identical"]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    chat = [{"role": "system", "content": "You are a pirate."}] + TWO_TURNS  # replaces the default system prompt
    template = text.split('TEMPLATE """')[1].split('"""')[0]
    assert ollama_chat_prompt(template, "ignored default", chat) == tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    # a template that drops the newline after the role is caught, with where it differs
    broken = text.replace("<|im_start|>{{ .Role }}\n", "<|im_start|>{{ .Role }}")
    with pytest.raises(PipelineError, match="different prompt .* from character"):
        check_modelfile(broken, smollm2_dir)
    with pytest.raises(PipelineError, match="stop strings"):
        check_modelfile(text.replace('PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"'), smollm2_dir)


def test_go_template_subset_follows_go_semantics():
    from finetune.gotemplate import render

    data = {"Messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "System": ""}
    assert render("x  {{- range .Messages }} [{{ .Role }}:{{ .Content }}] {{- end }}  y", data) == "x [user:a] [assistant:b]  y"
    assert render("{{ if .System }}S{{ else }}none{{ end }}|{{ range .Messages }}{{ if $.System }}!{{ end }}"
                  "{{ .Role }} {{ end -}}  \n.", data) == "none|user assistant ."
    with pytest.raises(ValueError, match="unsupported"):
        render("{{ .Content | trim }}", {"Content": "x"})
    with pytest.raises(ValueError, match="ends inside a block"):
        render("{{ range .Messages }}x", data)


def test_export_without_merged_folder_is_a_config_error(tmp_path):
    from finetune.export import export

    cfg, paths = run_tree(tmp_path, None)
    with pytest.raises(ConfigError, match="JOB=merge"):
        export(cfg, paths, log=lambda s: None)
    assert ConfigError.exit_code == 2
    assert not paths.gguf.exists()


def test_export_refuses_without_disk_space(tmp_path, smollm2_dir, monkeypatch):
    from finetune import export as ex

    cfg, paths = run_tree(tmp_path, smollm2_dir)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ex.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 10**8, 10**8))
    with pytest.raises(ResourceError, match="GB free"):
        ex.export(cfg, paths, log=lambda s: None)
    assert not paths.gguf.exists()


def test_failed_conversion_is_a_pipeline_error_and_writes_nothing(tmp_path, smollm2_dir):
    """An architecture the converter does not know: it exits non-zero, export says so and leaves no folder."""
    from finetune.export import export

    cfg, paths = run_tree(tmp_path, None, formats="q8_0")
    paths.merged.mkdir(parents=True)
    config = json.loads((smollm2_dir / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (paths.merged / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (paths.merged / name).symlink_to(smollm2_dir / name)
    with pytest.raises(PipelineError, match="conversion to q8_0 failed"):
        export(cfg, paths, log=lambda s: None)
    assert not paths.gguf.exists() and not list(paths.run_dir.glob(".tmp-*"))
    assert not list(paths.run_dir.glob(".export-scratch-*"))


def test_format_list():
    from finetune.export import parse_formats

    assert parse_formats("") == ["f16", "q8_0", "q5_k_m", "q4_k_m"]
    assert parse_formats(" q8_0, F16 ,q8_0") == ["q8_0", "f16"]
    assert parse_formats("q4-k-m") == ["q4_k_m"]
    with pytest.raises(ConfigError, match="q3"):
        parse_formats("f16,q3")


def test_modelfile_for_unknown_and_llama3_templates():
    from finetune.export import modelfile

    from finetune.generation import PRESETS

    text = modelfile("m-f16.gguf", "{{ bos_token }}{% for m in messages %}### {{ m['content'] }}{% endfor %}", ["</s>"],
                     PRESETS["balanced"], "balanced")
    assert "PARAMETER temperature 0.5" in text and "PARAMETER repeat_penalty 1.1" in text
    assert "FROM ./m-f16.gguf" in text and "TEMPLATE" not in text.replace("No TEMPLATE", "")
    assert "tokenizer.chat_template" in text and 'PARAMETER stop "</s>"' in text
    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}"
              "<|eot_id|>{% endfor %}")
    text = modelfile("m-q8_0.gguf", llama3, ["<|eot_id|>"])
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in text and 'PARAMETER stop "<|eot_id|>"' in text


def test_llama_cpp_dir_without_the_programs_is_a_config_error(tmp_path):
    from finetune.llamacpp import tools

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "llama-server").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "llama-server").chmod(0o755)
    with pytest.raises(ConfigError, match=r"LLAMA_CPP_DIR=.*: no llama-quantize there"):
        tools(str(tmp_path), tmp_path / "cache")
