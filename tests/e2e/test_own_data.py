"""A user's own files through run.sh, started from the user's folder: JOB=prepare on the real SmolLM2."""

import gzip
import json
import re
import subprocess

from tests.conftest import qa_rows
from tests.e2e.helpers import ROOT, env_for


def prepare_from(caller, tmp, **env):
    return subprocess.run([str(ROOT / "run.sh"), "prepare"], cwd=caller, env=env_for(tmp, **env), capture_output=True,
                          text=True, timeout=600)


def test_a_folder_of_real_files_given_relative_to_the_callers_folder(tmp_path, smollm2_dir):
    caller = tmp_path / "project"
    (caller / "my_data").mkdir(parents=True)
    rows = qa_rows(12)
    (caller / "my_data" / "part1.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"question": r["input"], "answer": r["output"]}) + "\n" for r in rows[:8]).encode()))
    (caller / "my_data" / "part2.csv").write_bytes(
        b"\xef\xbb\xbfprompt,response\n" + "".join(f"{r['input']},{r['output']}\n" for r in rows[8:]).encode())
    (caller / "my_data" / "notes.txt").write_text("where the data came from")
    r = prepare_from(caller, tmp_path, DATA_PATH="my_data")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "format: qa (auto-detected; question=question, answer=answer | question=prompt, answer=response), " \
           "reader: csv, jsonl" in r.stdout
    assert "read part1.jsonl.gz (jsonl, utf-8, gzip): 8 rows" in r.stdout
    assert "read part2.csv (csv, utf-8 (BOM)): 4 rows" in r.stdout
    assert "skipped notes.txt: not a data file type we read (.txt)" in r.stdout
    assert "12 rows read = 12 kept + 0 rejected" in r.stdout
    done = next(l for l in r.stdout.splitlines() if l.startswith("[done]"))
    assert done.endswith(":  data/"), done  # a prepare job names its data, not an adapter or a report
    stats = json.loads(next((tmp_path / "final_model").rglob("data_stats.json")).read_text())
    assert stats["data_path"] == str(caller / "my_data")


def test_when_the_gate_stops_a_run_its_evidence_stays_where_the_error_says(tmp_path, smollm2_dir):
    rows = qa_rows(6)
    lines = [f"{r['input']},{r['output']}" for r in rows] + [f"Question {i} without an answer?," for i in range(4)]
    (tmp_path / "qa.csv").write_text("question,answer\n" + "\n".join(lines) + "\n")
    r = prepare_from(tmp_path, tmp_path, DATA_PATH="qa.csv")
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    err = r.stderr[r.stderr.index("error: "):]
    assert "4 of 10 rows rejected" in err.splitlines()[0] and "Traceback" not in r.stderr
    named = re.findall(r"(/\S+/data/(?:rejected\.jsonl|data_stats\.json))", err)
    assert [p.rsplit("/", 1)[1] for p in named] == ["rejected.jsonl", "data_stats.json"]
    data = tmp_path / "final_model" / "SmolLM2-135M-Instruct"
    assert all(p.startswith(str(data)) for p in named)  # final_model/<model>/<epochs>/data/, as the README says
    rejected = [json.loads(l) for l in open(named[0], encoding="utf-8")]
    assert [x["line"] for x in rejected] == ["qa.csv:8", "qa.csv:9", "qa.csv:10", "qa.csv:11"]
    assert json.loads(open(named[1]).read())["rejected_by_reason"] == {"is empty": 4}
