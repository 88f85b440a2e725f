"""One scaffold for every stage: the registry drives the CLI, recipes and report; shared flags act the same way in
every stage; a stage refuses flags it does not use; configs are validated when built; accumulation is exact in
every trainer (one batch of B == B micro-batches of 1)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from posttrain.config import LoopArgs, OptimArgs, RuntimeArgs, build_config
from posttrain.errors import ConfigError
from posttrain.stages import STAGES
from posttrain.train.scaffold import Stage


def test_every_stage_is_built_from_the_shared_pieces_and_listed_once():
    from posttrain.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public API
    for name, info in STAGES.items():
        assert issubclass(info.config, (RuntimeArgs)) and issubclass(info.config, LoopArgs), name
        assert issubclass(info.config, OptimArgs), name
        assert name in commands
    assert set(commands) - set(STAGES) == {
        "demo",
        "run",
        "eval",
        "generate",
        "inspect",
        "merge",
        "prune",
        "quantize",
        "synth",
    }


@pytest.mark.parametrize(
    "stage, key",
    [
        ("rm", "lora_rank"),  # the score head is new: reward models train fully
        ("ppo", "grad_accum"),  # PPO's unit of work is the minibatch
        ("ppo", "batch_size"),
        ("grpo", "batch_size"),  # RL batches are prompts (batch_prompts)
        ("dpo", "replay_data"),
        ("dpo", "completion_only_loss"),
        ("grpo", "length_policy"),
    ],
)
def test_a_stage_refuses_a_flag_it_does_not_use(stage, key):
    with pytest.raises(ConfigError, match=rf"^{stage}\.{key}: unknown key"):
        build_config(STAGES[stage].config, {key: 1}, path=stage)


@pytest.mark.parametrize(
    "stage, values, message",
    [
        ("sft", {"batch_size": 6, "grad_accum": 4}, "sft.batch_size: 6 rows cannot be split into grad_accum=4"),
        ("sft", {"lr": -1.0}, "sft.lr: must be a positive number, got -1.0"),
        ("sft", {"replay_fraction": 0.3}, "sft.replay_data: replay_fraction=0.3 needs replay_data"),
        ("dpo", {"beta": 0.0}, "dpo.beta: must be > 0, got 0.0"),
        ("grpo", {"group_size": 1}, "grpo.group_size: must be at least 2, got 1"),
        ("grpo", {"reward": ["correct"], "reward_weights": [1.0, 2.0]}, "grpo.reward_weights: 2 weights for 1"),
        ("grpo", {"temperature": 0.0}, "grpo.temperature: must be > 0 for RL sampling"),
        ("ppo", {"batch_prompts": 3, "samples_per_prompt": 3, "minibatches": 2}, "ppo.minibatches: 2 does not divide"),
        ("ppo", {"kl_controller": "adaptive", "kl_target": 0.0}, "ppo.kl_target: must be > 0"),
        ("rm", {"threads": -2}, "rm.threads: must be >= 0, got -2"),
    ],
)
def test_configs_are_validated_when_built(stage, values, message):
    with pytest.raises(ConfigError) as err:
        build_config(STAGES[stage].config, values, path=stage)
    assert str(err.value).startswith(message)


def test_recipes_accept_every_registered_stage_and_nothing_else(tmp_path):
    from posttrain.pipeline import stage_config

    required = {"distill": {"teacher": "builtin:tiny-base"}}  # keys without a default
    for name in STAGES:
        stage = {"name": name, **required.get(name, {})}
        kind, cfg = stage_config(stage, index=0, out=tmp_path, previous_model=None)
        assert kind == name and isinstance(cfg, STAGES[name].config)
    with pytest.raises(ConfigError, match="unknown stage type 'rlhf'"):
        stage_config({"name": "rlhf"}, index=3, out=tmp_path, previous_model=None)


class _Probe(Stage):
    """A stage that trains nothing real: it records what the scaffold set up around its step."""

    name = "probe"

    def __init__(self, cfg):
        self.cfg, self.seen = cfg, {}

    def build(self, ctx):
        from posttrain.models.tiny import build_model, build_tokenizer

        tok = build_tokenizer()
        return build_model(tok, seed=0), tok

    def rows_per_step(self):
        return 4, 2

    def training_data(self):
        return list(range(4))

    def prepare(self, run):
        pass

    def step(self, run, indices, step):
        self.seen["threads"] = torch.get_num_threads()
        with run.amp():
            self.seen["autocast"] = torch.is_autocast_enabled(run.ctx.device.type)
            self.seen["dtype"] = torch.get_autocast_dtype(run.ctx.device.type)
        loss = sum(p.sum() for p in run.params) * 0.0
        run.backward(loss)
        finite, grad_norm, value = run.update(float(loss.detach()))
        return {"finite": finite, "loss": value, "grad_norm": grad_norm}

    def evaluate(self, run):
        return {}

    def save_final(self, run, path):
        path.mkdir(parents=True)

    def summary(self, run):
        return {}

    def extra_state(self):
        return {}

    def load_extra_state(self, state):
        pass


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_shared_runtime_flags_reach_every_stage(stage, tmp_path):
    """--threads and --mixed-precision are applied by the scaffold, whatever the stage's config class."""
    from posttrain.train.scaffold import run_stage

    cfg = build_config(
        STAGES[stage].config,
        {"out": str(tmp_path), "max_steps": 1, "threads": 1, "mixed_precision": "bf16", "progress": False}
        | ({"teacher": "builtin:tiny-base"} if stage == "distill" else {}),
        path=stage,
    )
    before = torch.get_num_threads()
    probe = _Probe(cfg)
    summary = run_stage(probe)
    assert probe.seen == {"threads": 1, "autocast": True, "dtype": torch.bfloat16}
    assert torch.get_num_threads() == before  # restored for the caller
    assert summary["steps"] == 1 and json.loads((tmp_path / "summary.json").read_text())["stage"] == "probe"
    assert (tmp_path / "config.yaml").read_text().startswith("stage: probe")


def _final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def _same_weights(a, b, atol):
    wa, wb = _final_weights(a), _final_weights(b)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_dpo_one_batch_equals_accumulated_micro_batches(tmp_path, loss):
    """KTO's reference point is the whole step's: micro-batches get it from a no-grad pass over the step."""
    from posttrain.config import DPOConfig
    from posttrain.train.dpo import run_dpo

    data = tmp_path / "kto.jsonl"
    if loss == "kto":
        from posttrain.tasks import get_task

        rows = get_task("arithmetic_prefs").rows("train", 16)
        data.write_text(
            "".join(
                json.dumps({"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}) + "\n"
                for i, r in enumerate(rows)
                for key in (("chosen",) if i % 2 else ("rejected",))
            )
        )
    outs = []
    for accum in (1, 4):
        out = tmp_path / f"a{accum}"
        values = {"out": str(out), "max_steps": 2, "batch_size": 4, "grad_accum": accum, "lr": 1e-3, "loss": loss}
        values.update(max_length=160, progress=False, eval_data="", log_every=1)
        if loss == "kto":
            values["data"] = str(data)
        run_dpo(build_config(DPOConfig, values, path="dpo"))
        outs.append(out)
    records = [[json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in outs]
    curves = [[(r["loss"], r["grad_norm"]) for r in rs] for rs in records]
    assert curves[1] == [pytest.approx(c, rel=1e-5) for c in curves[0]]
    # Adam divides each element's update by its own gradient scale: an element whose gradient is rounding-sized
    # moves by up to ~lr (1e-3) on summation-order noise alone (measured 6.8e-6 and 1.1e-5 on one element), so
    # the weights agree to lr/10; the loss and gradient norm above, to 1e-5 relative.
    _same_weights(outs[0], outs[1], atol=1e-4)


def test_rm_one_batch_equals_accumulated_micro_batches(tmp_path):
    from safetensors.torch import load_file

    from posttrain.config import RMConfig
    from posttrain.train.rm import run_rm

    outs, curves = [], []
    for accum in (1, 4):
        out = tmp_path / f"a{accum}"
        values = {"out": str(out), "max_steps": 2, "batch_size": 4, "grad_accum": accum, "lr": 1e-3, "log_every": 1}
        run_rm(build_config(RMConfig, {**values, "max_length": 160, "progress": False, "eval_data": ""}, path="rm"))
        outs.append(load_file(str(out / "final" / "model.safetensors")))
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        curves.append([(r["loss"], r["grad_norm"]) for r in records])
    assert curves[1] == [pytest.approx(c, rel=1e-5) for c in curves[0]]
    # Adam divides each element's update by its own gradient scale, so an element whose gradient is rounding-
    # sized can move by up to ~lr (1e-3) on summation-order noise alone: measured 1.3e-5 on one element.
    for name in outs[0]:
        torch.testing.assert_close(outs[1][name], outs[0][name], atol=1e-4, rtol=0, msg=name)


def test_grpo_dapo_token_mean_is_exact_under_accumulation(tmp_path):
    """DAPO's loss is a mean over the step's tokens: micro-batches of 1 completion give the same update (this
    failed before: each micro-batch was weighted by its share of sequences)."""
    from posttrain.config import GRPOConfig
    from posttrain.train.grpo import run_grpo

    outs = []
    for accum in (1, 8):
        out = tmp_path / f"a{accum}"
        values = {"out": str(out), "max_steps": 2, "batch_prompts": 2, "group_size": 4, "grad_accum": accum}
        values.update(loss="dapo", data="task:arithmetic", max_new_tokens=16, lr=1e-3, progress=False, log_every=1)
        values.update(reward=["correct_lenient", "length_penalty"], eval_limit=4, kl_coef=0.05)
        run_grpo(build_config(GRPOConfig, values, path="grpo"))
        outs.append(out)
    metrics = [[json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in outs]
    assert [m.get("reward_mean") for m in metrics[1]] == [m.get("reward_mean") for m in metrics[0]]
    assert [m.get("loss") for m in metrics[1]] == pytest.approx([m.get("loss") for m in metrics[0]], rel=1e-5)
    norms = [[m["grad_norm"] for m in ms if "grad_norm" in m] for ms in metrics]
    assert norms[0][0] > 0.1  # samples differ within groups: there is a gradient to get right
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    # Adam divides by sqrt(v): an element whose gradient is rounding-sized moves by up to ~lr either way, so the
    # weights agree to ~lr/10 (measured 2.1e-5 on one k_proj element with chunked log-probs), the loss and the
    # gradient norm above to 1e-5 relative.
    _same_weights(outs[0], outs[1], atol=1e-4)


def test_resolved_config_records_the_world_and_every_field(tmp_path):
    import yaml

    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    cfg = build_config(
        SFTConfig, {"out": str(tmp_path), "max_steps": 1, "batch_size": 2, "progress": False}, path="sft"
    )
    run_sft(cfg)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["stage"] == "sft" and saved["world_size"] == 1
    assert set(saved) - {"stage", "world_size"} == {f.name for f in dataclasses.fields(SFTConfig)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
@pytest.mark.parametrize(
    "argv, words",
    [
        (["sft", "--device", "cuda"], "device: 'cuda' asked for, but torch sees no CUDA device"),
        (["grpo", "--rollout-engine", "vllm"], "rollout_engine: vllm cannot run here: it needs an NVIDIA GPU"),
        (["rm", "--device", "tpu"], "device: "),
    ],
)
def test_device_and_engine_errors_are_one_clear_line(tmp_path, capsys, argv, words):
    from posttrain.cli import main

    code = main([*argv, "--out", str(tmp_path), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_preference_stages_skip_bad_rows_and_say_so(tmp_path, stage):
    from posttrain.errors import DataError
    from posttrain.tasks import get_task

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in get_task("arithmetic_prefs").rows("train", 4)]
    data = tmp_path / "prefs.jsonl"
    bad = {"prompt": "What is 1 + 1?", "chosen": "Answer: 2"}  # no rejected reply
    data.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], bad, *rows[1:]]))
    values = {"data": str(data), "eval_data": "", "max_steps": 1, "batch_size": 2, "max_length": 200, "progress": False}
    with pytest.raises(DataError, match=r"prefs.jsonl:2: field 'rejected'"):
        STAGES[stage].run(build_config(STAGES[stage].config, {**values, "out": str(tmp_path / "a")}, path=stage))
    out = tmp_path / "b"
    cfg = build_config(STAGES[stage].config, {**values, "out": str(out), "skip_bad_rows": True}, path=stage)
    assert STAGES[stage].run(cfg)["pairs"] == 4
    report = json.loads((out / "bad_rows.json").read_text())
    assert report["count"] == 1 and "rejected" in json.dumps(report["rows"])
