"""Typed, validated configs for every stage, composed from small shared pieces.

A stage's config is one frozen dataclass; every field is documented in its metadata, which is also the
``--help`` text of the matching CLI flag (``lora_rank`` <-> ``--lora-rank``). Values from YAML, flags or
``--set key=value`` all pass through :func:`build_config`, so an unknown key or a bad value fails at load time
with the key's path, the nearest valid key and the expected type.

    >>> cfg = build_config(SFTConfig, {"lr": 1e-3, "max_steps": 10}, path="sft")
    >>> cfg.lr, cfg.max_steps
    (0.001, 10)
    >>> build_config(SFTConfig, {"max_step": 10}, path="sft")
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: sft.max_step: unknown key (did you mean 'max_steps'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.errors import ConfigError


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its documentation (shown by ``--help``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _positive(cfg: Any, *names: str) -> Iterator[tuple[str, str]]:
    for name in names:
        if getattr(cfg, name) < 1:
            yield name, f"must be at least 1, got {getattr(cfg, name)}"


@dataclass(frozen=True)
class ModelArgs:
    model: str = opt("builtin:tiny-base", "local HF model dir, PEFT adapter dir, hub id, or builtin:tiny-base")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "weights dtype")
    trust_remote_code: bool = opt(False, "allow custom model code from the model dir (off by default)")
    chat_template: str = opt("", "a Jinja chat template file that replaces the model's own (saved with the result)")


@dataclass(frozen=True)
class LoraArgs:
    peft: Literal["auto", "none", "lora", "dora", "rslora", "ia3", "prompt", "prefix", "qlora"] = opt(
        "auto",
        "parameter-efficient method through peft: lora, dora (weight-decomposed LoRA), rslora (rank-stabilised"
        " scaling), ia3 (learned activation scales), prompt (learned input embeddings in front of each sequence),"
        " prefix (learned keys/values in every layer), qlora (LoRA on a 4-bit NF4 base: the qlora extra); none ="
        " full fine-tune; auto = lora when lora_rank > 0, else none",
    )
    lora_rank: int = opt(0, "LoRA/DoRA/rsLoRA rank (0 with peft auto = full fine-tune; 0 with a LoRA method = 8)")
    lora_alpha: float = opt(16.0, "LoRA scaling alpha")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input")
    lora_targets: list[str] = opt(
        [], "module names to adapt; empty = every linear layer but the output head (ia3: peft's per-model default)"
    )
    virtual_tokens: int = opt(16, "prompt/prefix: virtual tokens in front of each sequence")

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.lora_rank < 0:
            yield "lora_rank", f"must be >= 0, got {self.lora_rank}"
        if not 0 <= self.lora_dropout < 1:
            yield "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}"
        if self.peft in ("none", *NO_RANK_METHODS) and self.lora_rank:
            yield "lora_rank", f"peft {self.peft!r} has no rank; drop lora_rank={self.lora_rank} or pick a LoRA method"
        if self.peft in VIRTUAL_METHODS and self.lora_targets:
            yield "lora_targets", f"peft {self.peft!r} adapts no modules; drop lora_targets"
        if self.virtual_tokens < 1:
            yield "virtual_tokens", f"must be at least 1, got {self.virtual_tokens}"


LORA_METHODS = ("lora", "dora", "rslora", "qlora")
VIRTUAL_METHODS = ("prompt", "prefix")  # prompt learning: virtual tokens, nothing to fold into the weights
NO_RANK_METHODS = ("ia3", *VIRTUAL_METHODS)
DEFAULT_LORA_RANK = 8


def adapter_method(cfg: Any) -> str | None:
    """The peft method a config trains (``lora``, ``dora``, ``rslora``, ``ia3``, ``prompt``, ``prefix``,
    ``qlora``), or None for full fine-tuning.

    >>> adapter_method(build_config(SFTConfig, {"lora_rank": 4}, path="sft")), adapter_method(SFTConfig())
    ('lora', None)
    """
    method = getattr(cfg, "peft", "auto")
    if method == "auto":
        return "lora" if getattr(cfg, "lora_rank", 0) else None
    return None if method == "none" else method


@dataclass(frozen=True)
class DataArgs:
    data: str = opt("task:arithmetic", "training rows: a .jsonl/.parquet/.csv file, task:NAME[:SPLIT] or corpus")
    eval_data: str = opt("", "held-out rows (default: the task's val split when data is task:NAME, else none)")
    max_length: int = opt(512, "maximum tokens per sequence")
    length_policy: Literal["truncate", "drop"] = opt("truncate", "what to do with rows over max_length")
    skip_bad_rows: bool = opt(False, "skip malformed rows (count and reasons go to bad_rows.json) instead of stopping")

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from _positive(self, "max_length")


@dataclass(frozen=True)
class LMArgs:
    completion_only_loss: bool = opt(True, "train on completion/assistant tokens only (False: all tokens)")
    replay_data: str = opt("", "earlier-stage rows mixed into training against forgetting (e.g. corpus)")
    replay_fraction: float = opt(0.0, "share of training examples drawn from replay_data, in [0, 1)")

    def validate(self) -> Iterator[tuple[str, str]]:
        if not 0.0 <= self.replay_fraction < 1.0:
            yield "replay_fraction", f"must be in [0, 1), got {self.replay_fraction}"
        elif self.replay_fraction and not self.replay_data:
            yield "replay_data", f"replay_fraction={self.replay_fraction} needs replay_data"


@dataclass(frozen=True)
class OptimArgs:
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    warmup_steps: int = opt(0, "linear warm-up steps")
    schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "learning-rate decay after warm-up")
    max_grad_norm: float = opt(1.0, "gradient clipping norm; 0 = off")
    l2sp: float = opt(
        0.0,
        "pull toward the starting weights against forgetting: L2-SP, the penalty l2sp/2 x ||w - w_start||^2 over"
        " the trainable weights (its gradient l2sp x (w - w_start) is added before clipping); 0 = off",
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        if not math.isfinite(self.lr) or self.lr <= 0:
            yield "lr", f"must be a positive number, got {self.lr}"
        if self.warmup_steps < 0:
            yield "warmup_steps", f"must be >= 0, got {self.warmup_steps}"
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                yield name, f"must be in [0, 1), got {getattr(self, name)}"
        if self.weight_decay < 0:
            yield "weight_decay", f"must be >= 0, got {self.weight_decay}"
        if self.max_grad_norm < 0:
            yield "max_grad_norm", f"must be >= 0 (0 = no clipping), got {self.max_grad_norm}"
        if not math.isfinite(self.l2sp) or self.l2sp < 0:
            yield "l2sp", f"must be >= 0 (0 = off), got {self.l2sp}"


@dataclass(frozen=True)
class AccumArgs:
    grad_accum: int = opt(1, "micro-batches per optimiser step, per rank (the batch must divide evenly)")

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from _positive(self, "grad_accum")


@dataclass(frozen=True)
class BatchArgs:
    batch_size: int = opt(8, "rows per optimiser step over all ranks and micro-batches (the global batch)")

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.grad_accum < 1:
            return  # AccumArgs reports it
        if self.batch_size < 1 or self.batch_size % self.grad_accum:
            yield (
                "batch_size",
                (f"{self.batch_size} rows cannot be split into grad_accum={self.grad_accum} equal micro-batches"),
            )


@dataclass(frozen=True)
class LoopArgs:
    out: str = opt("", "run directory (required)")
    max_steps: int = opt(100, "optimiser steps")
    seed: int = opt(0, "seed for init, data order and sampling")
    save_every: int = opt(0, "checkpoint every N steps; 0 = only at the end")
    keep_checkpoints: int = opt(2, "newest complete checkpoints to keep; 0 = keep all")
    eval_every: int = opt(
        0,
        "held-out evaluation every N steps (and before step 1); 0 = only after the last step. What is measured"
        " is the stage's own: loss for sft/pretrain, loss and preference accuracy for dpo, pair accuracy for rm,"
        " greedy answer accuracy for grpo/ppo",
    )
    log_every: int = opt(10, "write metrics every N steps")
    resume: bool = opt(
        False,
        "continue from the newest complete checkpoint in out (fresh start if none); the config and data must be the"
        " checkpoint's, except the keys listed in the README (max_steps, save_every, eval_every, ...)",
    )
    overwrite: bool = opt(False, "replace the run already in out (only what posttrain wrote there is removed)")
    max_bad_steps: int = opt(5, "stop after this many non-finite steps in a row")
    progress: bool = opt(True, "show progress bars")

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from _positive(self, "max_steps", "log_every", "max_bad_steps")
        for name in ("save_every", "eval_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                yield name, f"must be >= 0, got {getattr(self, name)}"


@dataclass(frozen=True)
class RuntimeArgs:
    device: str = opt(
        "auto", "cpu, cuda, cuda:N, or auto (cuda when available, else cpu); under torchrun each rank takes its own GPU"
    )
    threads: int = opt(0, "torch CPU threads per process; 0 = torch's default")
    mixed_precision: Literal["no", "bf16"] = opt(
        "no", "bf16: forward and backward under bf16 autocast (weights and optimiser state stay in their dtype)"
    )
    fsdp: bool = opt(False, "under torchrun: shard parameters, gradients and optimiser state (FSDP2) instead of DDP")
    gradient_checkpointing: bool = opt(
        False, "recompute activations in the backward pass (less memory, ~30% more compute)"
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.threads < 0:
            yield "threads", f"must be >= 0, got {self.threads}"


@dataclass(frozen=True)
class SFTConfig(RuntimeArgs, LoopArgs, BatchArgs, AccumArgs, OptimArgs, LMArgs, DataArgs, LoraArgs, ModelArgs):
    """Supervised fine-tuning (full or LoRA) on prompt/completion, messages or text rows."""


@dataclass(frozen=True)
class PretrainConfig(RuntimeArgs, LoopArgs, BatchArgs, AccumArgs, OptimArgs, LMArgs, DataArgs, LoraArgs, ModelArgs):
    """Causal-LM training from scratch (``model: builtin:tiny`` / ``builtin:small``) or continued pretraining."""

    completion_only_loss: bool = opt(False, "train on all tokens (pretraining default)")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: accuracy (strict/lenient/fair), pass@k, perplexity."""

    model: str = opt("builtin:tiny-base", "model dir, adapter dir or hub id")
    task: str = opt("", "built-in task name (its test split); or give data")
    data: str = opt("", "rows with prompt and answer (.jsonl/.parquet/.csv)")
    out: str = opt("", "write results JSON here (checked before evaluating; an existing file needs overwrite)")
    overwrite: bool = opt(False, "replace an existing out file")
    strategy: Literal["greedy", "sample", "best_of_n", "self_consistency", "beam", "tree", "hybrid"] = opt(
        "greedy", "decoding or search strategy (see posttrain.search)"
    )
    n: int = opt(
        1,
        "sample: samples per prompt (pass@k for k = 1, 2, 4 ... n); best_of_n/self_consistency/hybrid: candidates;"
        " beam: width; tree: children per node",
    )
    temperature: float = opt(1.0, "sampling temperature (sampling strategies)")
    top_p: float = opt(1.0, "nucleus sampling mass (sampling strategies)")
    scorer: list[str] = opt(
        ["logprob"],
        "search scorer/value function: logprob (mean token log-prob) or reward functions without the gold answer"
        " (e.g. arithmetic_steps, format, module:function)",
    )
    weighted: bool = opt(False, "self_consistency: weight each vote by its score (exp(mean log-prob) for logprob)")
    length_penalty: float = opt(1.0, "beam: score = log-prob / length ** length_penalty")
    delimiter: str = opt("\n", "tree: text that ends a step")
    keep: int = opt(2, "tree: nodes kept per level (beam over steps)")
    token_budget: int = opt(0, "tree: generated tokens per question at most; 0 = n * keep * max_new_tokens")
    helper_model: str = opt("", "hybrid: the second model (same tokenizer)")
    helper_role: Literal["propose", "score"] = opt("propose", "hybrid: the helper proposes (main scores) or scores")
    engine: Literal["hf", "vllm"] = opt("hf", "generation backend: hf (built-in) or vllm (GPU only; beam/tree need hf)")
    scaling: list[int] = opt([], "accuracy-vs-compute curve: run the strategy at each n (e.g. 1,2,4,8,16)")
    max_new_tokens: int = opt(96, "generation limit")
    limit: int = opt(0, "evaluate only the first N rows; 0 = all")
    batch_size: int = opt(256, "prompts per generation batch")
    perplexity_data: str = opt(
        "", "text rows to measure perplexity on: a file, corpus:val, or a shipped text set (text:general, prose)"
    )
    show_examples: int = opt(5, "replies kept in the result (prompt, reply, gold answer, strict/lenient/fair marks)")
    seed: int = opt(0, "sampling seed")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "weights dtype")
    trust_remote_code: bool = opt(False, "allow custom model code from the model dir")
    chat_template: str = opt("", "a Jinja chat template file that replaces the model's own")
    progress: bool = opt(True, "show a progress bar while generating")
    threads: int = opt(0, "torch CPU threads; 0 = torch's default")

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from _positive(self, "n", "max_new_tokens", "batch_size", "keep")
        for name in ("limit", "token_budget", "threads", "show_examples"):
            if getattr(self, name) < 0:
                yield name, f"must be >= 0, got {getattr(self, name)}"
        if self.temperature <= 0:
            yield "temperature", f"must be > 0, got {self.temperature} (use strategy greedy for argmax decoding)"
        if not 0 < self.top_p <= 1:
            yield "top_p", f"must be in (0, 1], got {self.top_p}"
        if any(n < 1 for n in self.scaling):
            yield "scaling", f"every n must be at least 1, got {self.scaling}"
        if not self.scorer:
            yield "scorer", "give at least one scorer (logprob, a reward name or module:function)"
        if self.strategy == "hybrid" and not self.helper_model:
            yield "helper_model", "strategy hybrid needs a helper model"


@dataclass(frozen=True)
class RewardArgs:
    """Prompts and the reward functions that score their completions (shared by the RL trainers)."""

    data: str = opt("task:arithmetic", "prompt rows {prompt, ...}; other columns are passed to reward functions")
    eval_data: str = opt(
        "", "held-out rows {prompt, answer} for the greedy accuracy (default: the task's val split for task:NAME)"
    )
    eval_limit: int = opt(200, "held-out rows used for the greedy accuracy (the first N)")
    max_length: int = opt(512, "maximum prompt tokens (longer prompts are dropped and counted)")
    reward: list[str] = opt(
        ["correct"],
        "reward functions, comma-separated: built-in names, module:function, or rm:DIR (a reward model; rm:A+B an"
        " ensemble's mean)",
    )
    reward_weights: list[float] = opt([], "one weight per reward function (default 1 each)")
    reward_timeout_s: float = opt(30.0, "a reward call running longer than this fails")
    reward_on_error: Literal["raise", "zero"] = opt(
        "raise", "stop on a failing reward call, or score it 0 and count it"
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from _positive(self, "eval_limit", "max_length")
        if self.reward_timeout_s <= 0:
            yield "reward_timeout_s", f"must be > 0, got {self.reward_timeout_s}"
        if not self.reward:
            yield "reward", "give at least one reward function"
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            yield "reward_weights", f"{len(self.reward_weights)} weights for {len(self.reward)} reward functions"


@dataclass(frozen=True)
class MonitorArgs:
    """The reward-hacking monitor of the RL trainers (``posttrain.safeguards.monitor``); 0 turns a rule off."""

    on_hacking: Literal["warn", "stop"] = opt(
        "warn",
        "what a monitor alert does: warn (metrics.jsonl 'alerts' and the console) or stop the run (a checkpoint"
        " and final/ are written); either way best/ keeps the model with the best held-out (gold) accuracy",
    )
    kl_budget: float = opt(0.0, "alert when the mean per-token KL to the reference exceeds this (needs kl_coef > 0)")
    monitor_window: int = opt(5, "held-out evaluations the proxy-up/gold-down trend is fitted over")
    gold_tolerance: float = opt(0.03, "gold (held-out accuracy) loss, from its best and along the trend, that alerts")
    length_drift: float = opt(
        1.0, "alert when the mean completion length grows above (1 + this) x its start, or below 1 / (1 + this) x"
    )
    min_distinct_2: float = opt(0.1, "alert when within-group distinct-2 of the samples falls below this")
    max_overlap: float = opt(0.9, "alert when the samples' within-group bigram overlap (Jaccard) exceeds this")
    min_entropy: float = opt(0.0, "alert when the mean token entropy (nats) falls below this")
    max_disagreement: float = opt(
        0.0, "alert when a reward-model ensemble's (rm:A+B) mean per-sample std exceeds this (logged either way)"
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.kl_budget > 0 and getattr(self, "kl_coef", 0.0) <= 0:
            yield "kl_budget", "needs kl_coef > 0: without a KL penalty no reference is loaded and no KL is measured"
        if self.monitor_window < 2:
            yield "monitor_window", f"must be at least 2 (a trend needs two points), got {self.monitor_window}"
        names = ("kl_budget", "gold_tolerance", "length_drift", "min_distinct_2", "max_overlap", "min_entropy")
        for name in (*names, "max_disagreement"):
            if getattr(self, name) < 0:
                yield name, f"must be >= 0, got {getattr(self, name)}"


@dataclass(frozen=True)
class RolloutArgs:
    """How completions are sampled during RL."""

    batch_prompts: int = opt(8, "prompts per step over all ranks (N); groups are never split across ranks")
    max_new_tokens: int = opt(96, "generation limit per completion")
    temperature: float = opt(1.0, "sampling temperature")
    top_p: float = opt(1.0, "nucleus sampling mass")
    rollout_engine: Literal["hf", "vllm"] = opt(
        "hf", "generation backend: hf (built-in, any device) or vllm (GPU only; pip install 'posttrain[vllm]')"
    )
    rollout_dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto",
        "weights used for sampling: auto = the trained weights themselves; bfloat16 = a bf16 copy refreshed after"
        " every update (faster where bf16 matmuls are; rollout and trainer log-probs then differ by bf16 rounding)",
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from _positive(self, "batch_prompts", "max_new_tokens")
        if self.temperature <= 0:
            yield "temperature", f"must be > 0 for RL sampling, got {self.temperature}"
        if not 0 < self.top_p <= 1:
            yield "top_p", f"must be in (0, 1], got {self.top_p}"


@dataclass(frozen=True)
class GRPOConfig(
    RuntimeArgs, LoopArgs, AccumArgs, OptimArgs, RolloutArgs, MonitorArgs, RewardArgs, LoraArgs, ModelArgs
):
    """RL with verifiable rewards: GRPO and its family (Dr. GRPO, DAPO, GSPO; RLOO and REINFORCE++ baselines)."""

    group_size: int = opt(8, "completions sampled per prompt (G)")
    min_new_tokens: int = opt(0, "EOS is not sampled before this many tokens (log-probs stay untruncated)")
    loss: Literal["grpo", "dr_grpo", "dapo", "gspo"] = opt("grpo", "policy-loss variant")
    advantage: Literal["auto", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = opt(
        "auto", "advantage estimator; auto = the loss variant's own (dr_grpo -> centred, else group-normalised)"
    )
    epsilon_low: float = opt(0.0, "lower clip range; 0 = the loss variant's default")
    epsilon_high: float = opt(0.0, "upper clip range; 0 = the loss variant's default (DAPO: clip-higher)")
    updates_per_batch: int = opt(1, "policy updates per rollout batch (>1 uses the clipped ratio)")
    kl_coef: float = opt(0.0, "KL penalty to the reference; 0 loads no reference model")
    kl_estimator: Literal["k1", "k3"] = opt("k3", "per-token KL estimator")
    dynamic_sampling: bool = opt(False, "drop groups whose rewards are all equal (DAPO)")
    overlong_buffer: int = opt(0, "DAPO overlong shaping: penalty ramps over the last N tokens before the limit")

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from _positive(self, "updates_per_batch")
        if self.group_size < 2:
            yield (
                "group_size",
                f"must be at least 2, got {self.group_size}: every advantage estimator compares a completion with"
                " the others of its prompt's group, so a group of one never has a learning signal",
            )
        if self.kl_coef < 0:
            yield "kl_coef", f"must be >= 0, got {self.kl_coef}"
        for name in ("min_new_tokens", "epsilon_low", "epsilon_high", "overlong_buffer"):
            if getattr(self, name) < 0:
                yield name, f"must be >= 0, got {getattr(self, name)}"
        if self.min_new_tokens >= self.max_new_tokens:
            yield "min_new_tokens", f"{self.min_new_tokens} leaves no room under max_new_tokens={self.max_new_tokens}"
        if self.overlong_buffer >= self.max_new_tokens:
            yield "overlong_buffer", f"{self.overlong_buffer} must be below max_new_tokens={self.max_new_tokens}"


@dataclass(frozen=True)
class DPOConfig(RuntimeArgs, LoopArgs, BatchArgs, AccumArgs, OptimArgs, DataArgs, LoraArgs, ModelArgs):
    """Preference optimisation: DPO and its family (cDPO, IPO, SimPO, ORPO) on {prompt, chosen, rejected} rows,
    KTO on unpaired {prompt, completion, label} rows."""

    data: str = opt(
        "task:arithmetic_prefs", "preference rows {prompt, chosen, rejected} (kto: {prompt, completion, label})"
    )
    loss: Literal["dpo", "cdpo", "ipo", "simpo", "orpo", "kto"] = opt("dpo", "preference loss")
    beta: float = opt(0.1, "strength: DPO/cDPO/KTO beta, IPO's 1/(2 beta) target, SimPO beta, ORPO lambda")
    label_smoothing: float = opt(0.1, "cdpo: probability that a preference label is flipped")
    gamma: float = opt(0.5, "simpo: target reward margin")
    desirable_weight: float = opt(1.0, "kto: weight of desirable rows")
    undesirable_weight: float = opt(1.0, "kto: weight of undesirable rows")

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.beta <= 0:
            yield "beta", f"must be > 0, got {self.beta}"
        if not 0 <= self.label_smoothing < 0.5:
            yield "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}"
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                yield name, f"must be > 0, got {getattr(self, name)}"


@dataclass(frozen=True)
class RMConfig(RuntimeArgs, LoopArgs, BatchArgs, AccumArgs, OptimArgs, DataArgs, ModelArgs):
    """Reward model: Bradley–Terry loss on a scalar head over a causal-LM backbone, {prompt, chosen, rejected}
    rows (optional numeric margin column); saved as AutoModelForSequenceClassification. Trains fully (no LoRA:
    the score head is new)."""

    data: str = opt("task:arithmetic_prefs", "preference rows {prompt, chosen, rejected[, margin]}")
    length_policy: Literal["drop"] = opt("drop", "pairs over max_length are dropped (a reward needs the whole reply)")


@dataclass(frozen=True)
class PPOConfig(RuntimeArgs, LoopArgs, OptimArgs, RolloutArgs, MonitorArgs, RewardArgs, LoraArgs, ModelArgs):
    """PPO: value head, GAE, KL penalty in the reward (fixed or adaptive), optional KL trust region."""

    samples_per_prompt: int = opt(4, "completions sampled per prompt")
    ppo_epochs: int = opt(2, "passes over each rollout batch")
    minibatches: int = opt(2, "minibatches (optimiser steps) per pass; must divide the completions per step")
    clip_eps: float = opt(0.2, "policy ratio clip range")
    value_clip: float = opt(0.2, "value clip range around the rollout-time values")
    vf_coef: float = opt(0.1, "value-loss weight")
    gamma: float = opt(1.0, "discount")
    lam: float = opt(0.95, "GAE lambda")
    whiten_advantages: bool = opt(True, "normalise advantages over each batch's tokens (all ranks)")
    kl_coef: float = opt(0.05, "KL penalty coefficient (initial value for the adaptive controller); 0 = no reference")
    kl_controller: Literal["fixed", "adaptive"] = opt("fixed", "keep kl_coef fixed or adapt it towards kl_target")
    kl_target: float = opt(6.0, "adaptive controller: target KL per sequence (nats)")
    kl_horizon: int = opt(10000, "adaptive controller: horizon in samples")
    trust_region_kl: float = opt(0.0, "stop a batch's updates once mean KL to the rollout policy exceeds this; 0 = off")

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from _positive(self, "samples_per_prompt", "ppo_epochs", "minibatches")
        if (self.batch_prompts * self.samples_per_prompt) % self.minibatches:
            yield (
                "minibatches",
                (
                    f"{self.minibatches} does not divide batch_prompts x samples_per_prompt ="
                    f" {self.batch_prompts * self.samples_per_prompt}"
                ),
            )
        if self.kl_coef < 0:
            yield "kl_coef", f"must be >= 0, got {self.kl_coef}"
        if self.kl_controller == "adaptive" and self.kl_target <= 0:
            yield "kl_target", f"must be > 0 for the adaptive controller, got {self.kl_target}"
        if self.kl_horizon < 1:
            yield "kl_horizon", f"must be at least 1, got {self.kl_horizon}"
        if self.clip_eps <= 0:
            yield "clip_eps", f"must be > 0, got {self.clip_eps}"
        for name in ("value_clip", "vf_coef", "trust_region_kl"):
            if getattr(self, name) < 0:
                yield name, f"must be >= 0, got {getattr(self, name)}"
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                yield name, f"must be in [0, 1], got {getattr(self, name)}"


@dataclass(frozen=True)
class DistillConfig(RuntimeArgs, LoopArgs, BatchArgs, AccumArgs, OptimArgs, LMArgs, DataArgs, LoraArgs, ModelArgs):
    """Knowledge distillation (the GKD family): the student (``model``, full or PEFT) learns the teacher's token
    distributions on dataset completions, the teacher's own (``seq_kd``) or the student's (``lmbda``)."""

    teacher: str = opt("", "teacher model (dir, adapter dir, builtin:NAME); must share the student's tokenizer")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = opt(
        "jsd",
        "divergence per token: forward_kl = KL(teacher||student) (classic KD), reverse_kl = KL(student||teacher),"
        " jsd = generalised Jensen-Shannon with beta (GKD)",
    )
    beta: float = opt(0.5, "jsd: teacher weight of the mixture, in [0, 1] (0 = forward KL, 1 = reverse KL)")
    temperature: float = opt(1.0, "divides both models' logits in the loss, and samples on- and seq_kd completions")
    lmbda: float = opt(
        0.0, "share of steps trained on the student's own sampled completions (GKD's on-policy lambda), in [0, 1]"
    )
    seq_kd: bool = opt(False, "off-policy steps use teacher-sampled completions instead of the dataset's")
    max_new_tokens: int = opt(128, "generation limit of on-policy and seq_kd completions")
    teacher_top_k: int = opt(
        0,
        "K > 0: cache the teacher's top-K log-probs per target token once (out/teacher_topk.safetensors) and free"
        " the teacher before training (the loss then compares K+1-bin distributions); 0 = teacher in memory",
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        if not self.teacher:
            yield "teacher", "give the teacher model (--teacher DIR or builtin:NAME)"
        if not 0.0 <= self.beta <= 1.0:
            yield "beta", f"must be in [0, 1], got {self.beta}"
        if not 0.0 <= self.lmbda <= 1.0:
            yield "lmbda", f"must be in [0, 1], got {self.lmbda}"
        if self.temperature <= 0:
            yield "temperature", f"must be > 0, got {self.temperature}"
        yield from _positive(self, "max_new_tokens")
        if self.teacher_top_k < 0:
            yield "teacher_top_k", f"must be >= 0, got {self.teacher_top_k}"
        if self.teacher_top_k and (self.lmbda or self.seq_kd):
            yield (
                "teacher_top_k",
                "a cache holds the teacher on the dataset's completions only; on-policy (lmbda > 0) and seq_kd"
                " steps need the teacher in memory: set teacher_top_k 0",
            )


STAGE_CONFIGS: dict[str, type] = {
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "grpo": GRPOConfig,
    "dpo": DPOConfig,
    "rm": RMConfig,
    "ppo": PPOConfig,
    "distill": DistillConfig,
    "eval": EvalConfig,
}


def field_help(cls: type) -> dict[str, str]:
    """Field name -> documentation, in declaration order (most specific class first)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _number(text: str, tp: type) -> Any:
    try:
        return tp(text)
    except ValueError:
        return text  # coerce reports it with the key's path


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else coerce(value, args[0], path)
    ok = True
    if origin is Literal:
        ok = value in typing.get_args(tp)
    elif origin is list:
        item = typing.get_args(tp)[0]
        if isinstance(value, str):  # "1,2,4" from the command line or --set
            value = [v.strip() for v in value.split(",") if v.strip()]
            if item in (int, float):
                value = [_number(v, item) for v in value]
        ok = isinstance(value, list)
        if ok:
            value = [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value}")
    elif tp is str:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        value = str(value) if ok else value
    if not ok:
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def build_config(cls: type, values: dict[str, Any], *, path: str) -> Any:
    """Validate ``values`` against the dataclass ``cls`` and build the frozen config."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        key_path = f"{path}.{key}" if path else key
        if key not in hints or key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (valid keys: {', '.join(names)})"
            raise ConfigError(f"{key_path}: unknown key{hint}")
        kwargs[key] = coerce(value, hints[key], key_path)
    cfg = cls(**kwargs)
    for key, message in validation_errors(cfg):
        raise ConfigError(f"{path}.{key}: {message}" if path else f"{key}: {message}")
    return cfg


def validation_errors(cfg: Any) -> list[tuple[str, str]]:
    """(key, message) for every rule a built config breaks: each piece of the config checks its own fields."""
    found = []
    for klass in type(cfg).__mro__:
        check = klass.__dict__.get("validate")
        if check is not None:
            found += list(check(cfg))
    return found


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as a plain dict (for config.yaml in the run directory)."""
    return dataclasses.asdict(cfg)
