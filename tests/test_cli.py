"""The ``posttrain`` command on the embedded default: smoke runs, artifacts, and clear user errors."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main

TINY = ["--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--no-progress", "--log-every", "1"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_sft_full_writes_the_run_directory(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    code, out, err = run_cli(
        capsys, "sft", "--model", "builtin:tiny-base", "--data", "task:arithmetic", "--out", tmp_path, *TINY
    )
    assert code == 0, err
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["examples"] == 20000 and summary["heldout"]["loss"] > 0
    assert (tmp_path / "config.yaml").read_text().startswith("stage: sft")
    assert (tmp_path / "checkpoints" / "step_3" / "MANIFEST.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # plain transformers
    assert type(model).__name__ == "LlamaForCausalLM"
    assert any(f.suffix == ".safetensors" for f in (tmp_path / "final").iterdir())


def test_sft_lora_adapter_and_merge(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.models.loading import builtin_path

    code, _, err = run_cli(
        capsys, "sft", "--model", "builtin:tiny-base", "--out", tmp_path / "run", "--lora-rank", "4", *TINY
    )
    assert code == 0, err
    adapter = tmp_path / "run" / "final"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    base_dir = builtin_path("tiny-base")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    code, _, err = run_cli(capsys, "merge", "--model", "builtin:tiny-base", "--lora", adapter, "--out", tmp_path / "m")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.tensor([[5, 60, 61, 62]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-5)


def test_eval_writes_accuracy(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "--model",
        "builtin:tiny-base",
        "--task",
        "uppercase",
        "--limit",
        "6",
        "--max-new-tokens",
        "10",
        "--out",
        out,
        "--perplexity-data",
        "corpus:val",
    )
    assert code == 0, err
    result = json.loads(out.read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["rows"] == 6 and result["perplexity"] > 1.0
    assert json.loads(stdout)["accuracy"] == result["accuracy"]


def test_bad_row_stops_before_training_with_file_line_field(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 7}\n')
    code, _, err = run_cli(
        capsys, "sft", "--model", "builtin:tiny-base", "--data", data, "--out", tmp_path / "r", *TINY
    )
    assert code == 2
    assert f"{data}:2: field 'completion': expected a string" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r" / "final").exists() and not (tmp_path / "r" / "checkpoints").exists()


def test_skip_bad_rows_records_them(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\nnot json\n{"text": ""}\n')
    code, _, err = run_cli(
        capsys, "sft", "--model", "builtin:tiny-base", "--data", data, "--out", tmp_path / "r", "--skip-bad-rows", *TINY
    )
    assert code == 0, err
    bad = json.loads((tmp_path / "r" / "bad_rows.json").read_text())
    assert bad["count"] == 2 and [r["line"] for r in bad["rows"]] == [2, 3]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["data"]["skipped_bad_rows"] == 2


def test_all_rows_too_long_is_an_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "sft", "--model", "builtin:tiny-base", "--out", tmp_path, "--max-length", "8", *TINY)
    assert code == 2 and "no usable rows" in err and "max_length=8" in err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--set", "max_step=3"], "sft.max_step: unknown key (did you mean 'max_steps'?)"),
        (["--max-steps", "many"], "--max-steps: expected an integer, got 'many'"),
        (["--set", "lr=fast"], "--set lr: expected a number"),
        (["--model", "/no/such/dir"], "/no/such/dir: no such model directory"),
        (["--batch-size", "3", "--grad-accum", "2"], "sft.batch_size: 3 rows cannot be split"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, capsys, argv, words):
    code, _, err = run_cli(capsys, "sft", "--out", tmp_path, *TINY, *argv)
    assert code == 2 and words in err and "Traceback" not in err


def test_run_recipe_evaluates_every_stage(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: mini\nevaluate: {tasks: [arithmetic, uppercase], limit: 4, max_new_tokens: 8}\n"
        "search: {limit: 3, max_new_tokens: 8, strategies: [{strategy: greedy}, "
        "{strategy: self_consistency, scaling: [2, 3]}]}\n"
        "stages:\n  - {name: pretrain, use: 'builtin:tiny-base'}\n"
        "  - {name: sft, max_steps: 2, batch_size: 2, lr: 0.001}\n"
    )
    code, out, err = run_cli(
        capsys, "run", recipe, "--out", tmp_path / "run", "--set", "sft.max_steps=1", "--no-progress"
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["pretrain", "sft"]
    assert summary["stages"][1]["train"]["steps"] == 1
    for stage in summary["stages"]:
        assert 0 <= stage["eval"]["accuracy"] <= 1 and "uppercase" in stage["eval"]["retention"]
    assert "<img src='data:image/png;base64," in (tmp_path / "run" / "report.html").read_text()
    assert "retention acc" in out
    search = summary["search"]
    assert [(p["strategy"], p["n"]) for p in search] == [
        ("greedy", 1),
        ("self_consistency", 2),
        ("self_consistency", 3),
    ]
    for p in search:
        assert set(p) >= {"strategy", "n", "accuracy", "tokens_per_question", "oracle_pass_at_n"}
    assert (
        "oracle pass@n" in out and "Search: accuracy against compute" in (tmp_path / "run" / "report.html").read_text()
    )


def test_sigkill_and_resume_twice_matches_uninterrupted(tmp_path):
    """Kill the real process with SIGKILL at arbitrary moments, resume, and compare final weights bit for bit."""
    args = [
        sys.executable,
        "-m",
        "posttrain",
        "sft",
        "--model",
        "builtin:tiny-base",
        "--max-steps",
        "14",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--no-progress",
        "--save-every",
        "3",
        "--seed",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    cut = tmp_path / "cut"
    for wait_for in ("step_3", "step_9"):
        proc = subprocess.Popen(
            [*args, "--out", str(cut), "--resume"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 120
        while not (cut / "checkpoints" / wait_for).exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run([*args, "--out", str(cut), "--resume"], check=True, env=env, capture_output=True)
    a = load_file(str(Path(tmp_path / "full" / "final" / "model.safetensors")))
    b = load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_command_prints_its_help():
    """``posttrain X --help`` for every sub-command (argparse %-formats help texts: a bare % in one broke them)."""
    from posttrain.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        assert sub.format_help(), name
