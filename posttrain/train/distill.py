"""The ``distill`` stage: a student learns a teacher's token distributions (knowledge distillation, the GKD
family of Agarwal et al. 2024, with TRL's ``GKDTrainer`` conventions).

One step draws the global batch of SFT examples. With probability ``lmbda`` (decided per step from the seed, so
every rank and every resume agree) the step is on-policy: each example keeps its prompt and gets a completion
sampled from the student as it is now; otherwise it keeps the dataset's completion, or with ``seq_kd`` gets one
sampled from the teacher. Each completion token's divergence between the student's and the teacher's
distributions (``posttrain.losses.distill``: forward KL, reverse KL or generalised JSD, both at ``temperature``)
is summed and divided by the completion tokens of the whole step, as SFT does. The vocabulary is read a chunk of
tokens at a time (``posttrain.losses.chunked.chunked_divergence``): no full logits of a batch are ever held.

``teacher_top_k`` K > 0 runs the teacher once over the training examples before training, keeps its top-K
log-probs per completion token (``out/teacher_topk.safetensors``, reused on resume) and frees it: training then
holds one model, and the loss compares the two distributions coarsened to K+1 bins (the K tokens and the rest).

The held-out figure is the student's own NLL on the eval rows (as for SFT); the summary names the teacher.
Multi-turn rows: on-policy and seq_kd completions replace everything after the first trained token's prompt.

    >>> import tempfile
    >>> from posttrain.config import build_config, DistillConfig
    >>> cfg = build_config(DistillConfig, {"out": tempfile.mkdtemp(), "teacher": "builtin:tiny-base",
    ...     "model": "builtin:tiny-base", "max_steps": 1, "batch_size": 2, "progress": False}, path="distill")
    >>> run_distill(cfg)["distill"]["teacher"]
    'builtin:tiny-base'
"""

from __future__ import annotations

import json
import random
import zlib
from functools import partial
from pathlib import Path
from typing import Any

import torch

from posttrain.data.batching import PackedBatch, pack
from posttrain.data.encode import Example
from posttrain.distributed import DistContext
from posttrain.errors import ConfigError, ModelError, TrainingError
from posttrain.losses.chunked import CHUNK_TOKENS, chunked_divergence, head_log_softmax
from posttrain.losses.distill import divergence, topk_bins
from posttrain.models.forward import packed_states
from posttrain.train.scaffold import Run, forward_rows, run_stage
from posttrain.train.sft import LMStage

CACHE_FILE = "teacher_topk.safetensors"


class DistillStage(LMStage):
    """Distillation on the SFT data path (rows, replay, held-out NLL) with its own step."""

    def __init__(self, cfg: Any, **kwargs: Any):
        super().__init__(cfg, name="distill", **kwargs)
        self.teacher: Any = None
        # per example: (token ids (n, K), log-probs (n, K+1): the teacher's top K, then the rest of the vocabulary)
        self.top: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.on_policy_steps = 0

    def build(self, ctx: DistContext) -> tuple[Any, Any]:
        cfg = self.cfg
        if cfg.fsdp and (cfg.lmbda or cfg.seq_kd):
            raise ConfigError("distill.fsdp: on-policy and seq_kd sampling need the whole student; use DDP (no --fsdp)")
        model, tokenizer = super().build(ctx)
        self.teacher = load_teacher(cfg, tokenizer, ctx.device)
        if cfg.teacher_top_k:
            self.top = teacher_topk(self, ctx)
            self.teacher = None  # training holds one model: the cache replaces the teacher
        return model, tokenizer

    def step(self, run: Run, indices: list[int], step: int) -> dict[str, Any]:
        cfg = self.cfg
        on_policy = random.Random(f"{cfg.seed}:{step}").random() < cfg.lmbda
        self.on_policy_steps += on_policy
        mine = run.ctx.shard(list(range(len(indices))))  # positions in the global batch
        batch = [self.examples[indices[i]] for i in mine]
        top = [self.top[indices[i]] for i in mine] if self.top is not None else None
        if on_policy or cfg.seq_kd:
            source = run.model.module if on_policy else self.teacher
            seeds = [_sample_seed(cfg.seed, step, i) for i in mine]
            batch = sampled_completions(source, self.tokenizer, batch, seeds, cfg)
        # Whole-step counts: each rank sampled its own completions, so their lengths are summed over ranks.
        local_targets = sum(sum(e.loss_mask[1:]) for e in batch)
        n_targets, tokens = run.ctx.sum(local_targets, sum(len(e.input_ids) for e in batch))
        n_targets = max(int(n_targets), 1)
        size = len(batch) // cfg.grad_accum

        def forward(k: int, packed: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
            part_top = _cat_top(top[k * size : (k + 1) * size], run.ctx.device) if top is not None else None
            losses, right = run.model.forward(self.distill_losses, packed, part_top)
            return losses.float().sum(), right

        finite, grad_norm, loss, accuracy = self.accumulate(run, batch, n_targets, forward)
        return {
            "finite": finite,
            "loss": loss,
            "grad_norm": grad_norm,
            "token_accuracy": accuracy,
            "on_policy": int(on_policy),
            "completion_tokens": n_targets,
            "tokens": int(tokens),
        }

    def distill_losses(
        self, model: Any, packed: PackedBatch, top: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(divergence per completion token (n,), student argmax == target (n,))."""
        cfg = self.cfg
        states, head = packed_states(model, packed)
        if top is not None and top[0].shape[0] != states.shape[0]:
            raise TrainingError(f"teacher cache: {top[0].shape[0]} cached tokens for {states.shape[0]} trained ones")
        if top is None:
            with torch.no_grad():
                t_states, t_head = packed_states(self.teacher, packed)
            t_kwargs = {"scale": t_head.get("scale", 1.0), "softcap": t_head.get("softcap", 0.0)}

            def teacher(start: int, stop: int) -> tuple[torch.Tensor, None]:
                rows = t_states[start:stop]
                return head_log_softmax(rows, t_head["head"], temperature=cfg.temperature, **t_kwargs), None
        else:
            ids, logps = top

            def teacher(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
                return logps[start:stop], ids[start:stop]

        losses, argmax = chunked_divergence(
            states,
            head["head"],
            teacher,
            partial(divergence, cfg.loss, beta=cfg.beta),
            scale=head.get("scale", 1.0),
            softcap=head.get("softcap", 0.0),
            temperature=cfg.temperature,
        )
        targets = packed.targets[0, packed.target_mask[0]]
        return losses, argmax == targets

    def summary(self, run: Run) -> dict[str, Any]:
        cfg = self.cfg
        return {
            **super().summary(run),
            "distill": {
                "teacher": cfg.teacher,
                "loss": cfg.loss,
                **({"beta": cfg.beta} if cfg.loss == "jsd" else {}),
                "temperature": cfg.temperature,
                "lmbda": cfg.lmbda,
                "seq_kd": cfg.seq_kd,
                "on_policy_steps": self.on_policy_steps,
                "teacher_top_k": cfg.teacher_top_k,
            },
        }

    def extra_state(self) -> dict[str, Any]:
        return {"on_policy_steps": self.on_policy_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.on_policy_steps = int(state.get("on_policy_steps", 0))


def load_teacher(cfg: Any, tokenizer: Any, device: torch.device) -> Any:
    """The teacher, frozen in eval mode on ``device``; refused unless its vocabulary is the student's."""
    from posttrain.models.loading import load_model

    teacher, teacher_tok = load_model(cfg.teacher, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise ModelError(
            f"distill.teacher: {cfg.teacher} and the student {cfg.model} have different tokenizers; token-level"
            " distillation compares distributions over one vocabulary"
        )
    if teacher.get_output_embeddings().weight.shape[0] < len(tokenizer):
        raise ModelError(f"distill.teacher: {cfg.teacher}'s output layer is smaller than the tokenizer")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def sampled_completions(
    model: Any, tokenizer: Any, examples: list[Example], seeds: list[int], cfg: Any
) -> list[Example]:
    """Each example's prompt (its tokens before the first trained one) with a completion sampled from ``model``
    at ``cfg.temperature`` (EOS included when sampled), cut to ``cfg.max_length`` tokens."""
    from posttrain.rollout import HFEngine, SamplingParams

    prompts = [e.input_ids[: e.loss_mask.index(True)] for e in examples]
    params = SamplingParams(n=1, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    out = HFEngine(model, tokenizer).generate_ids(prompts, params, seed=seeds)
    result = []
    for prompt, ids, mask in zip(prompts, out.completion_ids.tolist(), out.mask.tolist(), strict=True):
        completion = [t for t, m in zip(ids, mask, strict=True) if m]
        tokens = (prompt + completion)[: cfg.max_length]
        result.append(Example(tokens, ([False] * len(prompt) + [True] * len(completion))[: cfg.max_length]))
    return result


def teacher_topk(stage: DistillStage, ctx: DistContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's top-K token ids and K+1-bin log-probs (``topk_bins``, at the temperature) at every target
    token of every training example, read from ``out/teacher_topk.safetensors`` when it was made for this
    teacher, data, K and temperature, else computed (and written by rank 0)."""
    from safetensors.torch import load_file, save_file

    cfg, examples = stage.cfg, stage.examples
    key = _cache_key(cfg, examples)
    path = Path(cfg.out) / CACHE_FILE
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            same = (f.metadata() or {}).get("key") == key
        if same:
            saved = load_file(str(path))
            return _split(saved["ids"], saved["logps"], saved["offsets"].tolist())
    ids, logps, offsets = [], [], [0]
    rows = forward_rows(cfg)
    with torch.no_grad():
        for start in range(0, len(examples), rows):
            packed = pack(examples[start : start + rows]).to(ctx.device)
            states, head = packed_states(stage.teacher, packed)
            kwargs = {"scale": head.get("scale", 1.0), "softcap": head.get("softcap", 0.0)}
            for chunk in states.split(CHUNK_TOKENS):
                lp = head_log_softmax(chunk, head["head"], temperature=cfg.temperature, **kwargs)
                top = lp.topk(cfg.teacher_top_k, dim=-1).indices
                ids.append(top.to(torch.int32).cpu())
                logps.append(topk_bins(lp, top).cpu())  # the K tokens' log-probs and the rest's, exactly
            for e in examples[start : start + rows]:
                offsets.append(offsets[-1] + sum(e.loss_mask[1:]))
    all_ids, all_logps = torch.cat(ids), torch.cat(logps)
    if ctx.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tensors = {"ids": all_ids, "logps": all_logps, "offsets": torch.tensor(offsets)}
        save_file(tensors, str(tmp), metadata={"key": key})
        tmp.replace(path)
    return _split(all_ids, all_logps, offsets)


def _cache_key(cfg: Any, examples: list[Example]) -> str:
    digest = zlib.crc32(json.dumps([[e.input_ids, e.loss_mask] for e in examples]).encode())
    return json.dumps([cfg.teacher, cfg.teacher_top_k, cfg.temperature, cfg.dtype, digest])


def _split(ids: torch.Tensor, logps: torch.Tensor, offsets: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(ids[a:b].long(), logps[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def _cat_top(parts: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch's cached teacher rows, in packing order (examples in order, each its target tokens)."""
    return torch.cat([p[0] for p in parts]).to(device), torch.cat([p[1] for p in parts]).to(device)


def _sample_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of one example of a step: independent of how the batch is split over ranks."""
    return zlib.crc32(f"distill:{seed}:{step}:{position}".encode())


def run_distill(cfg: Any, *, stop_after: int | None = None) -> dict[str, Any]:
    """Distil ``cfg.teacher`` into ``cfg.model``; see module docstring."""
    return run_stage(DistillStage(cfg), stop_after=stop_after)
