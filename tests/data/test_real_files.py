"""Files as people save them: byte-order marks, UTF-16/32, CSV/TSV, Parquet, Arrow, saved datasets, compressed,
and folders mixing them. Every file here is written by the test with the tool a user's file comes from."""

import bz2
import codecs
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune.config import RunConfig
from finetune.data.prepare import prepare, summary
from finetune.data.readers import Source, iter_raw_rows
from finetune.errors import DataError
from finetune.paths import RunPaths
from tests.conftest import qa_rows


from tests.data.test_formats import read, run_prepare, tok  # noqa: F401 - tok is a fixture


def jsonl_text(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def csv_bytes(rows, sep=",") -> bytes:
    import csv
    import io

    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=sep, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return out.getvalue().encode("utf-8")


ROWS = qa_rows(5)


# ---- encodings -------------------------------------------------------------------------------------------
def test_a_utf8_bom_no_longer_costs_the_first_jsonl_row(tmp_path, tok):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(codecs.BOM_UTF8 + jsonl_text(ROWS).encode())
    stats, paths = run_prepare(tmp_path, tok, f)
    assert (stats["rows_in"], stats["kept"], stats["rejected"]) == (5, 5, 0)
    assert stats["files"][0]["encoding"] == "utf-8 (BOM)"
    assert read(paths.train_file)[0]["id"] == "bom.jsonl:1"


def test_a_bom_json_array_is_read_as_one_array_not_line_by_line(tmp_path):
    f = tmp_path / "bom.json"
    f.write_bytes(codecs.BOM_UTF8 + json.dumps(ROWS, indent=2).encode())
    rows = list(iter_raw_rows(f))
    assert [r.where for r in rows] == [f"bom.json item {i}" for i in range(1, 6)]
    assert all(not r.error for r in rows)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-32-le"])
def test_utf16_and_utf32_files_are_read_by_their_bom(tmp_path, encoding):
    bom = {"utf-16-be": codecs.BOM_UTF16_BE, "utf-32-le": codecs.BOM_UTF32_LE}.get(encoding, b"")
    text = jsonl_text(ROWS + [{"input": "서울은 어디?", "output": "한국"}])
    (tmp_path / "w.jsonl").write_bytes(bom + text.encode(encoding))
    (tmp_path / "w.json").write_bytes(bom + json.dumps(ROWS).encode(encoding))
    src = Source.open(tmp_path)
    rows = list(src.rows())
    assert [r.raw["input"] for r in rows if not r.error] == [r["input"] for r in ROWS] * 2 + ["서울은 어디?"]
    assert {f["encoding"] for f in src.report()["files"]} == {encoding[:6] + " (BOM)"}


def test_utf16_without_a_bom_is_named_not_rejected_line_by_line(tmp_path):
    f = tmp_path / "nobom.jsonl"
    f.write_bytes(jsonl_text(ROWS).encode("utf-16-le"))
    with pytest.raises(DataError, match=r"nobom.jsonl: holds NUL bytes: UTF-16 or UTF-32 without a byte-order mark"):
        list(iter_raw_rows(f))


# ---- CSV and TSV -----------------------------------------------------------------------------------------
def test_csv_from_a_spreadsheet_keeps_text_as_written_and_rejects_bad_records_with_their_line(tmp_path, tok):
    f = tmp_path / "sheet.csv"
    f.write_bytes(codecs.BOM_UTF8 + b"Question,Answer\r\n"
                  b"What is the agent's number?,007\r\n"            # line 2: a number stays text
                  b"\"Say it, twice\",\"Hello,\nhello\"\r\n"          # lines 3-4: quoted comma and newline
                  b"one,two,three\r\n"                               # record 4: three fields
                  b"Bad bytes?,\xff\xfe\r\n"                         # record 5: not UTF-8
                  b"Empty answer?,\r\n")                             # record 6
    stats, paths = run_prepare(tmp_path, tok, f, data_max_reject_fraction=1.0)
    kept = read(paths.train_file)
    assert [r["messages"][1]["content"] for r in kept] == ["007", "Hello,\nhello"]
    assert [r["id"] for r in kept] == ["sheet.csv:2", "sheet.csv:3"]
    rejected = {r["line"]: r["reason"] for r in read(paths.rejected_file)}
    assert rejected == {"sheet.csv:4": "3 fields where the header has 2",
                        "sheet.csv:5": "not UTF-8 (column 'Answer': invalid start byte at byte 0)",
                        "sheet.csv:6": "field 'Answer' is empty"}
    assert stats["kept"] + stats["rejected"] == stats["rows_in"] == 5
    assert (stats["format"], stats["format_from"], stats["readers"]) == ("qa", "auto-detected", ["csv"])


def test_the_detected_format_and_reader_are_reported(tmp_path, tok):
    f = tmp_path / "io.csv"
    f.write_bytes(csv_bytes(ROWS))
    stats, paths = run_prepare(tmp_path, tok, f)
    text = summary(stats, paths)
    assert "format: input_output (auto-detected), reader: csv" in text
    assert "read io.csv (csv, utf-8): 5 rows" in text
    on_disk = json.loads(paths.data_stats.read_text())
    assert on_disk["format"] == "input_output" and on_disk["format_from"] == "auto-detected"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_tsv_with_a_bom_in_either_encoding(tmp_path, encoding):
    f = tmp_path / "d.tsv"
    f.write_bytes(csv_bytes(ROWS, sep="\t").decode().encode(encoding))
    rows = list(iter_raw_rows(f))
    assert [r.raw["output"] for r in rows] == [r["output"] for r in ROWS] and rows[0].where == "d.tsv:2"


# ---- columnar files and saved datasets -------------------------------------------------------------------
def test_parquet_arrow_file_arrow_stream_and_save_to_disk(tmp_path):
    import datasets

    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.ipc.new_file(str(tmp_path / "d.arrow"), table.schema) as w:
        w.write_table(table)
    with pa.ipc.new_stream(str(tmp_path / "d.stream.arrow"), table.schema) as w:  # the format of datasets' caches
        w.write_table(table)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:2]), test=datasets.Dataset.from_list(ROWS[2:])
                         ).save_to_disk(str(tmp_path / "dict"))
    inputs = [r["input"] for r in ROWS]
    for name in ("d.parquet", "d.arrow", "d.stream.arrow", "saved"):
        rows = list(iter_raw_rows(tmp_path / name))
        assert [r.raw["input"] for r in rows] == inputs, name
        assert rows[2].where == f"{name} row 3"
    src = Source.open(tmp_path / "dict")
    assert [r.where for r in src.rows()] == ["dict[train] row 1", "dict[train] row 2"]
    assert src.read[0].reader == "save_to_disk, split 'train' of train, test"


def test_squad_rows_as_the_hugging_face_datasets_store_them(tmp_path, tok):
    rows = [{"id": str(i), "title": "t", "context": f"{r['input']} {r['output']}.", "question": r["input"],
             "answers": {"text": [r["output"]], "answer_start": [0]}} for i, r in enumerate(ROWS)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "squad.parquet")
    stats, paths = run_prepare(tmp_path, tok, tmp_path / "squad.parquet")
    assert stats["format"] == "korquad" and stats["kept"] == 5
    assert read(paths.train_file)[0]["messages"][1]["content"] == ROWS[0]["output"]


# ---- compression -----------------------------------------------------------------------------------------
def test_gzip_zstd_and_bzip2_of_any_file_type(tmp_path):
    def zstd(data: bytes, path):
        with pa.CompressedOutputStream(str(path), "zstd") as out:
            out.write(data)

    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(ROWS), buf)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl_text(ROWS).encode()))
    zstd(csv_bytes(ROWS), tmp_path / "b.csv.zst")
    (tmp_path / "c.parquet.gz").write_bytes(gzip.compress(buf.getvalue().to_pybytes()))
    (tmp_path / "d.json.bz2").write_bytes(bz2.compress(codecs.BOM_UTF8 + json.dumps(ROWS).encode()))
    zstd(jsonl_text(ROWS).encode("utf-16"), tmp_path / "e.jsonl.zst")
    src = Source.open(tmp_path)
    rows = list(src.rows())
    assert len(rows) == 25 and not any(r.error for r in rows)
    assert [(f["file"], f["reader"], f["compression"]) for f in src.report()["files"]] == [
        ("a.jsonl.gz", "jsonl", "gzip"), ("b.csv.zst", "csv", "zstd"), ("c.parquet.gz", "parquet", "gzip"),
        ("d.json.bz2", "json", "bz2"), ("e.jsonl.zst", "jsonl", "zstd")]


def test_a_corrupt_archive_is_a_data_error_naming_the_file(tmp_path):
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(jsonl_text(ROWS * 50).encode())[:300])
    with pytest.raises(DataError, match=r"broken.jsonl.gz: cannot be read as gzip jsonl after \d+ rows"):
        list(iter_raw_rows(tmp_path / "broken.jsonl.gz"))


# ---- folders ---------------------------------------------------------------------------------------------
def test_a_folder_reads_every_data_file_and_names_what_it_skips(tmp_path, tok):
    # The case: a 100-row .jsonl.gz beside a 3-row .jsonl gave exit 0 with 3 rows, in silence.
    many = [{"input": f"Question number {i}?", "output": f"Answer {i}"} for i in range(100)]
    d = tmp_path / "data"
    d.mkdir()
    (d / "big.jsonl.gz").write_bytes(gzip.compress(jsonl_text(many).encode()))
    (d / "small.jsonl").write_text(jsonl_text(ROWS[:3]))
    (d / "sub").mkdir()
    (d / "sub" / "more.csv").write_bytes(csv_bytes(ROWS[3:]))
    (d / "README.txt").write_text("my notes")
    (d / "old.txt.gz").write_bytes(gzip.compress(b"notes"))
    (d / ".DS_Store").write_bytes(b"\0\0")
    stats, paths = run_prepare(tmp_path, tok, d)
    assert stats["rows_in"] == stats["kept"] == 105
    assert [f["file"] for f in stats["files"]] == ["big.jsonl.gz", "small.jsonl", "sub/more.csv"]
    skipped = {s["file"]: s["why"] for s in stats["skipped"]}
    assert skipped == {"README.txt": "not a data file type we read (.txt)", ".DS_Store": "hidden file",
                       "old.txt.gz": "not a data file type we read (.txt.gz)"}
    text = summary(stats, paths)
    assert "skipped README.txt: not a data file type" in text and "read sub/more.csv (csv, utf-8): 2 rows" in text


def test_a_folder_with_no_data_file_names_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds no data file \(notes.txt: not a data file type"):
        Source.open(tmp_path)


def test_a_single_file_with_another_name_is_read_by_its_content(tmp_path):
    (tmp_path / "qa.txt").write_text(jsonl_text(ROWS))
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "table.dat")
    with pa.ipc.new_stream(str(tmp_path / "cache.bin"), table.schema) as w:
        w.write_table(table)
    assert len(list(iter_raw_rows(tmp_path / "qa.txt"))) == 5
    assert [r.where for r in iter_raw_rows(tmp_path / "table.dat")][0] == "table.dat row 1"
    assert [r.raw for r in iter_raw_rows(tmp_path / "cache.bin")] == ROWS


# ---- accounting and evidence -----------------------------------------------------------------------------
def test_every_rejected_row_names_its_file_and_line_or_row_across_file_types(tmp_path, tok):
    d = tmp_path / "mixed"
    d.mkdir()
    qa = [{"question": r["input"], "answer": r["output"]} for r in ROWS]
    (d / "a.jsonl").write_text(jsonl_text(qa) + '{"question": "q"\n{"question": "no answer"}\n')
    (d / "b.csv").write_bytes(csv_bytes([{"question": "Who?", "answer": "Me"}, {"question": "Blank?", "answer": ""}]))
    pq.write_table(pa.Table.from_pylist([{"prompt": "P?", "completion": "C"}, {"prompt": "P2?", "completion": None}]),
                   d / "c.parquet")
    stats, paths = run_prepare(tmp_path, tok, d, data_max_reject_fraction=1.0)
    rejected = [(r["line"], r["reason"]) for r in read(paths.rejected_file)]
    assert [w for w, _ in rejected] == ["a.jsonl:6", "a.jsonl:7", "b.csv:3", "c.parquet row 2"]
    assert stats["kept"] + stats["rejected"] == stats["rows_in"] == 11
    assert stats["columns"] == {"question=question, answer=answer": 6, "question=prompt, answer=completion": 1}


def test_when_the_gate_stops_the_evidence_stays_and_the_error_names_it(tmp_path, tok):
    f = tmp_path / "d.csv"
    f.write_bytes(csv_bytes(ROWS[:3] + [{"input": f"q{i}", "output": ""} for i in range(3)]))
    with pytest.raises(DataError) as e:
        run_prepare(tmp_path, tok, f)
    paths = RunPaths.from_config(RunConfig(data_path=str(f), base_save_path=str(tmp_path / "out")))
    first = str(e.value).splitlines()
    assert "3 of 6 rows rejected" in first[0]
    assert f"every rejected row with its place and reason: {paths.rejected_file}" in first[1]
    assert f"counts: {paths.data_stats}" in first[2]
    assert [r["line"] for r in read(paths.rejected_file)] == ["d.csv:5", "d.csv:6", "d.csv:7"]
    stats = json.loads(paths.data_stats.read_text())
    assert stats["rejected_by_reason"] == {"is empty": 3} and "3 of 6 rows rejected" in stats["stopped"]
    assert not paths.train_file.exists() and not paths.eval_file.exists()


def test_strict_mode_also_leaves_the_row_that_stopped_it(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text(jsonl_text(ROWS) + '{"input": "q", "output": ""}\n')
    with pytest.raises(DataError, match="d.jsonl:6: field 'output' is empty"):
        run_prepare(tmp_path, tok, f, data_strict=True)
    rejected = next((tmp_path / "out").rglob("rejected.jsonl"))
    assert [r["line"] for r in read(rejected)] == ["d.jsonl:6"]


def test_conversations_in_a_parquet_list_column(tmp_path, tok):
    convs = [{"messages": [{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}]}
             for r in ROWS]
    pq.write_table(pa.Table.from_pylist(convs), tmp_path / "chat.parquet")
    stats, paths = run_prepare(tmp_path, tok, tmp_path / "chat.parquet")
    assert (stats["format"], stats["kept"]) == ("messages", 5)
    assert read(paths.train_file)[4]["messages"] == convs[4]["messages"]
