"""Reading DATA_PATH: files as people save them, turned into raw rows that know where they came from.

A file is JSON (an array or a KorQuAD/SQuAD document), JSONL, CSV, TSV, Parquet, an Arrow/Feather file, or a
`datasets.save_to_disk` folder; any of them may be gzip-, zstd- or bzip2-compressed (found by its magic bytes,
decompressed by pyarrow). Text files are UTF-8, with or without a byte-order mark, or UTF-16/UTF-32 with one.
A folder is walked: every data file is read, and every other file is named in `Source.skipped` with the reason.

The parsers are the libraries': `json` for JSON, pyarrow for CSV/TSV, Parquet and Arrow, `datasets` for saved
datasets. What is ours is the place of each row (`file:line` for JSONL and CSV, `file row N` for columnar files)
and the rule that a bad row becomes a rejected row, never a lost one: a line that is not UTF-8 or not JSON, or a
CSV record with the wrong number of fields, is yielded with its error for the gate to count.
"""

from __future__ import annotations

import codecs
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from finetune.errors import DataError

# The name of a data file, after any compression suffix, decides its reader.
READERS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
           ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bz2"))
# UTF-32's little-endian mark starts with UTF-16's: test it first.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_SAVED_DATASET = ("state.json", "dataset_dict.json")  # what save_to_disk writes (dataset_info.json is common elsewhere)


@dataclass
class RawRow:
    where: str              # "file.jsonl:12", "file.json item 3", "file.parquet row 7"
    raw: Any                # the parsed row, or None when it could not be read
    error: str = ""         # why it could not be read (bad JSON, not UTF-8, wrong number of CSV fields)
    text: str = ""          # the start of the raw row, for rejected.jsonl


@dataclass
class FileRead:
    """One data file (or saved dataset) as it was read: reported in data_stats.json and the prepare summary."""

    file: str
    reader: str             # json | jsonl | csv | tsv | parquet | arrow | save_to_disk
    encoding: str = ""      # text files: utf-8, "utf-8 (BOM)", "utf-16 (BOM)", ...
    compression: str = ""   # gzip | zstd | bz2
    rows: int = 0

    def describe(self) -> str:
        how = ", ".join(x for x in (self.reader, self.encoding, self.compression) if x)
        return f"{self.file} ({how}): {self.rows} rows"


@dataclass
class Source:
    """DATA_PATH resolved into the files it holds; `rows()` streams them and fills `read` as it goes."""

    path: Path
    plan: list[tuple[Path, str]] = field(default_factory=list)     # (file or saved-dataset folder, label)
    skipped: list[dict] = field(default_factory=list)              # {"file", "why"}
    read: list[FileRead] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path) -> "Source":
        src = cls(Path(path))
        if not src.path.exists():
            raise DataError(f"DATA_PATH={path}: no such file or folder")
        if src.path.is_dir() and not _is_saved_dataset(src.path):
            src._walk()
        else:
            src.plan.append((src.path, src.path.name))
        return src

    def _walk(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.path):
            here = Path(dirpath)
            for d in sorted(dirnames):
                rel = (here / d).relative_to(self.path).as_posix()
                if d.startswith("."):
                    self.skipped.append({"file": rel + "/", "why": "hidden folder"})
                elif _is_saved_dataset(here / d):
                    self.plan.append((here / d, rel))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _is_saved_dataset(here / d))
            for name in sorted(filenames):
                rel = (here / name).relative_to(self.path).as_posix()
                if name.startswith("."):
                    self.skipped.append({"file": rel, "why": "hidden file"})
                elif _reader_for_name(name) is None:
                    self.skipped.append({"file": rel, "why": f"not a data file type we read ({_suffixes(name) or 'no extension'})"})
                else:
                    self.plan.append((here / name, rel))
        self.plan.sort(key=lambda p: p[1])
        if not self.plan:
            listed = "; ".join(f"{s['file']}: {s['why']}" for s in self.skipped[:5]) or "it is empty"
            raise DataError(f"DATA_PATH={self.path}: the folder holds no data file ({listed})")

    def rows(self) -> Iterator[RawRow]:
        for path, label in self.plan:
            yield from _read_one(path, label, self.read)

    def report(self) -> dict:
        return {"files": [asdict(f) for f in self.read], "skipped": list(self.skipped)}


def iter_raw_rows(path: str | Path) -> Iterator[RawRow]:
    """Every row under `path` (a file, a folder, or a `datasets.save_to_disk` folder)."""
    yield from Source.open(path).rows()


# ----------------------------------------------------------------------------------------------------
def _suffixes(name: str) -> str:
    sfx = [x.lower() for x in Path(name).suffixes]
    return "".join(sfx[-2:] if sfx and sfx[-1] in COMPRESSED else sfx[-1:])


def _reader_for_name(name: str) -> str | None:
    p = Path(name.lower())
    if p.suffix in COMPRESSED:
        p = p.with_suffix("")
    return READERS.get(p.suffix)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in _SAVED_DATASET)


def _compression(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return next((name for magic, name in _MAGIC if head.startswith(magic)), "")


def _open(path: Path, compression: str):
    """A binary stream of the file's (decompressed) bytes."""
    if not compression:
        return open(path, "rb")
    return io.BufferedReader(pa.input_stream(str(path), compression=compression), buffer_size=1 << 20)


def _read_one(path: Path, label: str, read: list[FileRead]) -> Iterator[RawRow]:
    info = FileRead(label, "save_to_disk" if path.is_dir() else "")
    read.append(info)
    try:
        if path.is_dir():
            rows = _saved_dataset(path, label, info)
        else:
            info.compression, info.reader = _compression(path), _reader_for_name(path.name) or ""
            with _open(path, info.compression) as fh:
                head = fh.read(1 << 16)
            info.reader = info.reader or _sniff(head)
            if info.reader in ("json", "jsonl", "csv", "tsv"):
                info.encoding = _encoding(head, label)
            rows = {"json": _json, "jsonl": _json, "csv": _csv, "tsv": _csv, "parquet": _parquet, "arrow": _arrow}[
                info.reader](path, label, info)
        for row in rows:
            info.rows += 1
            yield row
    except (pa.ArrowException, OSError, EOFError, UnicodeError) as e:
        how = " ".join(x for x in (info.compression, info.reader) if x)
        raise DataError(f"{label}: cannot be read{' as ' + how if how else ''} after {info.rows} rows: {e}") from None


def _sniff(head: bytes) -> str:
    """The reader for a file whose name does not say (a single DATA_PATH file named .txt, say)."""
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith((b"ARROW1", b"\xff\xff\xff\xff")):  # an Arrow file, or a stream's first message
        return "arrow"
    return "json"


def _encoding(head: bytes, label: str) -> str:
    for bom, name in _BOMS:
        if head.startswith(bom):
            return f"{name} (BOM)"
    if b"\x00" in head[:256]:
        raise DataError(f"{label}: holds NUL bytes: UTF-16 or UTF-32 without a byte-order mark? Save it as UTF-8 "
                        "(or as UTF-16 with a BOM, as Windows tools do)")
    return "utf-8"


def _codec(info: FileRead) -> str:
    """The Python codec that reads the file and drops its byte-order mark."""
    name = info.encoding.split(" ")[0]
    return "utf-8-sig" if name == "utf-8" else name


def _preview(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)[:200]
    except (TypeError, ValueError):
        return str(value)[:200]


# ---- JSON and JSONL -----------------------------------------------------------------------------------
def _json(path: Path, label: str, info: FileRead) -> Iterator[RawRow]:
    codec = _codec(info)
    with io.TextIOWrapper(_open(path, info.compression), encoding=codec, errors="replace") as text_fh:
        start = text_fh.read(4096).lstrip()[:1]
    if start == "{":  # JSONL, or a KorQuAD document: the first line says (a one-line array need not be read twice)
        with io.TextIOWrapper(_open(path, info.compression), encoding=codec, errors="replace") as text_fh:
            is_document = not _is_row(text_fh.readline())
    else:
        is_document = start == "["
    if is_document:
        info.reader = "json"
        yield from _json_document(path, label, info, codec)
        return
    info.reader = "jsonl"
    if codec == "utf-8-sig":  # bytes per line, so one bad line is one rejected row
        with _open(path, info.compression) as fh:
            for lineno, line in enumerate(fh, 1):
                if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8):]
                if not line.strip():
                    continue
                where = f"{label}:{lineno}"
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield RawRow(where, None, f"not UTF-8 ({e.reason} at byte {e.start})", line[:200].decode("utf-8", "replace"))
                    continue
                yield _json_row(where, text)
        return
    with io.TextIOWrapper(_open(path, info.compression), encoding=codec) as text_fh:
        for lineno, text in enumerate(text_fh, 1):
            if text.strip():
                yield _json_row(f"{label}:{lineno}", text)


def _json_row(where: str, text: str) -> RawRow:
    try:
        return RawRow(where, json.loads(text), text=text[:200])
    except json.JSONDecodeError as e:
        return RawRow(where, None, f"JSON does not parse ({e.msg}, column {e.colno})", text[:200])


def _is_row(first_line: str) -> bool:
    """A file starting with '{' is JSONL when its first line alone is a complete JSON row (a one-line
    KorQuAD/SQuAD document, with its 'data' list, is a document, not a row)."""
    try:
        value = json.loads(first_line)
    except json.JSONDecodeError:
        return False
    return not (isinstance(value, dict) and isinstance(value.get("data"), list))


def _json_document(path: Path, label: str, info: FileRead, codec: str) -> Iterator[RawRow]:
    with _open(path, info.compression) as fh:
        data = fh.read()
    try:
        doc = json.loads(data.decode(codec))
    except UnicodeDecodeError as e:
        raise DataError(f"{label}: not {info.encoding} text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{label}:{e.lineno}: JSON does not parse ({e.msg}, column {e.colno})") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        yield from _squad(doc, label)
    elif isinstance(doc, list):
        for i, item in enumerate(doc, 1):
            yield RawRow(f"{label} item {i}", item, text=_preview(item))
    else:
        raise DataError(f"{label}: a JSON document must be an array of rows or a KorQuAD/SQuAD object with 'data'")


def _squad(doc: dict, label: str) -> Iterator[RawRow]:
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            context = para.get("context", "") if isinstance(para, dict) else ""
            for q, qa in enumerate(para.get("qas", []) if isinstance(para, dict) else []):
                where = f"{label} data[{a}].paragraphs[{p}].qas[{q}]"
                row = {"__squad__": True, "context": context, **qa} if isinstance(qa, dict) else qa
                yield RawRow(where, row, text=_preview(qa))


# ---- CSV and TSV (pyarrow.csv) -------------------------------------------------------------------------
def _csv(path: Path, label: str, info: FileRead) -> Iterator[RawRow]:
    """Records are numbered as lines are, the header being 1: `file.csv:N` is line N unless a quoted value
    spans lines. Every column is read as bytes and decoded per cell, so a cell that is not UTF-8 rejects its
    row only, and numbers stay the text the user wrote ('007' is not 7)."""
    import pyarrow.csv as pacsv

    bad: dict[int | None, list[RawRow]] = {}

    def on_bad(row) -> str:
        where = f"{label}:{row.number}" if row.number is not None else f"{label} (record number unknown)"
        bad.setdefault(row.number, []).append(RawRow(
            where, None, f"{row.actual_columns} fields where the header has {row.expected_columns}", row.text[:200]))
        return "skip"

    codec = _codec(info)
    read_opts = pacsv.ReadOptions(encoding="utf8" if codec == "utf-8-sig" else codec, use_threads=False)
    parse_opts = pacsv.ParseOptions(delimiter="\t" if info.reader == "tsv" else ",", newlines_in_values=True,
                                    invalid_row_handler=on_bad)
    try:
        with _open(path, info.compression) as fh:
            names = pacsv.open_csv(fh, read_options=read_opts, parse_options=parse_opts).schema.names
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            return
        raise
    bad.clear()
    convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names})
    number = 1  # the header
    with _open(path, info.compression) as fh:
        for batch in pacsv.open_csv(fh, read_options=read_opts, parse_options=parse_opts, convert_options=convert):
            for cells in batch.to_pylist():
                number += 1
                while number in bad:
                    yield from bad.pop(number)
                    number += 1
                yield _csv_row(f"{label}:{number}", cells)
    for rows in bad.values():
        yield from rows


def _csv_row(where: str, cells: dict) -> RawRow:
    row = {}
    for name, value in cells.items():
        try:
            row[name] = value.decode("utf-8") if value is not None else None
        except UnicodeDecodeError as e:
            text = _preview({k: (v.decode("utf-8", "replace") if v is not None else None) for k, v in cells.items()})
            return RawRow(where, None, f"not UTF-8 (column {name!r}: {e.reason} at byte {e.start})", text)
    return RawRow(where, row, text=_preview(row))


# ---- Parquet, Arrow, datasets.save_to_disk -------------------------------------------------------------
def _columnar_source(path: Path, info: FileRead):
    """A random-access source: the file itself, or its decompressed bytes in memory."""
    if not info.compression:
        return pa.memory_map(str(path))
    with _open(path, info.compression) as fh:
        return pa.BufferReader(fh.read())


def _batches_to_rows(batches, label: str) -> Iterator[RawRow]:
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield RawRow(f"{label} row {n}", row, text=_preview(row))


def _parquet(path: Path, label: str, info: FileRead) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    yield from _batches_to_rows(pq.ParquetFile(_columnar_source(path, info)).iter_batches(batch_size=1024), label)


def _arrow(path: Path, label: str, info: FileRead) -> Iterator[RawRow]:
    # An Arrow file has a footer; `datasets` writes its .arrow caches in the streaming format, which has none.
    try:
        reader = pa.ipc.open_file(_columnar_source(path, info))
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        batches = pa.ipc.open_stream(_columnar_source(path, info))
    yield from _batches_to_rows(batches, label)


def _saved_dataset(path: Path, label: str, info: FileRead) -> Iterator[RawRow]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        info.reader = f"save_to_disk, split {split!r} of {', '.join(ds)}"
        ds, label = ds[split], f"{label}[{split}]"
    for i, row in enumerate(ds, 1):
        yield RawRow(f"{label} row {i}", row, text=_preview(row))
