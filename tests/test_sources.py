"""Data sources: the built-in corpora read cleanly, every file format gives the same records, bad input is named."""

import csv
import json
import tracemalloc
import warnings

import pyarrow
import pyarrow.parquet
import pytest

from lmforge.data.sources import MAX_RECORD_CHARS, read_records, read_split, record_text, split_of
from lmforge.errors import UserError

RECORDS = [{"text": "今天天气很好。"}, {"text": "lmforge 支持中文，也支持 English."}, {"text": "第三行🎉"}]


def test_peoples_daily_reads_as_plain_chinese():
    records = list(read_records("builtin:peoples-daily"))
    assert len(records) > 19_000
    assert records[0]["text"] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    joined = "".join(record["text"] for record in records[:2000])
    for leftover in ("/n", "/v", "/w", "  ", "]nt"):
        assert leftover not in joined


def test_reviews_have_both_labels():
    records = list(read_records("builtin:reviews"))
    labels = [record["label"] for record in records]
    assert len(records) > 34_000 and set(labels) == {0, 1}
    assert 0.4 < sum(labels) / len(labels) < 0.6


def write_all_formats(folder):
    (folder / "d.txt").write_text("\n".join(r["text"] for r in RECORDS) + "\n\n  \n", encoding="utf-8")
    (folder / "d.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n\n", encoding="utf-8"
    )
    with open(folder / "d.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text"])
        writer.writeheader()
        writer.writerows(RECORDS)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(RECORDS), folder / "d.parquet")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_every_format_gives_the_same_records(tmp_path, suffix):
    write_all_formats(tmp_path)
    assert list(read_records(str(tmp_path / f"d{suffix}"))) == RECORDS


def test_undecodable_bytes_are_replaced_and_counted_in_one_warning(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("好\n".encode() + b"a\xffb\n" + b"\xfe\n\n" + "中\n".encode() + b"end\x80\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        texts = [record["text"] for record in read_records(str(path))]
    assert texts == ["好", "a\ufffdb", "\ufffd", "中", "end\ufffd"]
    assert len(caught) == 1 and "replaced 3 undecodable bytes" in str(caught[0].message)


def test_a_10_megabyte_line_is_read_in_pieces_with_flat_memory(tmp_path):
    path = tmp_path / "long.txt"
    line = "人民日报" * (10_000_000 // 12)  # ~10 MB of UTF-8 on one line
    path.write_text(line + "\nnext\n", encoding="utf-8")
    del line
    tracemalloc.start()
    pieces, total, longest = 0, 0, 0
    for record in read_records(str(path)):
        pieces += 1
        total += len(record["text"])
        longest = max(longest, len(record["text"]))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert longest == MAX_RECORD_CHARS and pieces > 30
    assert total == 4 * (10_000_000 // 12) + len("next")
    assert peak < 3_000_000


def test_missing_file_and_unknown_builtin_name_the_problem():
    with pytest.raises(UserError, match="no such data file: nowhere.txt.*builtin:peoples-daily"):
        read_records("nowhere.txt")
    with pytest.raises(UserError, match="unknown data source 'builtin:wiki'.*builtin:peoples-daily, builtin:reviews"):
        read_records("builtin:wiki")


def test_unsupported_extension_and_malformed_jsonl(tmp_path):
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(UserError, match=r"\.txt, \.jsonl, \.csv, \.parquet"):
        read_records(str(tmp_path / "d.xml"))
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 3"):
        list(read_records(str(tmp_path / "d.jsonl")))


def test_missing_field_is_named():
    with pytest.raises(UserError, match="field 'text' is missing.*data.jsonl line 7.*'title'"):
        record_text({"title": "x"}, "text", "data.jsonl line 7")


def test_split_is_deterministic_proportional_and_stable_as_the_corpus_grows(tmp_path):
    keys = [f"句子{i}" for i in range(20_000)]
    splits = [split_of(key, 0.05, 0.05) for key in keys]
    assert splits == [split_of(key, 0.05, 0.05) for key in keys]
    for name in ("valid", "test"):
        assert 0.04 < splits.count(name) / len(keys) < 0.06
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text("\n".join(keys[:500]), encoding="utf-8")
    large.write_text("\n".join(keys[:500] + [f"新{i}" for i in range(3000)]), encoding="utf-8")
    before = [r["text"] for r in read_split(str(small), "valid", 0.05, 0.05)]
    after = [r["text"] for r in read_split(str(large), "valid", 0.05, 0.05) if r["text"] in set(keys)]
    assert before == after and before
