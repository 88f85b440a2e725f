"""Hostile data files: every one is a ``DataError`` naming FILE:LINE (and the field), or a counted skip under
``skip_bad_rows``; never a raw exception, and never a run that silently trains nothing (issue 10)."""

from __future__ import annotations

import json
import os
import resource
import time

import pytest

from posttrain.data.batching import ResumableSampler
from posttrain.data.encode import MAX_CHARS_PER_TOKEN, EncodeStats, apply_length_policy, encode_row
from posttrain.data.prepare import checked_rows, prepare_examples
from posttrain.data.rows import load_rows, validate_rows
from posttrain.errors import DataError, TrainingError

GOOD = b'{"prompt": "a", "completion": "b"}\n'


def error_of(path, kind="sft", **kw) -> DataError:
    with pytest.raises(DataError) as err:
        validate_rows(load_rows(path), kind, source=str(path), **kw)
    return err.value


# 1. Bytes that are not UTF-8.


def test_non_utf8_jsonl_line_is_a_bad_row_naming_byte_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    # "é" is one character: the column counts characters, like the JSON errors' columns.
    path.write_bytes(GOOD + b'{"prompt": "\xc3\xa9", "completion": "\xff"}\n' + GOOD)
    assert str(error_of(path)) == f"{path}:2: not valid UTF-8 (byte 0xff at column 32)"
    checked = validate_rows(load_rows(path), "sft", source=str(path), skip_bad_rows=True)
    assert checked.lines == [1, 3] and checked.skipped[0]["line"] == 2


def test_non_utf8_csv_names_the_line_and_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,completion\na,b\nc,d\xfee\n")
    assert str(error_of(path)) == f"{path}:3: field 'completion': not valid UTF-8 (byte 0xfe at column 4)"


def test_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.decode().encode("utf-16"))
    assert str(error_of(path)) == f"{path}: is UTF-16 text; save it as UTF-8"


def test_corrupt_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet at all\n")
    err = error_of(path)
    assert err.line is None and str(err).startswith(f"{path}: not a readable Parquet file (")
    assert "\n" not in str(err)


# 2. JSON nested past the recursion limit.


@pytest.mark.parametrize("line", ["[" * 100_000 + "]" * 100_000, '{"prompt": ' + "[" * 100_000])
def test_deeply_nested_json_is_a_bad_row(tmp_path, line):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD + line.encode() + b"\n")
    assert str(error_of(path)) == f"{path}:2: not valid JSON (nested too deeply)"
    assert len(validate_rows(load_rows(path), "sft", source=str(path), skip_bad_rows=True).rows) == 1


def test_number_past_the_int_digit_limit_is_a_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD + b'{"prompt": "a", "completion": "b", "n": ' + b"1" * 5000 + b"}\n")
    err = error_of(path)
    assert err.line == 2 and str(err).startswith(f"{path}:2: not valid JSON (Exceeds the limit")


def test_lone_surrogate_escape_is_a_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD + b'{"prompt": "a\\ud800", "completion": "b"}\n')
    assert str(error_of(path)) == f"{path}:2: field 'prompt': not valid Unicode (lone surrogate U+D800)"


# 3. Wrong-typed Parquet and CSV columns; their line numbers.


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([1, 2], "1: field 'prompt': expected a string, got int"),
        ([[1], [2]], "1: field 'prompt': message 0: expected {'role': str, 'content': str}"),
        (["a", None], "2: field 'prompt': missing value (null)"),
    ],
)
def test_parquet_wrong_types_and_nulls_name_the_row(tmp_path, prompts, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": prompts, "completion": ["x", "y"]}), path)
    rows = load_rows(path)
    assert [r["__line__"] for r in rows] == [1, 2]  # Parquet rows are numbered from 1
    assert str(error_of(path)) == f"{path}:{message}"


def test_csv_label_and_margin_are_converted(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,label,margin\na,b,TRUE,1.5\nc,d,false,\ne,f, 1 ,-2\ng,h,0,0\n")
    rows = validate_rows(load_rows(path), "unpaired", source=str(path)).rows
    assert [r["label"] for r in rows] == [True, False, True, False]
    assert [r.get("margin") for r in rows] == [1.5, None, -2.0, 0.0]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "prompt,completion,label\na,b,true\nc,d,maybe\n",
            "3: field 'label': expected true or false (or 1 or 0), got 'maybe'",
        ),
        ("prompt,completion,label,margin\na,b,1,x\n", "2: field 'margin': expected a number, got 'x'"),
        ("prompt,completion,label\na,b,1\nc,d\n", "3: has 2 values, the header has 3 columns"),
        ('prompt,completion,label\n"a,b,1\n', "2: has 1 value, the header has 3 columns"),  # an unclosed quote
        # A quoted field over two lines: the next record starts on line 4 (the header is line 1).
        ('prompt,completion,label\n"a\nb",c,1\nd,,0\n', "4: field 'completion': empty text"),
    ],
)
def test_csv_bad_values_name_line_and_field(tmp_path, text, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    assert str(error_of(path, "unpaired")) == f"{path}:{message}"


def test_csv_field_longer_than_the_csv_module_limit(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na," + "b" * 200_000 + "\n")
    assert len(load_rows(path)[0]["completion"]) == 200_000


# 4. A row far longer than any model could use.


def test_long_line_is_cut_before_tokenising(tmp_path, tokenizer):
    """A 20 MB completion costs what a row of max_length costs: measured before the cut, tokenising took about
    265 bytes and 2.5 us per character (20 MB: about 5 GB and 50 s)."""
    completion = "word " * 4_000_000
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": completion}) + "\n")
    common = dict(kind="sft", max_length=64, length_policy="truncate", completion_only=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    long = prepare_examples(str(path), tokenizer, **common)
    seconds = time.perf_counter() - started
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert seconds < 5 and grown_mb < 1024, (seconds, grown_mb)
    budget = 64 * MAX_CHARS_PER_TOKEN - 1  # the prompt "q" took one character of it
    short = prepare_examples([{"prompt": "q", "completion": completion[:budget]}], tokenizer, **common)
    assert long.examples == short.examples and len(long.examples[0].input_ids) == 64
    assert long.truncated == short.truncated == 1


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "q", "completion": "word " * 2000},
        {"prompt": "word " * 2000, "completion": "a"},
        {"messages": [{"role": "user", "content": "hi " * 900}, {"role": "assistant", "content": "yo " * 900}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 50},
    ],
)
def test_the_cut_keeps_what_truncation_keeps(tokenizer, row):
    max_length = 16
    full = encode_row(row, tokenizer)
    cut = encode_row(row, tokenizer, max_length=max_length)
    assert cut.capped and len(cut.input_ids) < len(full.input_ids)
    truncated = [apply_length_policy(ex, max_length, "truncate", EncodeStats()) for ex in (full, cut)]
    assert truncated[0] == truncated[1]


def test_a_cut_row_is_still_too_long_under_drop(tokenizer, monkeypatch):
    # Were a text's tokens to average more characters than the budget allows, the cut row could fit in
    # max_length (made so here: 13-character tokens, a budget of 1 character per token): the flag decides.
    from posttrain.data import encode

    monkeypatch.setattr(encode, "MAX_CHARS_PER_TOKEN", 1)
    ex = encode_row({"prompt": "q", "completion": "<|assistant|>" * 200}, tokenizer, max_length=100)
    assert ex.capped and len(ex.input_ids) < 100
    stats = EncodeStats()
    assert apply_length_policy(ex, 100, "drop", stats) is None and stats.dropped == 1


def test_row_with_prompt_and_text_is_a_text_row(tmp_path, tokenizer):
    # Validation reads {prompt, text} as a text row (no completion), and so must encoding (and the cut).
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 1000, "text": "ab"}) + "\n")
    data = prepare_examples(str(path), tokenizer, kind="sft", max_length=8, length_policy="drop", completion_only=True)
    assert tokenizer.decode(data.examples[0].input_ids) == "ab</s>" and data.dropped == 0


# 5. A preference pair that teaches nothing.


@pytest.mark.parametrize(
    "chosen, rejected",
    [
        ("The answer is 4.", "  The answer is 4.\n"),
        ([{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": " 4 "}]),
    ],
)
def test_identical_chosen_and_rejected_is_a_bad_row(tmp_path, chosen, rejected):
    path = tmp_path / "d.jsonl"
    prompt = "2+2=" if isinstance(chosen, str) else [{"role": "user", "content": "2+2="}]
    good = {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": "no" if isinstance(chosen, str) else [rejected[0] | {"content": "5"}],
    }
    path.write_text(
        "\n".join(json.dumps(r) for r in (good, {"prompt": prompt, "chosen": chosen, "rejected": rejected}))
    )
    expected = f"{path}:2: field 'rejected': identical to chosen: the pair teaches nothing"
    assert str(error_of(path, "preference")) == expected
    checked = checked_rows(str(path), "preference", skip_bad_rows=True, run_dir=tmp_path / "run")
    assert len(checked.rows) == 1
    bad = json.loads((tmp_path / "run" / "bad_rows.json").read_text())
    reason = "identical to chosen: the pair teaches nothing"
    assert bad["count"] == 1 and bad["rows"] == [{"line": 2, "field": "rejected", "reason": reason}]


def test_message_completion_needs_a_message_prompt(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "completion": [{"role": "assistant", "content": "yo"}]}) + "\n")
    assert str(error_of(path)) == (
        f"{path}:1: field 'completion': a list of messages needs the prompt as a list of messages too"
    )


def test_chat_template_that_refuses_a_conversation_names_the_line(tmp_path):
    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('starts with assistant') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    path = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    rows.append({"messages": [{"role": "assistant", "content": "b"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as err:
        prepare_examples(str(path), tok, kind="sft", max_length=64, length_policy="truncate", completion_only=True)
    assert str(err.value) == f"{path}:2: the chat template refused the conversation (starts with assistant)"


# 6. Files that are not data files, and data files in the shapes people write.


def test_directory_as_data(tmp_path):
    assert str(error_of(tmp_path)) == f"{tmp_path}: is a directory; give a .jsonl, .json, .parquet or .csv file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD)
    path.chmod(0)
    assert str(error_of(path)) == f"{path}: cannot read the file (Permission denied)"


def test_unreadable_file_even_as_root(tmp_path, monkeypatch):
    from pathlib import Path

    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    assert str(error_of(path)) == f"{path}: cannot read the file (Permission denied)"


@pytest.mark.parametrize(
    "name, content", [("d.jsonl", b""), ("d.jsonl", b"\n\n  \n"), ("d.csv", b"prompt,completion\n")]
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert str(error_of(path, skip_bad_rows=True)) == f"{path}: no usable rows (the data is empty)"


def test_json_array_numbers_items_by_their_first_line(tmp_path):
    path = tmp_path / "d.json"
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"prompt": "e", "completion": 3}]
    path.write_text(json.dumps(rows, indent=2))  # each item takes 4 lines after the "[" line
    loaded = load_rows(path)
    assert [r["__line__"] for r in loaded] == [2, 6, 10]
    assert str(error_of(path)) == f"{path}:10: field 'completion': expected a string, got int"


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"prompt": "a", "completion": "b"},\n {"prompt": }]', "2: not valid JSON (Expecting value at column 13)"),
        (
            '[{"prompt": "a", "completion": "b"}\n {"prompt": "c"}]',
            "2: not valid JSON (expected ',' or ']' after an array item)",
        ),
        ('[{"prompt": "a", "completion": "b"}]\n[]', "2: not valid JSON (more text after the array)"),
        ('[{"prompt": "a", "completion": "b"},\n 7]', "2: expected a JSON object, got int"),
    ],
)
def test_broken_json_array(tmp_path, text, message):
    path = tmp_path / "d.json"
    path.write_text(text)
    assert str(error_of(path)) == f"{path}:{message}"


def test_json_file_holding_one_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"prompt": "a", "completion": "b"}]}, indent=1))
    assert str(error_of(path)) == f"{path}: holds one JSON object; give one object per line or an array"


def test_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + GOOD)
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbfprompt,completion\na,b\n")
    (tmp_path / "d.json").write_bytes(b"\xef\xbb\xbf[" + GOOD.strip() + b"]")
    for name in ("d.jsonl", "d.csv", "d.json"):
        assert validate_rows(load_rows(tmp_path / name), "sft", source=name).rows == [
            {"prompt": "a", "completion": "b"}
        ]


# Resuming over other data.


def test_resume_over_data_of_another_size_is_refused():
    state = ResumableSampler(500, seed=0).state_dict()
    with pytest.raises(TrainingError) as err:
        ResumableSampler(300, seed=0).load_state_dict(state)
    assert str(err.value) == (
        "resume: the checkpoint's sampler was over 500 rows, the data now has 300; resume with the same data"
    )
    # A checkpoint from before the size was saved: its offset still has to fit.
    with pytest.raises(TrainingError, match="at row 400 of an epoch, the data now has 300"):
        ResumableSampler(300, seed=0).load_state_dict({"epoch": 0, "offset": 400})


# The command line: one line, exit status 2, no traceback.


@pytest.mark.parametrize(
    "content, message",
    [
        (GOOD + b'{"prompt": "a", "completion": "\xff"}\n', "2: not valid UTF-8 (byte 0xff at column 32)"),
        (GOOD + b"[" * 100_000 + b"\n", "2: not valid JSON (nested too deeply)"),
    ],
)
def test_cli_prints_one_line_for_a_hostile_file(tmp_path, capsys, content, message):
    from posttrain.cli import main

    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    argv = [
        "sft",
        "--model",
        "builtin:tiny-base",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--max-steps",
        "1",
    ]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"posttrain sft: error: {data}:{message}"]
