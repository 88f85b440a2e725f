"""Data rows: formats, validation errors naming file/line/field, encoding masks, packing, length policy."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data.batching import ResumableSampler, pack
from posttrain.data.encode import EncodeStats, Example, apply_length_policy, encode_row
from posttrain.data.rows import load_rows, validate_rows
from posttrain.errors import DataError


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize(
    "bad, field, words",
    [
        ("{not json", None, "not valid JSON"),
        ({"prompt": "a"}, None, "missing field"),
        ({"prompt": "a", "completion": 3}, "completion", "expected a string"),
        ({"text": "   "}, "text", "empty text"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant message"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "unknown role"),
    ],
)
def test_bad_row_names_file_line_and_field(tmp_path, bad, field, words):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, bad])
    with pytest.raises(DataError) as err:
        validate_rows(load_rows(path), "sft", source=str(path))
    assert err.value.line == 2 and err.value.field == field
    assert str(path) + ":2" in str(err.value) and words in str(err.value)


def test_skip_bad_rows_keeps_good_and_records_reasons(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, "{x", {"text": ""}])
    checked = validate_rows(load_rows(path), "sft", source=str(path), skip_bad_rows=True)
    assert len(checked.rows) == 1
    assert [s["line"] for s in checked.skipped] == [2, 3]


def test_zero_usable_rows_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{x"])
    with pytest.raises(DataError, match="no usable rows"):
        validate_rows(load_rows(path), "sft", source=str(path), skip_bad_rows=True)


def test_parquet_and_csv_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("prompt,completion\n1+1=,2\n2+2=,4\n")
    # Parquet rows are numbered from 1; CSV lines count the header line.
    assert load_rows(tmp_path / "d.parquet") == [r | {"__line__": i} for i, r in enumerate(rows, start=1)]
    assert load_rows(tmp_path / "d.csv") == [r | {"__line__": i} for i, r in enumerate(rows, start=2)]


def test_completion_only_mask_prompt_completion(tokenizer):
    ex = encode_row({"prompt": "ab", "completion": "cd"}, tokenizer)
    assert tokenizer.decode(ex.input_ids) == "abcd</s>"
    assert ex.loss_mask == [False, False, True, True, True]
    full = encode_row({"prompt": "ab", "completion": "cd"}, tokenizer, completion_only=False)
    assert all(full.loss_mask)


def test_messages_mask_covers_every_assistant_turn_only(tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "B"},
        ]
    }
    ex = encode_row(row, tokenizer)
    trained = "".join(tokenizer.decode([t]) for t, m in zip(ex.input_ids, ex.loss_mask) if m)
    # The assistant contents and their end-of-turn tokens are trained; user turns and role markers are not.
    assert trained == "A1</s>B</s>"


def test_conversational_prompt_completion_matches_messages(tokenizer):
    p = [{"role": "user", "content": "hi"}]
    c = [{"role": "assistant", "content": "yo"}]
    a = encode_row({"prompt": p, "completion": c}, tokenizer)
    b = encode_row({"messages": p + c}, tokenizer)
    assert a == b


def test_length_policy_truncate_and_drop():
    ex = Example(list(range(10)), [False] * 4 + [True] * 6)
    stats = EncodeStats()
    cut = apply_length_policy(ex, 6, "truncate", stats)
    assert cut.input_ids == list(range(6)) and stats.truncated == 1
    assert apply_length_policy(ex, 6, "drop", stats) is None and stats.dropped == 1
    # The prompt alone fills max_length: nothing left to train on, dropped even under "truncate".
    assert apply_length_policy(ex, 4, "truncate", stats) is None and stats.dropped == 2


def test_pack_targets_never_cross_sequences():
    b = pack([Example([1, 2, 3], [False, True, True]), Example([4, 5], [True, True])])
    assert b.targets.tolist() == [[2, 3, 0, 5, 0]]
    assert b.target_mask.tolist() == [[True, True, False, True, False]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1]]


def test_sampler_epochs_and_resume():
    s = ResumableSampler(4, seed=3)
    seen = s.take(4)
    assert sorted(seen) == [0, 1, 2, 3]
    s.take(2)
    state = s.state_dict()
    tail = s.take(5)
    s2 = ResumableSampler(4, seed=3)
    s2.load_state_dict(state)
    assert s2.take(5) == tail
    assert state == {"epoch": 1, "offset": 2, "size": 4}


def test_builtin_task_splits_are_fixed_and_disjoint():
    from posttrain.tasks import get_task

    task = get_task("arithmetic")
    test = task.rows("test")
    assert test == task.rows("test")
    train_q = {r["question"] for r in task.rows("train")}
    assert not train_q & {r["question"] for r in test}
    assert len(test) >= 200


def test_packed_batch_is_a_tensor_row():
    b = pack([Example([1, 2], [False, True])])
    assert b.input_ids.dtype == torch.long and b.num_tokens == 2 and b.num_target_tokens == 1
