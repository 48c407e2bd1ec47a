"""Issue 23: passages are learned as text, EVAL_PATH is scored beside the trained questions, and the bundled
invented-fact files are what they claim (paraphrases ask the trained facts in other words)."""

import json
from pathlib import Path

import pytest

from finetune.config import DEFAULT_DATA, DEFAULT_EVAL, RunConfig
from finetune.data.prepare import prepare
from finetune.errors import ConfigError, DataError
from finetune.evaluate import eval_set, evaluate
from finetune.paths import RunPaths
from tests.conftest import ROOT, write_jsonl

KNOWLEDGE = [("data/sample/korquad_sample.json", "data/sample/korquad_sample_paraphrases.json"),
             ("data/knowledge/harbour.json", "data/knowledge/harbour_paraphrases.json"),
             ("data/knowledge/crafts.json", "data/knowledge/crafts_paraphrases.json"),
             ("data/heldout/island.json", "data/heldout/island_paraphrases.json")]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from finetune.model import load_tokenizer

    return load_tokenizer(str(smollm2_dir), RunConfig())[0]


def _doc(tmp_path, paragraphs):
    doc = {"data": [{"title": f"t{i}", "paragraphs": [{"context": ctx, "qas": [
        {"id": f"{i}-{j}", "question": q, "answers": [{"text": a, "answer_start": ctx.find(a)}]} for j, (q, a) in enumerate(qas)]}]}
        for i, (ctx, qas) in enumerate(paragraphs)]}
    f = tmp_path / "doc.json"
    f.write_text(json.dumps(doc))
    return f


PARAGRAPHS = [("Ada lives in Brill. She keeps bees.", [("Where does Ada live?", "Brill"), ("What does Ada keep?", "bees")]),
              ("Tom Rudd built the Needle in 1796.", [("Who built the Needle?", "Tom Rudd"), ("When was the Needle built?", "1796")])]


def _read(p):
    return [json.loads(l) for l in open(p, encoding="utf-8")]


def test_each_distinct_passage_is_trained_once_as_text_and_never_evaluated(tmp_path, tok):
    cfg = RunConfig(data_path=str(_doc(tmp_path, PARAGRAPHS)), base_save_path=str(tmp_path / "out"), passage_rows="on",
                    question_variants="off")
    paths = RunPaths.from_config(cfg)
    stats = prepare(cfg, paths, tok)
    train = _read(paths.train_file)
    assert [r["text"] for r in train if r["format"] == "passage"] == [p for p, _ in PARAGRAPHS]
    assert sum(r["format"] == "korquad" for r in train) == 4
    assert all(r["format"] == "korquad" for r in _read(paths.eval_file))
    assert (stats["passage_rows"], stats["kept"], stats["rows_in"]) == (2, 4, 4)  # kept + rejected = input still


def test_passage_rows_off_trains_the_questions_alone(tmp_path, tok):
    cfg = RunConfig(data_path=str(_doc(tmp_path, PARAGRAPHS)), base_save_path=str(tmp_path / "out"), passage_rows="off",
                    question_variants="off")
    paths = RunPaths.from_config(cfg)
    assert prepare(cfg, paths, tok)["passage_rows"] == 0
    assert all(r["format"] == "korquad" for r in _read(paths.train_file))


def test_a_passage_whose_questions_are_all_held_out_is_not_trained(tmp_path, tok):
    paragraphs = [(f"Fact {i}: the answer is word{i}.", [(f"What is fact {i}?", f"word{i}")]) for i in range(40)]
    cfg = RunConfig(data_path=str(_doc(tmp_path, paragraphs)), base_save_path=str(tmp_path / "out"), passage_rows="on",
                    question_variants="off", eval_fraction=0.3)
    paths = RunPaths.from_config(cfg)
    prepare(cfg, paths, tok)
    train, held = _read(paths.train_file), _read(paths.eval_file)
    trained_answers = {r["messages"][1]["content"] for r in train if "messages" in r}
    passages = [r["text"] for r in train if r["format"] == "passage"]
    assert held and len(passages) == len(trained_answers)
    for r in held:
        assert not any(r["messages"][1]["content"] + "." in p for p in passages)


def test_eval_path_auto_is_the_samples_paraphrases_only_for_the_bundled_sample():
    assert RunConfig().eval_set_path == DEFAULT_EVAL
    assert RunConfig(data_path="./" + DEFAULT_DATA).eval_set_path == DEFAULT_EVAL
    assert RunConfig(data_path="mine.jsonl").eval_set_path == ""
    assert RunConfig(eval_path="none").eval_set_path == ""
    assert RunConfig(data_path="mine.jsonl", eval_path="other.json").eval_set_path == "other.json"


def test_eval_path_reads_any_format_and_names_the_rows_it_cannot_use(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "Where does Ada live?", "output": "Brill"},
                                           {"input": "Who built the Needle?", "output": "Tom Rudd"},
                                           {"text": "no question here"}, {"nothing": 1}])
    items, skipped = eval_set(RunConfig(eval_path=str(f)))
    assert [(i["messages"][-1]["content"], i["answers"]) for i in items] == [
        ("Where does Ada live?", ["Brill"]), ("Who built the Needle?", ["Tom Rudd"])]
    assert len(skipped) == 2 and "e.jsonl:3" in skipped[0]
    with pytest.raises(ConfigError, match="EVAL_PATH"):
        eval_set(RunConfig(eval_path=str(tmp_path / "missing.json")))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "only text"}])
    with pytest.raises(DataError, match="no usable"):
        eval_set(RunConfig(eval_path=str(bad)))


def test_the_report_scores_eval_path_beside_the_trained_questions(tmp_path, smollm2_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ev = write_jsonl(tmp_path / "para.jsonl", [{"instruction": "Which city is the capital of France?", "output": "Paris"}])
    cfg = RunConfig(base_model_name=str(smollm2_dir), base_save_path=str(tmp_path / "out"), retention_set="none",
                    eval_max_new_tokens=12, use_qlora=False, eval_path=str(ev))
    paths = RunPaths.from_config(cfg)
    write_jsonl(paths.eval_file, [{"id": "e1", "messages": [{"role": "user", "content": "What is the capital of France?"},
                                                             {"role": "assistant", "content": "Paris"}]}])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir),
                           LoraConfig(r=8, target_modules=["down_proj"], task_type="CAUSAL_LM"))  # B = 0: a no-op
    model.save_pretrained(paths.adapters)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(paths.adapters)
    report = evaluate(cfg, paths, str(smollm2_dir), "cpu", log=lambda *_: None)
    e = report["eval_set"]
    assert report["base"]["n"] == 1 and e["base"]["n"] == 1 and e["path"] == str(ev)
    assert e["examples"][0]["question"] == "Which city is the capital of France?"
    assert e["base"]["contains_match"] == e["finetuned"]["contains_match"]  # a no-op adapter answers as the base
    assert "Questions not trained on" in (paths.eval_dir / "report.md").read_text()


@pytest.mark.parametrize("data,para", KNOWLEDGE)
def test_every_paraphrase_asks_a_trained_fact_in_other_words(data, para):
    doc = json.loads((ROOT / data).read_text(encoding="utf-8"))
    trained = {qa["question"]: (qa["answers"][0]["text"], p["context"])
               for d in doc["data"] for p in d["paragraphs"] for qa in p["qas"]}
    rows = json.loads((ROOT / para).read_text(encoding="utf-8"))
    assert sorted(r["trained_question"] for r in rows) == sorted(trained)
    for r in rows:
        answer, context = trained[r["trained_question"]]
        assert r["output"] == answer and answer in context
        assert r["instruction"] != r["trained_question"] and r["instruction"] not in trained


def test_the_demo_keeps_passage_rows_off_and_user_qa_data_gets_them(clean_env):
    from finetune.data.passages import enabled

    assert not enabled(RunConfig.from_env({}, env_file=None))  # the bundled sample
    assert enabled(RunConfig.from_env({"DATA_PATH": "mine.json"}, env_file=None))
    assert not enabled(RunConfig.from_env({"DATA_PATH": "mine.json", "PASSAGE_ROWS": "off"}, env_file=None))


def test_questions_are_reworded_by_grammar_rules_in_korean_and_english_only():
    from finetune.data.variants import reword

    assert reword("청솔 천문대는 누가 세웠나요?") == ["청솔 천문대가 누가 세웠나요?", "청솔 천문대는 누가 세웠습니까?",
                                            "궁금한 게 있어요. 청솔 천문대는 누가 세웠나요?"]
    assert reword("항구의 이름은 무엇인가요?")[:2] == ["항구 이름이 무엇인가요?", "항구의 이름은 무엇입니까?"]
    # Left alone: compound particles (에는), nouns ending in 의, an adjective's ending, a verb's -는 further on
    assert reword("달무리떡에는 어떤 꽃잎이 들어가나요?")[0] == "달무리떡에는 어떤 꽃잎이 들어갑니까?"
    assert reword("민주주의 원칙은 무엇인가요?")[0] == "민주주의 원칙이 무엇인가요?"
    assert reword("이 산은 유명한가요?") == ["궁금한 게 있어요. 이 산은 유명한가요?"]
    assert reword("물안개섬에서만 자라는 꽃은 무엇인가요?")[0] == "물안개섬에서만 자라는 꽃은 무엇입니까?"
    assert reword("Which river flows out of the lake?") == ["What river flows out of the lake?",
                                                            "Do you know this? Which river flows out of the lake?"]
    assert reword("In what year was the bridge built?")[0] == "When was the bridge built?"
    assert reword("Quelle rivière sort du lac ?") == [] and reword("Tell me a story.") == []


def test_question_variants_are_trained_beside_their_question_and_never_evaluated(tmp_path, tok):
    # EVAL_PATH asks one fact in a wording a rule also writes: the report scores it as unseen, so it is not trained.
    write_jsonl(tmp_path / "para.jsonl", [{"question": "Do you know this? Where does Ada live?", "answer": "Brill"}])
    cfg = RunConfig(data_path=str(_doc(tmp_path, PARAGRAPHS)), base_save_path=str(tmp_path / "out"), passage_rows="off",
                    question_variants="on", eval_path=str(tmp_path / "para.jsonl"))
    paths = RunPaths.from_config(cfg)
    stats = prepare(cfg, paths, tok)
    train = _read(paths.train_file)
    variants = [r for r in train if r["id"].startswith("variant:")]
    # four framings and one wh-word swap (What -> Which), less the framing EVAL_PATH asks
    assert stats["variant_rows"] == len(variants) == 4 and (stats["kept"], stats["train"], stats["rows_in"]) == (4, 4, 4)
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in train}
    assert "Do you know this? Where does Ada live?" not in answers and "Where does Ada live?" in answers
    assert answers["Which does Ada keep?"] == "bees" and answers["Do you know this? Who built the Needle?"] == "Tom Rudd"
    assert not any(r["id"].startswith("variant:") for r in _read(paths.eval_file))
    assert not list(paths.data_dir.glob("*.spool"))


def test_a_variant_that_is_another_input_question_is_not_trained(tmp_path, tok):
    # The held-out question is the first one's rewording: training it as a variant would train the held-out answer.
    paragraphs = [(f"Fact {i}.", [(f"Which is fact {i}?", f"w{i}"), (f"What is fact {i}?", f"w{i}")]) for i in range(30)]
    cfg = RunConfig(data_path=str(_doc(tmp_path, paragraphs)), base_save_path=str(tmp_path / "out"), passage_rows="off",
                    question_variants="on", eval_fraction=0.3)
    paths = RunPaths.from_config(cfg)
    prepare(cfg, paths, tok)
    held = {r["messages"][0]["content"] for r in _read(paths.eval_file)}
    trained = [r["messages"][0]["content"] for r in _read(paths.train_file)]
    assert held and not held & set(trained) and len(trained) == len(set(trained))


def test_question_variants_are_off_until_measured_on_two_seeds_of_every_file(clean_env):
    from finetune.data.variants import enabled

    assert not enabled(RunConfig.from_env({}, env_file=None))  # the bundled sample
    assert not enabled(RunConfig.from_env({"DATA_PATH": "mine.json"}, env_file=None))
    assert enabled(RunConfig.from_env({"DATA_PATH": "mine.json", "QUESTION_VARIANTS": "on"}, env_file=None))
