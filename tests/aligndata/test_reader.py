"""aligndata.read.reader: containers, line numbers, bad JSON, bounded memory."""

from __future__ import annotations

import gzip
import io
import json
import sys
import tracemalloc
from pathlib import Path

import pytest

from aligndata.errors import InputError
from aligndata.read.reader import CHUNK_CHARS, RawRecord, RecordStream, display_name


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return str(path)


def read(path: str) -> list[RawRecord]:
    with RecordStream(path) as stream:
        return list(stream)


def summary(records: list[RawRecord]) -> list[tuple]:
    """(index, line, value or error) per record: what most tests assert."""
    return [(r.index, r.line, r.value if r.error is None else r.error) for r in records]


# -- JSON Lines -----------------------------------------------------------------------------------

def test_jsonl_records_keep_their_line_numbers_across_blank_lines(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"a": 1}\n\n   \n{"a": 2}\n{"a": 3}')
    assert summary(read(path)) == [(1, 1, {"a": 1}), (2, 4, {"a": 2}), (3, 5, {"a": 3})]


def test_jsonl_with_crlf_line_endings_and_a_bom_parses(tmp_path):
    path = write(tmp_path, "a.jsonl", b'\xef\xbb\xbf{"a": 1}\r\n{"a": "\xc3\xa9"}\r\n')
    assert summary(read(path)) == [(1, 1, {"a": 1}), (2, 2, {"a": "é"})]


def test_ndjson_extension_is_read_as_json_lines(tmp_path):
    path = write(tmp_path, "a.ndjson", '1\n"x"\n')
    with RecordStream(path) as stream:
        assert stream.mode == "lines"
        assert summary(list(stream)) == [(1, 1, 1), (2, 2, "x")]


def test_json_file_whose_first_line_is_a_whole_value_is_read_as_json_lines(tmp_path):
    path = write(tmp_path, "a.json", '{"a": 1}\n{"a": 2}\n')
    with RecordStream(path) as stream:
        assert stream.mode == "lines"
        assert summary(list(stream)) == [(1, 1, {"a": 1}), (2, 2, {"a": 2})]


def test_bad_jsonl_line_becomes_an_error_record_and_reading_goes_on(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"a": 1}\n{"a": 1,}\n{"a": 3}\n')
    records = read(path)
    assert summary(records) == [
        (1, 1, {"a": 1}),
        (2, 2, "invalid JSON: Expecting property name enclosed in double quotes (column 9)"),
        (3, 3, {"a": 3}),
    ]
    assert records[1].text == '{"a": 1,}'
    assert records[1].fatal is False


def test_missing_closing_brace_is_reported_at_the_end_of_its_own_line(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"a": 1}\n{"a": [1, 2]\n')
    assert summary(read(path))[1] == (2, 2, "invalid JSON: Expecting ',' delimiter (column 13)")


def test_invalid_utf8_line_becomes_an_error_record(tmp_path):
    path = write(tmp_path, "a.jsonl", b'{"a": 1}\n{"a": "\xff"}\n')
    records = read(path)
    assert summary(records)[1] == (2, 2, "invalid UTF-8 at byte 8 of the line")
    assert records[1].text == '{"a": "\ufffd"}'


def test_nan_infinity_and_overflowing_numbers_parse_but_are_flagged_nonfinite(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"a": 1.5e300}\n{"a": NaN}\n{"a": -Infinity}\n{"a": 1e400}\n')
    assert [r.nonfinite for r in read(path)] == [False, True, True, True]
    path = write(tmp_path, "a.json", '[{"a": 2.5}, {"a": -1e999}]')
    assert [r.nonfinite for r in read(path)] == [False, True]


def test_absurdly_nested_jsonl_line_is_an_error_record_not_a_crash(tmp_path):
    path = write(tmp_path, "a.jsonl", "[" * 5000 + "]" * 5000 + '\n{"a": 1}\n')
    assert summary(read(path)) == [(1, 1, "invalid JSON: nested too deeply"), (2, 2, {"a": 1})]


def test_jsonl_whose_first_line_is_not_json_at_all_is_an_input_error(tmp_path):
    path = write(tmp_path, "a.jsonl", 'hello world\n{"a": 1}\n')
    with pytest.raises(InputError) as e:
        read(path)
    assert str(e.value) == f"{path}:1: not JSON (Expecting value at column 1)"


# -- one JSON document --------------------------------------------------------------------------

def test_pretty_printed_array_gives_each_record_the_line_it_starts_on(tmp_path):
    records = [{"conversations": [{"from": "human", "value": f"q{i}"}]} for i in range(3)]
    path = write(tmp_path, "a.json", json.dumps(records, indent=2))
    got = read(path)
    assert [(r.index, r.line) for r in got] == [(1, 2), (2, 10), (3, 18)]
    assert [r.value for r in got] == records


def test_single_top_level_object_is_one_record(tmp_path):
    path = write(tmp_path, "a.json", '\n\n{\n  "a": 1\n}\n')
    assert summary(read(path)) == [(1, 3, {"a": 1})]


def test_json_document_with_a_bom_parses(tmp_path):
    path = write(tmp_path, "a.json", b'\xef\xbb\xbf[\n{"a": 1}\n]')
    assert summary(read(path)) == [(1, 2, {"a": 1})]


def test_empty_array_yields_no_records(tmp_path):
    assert read(write(tmp_path, "a.json", "[ \n ]")) == []


@pytest.mark.parametrize(
    ("text", "error", "line"),
    [
        ('[{"a": 1},\n]', "invalid JSON: trailing comma before ']'", 2),
        ('[{"a": 1},\n{"a": 2', "invalid JSON: file ends inside a record (truncated?)", 2),
        ('[{"a": 1}\n{"a": 2}]', "invalid JSON: expected ',' or ']' between records, found '{'", 2),
        ('[{"a": 1}\n', "invalid JSON: file ends inside the top-level array (truncated?)", 2),
        ('[\n{"a": 1}\n]\nmore', "extra data after the top-level JSON array", 4),
        ('{\n"a": 1}\n\n[2]', "extra data after the top-level JSON value", 4),
    ],
)
def test_broken_json_document_ends_with_one_fatal_error_record(tmp_path, text, error, line):
    got = read(write(tmp_path, "a.json", text))
    assert [r.value for r in got[:1]] == [{"a": 1}]
    assert [(r.index, r.line, r.error, r.fatal) for r in got[1:]] == [(2, line, error, True)]


def test_invalid_utf8_inside_an_array_is_fatal_and_names_its_line(tmp_path):
    got = read(write(tmp_path, "a.json", b'[\n{"a": "\xff"}]'))
    assert [(r.index, r.line, r.error, r.fatal) for r in got] == [
        (1, 2, "invalid UTF-8 on line 2 (invalid start byte)", True)]


def test_invalid_utf8_deep_into_a_large_array_names_its_line(tmp_path):
    good = b",\n".join(b'{"text": "%s"}' % (b"ab" * 300) for _ in range(5000))
    got = read(write(tmp_path, "a.json", b"[\n" + good + b',\n{"text": "\xc3("}\n]'))
    assert len(good) > 2 * CHUNK_CHARS
    assert len(got) == 5001
    assert [(r.line, r.error, r.fatal) for r in got[-1:]] == [
        (5002, "invalid UTF-8 on line 5002 (invalid continuation byte)", True)]


def test_absurdly_nested_array_element_is_fatal_not_a_crash(tmp_path):
    got = read(write(tmp_path, "a.json", "[" * 5000 + "]" * 5000))
    assert [(r.index, r.error, r.fatal) for r in got] == [(1, "invalid JSON: nested too deeply", True)]


def test_array_records_straddling_read_chunks_keep_values_and_lines(tmp_path):
    # ~3 MiB of records of uneven size, so several cut across the 1 MiB chunk boundaries.
    records = [{"i": i, "text": "é" * (i * 37 % 5000)} for i in range(1200)]
    body = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"
    assert len(body) > 2 * CHUNK_CHARS
    got = read(write(tmp_path, "big.json", body))
    assert [r.value for r in got] == records
    assert [r.line for r in got] == [i + 2 for i in range(1200)]


def test_one_record_larger_than_a_read_chunk_is_read_whole(tmp_path):
    huge = "x" * (3 * CHUNK_CHARS)
    got = read(write(tmp_path, "a.json", json.dumps([{"a": 1}, {"big": huge}, {"a": 3}])))
    assert [r.value for r in got] == [{"a": 1}, {"big": huge}, {"a": 3}]


def test_streaming_a_large_array_holds_only_a_few_chunks_in_memory(tmp_path):
    record = {"messages": [{"role": "user", "content": "word " * 200}]}
    n = 22_000  # ~22 MB on disk, over twice the memory the test allows
    path = tmp_path / "large.json"
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(record) for _ in range(n)) + "\n]")
    assert path.stat().st_size > 20 * CHUNK_CHARS
    tracemalloc.start()
    try:
        count = sum(1 for _ in RecordStream(str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 10 * CHUNK_CHARS  # read buffers + a few chunks of text, whatever the file size


# -- gzip, stdin, files that are not data -------------------------------------------------------------

def test_gzip_is_detected_by_magic_bytes_whatever_the_name(tmp_path):
    path = write(tmp_path, "data.bin", gzip.compress(b'[{"a": 1},\n{"a": 2}]'))
    assert summary(read(path)) == [(1, 1, {"a": 1}), (2, 2, {"a": 2})]


def test_gzipped_jsonl_is_read_as_json_lines(tmp_path):
    path = write(tmp_path, "data.jsonl.gz", gzip.compress(b'{"a": 1}\n{"a": 2}\n'))
    with RecordStream(path) as stream:
        assert stream.mode == "lines"
        assert summary(list(stream)) == [(1, 1, {"a": 1}), (2, 2, {"a": 2})]


def test_truncated_gzip_is_an_input_error_naming_the_last_good_record(tmp_path):
    lines = "".join(json.dumps({"i": i, "pad": "abc" * (i % 700)}) + "\n" for i in range(3000))
    data = gzip.compress(lines.encode(), mtime=0)
    path = write(tmp_path, "cut.jsonl.gz", data[: len(data) // 2])
    seen = []
    with pytest.raises(InputError) as e:
        for r in RecordStream(path):
            seen.append(r.index)
    assert str(e.value) == (f"{path}: read error after record {len(seen)}: "
                            "Compressed file ended before the end-of-stream marker was reached")
    assert seen == list(range(1, len(seen) + 1)) and len(seen) > 100


def test_gzip_magic_with_garbage_after_it_is_an_input_error(tmp_path):
    path = write(tmp_path, "a.json", b"\x1f\x8bnot really gzip")
    with pytest.raises(InputError) as e:
        RecordStream(path)
    assert str(e.value).startswith(f"{path}: not a readable gzip file (")


def test_dash_reads_standard_input_and_is_named_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"a": 1}\n{"a": 2}\n')))
    with RecordStream("-") as stream:
        assert stream.name == "<stdin>"
        assert summary(list(stream)) == [(1, 1, {"a": 1}), (2, 2, {"a": 2})]
    assert display_name("-") == "<stdin>"
    assert display_name("x.json") == "x.json"


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("empty.json", b"", "{path}: file is empty (no records)"),
        ("blank.jsonl", b"  \n\n ", "{path}: file is empty (no records)"),
        ("empty.json.gz", gzip.compress(b""), "{path}: file is empty (no records)"),
        ("text.json", b"hello", "{path}: not JSON (starts with b'hello'); expected a JSON array, an object or JSON Lines"),
        ("number.json", b"42\n", "{path}: not JSON (starts with b'42\\n'); expected a JSON array, an object or JSON Lines"),
    ],
)
def test_files_that_hold_no_records_are_input_errors(tmp_path, name, data, message):
    path = write(tmp_path, name, data)
    with pytest.raises(InputError) as e:
        RecordStream(path)
    assert str(e.value) == message.format(path=path)


def test_missing_file_and_directory_are_input_errors(tmp_path):
    with pytest.raises(InputError) as e:
        RecordStream(str(tmp_path / "nope.json"))
    assert str(e.value) == f"{tmp_path / 'nope.json'}: no such file"
    with pytest.raises(InputError) as e:
        RecordStream(str(tmp_path))
    assert str(e.value) == f"{tmp_path}: is a directory, not a file"


def test_stream_counts_bytes_read_and_knows_the_file_size(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"a": 1}\n' * 10)
    with RecordStream(path) as stream:
        assert stream.total_bytes == 90
        assert len(list(stream)) == 10
        assert stream.records_read == 10
        assert stream.bytes_read() == 90


def test_raw_lines_parsed_elsewhere_give_exactly_the_records_of_the_stream(tmp_path):
    """convert's workers parse JSON Lines from raw_lines() with LineParser: same records, lines and flags."""
    from aligndata.read.reader import LineParser

    data = (b'\xef\xbb\xbf{"a": 1}\r\n\n   \n{"a": NaN}\n{"a": "\xff"}\n{"a": 1e400}\n{"a": \n'
            + b"[" * 5000 + b"]" * 5000 + b'\n\t\n{"a": [Infinity]}\n42\n{"b": "\xc3\xa9"}')
    path = write(tmp_path, "a.jsonl", data)
    expected = read(path)
    with RecordStream(path) as stream:
        parse = LineParser(stream.name)
        got = [parse(index, line, raw) for index, line, raw in stream.raw_lines()]
        assert stream.records_read == len(expected) == 9
    assert repr(got) == repr(expected)  # repr: NaN != NaN
    assert [(r.index, r.line) for r in got] == list(enumerate([1, 4, 5, 6, 7, 8, 10, 11, 12], start=1))
    assert [r.nonfinite for r in got] == [False, True, False, True, False, False, True, False, False]
    assert [r.error is not None for r in got] == [False, False, True, False, True, True, False, False, False]


def test_line_parser_refuses_a_first_line_that_is_not_json_like_the_stream(tmp_path):
    from aligndata.read.reader import LineParser

    with pytest.raises(InputError, match=r"a.jsonl:3: not JSON \(Expecting value at column 1\)"):
        LineParser(str(tmp_path / "a.jsonl"))(1, 3, b"hello world\n")
    assert LineParser("a.jsonl")(2, 3, b"hello\n").error == "invalid JSON: Expecting value (column 1)"


def test_raw_lines_is_for_json_lines_only(tmp_path):
    path = write(tmp_path, "a.json", '[{"a": 1},\n{"a": 2}]')
    with RecordStream(path) as stream, pytest.raises(ValueError, match="needs JSON Lines"):
        next(stream.raw_lines())
