"""Reading and validating data rows (JSONL, Parquet, CSV, ``datasets`` datasets, built-in tasks).

Row formats follow TRL's column names (DESIGN.md, "Data rows"). A bad row is a ``DataError`` naming the file,
the line and the field; ``skip_bad_rows=True`` instead drops it and records why.

    >>> rows = load_rows("task:arithmetic:test")
    >>> checked = validate_rows(rows, "sft", source="task:arithmetic:test")
    >>> len(checked.rows), checked.skipped
    (500, [])
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """Rows from a file path (``.jsonl``/``.json``/``.parquet``/``.csv``), ``task:NAME[:SPLIT]`` for a built-in
    task (default split ``train``), ``corpus[:SPLIT]`` for the pretraining corpus, or any iterable of dicts (a
    ``datasets.Dataset`` included). A JSONL line that is not JSON is a ``DataError`` naming the line."""
    if not isinstance(source, (str, Path)):
        return [dict(r) for r in source]
    path = resolve_source(str(source))
    text = str(source)
    if not path.is_file():
        raise DataError(text, None, None, "no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise DataError(text, None, None, f"unsupported file type {suffix!r} (use .jsonl, .parquet or .csv)")


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


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                rows.append(_BadRow(number, f"not valid JSON ({err.msg} at column {err.colno})"))
                continue
            if not isinstance(row, dict):
                rows.append(_BadRow(number, f"expected a JSON object, got {type(row).__name__}"))
                continue
            row["__line__"] = number
            rows.append(row)
    return rows


class _BadRow(dict):
    """A line that could not be parsed; kept so that validation can report or skip it in order."""

    def __init__(self, line: int, reason: str):
        super().__init__(__line__=line, __error__=reason)


def _check_string(row: Row, key: str) -> str | None:
    value = row[key]
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not value.strip():
        return "empty text"
    return None


def _check_messages(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "expected a non-empty list of {role, content} messages"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i}: expected {{'role': str, 'content': str}}"
        if m["role"] not in ("system", "user", "assistant", "tool"):
            return f"message {i}: unknown role {m['role']!r}"
    return None


def row_error(row: Row, kind: str) -> tuple[str | None, str] | None:
    """(field, reason) if ``row`` is not a valid row of ``kind`` ("sft", "text", "prompt", "preference" or
    "unpaired"), else None."""
    if "__error__" in row:
        return None, row["__error__"]
    formats = FORMATS[kind]
    fmt = next((f for f in formats if all(k in row for k in f)), None)
    if fmt is None:
        wanted = " or ".join("{" + ", ".join(f) + "}" for f in formats)
        missing = next(k for k in formats[0] if k not in row) if len(formats) == 1 else None
        return missing, f"missing field; a {kind} row needs {wanted}"
    for key in fmt:
        value = row[key]
        if key == "label":
            reason = None if isinstance(value, bool) else f"expected true or false, got {value!r}"
        elif key == "messages" or (key in ("prompt", "completion", "chosen", "rejected") and isinstance(value, list)):
            reason = _check_messages(value)
        else:
            reason = _check_string(row, key)
        if reason:
            return key, reason
    if kind == "sft" and fmt == ("messages",) and not any(m["role"] == "assistant" for m in row["messages"]):
        return "messages", "no assistant message to train on"
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
    if not out.rows:
        raise DataError(source, None, None, f"no usable rows ({len(out.skipped)} bad, {len(rows)} in all)")
    return out
