"""Nothing lost, nothing silently replaced: run directories, resume fingerprints, locks, caches, corrupt
checkpoints, whole-recipe validation and user errors as one line (issue 10)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from posttrain.cli import main
from posttrain.errors import ConfigError

FAST = ["--max-steps", "1", "--batch-size", "2", "--no-progress", "--model", "builtin:tiny-base"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def sft_data(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    return path


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def sft(capsys, out, data, *extra):
    return run_cli(capsys, "sft", "--data", data, "--out", out, *FAST, *extra)


def test_an_out_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, sft_data, capsys):
    out = tmp_path / "run"
    assert sft(capsys, out, sft_data)[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, _, err = sft(capsys, out, sft_data)
    assert code == 2
    line = one_error_line(err)
    assert "sft.out:" in line and "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (out / "metrics.jsonl").read_text() == before  # untouched

    (out / "notes.txt").write_text("mine")  # a file of the user's next to the run survives an overwrite
    code, _, err = sft(capsys, out, sft_data, "--overwrite", "--lr", "0.002")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert "lr: 0.002" in (out / "config.yaml").read_text()


def test_user_files_in_final_are_never_deleted(tmp_path, sft_data, capsys):
    out = tmp_path / "run"
    assert sft(capsys, out, sft_data)[0] == 0
    (out / "final" / "my_eval.txt").write_text("precious")
    for flag in ("--overwrite", "--resume"):
        code, _, err = sft(capsys, out, sft_data, flag)
        assert code == 2, flag
        assert "my_eval.txt" in one_error_line(err) and "did not write" in err
    assert (out / "final" / "my_eval.txt").read_text() == "precious"
    assert (out / "final" / "config.json").is_file()


def test_overwrite_refuses_a_directory_posttrain_did_not_mark(tmp_path, sft_data, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "config.yaml").write_text("someone else's")
    code, _, err = sft(capsys, out, sft_data, "--overwrite")
    assert code == 2 and "did not mark as its own run" in one_error_line(err)
    assert (out / "config.yaml").read_text() == "someone else's"


def test_merge_never_deletes_an_existing_directory(tmp_path, capsys):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    adapter = tmp_path / "lora"
    assert run_cli(capsys, "sft", "--out", adapter, "--lora-rank", "2", *FAST)[0] == 0
    args = ["merge", "--model", "builtin:tiny-base", "--lora", adapter / "final", "--out", target]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "exists and is not empty" in one_error_line(err)
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 2 and "keep.txt" in one_error_line(err)
    assert (target / "keep.txt").read_text() == "mine"
    (target / "keep.txt").unlink()
    assert run_cli(capsys, *args)[0] == 0  # an empty directory is fine
    assert run_cli(capsys, *args, "--overwrite")[0] == 0  # and posttrain may replace what it wrote
    assert (target / "config.json").is_file()


def test_resume_refuses_a_different_config_or_data_and_names_it(tmp_path, sft_data, capsys):
    out = tmp_path / "run"
    original = sft_data.read_text()
    assert sft(capsys, out, sft_data, "--lr", "0.001")[0] == 0
    code, _, err = sft(capsys, out, sft_data, "--resume", "--lr", "0.002")
    line = one_error_line(err)
    assert code == 2 and "sft.resume:" in line and "lr 0.001 -> 0.002" in line
    other = tmp_path / "other.jsonl"
    other.write_text(sft_data.read_text().replace('"3"', '"4"'))
    code, _, err = sft(capsys, out, other, "--resume", "--lr", "0.001")
    line = one_error_line(err)
    assert code == 2 and "the training data" in line and "data '" in line  # the path and the content both changed
    # Same settings, content changed in place: only the content hash can tell.
    sft_data.write_text(other.read_text())
    code, _, err = sft(capsys, out, sft_data, "--resume", "--lr", "0.001")
    assert code == 2 and "the training data" in one_error_line(err) and "lr " not in err
    # What may change on resume: a longer run.
    sft_data.write_text(original)
    code, _, err = sft(capsys, out, sft_data, "--resume", "--lr", "0.001", "--max-steps", "2")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 1


def test_a_second_run_on_a_locked_out_is_refused(tmp_path, sft_data, capsys):
    from posttrain.rundir import claim

    out = tmp_path / "run"
    held = claim(out, key="other")  # another run holds the directory
    try:
        code, _, err = sft(capsys, out, sft_data)
        line = one_error_line(err)
        assert code == 2 and "in use by another posttrain run" in line and "pid " in line
        assert not (out / "config.yaml").exists()
    finally:
        held.release()
    assert sft(capsys, out, sft_data)[0] == 0  # the lock goes with its holder


def test_dpo_reference_cache_is_keyed_on_model_and_data(tmp_path, capsys):
    from posttrain.train.dpo import load_reference

    out = tmp_path / "dpo"
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["dpo", "--out", out, "--data", data, "--eval-data", data, "--max-steps", "1", "--batch-size", "2"]
    args += ["--no-progress"]
    assert run_cli(capsys, *args)[0] == 0
    path = out / "reference_logps.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert len(f.metadata()["key"]) == 20
    real = load_reference(out)["train"]
    assert not list(out.glob(".reference_logps*"))  # no temp file left behind
    # A cache from another model or data (another key) is recomputed, never used.
    from safetensors.torch import save_file

    saved = load_reference(out)
    save_file({k: torch.full_like(v, 123.0) for k, v in saved.items()}, str(path), metadata={"key": "another-model"})
    assert run_cli(capsys, *args, "--resume", "--max-steps", "2")[0] == 0
    again = load_reference(out)["train"]
    seen = ~torch.isnan(real[:, 0])
    assert torch.equal(again[seen], real[seen]) and not (again == 123.0).any()
    # The same key is reused as it is (so a resume computes nothing twice).
    with safe_open(str(path), framework="pt") as f:
        key = f.metadata()["key"]
    save_file({k: torch.full_like(v, -7.0) for k, v in saved.items()}, str(path), metadata={"key": key})
    assert run_cli(capsys, *args, "--resume", "--max-steps", "3")[0] == 0
    assert all((v == -7.0).all() for v in load_reference(out).values())


def test_corrupt_checkpoint_is_one_clear_error(tmp_path, sft_data, capsys):
    out = tmp_path / "run"
    assert sft(capsys, out, sft_data)[0] == 0
    weights = out / "checkpoints" / "step_1" / "trainable.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(b"\xff" * size)  # same size: the manifest cannot tell, the header is garbage
    code, _, err = sft(capsys, out, sft_data, "--resume", "--max-steps", "2")
    line = one_error_line(err)
    assert code == 2 and "trainable.safetensors: corrupt checkpoint" in line and "delete" in line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "nan"], "sft.lr: expected a finite number, got nan"),
        (["--batch-size", "0"], "sft.batch_size: 0 rows cannot be split"),
        (["--log-every", "0"], "sft.log_every: must be at least 1"),
        (["--threads", "-1"], "sft.threads: must be >= 0, got -1"),
        (["--max-steps", "0"], "sft.max_steps: must be at least 1, got 0"),
        (["--max-length", "-5"], "sft.max_length: must be at least 1"),
        (["--device", "cuda"], "device: 'cuda' asked for, but torch sees no CUDA device"),
        (["--out", "/proc/version/run"], "sft.out: cannot create /proc/version/run: /proc/version is a file"),
    ],
)
def test_bad_numbers_and_paths_are_one_line(tmp_path, sft_data, capsys, flags, message):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run_cli(capsys, "sft", "--data", sft_data, "--out", tmp_path / "o", *FAST, *flags)
    assert code == 2 and message in one_error_line(err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--task", "arithmetic", "--n", "0"], "eval.n: must be at least 1, got 0"),
        (["eval", "--task", "arithmetic", "--max-new-tokens", "0"], "eval.max_new_tokens: must be at least 1"),
        (["eval", "--task", "arithmetic", "--temperature", "inf"], "eval.temperature: expected a finite number"),
        (["generate", "--model", "builtin:tiny-base", "--prompt", "1+1", "--n", "0"], "generate --n: must be at"),
        (["grpo", "--group-size", "1", "--out", "x"], "grpo.group_size: must be at least 2, got 1"),
    ],
)
def test_bad_eval_and_generate_numbers_are_one_line(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in one_error_line(err)


def test_eval_out_is_checked_before_the_work(tmp_path, capsys, monkeypatch):
    import posttrain.eval.harness as harness

    monkeypatch.setattr(harness, "load_model", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "eval", "--task", "arithmetic", "--out", blocker / "r.json")
    assert code == 2 and "eval.out: cannot create" in one_error_line(err)
    existing = tmp_path / "r.json"
    existing.write_text("{}")
    code, _, err = run_cli(capsys, "eval", "--task", "arithmetic", "--out", existing)
    assert code == 2 and "exists; pass --overwrite" in one_error_line(err)
    assert existing.read_text() == "{}"


def write_recipe(tmp_path: Path, stages: list[dict]) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "stages": stages}))
    return path


@pytest.mark.parametrize(
    "second, message",
    [
        ({"name": "../escape", "type": "sft"}, "stages[1].name: '../escape' is not a plain name"),
        ({"name": "sft"}, "stages[1].name: 'sft' is used twice"),
        ({"name": "dpo", "bogus_key": 1}, "stages[1](dpo).bogus_key: unknown key"),
        ({"name": "dpo", "beta": -1}, "stages[1](dpo).beta: must be > 0"),
        ({"name": "dpo", "data": "missing.jsonl"}, "stages[1](dpo): missing.jsonl: no such file"),
        ({"name": "dpo", "out": "/tmp/elsewhere"}, "stages[1](dpo).out: a recipe stage writes to"),
        ({"name": "grpo", "reward": ["os:system"]}, "reward 'os:system'"),
        ({"name": "grpo", "model": "/no/such/model"}, "/no/such/model: no such model directory"),
    ],
)
def test_a_recipe_is_validated_whole_before_anything_trains(tmp_path, capsys, second, message):
    recipe = write_recipe(tmp_path, [{"name": "sft", "max_steps": 1, "batch_size": 2, "progress": False}, second])
    code, _, err = run_cli(capsys, "run", recipe)
    assert code == 2 and message in one_error_line(err)
    assert not (tmp_path / "out" / "sft").exists()  # the first stage never started
    assert not (tmp_path / "escape").exists()


def test_run_dir_checks_are_pure_and_name_the_key(tmp_path):
    from posttrain.rundir import check_run_dir

    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"^x.out: .*/f is a file, not a directory$"):
        check_run_dir(tmp_path / "f", key="x.out")
    assert check_run_dir(tmp_path / "new" / "deeper", key="x.out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking writes nothing


def test_a_reward_that_needs_a_missing_column_stops_before_training(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "2+2="}) + "\n" + json.dumps({"prompt": "3+3=", "answer": "6"}) + "\n")
    code, _, err = run_cli(
        capsys, "grpo", "--data", data, "--out", tmp_path / "g", "--reward", "correct", "--max-steps", "1"
    )
    line = one_error_line(err)
    assert code == 2 and "reward 'correct' needs column 'answer'" in line and "first: line 1" in line
    assert not (tmp_path / "g" / "metrics.jsonl").exists()
    recipe = write_recipe(tmp_path, [{"name": "grpo", "data": str(data), "reward": ["correct"]}])
    code, _, err = run_cli(capsys, "run", recipe)
    assert code == 2 and "stages[0](grpo)" in err and "needs column 'answer'" in one_error_line(err)


def test_grpo_goes_on_past_a_stuck_reward_under_zero(tmp_path, capsys, monkeypatch):
    # The third call of each worker never returns: it is killed after the timeout, scored 0 and counted, and a
    # fresh worker scores the rest; the step completes.
    (tmp_path / "stuck_once.py").write_text(
        "import time\ncalls = 0\n\ndef reward(completion, **_):\n    global calls\n    calls += 1\n"
        "    if calls == 3:\n        time.sleep(10**6)\n    return 1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from posttrain.rewards import sandbox

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    args = ["grpo", "--data", data, "--eval-data", data, "--out", tmp_path / "g", "--reward", "stuck_once:reward"]
    args += ["--batch-prompts", "2", "--group-size", "2", "--max-new-tokens", "4", "--max-steps", "1"]
    args += ["--reward-timeout-s", "1", "--reward-on-error", "zero", "--no-progress"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    metrics = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if m.get("step") == 1)
    assert step["reward_failures"] == 1 and step["reward_mean"] == 0.75
    sandbox.shutdown_workers()
    tasks = Path(f"/proc/{os.getpid()}/task")
    assert [c for t in tasks.iterdir() for c in (t / "children").read_text().split()] == []  # none left, no zombie


def test_a_recipe_resumes_or_overwrites_as_a_whole(tmp_path, sft_data, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    stage = {"name": "sft", "data": str(sft_data), "max_steps": 2, "batch_size": 2, "progress": False}
    suite = {"tasks": ["arithmetic"], "limit": 2, "max_new_tokens": 4}
    recipe.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "evaluate": suite, "stages": [stage]}))
    assert run_cli(capsys, "run", recipe, "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 2 and "run.out:" in one_error_line(err) and "already holds a run" in err
    assert run_cli(capsys, "run", recipe, "--no-progress", "--resume")[0] == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"][0]["train"]["resumed_from"] == 2  # nothing trained twice
    assert run_cli(capsys, "run", recipe, "--no-progress", "--overwrite")[0] == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"][0]["train"]["resumed_from"] is None
