"""Reading and validating data rows (JSONL, JSON, Parquet, CSV, ``datasets`` datasets, built-in tasks).

Row formats follow TRL's column names (DESIGN.md, "Data rows"). A bad row is a ``DataError`` naming the file,
the line and the field; ``skip_bad_rows=True`` instead drops it and records why.

    >>> rows = load_rows("task:arithmetic:test")
    >>> checked = validate_rows(rows, "sft", source="task:arithmetic:test")
    >>> len(checked.rows), checked.skipped
    (500, [])
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from posttrain.errors import ConfigError, DataError

Row = dict[str, Any]

# Which columns make a row of each kind; the first matching format wins.
FORMATS: dict[str, list[tuple[str, ...]]] = {
    "sft": [("messages",), ("prompt", "completion"), ("text",)],
    "text": [("text",)],
    "prompt": [("prompt",)],
    "preference": [("prompt", "chosen", "rejected")],
    "unpaired": [("prompt", "completion", "label")],
}


@dataclass
class CheckedRows:
    """Validated rows plus the bad rows that were skipped (with their reasons)."""

    rows: list[Row]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)


def load_rows(source: str | Path | Iterable[Row]) -> list[Row]:
    """Rows from a file path (``.jsonl``, ``.json``, ``.parquet`` or ``.csv``), ``task:NAME[:SPLIT]`` for a
    built-in task (default split ``train``), ``corpus[:SPLIT]`` for the pretraining corpus, or any iterable of
    dicts (a ``datasets.Dataset`` included).

    Every row read from a file carries its place in ``__line__``: the JSONL line; for a ``.json`` file holding
    one JSON array of objects (as TRL users write them), the line each item starts on; the CSV line counting the
    header as line 1 (the line a record starts on when a quoted field spans lines); the Parquet row numbered
    from 1. A line that cannot be read (not UTF-8, not JSON, not an object, a CSV value of the wrong type) is
    kept as a bad row that ``validate_rows`` reports or skips; a file that cannot be read at all is a
    ``DataError``. A UTF-8 byte-order mark is accepted."""
    if not isinstance(source, (str, Path)):
        return [dict(r) for r in source]
    path = resolve_source(str(source))
    text = str(source)
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    try:
        if path.is_dir():
            raise DataError(text, None, None, "is a directory; give a .jsonl, .json, .parquet or .csv file")
        if not path.is_file():
            raise DataError(text, None, None, "no such file")
        if suffix not in readers:
            raise DataError(text, None, None, f"unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .csv)")
        return readers[suffix](path, text)
    except OSError as err:
        raise DataError(text, None, None, f"cannot read the file ({err.strerror or err})") from None


def resolve_source(text: str) -> Path:
    """The file behind a data spec: ``task:NAME[:SPLIT]`` and ``corpus[:SPLIT]`` are generated into the cache."""
    from posttrain import cache

    try:
        if text.startswith("task:"):
            name, _, split = text[5:].partition(":")
            return cache.task_file(name, split or "train")
        if text == "corpus" or text.startswith("corpus:"):
            return cache.corpus_file(text.partition(":")[2] or "train")
    except (ConfigError, ValueError) as err:
        raise DataError(text, None, None, str(err)) from None
    return Path(text)


# Files are decoded with errors="surrogateescape": a byte that is not UTF-8 becomes one lone surrogate
# U+DC80..U+DCFF, found per line, so that one bad line is one bad row rather than an exception mid-file.
_ESCAPED_BYTE = re.compile(r"[\udc80-\udcff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _open_text(path: Path, name: str, *, newline: str | None = None) -> IO[str]:
    with path.open("rb") as f:
        if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            raise DataError(name, None, None, "is UTF-16 text; save it as UTF-8")
    return path.open(encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _utf8_problem(text: str, start: int = 0, end: int | None = None) -> tuple[int, str] | None:
    """(index, reason) of the first byte of ``text[start:end]`` that was not UTF-8 in the file; the column is
    counted in characters from the start of its line."""
    if text.isascii():
        return None
    bad = _ESCAPED_BYTE.search(text, start, len(text) if end is None else end)
    if bad is None:
        return None
    column = bad.start() - text.rfind("\n", 0, bad.start())
    return bad.start(), f"not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at column {column})"


def _parse_line(line: str, number: int) -> Row:
    """One JSONL line as a row, or as a bad row saying why not."""
    problem = _utf8_problem(line)
    if problem is not None:
        return _BadRow(number, problem[1])
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return _BadRow(number, f"not valid JSON ({err.msg} at column {err.colno})")
    except RecursionError:
        return _BadRow(number, "not valid JSON (nested too deeply)")
    except ValueError as err:  # a number past Python's int_max_str_digits
        return _BadRow(number, f"not valid JSON ({str(err).partition(':')[0]})")
    if not isinstance(row, dict):
        return _BadRow(number, f"expected a JSON object, got {type(row).__name__}")
    row["__line__"] = number
    return row


def _read_jsonl(path: Path, name: str) -> list[Row]:
    with _open_text(path, name) as f:
        return [_parse_line(line, number) for number, line in enumerate(f, start=1) if line.strip()]


def _read_json(path: Path, name: str) -> list[Row]:
    """A ``.json`` file: one JSON array of row objects, else JSON Lines (one JSON object over several lines is
    neither: said so, rather than line 1 being bad JSON)."""
    with _open_text(path, name) as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                break
        f.seek(0)
        if chunk.lstrip().startswith("["):
            return _json_array(f.read(), name)
        rows = [_parse_line(line, number) for number, line in enumerate(f, start=1) if line.strip()]
        if rows and "__error__" in rows[0] and chunk.lstrip().startswith("{"):
            f.seek(0)
            try:
                whole = json.loads(f.read())
            except (ValueError, RecursionError):
                whole = None
            if isinstance(whole, dict):
                raise DataError(name, None, None, "holds one JSON object; give one object per line or an array")
        return rows


def _json_array(text: str, name: str) -> list[Row]:
    """The items of a JSON array of objects, each numbered by the line it starts on. The array's syntax must
    hold (an item that breaks it leaves no way to find the next one); an item that is not an object, or holds
    bytes that are not UTF-8, is a bad row."""
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    line, counted = 1, 0

    def line_at(index: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, index)
        counted = index
        return line

    pos = _JSON_SPACE.match(text, text.index("[") + 1).end()
    closed = text.startswith("]", pos)
    while not closed:
        number = line_at(pos)
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(name, err.lineno, None, f"not valid JSON ({err.msg} at column {err.colno})") from None
        except RecursionError:
            raise DataError(name, number, None, "not valid JSON (nested too deeply)") from None
        except ValueError as err:
            raise DataError(name, number, None, f"not valid JSON ({str(err).partition(':')[0]})") from None
        problem = _utf8_problem(text, pos, end)
        if problem is not None:
            rows.append(_BadRow(line_at(problem[0]), problem[1]))
        elif not isinstance(item, dict):
            rows.append(_BadRow(number, f"expected a JSON object, got {type(item).__name__}"))
        else:
            item["__line__"] = number
            rows.append(item)
        pos = _JSON_SPACE.match(text, end).end()
        closed = text.startswith("]", pos)
        if not closed and not text.startswith(",", pos):
            raise DataError(name, line_at(pos), None, "not valid JSON (expected ',' or ']' after an array item)")
        pos = _JSON_SPACE.match(text, pos + 1).end()
    if pos < len(text):
        raise DataError(name, line_at(pos), None, "not valid JSON (more text after the array)")
    return rows


def _read_parquet(path: Path, name: str) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(name, None, None, f"not a readable Parquet file ({' '.join(str(err).split())})") from None
    for number, row in enumerate(rows, start=1):
        row["__line__"] = number
    return rows


def _read_csv(path: Path, name: str) -> list[Row]:
    """CSV rows, every value a string but ``label`` (true/false/1/0, as a bool) and ``margin`` (a number; an
    empty cell is no margin, as in a JSON row without one)."""
    import csv

    problems: list[tuple[int, str]] = []  # bytes that are not UTF-8, in the lines of the record being read

    def checked_lines(lines: Iterable[str]) -> Iterator[str]:
        for number, line in enumerate(lines, start=1):
            problem = _utf8_problem(line)
            if problem is not None:
                problems.append((number, problem[1]))
            yield line

    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long texts are cut before tokenising, not refused here
    try:
        with _open_text(path, name, newline="") as f:
            reader = csv.reader(checked_lines(f))
            header: list[str] | None = None
            rows: list[Row] = []
            while True:
                start = reader.line_num + 1
                problems.clear()
                try:
                    record = next(reader, None)
                except csv.Error as err:
                    raise DataError(name, reader.line_num, None, f"not valid CSV ({err})") from None
                if record is None:
                    return rows
                if header is None:
                    if problems:
                        raise DataError(name, problems[0][0], None, "header: " + problems[0][1])
                    header = record
                    twice = next((k for k in header if header.count(k) > 1), None)
                    if twice is not None:
                        raise DataError(name, 1, None, f"column {twice!r} appears twice in the header")
                    continue
                if not record:
                    continue
                if problems:
                    key = next((k for k, v in zip(header, record) if _utf8_problem(v)), None)
                    rows.append(_BadRow(problems[0][0], problems[0][1], key))
                elif len(record) != len(header):
                    n = len(record)
                    rows.append(_BadRow(start, f"has {n} value{'s' * (n != 1)}, the header has {len(header)} columns"))
                else:
                    rows.append(_csv_row(dict(zip(header, record)), start))
    finally:
        csv.field_size_limit(limit)


_CSV_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _csv_row(row: Row, line: int) -> Row:
    """A CSV record with ``label`` and ``margin`` converted from text, or a bad row naming the value."""
    if "label" in row:
        label = _CSV_BOOLS.get(row["label"].strip().lower())
        if label is None:
            return _BadRow(line, f"expected true or false (or 1 or 0), got {row['label']!r}", "label")
        row["label"] = label
    if "margin" in row:
        if not row["margin"].strip():
            del row["margin"]
        else:
            try:
                row["margin"] = float(row["margin"])
            except ValueError:
                return _BadRow(line, f"expected a number, got {row['margin']!r}", "margin")
    row["__line__"] = line
    return row


class _BadRow(dict):
    """A line that could not be read as a row; kept so that validation can report or skip it in order."""

    def __init__(self, line: int, reason: str, field: str | None = None):
        super().__init__(__line__=line, __error__=reason, __field__=field)


def _check_text(value: str) -> str | None:
    """A JSON escape such as "\\ud800" gives a lone surrogate, which no tokenizer accepts."""
    lone = None if value.isascii() else _SURROGATE.search(value)
    return None if lone is None else f"not valid Unicode (lone surrogate U+{ord(lone.group()):04X})"


def _check_string(row: Row, key: str) -> str | None:
    value = row[key]
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not value.strip():
        return "empty text"
    return _check_text(value)


def _check_messages(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "expected a non-empty list of {role, content} messages"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i}: expected {{'role': str, 'content': str}}"
        if m["role"] not in ("system", "user", "assistant", "tool"):
            return f"message {i}: unknown role {m['role']!r}"
        reason = _check_text(m["content"])
        if reason:
            return f"message {i}: {reason}"
    return None


def _said(value: str | list[dict]) -> list[tuple[str, str]]:
    """What a completion says, for comparing two: a text is one assistant message; whitespace at the ends of a
    message's content does not count."""
    messages = [{"role": "assistant", "content": value}] if isinstance(value, str) else value
    return [(m["role"], m["content"].strip()) for m in messages]


def row_error(row: Row, kind: str) -> tuple[str | None, str] | None:
    """(field, reason) if ``row`` is not a valid row of ``kind`` ("sft", "text", "prompt", "preference" or
    "unpaired"), else None. A preference pair whose chosen and rejected completions say the same is not valid:
    it teaches nothing."""
    if "__error__" in row:
        return row.get("__field__"), row["__error__"]
    formats = FORMATS[kind]
    fmt = next((f for f in formats if all(k in row for k in f)), None)
    if fmt is None:
        wanted = " or ".join("{" + ", ".join(f) + "}" for f in formats)
        missing = next(k for k in formats[0] if k not in row) if len(formats) == 1 else None
        return missing, f"missing field; a {kind} row needs {wanted}"
    for key in fmt:
        value = row[key]
        if value is None:
            reason = "missing value (null)"
        elif key == "label":
            reason = None if isinstance(value, bool) else f"expected true or false, got {value!r}"
        elif key == "messages" or (key in ("prompt", "completion", "chosen", "rejected") and isinstance(value, list)):
            reason = _check_messages(value)
            if not reason and key not in ("messages", "prompt") and isinstance(row.get("prompt"), str):
                reason = "a list of messages needs the prompt as a list of messages too"
        else:
            reason = _check_string(row, key)
        if reason:
            return key, reason
    if kind == "sft" and fmt == ("messages",) and not any(m["role"] == "assistant" for m in row["messages"]):
        return "messages", "no assistant message to train on"
    if kind == "preference" and _said(row["chosen"]) == _said(row["rejected"]):
        return "rejected", "identical to chosen: the pair teaches nothing"
    return None


def validate_rows(rows: list[Row], kind: str, *, source: str, skip_bad_rows: bool = False) -> CheckedRows:
    """Check every row; raise ``DataError`` at the first bad one, or skip and record bad rows.

    Zero usable rows is always an error, whatever ``skip_bad_rows`` says.
    """
    out = CheckedRows(rows=[])
    for index, row in enumerate(rows):
        line = row.get("__line__", index + 1)
        problem = row_error(row, kind)
        if problem is not None:
            key, reason = problem
            if not skip_bad_rows:
                raise DataError(source, line, key, reason)
            out.skipped.append({"line": line, "field": key, "reason": reason})
            continue
        clean = {k: v for k, v in row.items() if k != "__line__"}
        out.rows.append(clean)
        out.lines.append(line)
    if not rows:
        raise DataError(source, None, None, "no usable rows (the data is empty)")
    if not out.rows:
        raise DataError(source, None, None, f"no usable rows ({len(out.skipped)} bad, {len(rows)} in all)")
    return out
