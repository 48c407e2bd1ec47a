"""Question/answer columns are found by their common names or mapped with DATA_COLUMNS; a relative DATA_PATH
means the caller's folder."""

import json

import pytest

from finetune.config import RunConfig
from finetune.data.formats import detect, normalise
from finetune.data.prepare import prepare
from finetune.errors import ConfigError
from finetune.paths import RunPaths


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from finetune.model import load_tokenizer

    t, _ = load_tokenizer(str(smollm2_dir), RunConfig())
    return t


def turns(row, **kw):
    fmt = detect(row)
    return fmt, [m["content"] for m in normalise(row, fmt, **{"qa_with_context": False, **kw})["messages"]]


@pytest.mark.parametrize("q, a", [("question", "answer"), ("prompt", "response"), ("prompt", "completion"),
                                  ("query", "response"), ("Question", "Answer"), (" QUERY ", "Response")])
def test_common_question_answer_names_are_recognised(q, a):
    assert turns({q: "Who founded Brackwater?", a: "Ilse Varn", "id": 7}) == ("qa", ["Who founded Brackwater?", "Ilse Varn"])


def test_instruction_output_and_input_output_keep_their_own_formats():
    assert turns({"instruction": "Translate", "input": "hello", "output": "안녕"}) == ("alpaca", ["Translate\n\nhello", "안녕"])
    assert turns({"input": "Q?", "output": "A"}) == ("input_output", ["Q?", "A"])


@pytest.mark.parametrize("ctx", ["context", "passage", "Passage"])
def test_a_context_or_passage_column_goes_into_the_prompt_only_with_qa_with_context(ctx):
    row = {"question": "Where does Ada live?", "answer": "Brill", ctx: "Ada lives in Brill."}
    assert turns(row)[1][0] == "Where does Ada live?"
    assert turns(row, qa_with_context=True)[1][0] == "Ada lives in Brill.\n\nWhere does Ada live?"


def test_a_row_without_known_names_is_unrecognised_and_the_reason_says_data_columns(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"Q": f"q{i}", "A": f"a{i}"}) + "\n" for i in range(3)))
    cfg = RunConfig(data_path=str(f), base_save_path=str(tmp_path / "out"), data_max_reject_fraction=1.0)
    with pytest.raises(Exception, match="no usable rows"):
        prepare(cfg, RunPaths.from_config(cfg), tok)
    rejected = [json.loads(l) for l in open(RunPaths.from_config(cfg).rejected_file)]
    assert "unrecognised row (fields: A, Q)" in rejected[0]["reason"] and "DATA_COLUMNS" in rejected[0]["reason"]


def test_data_columns_maps_any_column_names(tmp_path, tok):
    f = tmp_path / "sheet.csv"
    f.write_text("Num,Frage,Antwort,Absatz\n1,Wo wohnt Ada?,Brill,Ada wohnt in Brill.\n2,Wer?,,x\n3,Was?,Nichts,y\n",
                 encoding="utf-8")
    cfg = RunConfig(data_path=str(f), base_save_path=str(tmp_path / "out"), data_max_reject_fraction=1.0,
                    data_columns="question=Frage, answer=Antwort, context=Absatz", qa_with_context=True)
    paths = RunPaths.from_config(cfg)
    stats = prepare(cfg, paths, tok)
    kept = [json.loads(l) for l in open(paths.train_file)]
    assert kept[0]["messages"][0]["content"] == "Ada wohnt in Brill.\n\nWo wohnt Ada?"
    assert [json.loads(l) for l in open(paths.rejected_file)] == [
        {"line": "sheet.csv:3", "reason": "field 'Antwort' is empty", "raw": '{"Num": "2", "Frage": "Wer?", "Antwort": "", "Absatz": "x"}'}]
    assert (stats["format"], stats["format_from"]) == ("qa", "DATA_COLUMNS")
    assert stats["columns"] == {"question=Frage, answer=Antwort, context=Absatz": 2}


def test_data_columns_naming_a_missing_column_rejects_the_row_with_the_name(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"q": "x?", "a": "y"}) + "\n" + json.dumps({"q": "z?", "answer": "w"}) + "\n")
    cfg = RunConfig(data_path=str(f), base_save_path=str(tmp_path / "out"), data_max_reject_fraction=1.0,
                    data_columns="question=q,answer=a")
    paths = RunPaths.from_config(cfg)
    assert prepare(cfg, paths, tok)["rejected_by_reason"] == {"missing field": 1}
    assert json.loads(paths.rejected_file.read_text())["reason"] == "missing field 'a'"


def test_data_columns_is_parsed_and_validated_with_every_problem_at_once():
    cfg = RunConfig.from_env({"DATA_COLUMNS": "question=Q , answer=A"}, None)
    assert cfg.columns == {"question": "Q", "answer": "A"}
    assert RunConfig.from_env({}, None).columns is None
    with pytest.raises(ConfigError) as e:
        RunConfig.from_env({"DATA_COLUMNS": "question=Q,reply=A,question=R", "DATA_FORMAT": "alpaca"}, None)
    msg = str(e.value)
    for needle in ("unknown role 'reply' (allowed: question, answer, context)", "question is given twice",
                   "answer=COLUMN is missing", "needs DATA_FORMAT=auto or qa, not alpaca"):
        assert needle in msg
    for bad in ("question", "question=,answer=A", "=Q,answer=A"):
        with pytest.raises(ConfigError, match="expected question=COLUMN,answer=COLUMN"):
            RunConfig.from_env({"DATA_COLUMNS": bad}, None)
    with pytest.raises(ConfigError, match="only QA_WITH_CONTEXT=true puts into the prompt"):
        RunConfig.from_env({"DATA_COLUMNS": "question=Q,answer=A,context=P"}, None)


def test_a_relative_data_path_is_relative_to_the_callers_folder(tmp_path):
    env = {"DATA_PATH": "my/qa.csv", "RAPA_CALLER_DIR": "/home/ada/project"}
    assert RunConfig.from_env(env, None).data_path == "/home/ada/project/my/qa.csv"
    assert RunConfig.from_env({**env, "DATA_PATH": "/data/qa.csv"}, None).data_path == "/data/qa.csv"
    (tmp_path / ".env").write_text("DATA_PATH=data/qa.jsonl\n")  # a .env value stays where the .env is read
    assert RunConfig.from_env({"RAPA_CALLER_DIR": "/elsewhere"}, tmp_path / ".env").data_path == "data/qa.jsonl"
    assert RunConfig.from_env({"RAPA_CALLER_DIR": "/elsewhere"}, None).data_path == "data/sample/korquad_sample.json"


def test_input_output_and_qa_files_may_share_a_folder_but_other_formats_may_not(tmp_path, tok):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps({"input": f"q{i}?", "output": f"a{i}"}) + "\n" for i in range(3)))
    (d / "b.csv").write_text("question,answer\nWho?,Me\n")
    cfg = RunConfig(data_path=str(d), base_save_path=str(tmp_path / "out"))
    assert prepare(cfg, RunPaths.from_config(cfg), tok)["kept"] == 4
    qa = RunConfig(data_path=str(d), base_save_path=str(tmp_path / "out"), data_format="qa")
    assert prepare(qa, RunPaths.from_config(qa), tok)["kept"] == 4
    (d / "c.jsonl").write_text(json.dumps({"text": "plain text"}) + "\n")
    with pytest.raises(Exception, match="mixes formats: mostly input_output, but qa at b.csv:2; text at c.jsonl:1"):
        prepare(cfg, RunPaths.from_config(cfg), tok)
