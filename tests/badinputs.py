"""Generate the bad-input corpus: every file a user could plausibly hand to `aligndata`, broken on purpose.

    cases = generate(tmp_dir)        writes one file (or directory) per Case and returns the list

Each Case says what the documented behaviour is (aligndata/errors.py): the exit code of `validate`,
of `convert --to openai|preference --on-error fail` and `--on-error skip`, the line and JSON path
that the first message must name, and how many records are read. The corpus is generated, not
hand-picked: the wrong-type and null cases walk every field of every format's good record.

Run it as a script to write the corpus somewhere and list it:  python tests/badinputs.py OUT_DIR
"""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

OK, INVALID, INPUT = 0, 1, 2  # aligndata/errors.py

SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}],
            "system": "Be brief."}
OPENAI = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}
TEXT_PREF = {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."}
GOOD = {"sharegpt": SHAREGPT, "openai": OPENAI, "text-preference": TEXT_PREF}
TASK = {"sharegpt": "sft", "openai": "sft", "text-preference": "dpo"}
# Fields whose value is checked; wrong types and nulls are planted at each of them.
FIELDS = {
    "sharegpt": [("conversations",), ("conversations", 0), ("conversations", 0, "from"),
                 ("conversations", 1, "value"), ("system",)],
    "openai": [("messages",), ("messages", 1), ("messages", 0, "role"), ("messages", 1, "content")],
    "text-preference": [("prompt",), ("chosen",), ("rejected",)],
}
BIG = 10 * 1024 * 1024


@dataclass
class Case:
    name: str
    path: Path
    task: str  # "sft" (convert --to openai) or "dpo" (convert --to preference)
    validate: int  # exit code of `aligndata validate`
    fail: int  # exit code of `convert --on-error fail`
    skip: int  # exit code of `convert --on-error skip`
    message: str  # a fragment every run that fails must print (besides the file name)
    line: int | None = None  # the line the first problem names (None: a whole-file error)
    field: str | None = None  # the JSON path the first problem names
    records: int | None = None  # records read, when the run reads to the end
    lines_mode: bool = True  # JSON Lines (a bad record is skippable) vs one JSON document

    @property
    def to(self) -> str:
        return "openai" if self.task == "sft" else "preference"

    def __repr__(self) -> str:
        return f"Case({self.name})"


def _path(keys: tuple) -> str:
    return "$" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys)


def _planted(record: dict, keys: tuple, value: Any) -> dict:
    rec = json.loads(json.dumps(record))
    target = rec
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    return rec


def _jsonl(records: list[Any]) -> str:
    return "".join(json.dumps(r, allow_nan=True) + "\n" for r in records)


def generate(directory: str | Path, *, write: bool = True) -> list[Case]:
    """The cases, each written under `directory`; with write=False only listed (for test ids)."""
    d = Path(directory)
    if write:
        d.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, content: str | bytes | None, task: str, *, writer: Callable[[Path], None] | None = None,
            **kw: Any) -> None:
        path = d / name
        if not write:
            pass
        elif writer is not None:
            writer(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_bytes(content.encode("utf-8"))
        cases.append(Case(name, path, task, **kw))

    good2 = [SHAREGPT, SHAREGPT]
    line3 = dict(line=3, records=3)

    # -- wrong types and nulls at every field of every format (two good records first, so detection works)
    for fmt, fields in FIELDS.items():
        good = [GOOD[fmt]] * 2
        for keys in fields:
            for label, value in (("int", 7), ("null", None), ("list", [1, "x"]), ("object", {"k": 1})):
                if label == "object" and keys[-1] == 0:
                    continue  # a message object in a message slot is a different (valid-typed) case
                if label == "list" and keys == ("messages",) or label == "list" and keys == ("conversations",):
                    continue  # a list there is the right type
                rec = _planted(GOOD[fmt], keys, value)
                name = f"{fmt}-{label}-at-{'.'.join(map(str, keys))}.jsonl"
                if keys == ("prompt",):
                    # {"prompt": <not a string>, "chosen": str, "rejected": str} is closer to openai-preference
                    # (whose prompt is optional), so the file is mixed-format: refused whole, never guessed.
                    add(name, _jsonl(good + [rec]), TASK[fmt], validate=INVALID, fail=INVALID, skip=INVALID,
                        message="different formats", line=3, field="$", lines_mode=False)
                    continue
                add(name, _jsonl(good + [rec]), TASK[fmt], validate=INVALID, fail=INVALID, skip=OK, message="",
                    field=_path(keys), **line3)
    # null everywhere: a record that is null, and one whose every leaf is null
    add("null-record.jsonl", _jsonl(good2 + [None]), "sft", validate=INVALID, fail=INVALID, skip=OK,
        message="", field="$", **line3)
    add("null-leaves.jsonl", _jsonl(good2 + [{"conversations": [{"from": None, "value": None}] * 2, "system": None}]),
        "sft", validate=INVALID, fail=INVALID, skip=OK, message="", field="$.conversations[0].from", **line3)
    for label, value in (("number", 42), ("string", "hello"), ("list", [1, 2]), ("true", True)):
        add(f"scalar-record-{label}.jsonl", _jsonl(good2 + [value]), "sft", validate=INVALID, fail=INVALID, skip=OK,
            message="", field="$", **line3)

    # -- JSON syntax
    text = _jsonl(good2 + [SHAREGPT])
    add("truncated.jsonl", text[: len(text) - 20], "sft", validate=INVALID, fail=INVALID, skip=OK,
        message="invalid JSON", field="$", **line3)
    array = "[\n" + ",\n".join(json.dumps(r) for r in good2 + [SHAREGPT]) + "\n]\n"
    add("array-cut-mid-record.json", array[: array.rindex("Hello") + 2], "sft", validate=INVALID, fail=INVALID,
        skip=INVALID, message="truncated", line=4, field="$", lines_mode=False)
    add("array-cut-between-records.json", array[: array.rindex(",") + 1], "sft", validate=INVALID, fail=INVALID,
        skip=INVALID, message="truncated", line=4, field="$", lines_mode=False)
    add("array-trailing-comma.json", "[\n" + json.dumps(SHAREGPT) + ",\n]\n", "sft", validate=INVALID,
        fail=INVALID, skip=INVALID, message="trailing comma", line=3, field="$", lines_mode=False)
    add("array-missing-comma.json", "[\n" + json.dumps(SHAREGPT) + "\n" + json.dumps(SHAREGPT) + "\n]\n", "sft",
        validate=INVALID, fail=INVALID, skip=INVALID, message="expected ','", line=3, field="$", lines_mode=False)
    add("extra-data-after-array.json", "[\n" + json.dumps(SHAREGPT) + "\n]\n{}\n", "sft", validate=INVALID,
        fail=INVALID, skip=INVALID, message="extra data", line=4, field="$", lines_mode=False)
    add("garbage-line.jsonl", _jsonl(good2) + "this is not json\n" + _jsonl([SHAREGPT]), "sft", validate=INVALID,
        fail=INVALID, skip=OK, message="invalid JSON", field="$", line=3, records=4)

    # -- encodings and line endings
    bad_utf8 = _jsonl(good2).encode() + b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}\n'
    add("invalid-utf8.jsonl", bad_utf8, "sft", validate=INVALID, fail=INVALID, skip=OK, message="invalid UTF-8",
        field="$", **line3)
    bad_utf8_array = ("[\n" + ",\n".join(json.dumps(r) for r in good2) + ",\n").encode() + \
        b'{"conversations": [{"from": "human", "value": "\xff\xfe"}]}\n]\n'
    add("invalid-utf8-array.json", bad_utf8_array, "sft", validate=INVALID, fail=INVALID, skip=INVALID,
        message="invalid UTF-8", line=4, field="$", lines_mode=False)
    add("bom.jsonl", b"\xef\xbb\xbf" + _jsonl(good2 + [SHAREGPT]).encode(), "sft", validate=OK, fail=OK, skip=OK,
        message="", records=3)
    add("bom-array.json", b"\xef\xbb\xbf" + array.encode(), "sft", validate=OK, fail=OK, skip=OK, message="",
        records=3, lines_mode=False)
    add("bom-then-bad-line.jsonl", b"\xef\xbb\xbf" + _jsonl(good2 + [{"conversations": 1}]).encode(), "sft",
        validate=INVALID, fail=INVALID, skip=OK, message="", field="$.conversations", **line3)
    add("crlf.jsonl", _jsonl(good2 + [SHAREGPT]).replace("\n", "\r\n"), "sft", validate=OK, fail=OK, skip=OK,
        message="", records=3)
    add("crlf-bad-line.jsonl", _jsonl(good2 + [{"conversations": []}]).replace("\n", "\r\n"), "sft",
        validate=INVALID, fail=INVALID, skip=OK, message="", field="$.conversations", **line3)
    crlf_array = "[\r\n" + ",\r\n".join(json.dumps(r, indent=1).replace("\n", "\r\n") for r in good2) + \
        ",\r\n" + json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\r\n]\r\n"
    add("crlf-array-bad-record.json", crlf_array, "sft", validate=INVALID, fail=INVALID, skip=OK,
        message="robot", line=crlf_array.count("\n", 0, crlf_array.index('{"conversations": [{"from": "robot"')) + 1,
        field="$.conversations[0].from", records=3, lines_mode=False)

    # -- NaN / Infinity literals (not JSON) and numbers that overflow to infinity
    for label, lit in (("nan", "NaN"), ("infinity", "Infinity"), ("neg-infinity", "-Infinity"), ("overflow", "1e400")):
        bad = _jsonl([TEXT_PREF] * 2) + '{"prompt": "q", "chosen": "a", "rejected": "b", "score": %s}\n' % lit
        add(f"{label}-literal.jsonl", bad, "dpo", validate=INVALID, fail=INVALID, skip=OK, message="",
            field="$.score", **line3)
    add("nan-in-message.jsonl", _jsonl(good2) + '{"conversations": [{"from": "human", "value": NaN}]}\n', "sft",
        validate=INVALID, fail=INVALID, skip=OK, message="", field="$.conversations[0].value", **line3)

    # -- lone surrogate escapes: valid JSON, but half a UTF-16 pair is no character and has no UTF-8
    lone = '{"conversations": [{"from": "human", "value": "Hi \\ud83d"}, {"from": "gpt", "value": "Hello"}]}\n'
    add("lone-surrogate-in-message.jsonl", _jsonl(good2) + lone, "sft", validate=INVALID, fail=INVALID, skip=OK,
        message="lone surrogate escape \\ud83d", field="$.conversations[0].value", **line3)
    lone_pair = '{"prompt": "q", "chosen": "a \\udc00 b", "rejected": "b"}\n'
    add("lone-surrogate-in-completion.jsonl", _jsonl([TEXT_PREF] * 2) + lone_pair, "dpo", validate=INVALID,
        fail=INVALID, skip=OK, message="lone surrogate escape \\udc00", field="$.chosen", **line3)
    emoji = [SHAREGPT, SHAREGPT, _planted(SHAREGPT, ("conversations", 1, "value"), "Hi \U0001f600")]
    add("surrogate-pair.jsonl", _jsonl(emoji), "sft", validate=OK, fail=OK, skip=OK, message="", records=3)
    lone_array = json.dumps(emoji).replace("\\ud83d\\ude00", "\\ude00")  # the pair's second half, alone
    add("lone-surrogate-in-array.json", lone_array, "sft", validate=INVALID, fail=INVALID, skip=OK,
        message="lone surrogate escape \\ude00", line=1, field="$.conversations[1].value", records=3,
        lines_mode=False)

    # -- semantic problems
    for role in ("robot", "", "HUMAN"):
        rec = _planted(SHAREGPT, ("conversations", 0, "from"), role)
        add(f"unknown-role-{role or 'empty'}.jsonl", _jsonl(good2 + [rec]), "sft", validate=INVALID, fail=INVALID,
            skip=OK, message="", field="$.conversations[0].from", **line3)
    rec = _planted(OPENAI, ("messages", 1, "role"), "wizard")
    add("unknown-role-openai.jsonl", _jsonl([OPENAI] * 2 + [rec]), "sft", validate=INVALID, fail=INVALID, skip=OK,
        message="", field="$.messages[1].role", **line3)
    add("empty-conversations.jsonl", _jsonl(good2 + [{"conversations": []}]), "sft", validate=INVALID,
        fail=INVALID, skip=OK, message="", field="$.conversations", **line3)
    add("empty-messages.jsonl", _jsonl([OPENAI] * 2 + [{"messages": []}]), "sft", validate=INVALID, fail=INVALID,
        skip=OK, message="", field="$.messages", **line3)
    add("empty-object.jsonl", _jsonl(good2 + [{}]), "sft", validate=INVALID, fail=INVALID, skip=OK, message="",
        field="$", **line3)
    add("empty-preference.jsonl", _jsonl([TEXT_PREF] * 2 + [{"prompt": "", "chosen": "", "rejected": ""}]), "dpo",
        validate=INVALID, fail=INVALID, skip=OK, message="", field="$.prompt", **line3)
    add("duplicates.jsonl", _jsonl([SHAREGPT] * 50), "sft", validate=OK, fail=OK, skip=OK, message="", records=50)
    add("mixed-formats.jsonl", _jsonl([SHAREGPT, OPENAI, SHAREGPT, OPENAI]), "sft", validate=INVALID,
        fail=INVALID, skip=INVALID, message="records match different formats", line=2, field="$", lines_mode=False)
    add("mixed-tasks.jsonl", _jsonl([SHAREGPT, TEXT_PREF, SHAREGPT, TEXT_PREF]), "sft", validate=INVALID,
        fail=INVALID, skip=INVALID, message="records match different formats", line=2, field="$", lines_mode=False)

    # -- size and depth
    big = _planted(SHAREGPT, ("conversations", 1, "value"), "x" * BIG)
    add("ten-megabyte-string.jsonl", _jsonl([SHAREGPT, big, SHAREGPT]), "sft", validate=OK, fail=OK, skip=OK,
        message="", records=3)
    add("ten-megabyte-string-array.json", "[" + ",".join(json.dumps(r) for r in (SHAREGPT, big, SHAREGPT)) + "]",
        "sft", validate=OK, fail=OK, skip=OK, message="", records=3, lines_mode=False)
    big_bad = _planted(SHAREGPT, ("conversations", 1, "from"), "y" * BIG)
    add("ten-megabyte-role.jsonl", _jsonl(good2 + [big_bad]), "sft", validate=INVALID, fail=INVALID, skip=OK,
        message="", field="$.conversations[1].from", **line3)
    deep = "[" * 100_000 + "]" * 100_000
    add("deeply-nested.jsonl", _jsonl(good2) + '{"conversations": ' + deep + "}\n", "sft", validate=INVALID,
        fail=INVALID, skip=OK, message="nested too deeply", field="$", **line3)
    add("deeply-nested-array.json", "[\n" + json.dumps(SHAREGPT) + ",\n" + deep + "\n]\n", "sft",
        validate=INVALID, fail=INVALID, skip=INVALID, message="nested too deeply", line=3, field="$",
        lines_mode=False)
    junk: Any = "leaf"
    for i in range(60):
        junk = {"k": [junk, i, None]}
    add("nested-junk.jsonl", _jsonl(good2 + [_planted(SHAREGPT, ("conversations", 1), junk)]), "sft",
        validate=INVALID, fail=INVALID, skip=OK, message="", field="$.conversations[1]", **line3)

    # -- not data at all: exit code 2, whole-file messages
    add("empty.jsonl", "", "sft", validate=INPUT, fail=INPUT, skip=INPUT, message="empty")
    add("blank-lines.jsonl", "\n \r\n\t\n", "sft", validate=INPUT, fail=INPUT, skip=INPUT, message="empty")
    add("bom-only.json", b"\xef\xbb\xbf", "sft", validate=INPUT, fail=INPUT, skip=INPUT, message="empty")
    add("plain-text.json", "hello, world\n", "sft", validate=INPUT, fail=INPUT, skip=INPUT, message="not JSON")
    add("binary.json", bytes(range(256)) * 4, "sft", validate=INPUT, fail=INPUT, skip=INPUT, message="not JSON")
    add("a-directory.jsonl", None, "sft", writer=lambda p: p.mkdir(), validate=INPUT, fail=INPUT, skip=INPUT,
        message="is a directory")
    add("missing-file.jsonl", None, "sft", writer=lambda p: None, validate=INPUT, fail=INPUT, skip=INPUT,
        message="no such file")
    gz = gzip.compress(_jsonl(good2 * 50).encode())
    add("truncated.jsonl.gz", gz[: len(gz) // 2], "sft", validate=INPUT, fail=INPUT, skip=INPUT,
        message="not a readable gzip file")
    add("no-format.jsonl", _jsonl([{"a": 1}, {"b": 2}]), "sft", validate=INPUT, fail=INPUT, skip=INPUT,
        message="cannot detect the format")
    return cases


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/badinputs.py OUT_DIR", file=sys.stderr)
        return 2
    for case in generate(argv[0]):
        print(f"{case.name}\tvalidate={case.validate} fail={case.fail} skip={case.skip}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
