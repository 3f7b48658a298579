"""What a new user meets first in `aligndata`: options that would be ignored are refused, --help and the
summary say what has no limit, and the messages for common mistakes say what was expected."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from aligndata.cli import app
from paths import SAMPLES

runner = CliRunner()

CHAT = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Arr! Ahoy, matey."}]}


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    return line


def chats(tmp_path, n=3):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(CHAT) + "\n" for _ in range(n)))
    return path


@pytest.mark.parametrize(("options", "message"), [
    (["--to", "dpo", "--max-length", "64", "--max-prompt-length", "32"],
     "error: --max-prompt-length applies with --length-policy truncate only (drop keeps or drops whole pairs, it "
     "never cuts a prompt); add --length-policy truncate or leave it out"),
    (["--to", "dpo", "--train-on", "last"],
     "error: --train-on last applies to --to sft only (DPO trains the chosen and rejected replies, never the "
     "prompt's turns)"),
])
def test_options_that_would_be_ignored_are_usage_errors(tmp_path, tiny_tokenizer_dir, options, message):
    result = run("convert", SAMPLES / "text_preference.jsonl", "--tokenizer", tiny_tokenizer_dir,
                 "--out", tmp_path / "o", "-q", *options)
    assert result.exit_code == 2
    assert error_line(result) == message


def test_convert_help_says_what_it_refuses_and_that_no_max_length_means_no_limit():
    text = " ".join(run("convert", "--help").output.split())
    assert "default: no limit" in text
    assert ("Refused (exit 2): --max-prompt-length without --length-policy truncate or with --to sft; "
            "--length-policy truncate without --max-length; --train-on last with --to dpo;") in text
    assert " convert [OPTIONS] FILES... " in text


def test_summary_says_there_is_no_length_limit(tmp_path, tiny_tokenizer_dir):
    result = run("convert", chats(tmp_path), "--to", "sft", "--tokenizer", tiny_tokenizer_dir, "--out", tmp_path / "o",
                 "-q")
    assert result.exit_code == 0, result.output
    assert re.search(r"^no --max-length: no length limit \(the longest sequence has \d+ tokens\)$", result.output,
                     re.MULTILINE)


def test_every_record_too_long_names_the_options_and_the_lengths(tmp_path, tiny_tokenizer_dir):
    result = run("convert", chats(tmp_path), "--to", "sft", "--tokenizer", tiny_tokenizer_dir, "--max-length", "4",
                 "--out", tmp_path / "o", "-q")
    assert result.exit_code == 2
    assert re.fullmatch(r"error: \S+chats.jsonl: no records were kept, nothing to write \(read 3, rejected 0, "
                        r"dropped 3\); 3 were longer than --max-length 4 \(their lengths: p50 (\d+), p90 \1, p99 \1, "
                        r"longest \1 tokens\): raise --max-length, or cut them with --length-policy truncate",
                        error_line(result))


@pytest.mark.parametrize("args", [[], ["--format", "sharegpt"]])
def test_a_pretty_printed_array_named_jsonl_is_named_as_such(tmp_path, args):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(json.loads((SAMPLES / "sharegpt.json").read_text()), indent=2))
    result = run("validate", path, "-q", *args)
    assert result.exit_code == 2
    assert error_line(result) == (f"error: {path}: this looks like a JSON array spread over several lines, not JSON "
                                  "Lines (one record per line); name it .json")


def test_a_jsonl_line_holding_a_whole_list_is_still_a_record(tmp_path):
    path = tmp_path / "bare.jsonl"
    path.write_text(json.dumps(CHAT["messages"]) + "\n" + json.dumps(CHAT["messages"]) + "\n")
    assert run("validate", path, "-q").exit_code == 0


def test_tokenizer_at_an_empty_directory_says_what_was_expected(tmp_path):
    (tmp_path / "tok").mkdir()
    result = run("convert", chats(tmp_path), "--to", "sft", "--tokenizer", tmp_path / "tok", "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert error_line(result) == (f"error: cannot load tokenizer '{tmp_path / 'tok'}': the directory holds no "
                                  "tokenizer files (expected one of tokenizer.json, tokenizer_config.json, "
                                  "tokenizer.model, vocab.json, vocab.txt)")


def test_tokenizer_at_a_vocab_json_says_to_pass_its_directory(tmp_path, tiny_tokenizer_dir):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"a": 0, "b": 1}))
    result = run("convert", chats(tmp_path), "--to", "sft", "--tokenizer", vocab, "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert error_line(result).startswith(f"error: cannot load tokenizer '{vocab}': not a tokenizer.json of the "
                                         "tokenizers library (")
    assert error_line(result).endswith("); for vocab.json + merges.txt or tokenizer_config.json pass the directory "
                                       "that holds them")


def test_a_bare_tokenizer_json_names_the_file_and_its_directory(tmp_path, tiny_tokenizer_dir):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", alone / "tokenizer.json")
    result = run("convert", chats(tmp_path), "--to", "sft", "--tokenizer", alone / "tokenizer.json",
                 "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert error_line(result).startswith(f"error: the tokenizer '{alone / 'tokenizer.json'}' has no chat template (a "
                                         "tokenizer.json file alone has none: pass the directory with its "
                                         "tokenizer_config.json); pass --chat-template")


def test_hh_template_without_eos_is_one_usage_error_and_eos_token_fixes_it(tmp_path, tiny_tokenizer_dir):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", alone / "tokenizer.json")  # no config: no eos_token
    common = ["convert", SAMPLES / "hh.jsonl", "--to", "dpo", "--tokenizer", alone / "tokenizer.json",
              "--chat-template", "hh", "-q", "--on-error", "skip"]
    result = run(*common, "--out", tmp_path / "o1")
    assert result.exit_code == 2
    assert result.output.count("error: ") == 1
    assert error_line(result).endswith("defines none; name it with --eos-token (e.g. --eos-token '<|endoftext|>')")
    eos = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())["eos_token"]
    result = run(*common, "--out", tmp_path / "o2", "--eos-token", eos)
    assert result.exit_code == 0, result.output
    result = run(*common, "--out", tmp_path / "o3", "--eos-token", "<no such token>")
    assert (result.exit_code, error_line(result)) == (
        2, f"error: --eos-token '<no such token>': not a token of the tokenizer '{alone / 'tokenizer.json'}'")


@pytest.mark.slow
@pytest.mark.shared_data
def test_gguf_without_template_names_the_file(shared_data, tmp_path):
    gguf = shared_data / "tokenizers" / "gguf-gpt-2" / "ggml-vocab-gpt-2.gguf"
    result = run("convert", chats(tmp_path), "--to", "sft", "--tokenizer", gguf, "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert error_line(result).startswith(f"error: the tokenizer '{gguf}' has no chat template; ")
    result = run("convert", chats(tmp_path), "--to", "sft", "--tokenizer", gguf.parent, "--out", tmp_path / "o")
    assert error_line(result).endswith("; it holds ggml-vocab-gpt-2.gguf: pass that file")


def test_usage_line_and_version():
    from aligndata import __version__

    assert " validate [OPTIONS] FILES...\n" in run("validate", "--help").output
    assert "{files}" not in run("convert", "--help").output
    result = run("--version")
    assert (result.exit_code, result.output) == (0, f"aligndata {__version__}\n")
