"""torchrun on CPU (gloo): two ranks follow the loss curve of one process with the same global batch and end with
the same weights, under DDP (SFT, DPO with LoRA, GRPO) and FSDP2 (SFT); a job killed with SIGKILL resumes to the
weights of an uninterrupted one; a user error on one rank is reported once and every rank exits.

Tolerance: every run is fp32 and computes the same sums in a different order (each rank sums its share, then
the all-reduce adds the shares; FSDP2 also reduce-scatters), so the results differ by float32 rounding only.
Measured when these tests were written: losses equal to 1e-6 relative, weights to < 2e-6 after 3 steps of
AdamW. Adam normalises each update by its running RMS, so a rounding-level gradient difference moves a weight by
at most ~lr per step: the weight tolerance is 1e-5 (lr 1e-4 to 1e-3, 3 to 4 steps); a real bug (a rank's share
counted twice, a missing all-reduce, the wrong normaliser) changes the loss from the first step and the weights
by ~lr per step, far outside it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# Two ranks on two cores: one thread each (two processes with two threads each slow each other 10-30x).
COMMON = ["--model", "builtin:tiny-base", "--no-progress", "--threads", "1", "--seed", "3"]


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if extra_path is not None:
        env["PYTHONPATH"] = f"{extra_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def run(args: list[str], *, ranks: int, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``posttrain ARGS`` in one process, or under torchrun with ``ranks`` processes."""
    head = [*TORCHRUN, "-m", "posttrain"] if ranks == 2 else [sys.executable, "-m", "posttrain"]
    return subprocess.run([*head, *args, *COMMON], capture_output=True, text=True, timeout=timeout, env=env or _env())


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(out: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    final = out / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(final / name))


def assert_same_run(
    a: Path, b: Path, *, keys: tuple[str, ...] = ("loss",), atol: float = 1e-5, metric_abs: float = 1e-6
) -> None:
    for key in keys:
        assert losses(b, key) == pytest.approx(losses(a, key), rel=1e-5, abs=metric_abs), key
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=atol, rtol=0, msg=name)


SFT = [
    "sft",
    "--data",
    "task:arithmetic",
    "--max-length",
    "128",
    "--batch-size",
    "8",
    "--lr",
    "1e-3",
    "--log-every",
    "1",
]


@pytest.fixture(scope="module")
def sft_one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft1")
    ok(run([*SFT, "--out", str(out), "--max-steps", "4", "--save-every", "2"], ranks=1))
    return out


def test_sft_two_ranks_ddp_and_fsdp2_match_one_process(sft_one_process, tmp_path):
    # DDP with 2 micro-batches per rank: ranks x micro-batches together give the gradient of the global batch.
    ddp = tmp_path / "ddp"
    ok(run([*SFT, "--out", str(ddp), "--max-steps", "4", "--grad-accum", "2"], ranks=2))
    # grad_norm is taken after the all-reduce: it catches a gradient that is averaged instead of summed (a loss
    # curve would not: Adam hardly notices a constant factor).
    assert_same_run(sft_one_process, ddp, keys=("loss", "grad_norm", "token_accuracy", "eval_loss"))
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "ddp"
    # FSDP2: parameters sharded, gathered for the checkpoint and final/ (a plain HF model).
    fsdp = tmp_path / "fsdp"
    ok(run([*SFT, "--out", str(fsdp), "--max-steps", "4", "--fsdp", "--save-every", "2"], ranks=2))
    assert_same_run(sft_one_process, fsdp, keys=("loss", "grad_norm", "eval_loss"))
    assert json.loads((fsdp / "summary.json").read_text())["parallel"] == "fsdp"
    # Resume under FSDP2 from the step-2 checkpoint (gathered full tensors, re-sharded on load): same end.
    shutil.rmtree(fsdp / "checkpoints" / "step_4")
    shutil.rmtree(fsdp / "final")
    ok(run([*SFT, "--out", str(fsdp), "--max-steps", "4", "--fsdp", "--save-every", "2", "--resume"], ranks=2))
    assert json.loads((fsdp / "summary.json").read_text())["resumed_from"] == 2
    assert_same_run(sft_one_process, fsdp, keys=("loss", "eval_loss"))
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(fsdp / "final") is not None


def test_sigkill_under_torchrun_then_resume_gives_the_uninterrupted_weights(sft_one_process, tmp_path):
    out = tmp_path / "killed"
    # Bigger steps, so that the job is still running when its first checkpoint appears.
    args = [*SFT, "--out", str(out), "--max-steps", "4", "--save-every", "2", "--batch-size", "8"]
    proc = subprocess.Popen(
        [*TORCHRUN, "-m", "posttrain", *args, *COMMON],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
        start_new_session=True,
    )
    deadline = time.time() + 180
    while not (out / "checkpoints" / "step_2" / "MANIFEST.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, at once
    proc.wait()
    if (out / "final").exists():
        pytest.skip("the job finished before it could be killed (machine too fast for this test's sizes)")
    ok(run([*args, "--resume"], ranks=2))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] in (2, 4) and summary["steps"] == 4
    assert_same_run(sft_one_process, out)


def test_dpo_lora_two_ranks_match_one_process(tmp_path):
    args = ["dpo", "--data", "task:arithmetic_prefs", "--max-length", "160", "--batch-size", "4", "--lr", "1e-3"]
    args += ["--max-steps", "3", "--lora-rank", "4", "--log-every", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run([*args, "--out", str(one)], ranks=1))
    ok(run([*args, "--out", str(two)], ranks=2))
    # The reference log-probs were computed by each rank for its own rows and shared: the saved table is whole.
    ref_one = load_file(str(one / "reference_logps.safetensors"))["train"]
    ref_two = load_file(str(two / "reference_logps.safetensors"))["train"]
    torch.testing.assert_close(ref_two, ref_one, atol=1e-4, rtol=0, equal_nan=True)
    # Margins are differences of summed log-probs of ~100-token sequences (|sum| ~ 100, float32 ulp ~ 8e-6), and
    # each rank packs different sequences together for the reference pass: they agree to ~1e-5 absolute.
    # LoRA A matrices start with a zero gradient (B = 0); Adam scales an element's update by 1/|its gradient
    # history|, so an element whose gradient is rounding-sized moves by up to ~lr either way: 1e-4 here (lr 1e-3),
    # measured 3e-5 on one element of 92k.
    assert_same_run(one, two, keys=("loss", "grad_norm", "margin", "eval_loss"), metric_abs=5e-5, atol=1e-4)


def test_grpo_two_ranks_sample_and_train_like_one_process(tmp_path):
    # REINFORCE++ baselines need the whole batch's rewards; DAPO's token mean needs the whole step's tokens.
    args = ["grpo", "--data", "task:arithmetic", "--batch-prompts", "4", "--group-size", "4", "--max-new-tokens", "16"]
    args += ["--max-steps", "3", "--lr", "1e-3", "--log-every", "1", "--reward", "correct_lenient,length_penalty"]
    args += ["--loss", "dapo", "--advantage", "reinforce_pp", "--grad-accum", "2", "--eval-limit", "8"]
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run([*args, "--out", str(one)], ranks=1))
    ok(run([*args, "--out", str(two)], ranks=2))
    # Samples are seeded per prompt, so both runs draw the same completions: the rewards agree exactly.
    assert losses(two, "reward_mean") == losses(one, "reward_mean")
    assert losses(two, "completion_length") == losses(one, "completion_length")
    assert max(losses(one, "grad_norm")) > 0.1  # the samples differ within groups: there is a gradient to check
    assert_same_run(one, two, keys=("loss", "grad_norm", "kl", "eval_accuracy_strict"))


def test_a_user_error_is_reported_once_and_every_rank_exits(tmp_path):
    # An error on one rank only: a reward function that fails on rank 1 while rank 0 waits in a collective.
    (tmp_path / "flaky.py").write_text(
        "import os\n\ndef reward(completion, **_):\n"
        "    if os.environ.get('RANK') == '1':\n        raise ValueError('rank one cannot score')\n    return 0.0\n"
    )
    args = ["grpo", "--data", "task:uppercase", "--batch-prompts", "2", "--group-size", "2", "--max-new-tokens", "4"]
    args += ["--max-steps", "2", "--reward", "flaky:reward", "--out", str(tmp_path / "g")]
    started = time.time()
    result = run(args, ranks=2, timeout=120, env=_env(tmp_path))
    assert result.returncode != 0 and time.time() - started < 120
    assert result.stderr.count("posttrain grpo: error") == 1, result.stderr[-3000:]
    assert "(rank 1 of 2): reward 'flaky:reward' raised ValueError: rank one cannot score" in result.stderr
    # An error every rank hits (a batch that cannot be split over the ranks): also printed once.
    result = run([*args[:-1], str(tmp_path / "h"), "--batch-prompts", "3"], ranks=2, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("posttrain grpo: error") == 1, result.stderr[-3000:]
    assert "grpo.batch_prompts: 3 prompts cannot be split over 2 ranks" in result.stderr
    shutil.rmtree(tmp_path / "g", ignore_errors=True)
