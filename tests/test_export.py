"""GGUF export of the real embedded SmolLM2-135M-Instruct (CPU): the files read back with the expected metadata.

One export (f16 + q8_0, about 40 s on 2 cores) is shared by the read-back tests; the rest are fast unit checks
of the error paths, the format list and the Modelfile.
"""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import pytest

from finetune.config import RunConfig
from finetune.errors import ConfigError, PipelineError, ResourceError
from finetune.paths import RunPaths

SLUG = "SmolLM2-135M-Instruct"


def run_tree(root: Path, model_dir: Path | None, formats: str = "f16,q8_0") -> tuple[RunConfig, RunPaths]:
    """`<root>/final_model/<model>/3/qlora_merged/` holding links to `model_dir` (or nothing)."""
    cfg = RunConfig(base_save_path=str(root / "final_model"), export_gguf=formats, num_epochs=3)
    paths = RunPaths.from_config(cfg)
    if model_dir is not None:
        paths.merged.mkdir(parents=True)
        for f in model_dir.iterdir():
            (paths.merged / f.name).symlink_to(f.resolve())
    return cfg, paths


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
    cfg, paths = run_tree(root, smollm2_dir)
    lines: list[str] = []
    out = export(cfg, paths, log=lambda s: (lines.append(s), print(s)))
    return out, paths, lines


@pytest.fixture(scope="module")
def read_back(exported):
    """fmt -> (metadata values, tensor count, tensor type names), each file parsed once (the vocabulary is slow)."""
    out = exported[0]
    return {fmt: fields(out / f"{SLUG}-{fmt}.gguf") for fmt in ("f16", "q8_0")}


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
    assert names == sorted([f"{SLUG}-f16.gguf", f"{SLUG}-q8_0.gguf", "Modelfile", "export.json"])
    assert not list(out.parent.glob(".tmp-*")) and not list(out.parent.glob(".export-scratch-*")), "temp folders left"
    f16, q8 = out / f"{SLUG}-f16.gguf", out / f"{SLUG}-q8_0.gguf"
    assert q8.stat().st_size < 0.6 * f16.stat().st_size
    assert all(line.startswith("[export]") for line in lines)
    # q4_k_m is not asked for here; where llama.cpp's quantiser is missing the output says why
    q4 = json.loads((out / "export.json").read_text())["q4_k_m"]
    assert q4 == "not requested" or any(line.startswith("[export] q4_k_m not available here") for line in lines)


@pytest.mark.parametrize("fmt,file_type", [("f16", 1), ("q8_0", 7)])
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


def test_modelfile_carries_template_and_stop(exported):
    out, _, _ = exported
    text = (out / "Modelfile").read_text(encoding="utf-8")
    assert f"FROM ./{SLUG}-q8_0.gguf" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["formats"]) == {"f16", "q8_0"} and manifest["modelfile_from"] == f"{SLUG}-q8_0.gguf"


def test_chatml_go_template_matches_the_jinja_template(smollm2_dir):
    """Render both for one conversation: the Go template (interpreted by hand for ChatML) equals the Jinja output."""
    from jinja2 import Template

    from finetune.export import _GO_TEMPLATES, _default_system

    jinja = (smollm2_dir / "chat_template.jinja").read_text(encoding="utf-8")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    want = Template(jinja).render(messages=msgs, add_generation_prompt=True)
    system = _default_system(jinja, "chatml")
    go = _GO_TEMPLATES["chatml"]
    head, rest = go.split("{{- range .Messages }}")
    body, tail = rest.split("{{ end }}")
    got = head + "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
                         for m in [{"role": "system", "content": system}] + msgs) + tail
    assert got == want


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

    assert parse_formats("") == ["f16", "q8_0"]
    assert parse_formats(" q8_0, F16 ,q8_0") == ["q8_0", "f16"]
    assert parse_formats("q4-k-m") == ["q4_k_m"]
    with pytest.raises(ConfigError, match="q3"):
        parse_formats("f16,q3")


def test_modelfile_for_unknown_and_llama3_templates():
    from finetune.export import modelfile

    text = modelfile("m-f16.gguf", "{{ bos_token }}{% for m in messages %}### {{ m['content'] }}{% endfor %}", ["</s>"])
    assert "FROM ./m-f16.gguf" in text and "TEMPLATE" not in text.replace("No TEMPLATE", "")
    assert "tokenizer.chat_template" in text and 'PARAMETER stop "</s>"' in text
    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}"
              "<|eot_id|>{% endfor %}")
    text = modelfile("m-q8_0.gguf", llama3, ["<|eot_id|>"])
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in text and 'PARAMETER stop "<|eot_id|>"' in text
