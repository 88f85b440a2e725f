"""From a data spec to tokenised training examples, with the bad-row and max-length policies applied."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.encode import EncodeStats, Example, apply_length_policy, encode_row
from posttrain.data.rows import load_rows, validate_rows
from posttrain.errors import DataError


@dataclass
class PreparedData:
    examples: list[Example]
    rows: int
    skipped_rows: int
    truncated: int
    dropped: int

    def summary(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "examples": len(self.examples),
            "skipped_bad_rows": self.skipped_rows,
            "truncated": self.truncated,
            "dropped_too_long": self.dropped,
        }


def checked_rows(
    source: Any, kind: str, *, skip_bad_rows: bool, run_dir: Path | None = None, label: str = "data"
) -> Any:
    """Load and validate rows of ``kind``. Bad rows raise ``DataError`` (file, line, field) unless
    ``skip_bad_rows``; skipped rows' count and reasons go to ``run_dir/bad_rows[_LABEL].json`` (pass ``run_dir``
    on one process only: under torchrun, rank 0)."""
    name = source if isinstance(source, str) else "<rows>"
    checked = validate_rows(load_rows(source), kind, source=name, skip_bad_rows=skip_bad_rows)
    if checked.skipped and run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / f"bad_rows{'' if label == 'data' else '_' + label}.json").write_text(
            json.dumps({"source": name, "count": len(checked.skipped), "rows": checked.skipped}, indent=1)
        )
    return checked


def prepare_examples(
    source: Any,
    tokenizer: Any,
    *,
    kind: str,
    max_length: int,
    length_policy: str,
    completion_only: bool,
    skip_bad_rows: bool = False,
    run_dir: Path | None = None,
    label: str = "data",
) -> PreparedData:
    """Load, validate, tokenise and length-check rows. Bad rows raise ``DataError`` (file, line, field) unless
    ``skip_bad_rows``, in which case their count and reasons go to ``run_dir/bad_rows.json``. Text past what
    ``max_length`` tokens can hold is cut before tokenising (``encode.cap_row``), so memory and time stay
    bounded by ``max_length`` whatever the length of a row."""
    name = source if isinstance(source, str) else "<rows>"
    checked = checked_rows(source, kind, skip_bad_rows=skip_bad_rows, run_dir=run_dir, label=label)
    stats = EncodeStats()
    examples = []
    for row, line in zip(checked.rows, checked.lines):
        try:
            example = encode_row(row, tokenizer, completion_only=completion_only, max_length=max_length)
        except DataError as err:
            raise DataError(name, line, err.field, err.reason) from None
        kept = apply_length_policy(example, max_length, length_policy, stats)
        if kept is not None:
            examples.append(kept)
    if not examples:
        raise DataError(
            name,
            None,
            None,
            f"no usable rows: {stats.dropped} of {len(checked.rows)} dropped by length_policy={length_policy!r}"
            f" at max_length={max_length} ({', '.join(sorted(set(stats.reasons)))})",
        )
    return PreparedData(examples, len(checked.rows), len(checked.skipped), stats.truncated, stats.dropped)


def mix_replay(examples: list[Example], replay: list[Example], fraction: float, *, seed: int) -> list[Example]:
    """Add replay examples so that they make up ``fraction`` of the result (drawn without replacement while they
    last, then again), against catastrophic forgetting of an earlier stage.

    >>> a, b = [Example([1, 2], [False, True])] * 6, [Example([3, 4], [True, True])] * 5
    >>> mixed = mix_replay(a, b, 0.25, seed=0)
    >>> len(mixed), sum(e.input_ids[0] == 3 for e in mixed)
    (8, 2)
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"replay_fraction must be in [0, 1), got {fraction}")
    count = round(len(examples) * fraction / (1.0 - fraction))
    if count == 0 or not replay:
        return list(examples)
    rng = random.Random(seed)
    drawn: list[Example] = []
    while len(drawn) < count:
        drawn += rng.sample(replay, min(len(replay), count - len(drawn)))
    return list(examples) + drawn
