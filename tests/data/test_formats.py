"""Every input format is detected and normalised; bad rows are rejected with place and reason, never lost."""

import json

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from finetune.config import RunConfig
from finetune.data.formats import RowError, detect, normalise
from finetune.data.readers import iter_raw_rows
from finetune.data.prepare import prepare
from finetune.errors import DataError
from finetune.paths import RunPaths
from tests.conftest import qa_rows, write_jsonl


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from finetune.model import load_tokenizer

    t, _ = load_tokenizer(str(smollm2_dir), RunConfig())
    return t


def run_prepare(tmp_path, tok, data, **kw):
    cfg = RunConfig(data_path=str(data), base_save_path=str(tmp_path / "out"), **kw)
    paths = RunPaths.from_config(cfg)
    return prepare(cfg, paths, tok), paths


def read(p):
    return [json.loads(l) for l in open(p, encoding="utf-8")]


SAMPLES = {
    "input_output": {"input": "Q?", "output": "A", "source": "s"},
    "alpaca": {"instruction": "Translate", "input": "hello", "output": "안녕"},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                   {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                                   {"from": "gpt", "value": "Bye!"}]},
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    "text": {"text": "Plain continued pre-training text."},
}


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_each_row_format_is_detected_and_normalised(fmt):
    assert detect(SAMPLES[fmt]) == fmt
    norm = normalise(SAMPLES[fmt], fmt, False)
    assert ("text" in norm) == (fmt == "text")


def test_seed_002_conversations_with_role_content_are_messages():
    row = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    assert detect(row) == "messages"
    assert normalise(row, "messages", False)["messages"][1] == {"role": "assistant", "content": "Yo"}


def test_sharegpt_keeps_system_and_every_turn():
    msgs = normalise(SAMPLES["sharegpt"], "sharegpt", False)["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]


def test_korquad_document_with_and_without_context(tmp_path):
    doc = {"data": [{"title": "t", "paragraphs": [{"context": "Ada lives in Brill.", "qas": [
        {"id": "1", "question": "Where does Ada live?", "answers": [{"text": "Brill", "answer_start": 13}]}]}]}]}
    f = tmp_path / "k.json"
    f.write_text(json.dumps(doc))
    rows = list(iter_raw_rows(f))
    assert len(rows) == 1 and detect(rows[0].raw) == "korquad"
    assert normalise(rows[0].raw, "korquad", False)["messages"][0]["content"] == "Where does Ada live?"
    assert normalise(rows[0].raw, "korquad", True)["messages"][0]["content"].startswith("Ada lives in Brill.")


def test_json_array_jsonl_folder_and_save_to_disk_are_all_read(tmp_path, tok):
    rows = qa_rows(4)
    (tmp_path / "a.json").write_text(json.dumps(rows[:2]))
    write_jsonl(tmp_path / "dir" / "b.jsonl", rows[2:])
    (tmp_path / "dir" / "c.json").write_text(json.dumps(rows[:1]))
    assert len(list(iter_raw_rows(tmp_path / "a.json"))) == 2
    assert len(list(iter_raw_rows(tmp_path / "dir"))) == 3
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert [r.raw["input"] for r in iter_raw_rows(tmp_path / "saved")] == [r["input"] for r in rows]


BAD = [
    ('{"input": "q", "output": ', "JSON does not parse"),
    (b'{"input": "\xff\xfe", "output": "a"}', "not UTF-8"),
    ('{"input": "q"}', "unrecognised row"),
    ('{"input": "q", "output": 5}', "must be a string"),
    ('{"input": "q", "output": "   "}', "is empty"),
    ('{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown role"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant turn"),
    ('[1, 2]', "expected a JSON object"),
]


def test_every_kind_of_bad_row_is_rejected_with_line_and_reason(tmp_path, tok):
    good = qa_rows(10)
    f = tmp_path / "mixed.jsonl"
    with open(f, "wb") as fh:
        for r in good:
            fh.write((json.dumps(r) + "\n").encode())
        for raw, _ in BAD:
            fh.write((raw if isinstance(raw, bytes) else raw.encode()) + b"\n")
        fh.write((json.dumps(good[0]) + "\n").encode())  # exact duplicate
    stats, paths = run_prepare(tmp_path, tok, f, data_max_reject_fraction=1.0, eval_fraction=0.0)
    rejected = read(paths.rejected_file)
    assert stats["rows_in"] == 10 + len(BAD) + 1
    assert stats["kept"] + stats["rejected"] == stats["rows_in"]
    assert len(rejected) == len(BAD) + 1
    for (raw, reason), rec in zip(BAD, rejected):
        assert reason in rec["reason"], rec
        assert rec["line"].startswith("mixed.jsonl:") and rec["raw"]
    assert "exact duplicate of mixed.jsonl:1" in rejected[-1]["reason"]


def test_too_many_rejects_stop_with_exit_3_and_a_table(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(3) + ['{"input": "q"}'] * 3)
    with pytest.raises(DataError, match=r"(?s)3 of 6 rows rejected .*unrecognised row") as e:
        run_prepare(tmp_path, tok, f)
    assert e.value.exit_code == 3


def test_strict_mode_stops_at_the_first_bad_row(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(3) + ['{"input": "q", "output": ""}'])
    with pytest.raises(DataError, match=r"d.jsonl:4: field 'output' is empty"):
        run_prepare(tmp_path, tok, f, data_strict=True)


def test_empty_result_is_a_data_error(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", ['{"nope": 1}'])
    with pytest.raises(DataError, match="no usable rows"):
        run_prepare(tmp_path, tok, f, data_max_reject_fraction=1.0)


def test_a_file_mixing_formats_is_an_error_naming_the_lines(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(5) + [SAMPLES["alpaca"]])
    with pytest.raises(DataError, match=r"mixes formats: mostly input_output, but alpaca at d.jsonl:6"):
        run_prepare(tmp_path, tok, f)


def test_length_policies(tmp_path, tok):
    long_row = {"input": "word " * 300, "output": "short answer"}
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(8) + [long_row])
    stats, paths = run_prepare(tmp_path, tok, f, max_seq_length=128, data_max_reject_fraction=1.0)
    # truncate keeps the start: the answer at the end is cut away entirely, so the row is rejected, counted
    assert stats["rejected_by_reason"] == {"answer cut off by MAX_SEQ_LENGTH": 1}
    stats, _ = run_prepare(tmp_path, tok, f, max_seq_length=128, max_length_policy="drop", data_max_reject_fraction=1.0)
    assert stats["rejected_by_reason"] == {"too long (MAX_LENGTH_POLICY=drop)": 1}
    with pytest.raises(DataError, match="MAX_LENGTH_POLICY=fail"):
        run_prepare(tmp_path, tok, f, max_seq_length=128, max_length_policy="fail")
    answer_long = {"input": "q", "output": "word " * 300}
    f2 = write_jsonl(tmp_path / "e.jsonl", qa_rows(8) + [answer_long])
    stats, _ = run_prepare(tmp_path, tok, f2, max_seq_length=128)
    assert stats["truncated"] == 1 and stats["kept"] == 9


def test_prepare_is_deterministic_and_splits_by_eval_fraction(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(16))
    _, p1 = run_prepare(tmp_path / "a", tok, f, eval_fraction=0.25, seed=3)
    _, p2 = run_prepare(tmp_path / "b", tok, f, eval_fraction=0.25, seed=3)
    assert p1.train_file.read_bytes() == p2.train_file.read_bytes()
    assert p1.eval_file.read_bytes() == p2.eval_file.read_bytes()
    n_train, n_eval = len(read(p1.train_file)), len(read(p1.eval_file))
    assert n_train + n_eval == 16 and 1 <= n_eval <= 8
    stats = json.loads(p1.data_stats.read_text())
    for k in ("min", "median", "p95", "p99", "max"):
        assert k in stats["tokens"]
    assert stats["recommended_max_seq_length"] % 64 == 0


def test_a_failed_prepare_leaves_its_evidence_but_nothing_to_train_on(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", ['{"nope": 1}'])
    with pytest.raises(DataError):
        run_prepare(tmp_path, tok, f, data_max_reject_fraction=1.0)
    data = next((tmp_path / "out").rglob("data"))
    assert sorted(p.name for p in data.iterdir()) == ["data_stats.json", "rejected.jsonl"]
    assert not any(p.name.startswith(".tmp") for p in data.parent.iterdir())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))),
                        max_size=15))
@example(garbage=["\x1f"])  # a control character alone on a line: a rejected row, not a blank line
def test_kept_plus_rejected_equals_input_for_random_garbage(tmp_path_factory, tok, garbage):
    tmp = tmp_path_factory.mktemp("prop")
    lines = [json.dumps(r) for r in qa_rows(6)] + [g.replace("\n", " ").replace("\r", " ") for g in garbage]
    f = tmp / "d.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # Blank as the reader counts it: ASCII whitespace only. A line holding a control character such as U+001F (which
    # str.strip() would call whitespace) is a row, rejected with its reason, never dropped unseen.
    non_blank = sum(1 for l in lines if l.encode("utf-8").strip())
    stats, paths = run_prepare(tmp, tok, f, data_max_reject_fraction=1.0)
    assert stats["kept"] + stats["rejected"] == stats["rows_in"] == non_blank
    assert len(read(paths.rejected_file)) == stats["rejected"]
