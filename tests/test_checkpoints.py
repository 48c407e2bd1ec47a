"""The checkpoint format: sealed only when complete, verified before resume, rotated safely."""

import json

from finetune import checkpoints as ck


def make(root, step, sealed=True, payload=b"weights"):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(payload * 10)
    (d / "optimizer.pt").write_bytes(b"opt")
    if sealed:
        ck.finalize(d, {"step": step, "fingerprint": {"lora_rank": 16}})
    return d


def test_finalize_writes_manifest_with_sizes_and_hashes_then_marker(tmp_path):
    d = make(tmp_path, 5)
    m = json.loads((d / ck.MANIFEST).read_text())
    assert m["step"] == 5 and set(m["files"]) == {"adapter_model.safetensors", "optimizer.pt"}
    assert m["files"]["optimizer.pt"]["sha256"] == ck.sha256(d / "optimizer.pt")
    assert (d / ck.MARKER).is_file() and ck.verify(d) is None


def test_newest_complete_is_chosen_by_step_number_not_name_order_or_mtime(tmp_path):
    make(tmp_path, 9)
    make(tmp_path, 10)
    (tmp_path / "checkpoint-10-backup").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert ck.newest_complete(tmp_path).name == "checkpoint-10"


def test_unsealed_truncated_or_missing_files_are_skipped_with_a_reason(tmp_path):
    make(tmp_path, 1)
    truncated = make(tmp_path, 2)
    (truncated / "adapter_model.safetensors").write_bytes(b"cut")
    missing = make(tmp_path, 3)
    (missing / "optimizer.pt").unlink()
    make(tmp_path, 4, sealed=False)
    said = []
    assert ck.newest_complete(tmp_path, said.append).name == "checkpoint-1"
    assert "checkpoint-4" in said[0] and "no COMPLETE marker" in said[0]
    assert "optimizer.pt is missing" in said[1]
    assert "adapter_model.safetensors has 3 bytes" in said[2]


def test_same_size_corruption_is_caught_by_sha256(tmp_path):
    d = make(tmp_path, 1, payload=b"abcdefg")
    (d / "adapter_model.safetensors").write_bytes(b"gfedcba" * 10)
    assert "sha256" in ck.verify(d)


def test_rotation_keeps_the_newest_complete_and_never_a_newer_partial(tmp_path):
    for s in (1, 2, 3):
        make(tmp_path, s)
    make(tmp_path, 4, sealed=False)  # being written right now
    ck.rotate(tmp_path, keep=2, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    ck.rotate(tmp_path, keep=1, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_a_stale_partial_older_than_a_complete_one_is_cleaned(tmp_path):
    make(tmp_path, 1, sealed=False)
    make(tmp_path, 2)
    ck.rotate(tmp_path, keep=3, log=lambda *_: None)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_compatibility_diff_names_each_changed_field():
    diff = ck.check_compatible({"lora_rank": 16, "seed": 1}, {"lora_rank": 8, "seed": 1})
    assert diff == ["lora_rank: checkpoint has 16, now 8"]
