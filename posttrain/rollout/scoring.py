"""Teacher-forced log-probs of rollout completions: what the trainer computes, with gradient, for the tokens the
engine sampled. Same distribution as the engine's (logits / temperature), so on one model the two agree to
float precision — their largest difference is logged as a bug signal.

Legend: B completions, T completion tokens (as in ``Rollouts``).
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.models.forward import packed_logps
from posttrain.rollout.engine import Rollouts


def completion_logps(
    model: Any,
    rollouts: Rollouts,
    *,
    temperature: float = 1.0,
    rows: Any = None,
    with_entropy: bool = False,
    share_prompts: bool = True,
    return_hidden: bool = False,
) -> Any:
    """(b, T) log-probs of the completion tokens of ``rows`` (default: all) under ``model``, one packed forward;
    with ``with_entropy`` also the (b, T) entropy of each token's distribution (detached).

    With ``share_prompts`` the completions of one prompt are packed after a single copy of it and attend to it
    through ``prefix_attention``: the prompt's tokens go through the model once instead of once per completion,
    and the numbers (and gradients) are those of the unshared computation. Positions past a completion's end are
    0. Gradient flows when called outside ``torch.no_grad()``. With ``return_hidden`` the last hidden state at
    each predicting position (n_tokens, H), in the order of ``mask``, is returned last (for value heads).
    """
    rows = list(range(len(rollouts.prompt_index))) if rows is None else list(rows)
    members: dict[Any, list[int]] = {}
    for pos, r in enumerate(rows):
        members.setdefault(rollouts.prompt_index[r] if share_prompts else ("row", pos), []).append(pos)
    ids: list[int] = []
    positions: list[int] = []
    groups: list[tuple[int, tuple[int, ...]]] = []
    logit_at: list[list[int]] = [[] for _ in rows]  # where each completion token's predicting logit sits
    targets: list[list[int]] = [[] for _ in rows]
    for poss in members.values():
        prompt = rollouts.prompt_ids[rollouts.prompt_index[rows[poss[0]]]]
        start, n_prompt = len(ids), len(prompt)
        ids += prompt
        positions += range(n_prompt)
        branches = []
        for pos in poss:
            completion = rollouts.completion_ids[rows[pos]][rollouts.mask[rows[pos]]].tolist()
            branch = len(ids)
            ids += completion
            positions += range(n_prompt, n_prompt + len(completion))
            # The first completion token is predicted by the prompt's last position, the rest by their own branch.
            logit_at[pos] = [start + n_prompt - 1, *range(branch, branch + len(completion) - 1)]
            targets[pos] = completion
            branches.append(len(completion))
        groups.append((n_prompt, tuple(branches)))
    device = rollouts.completion_ids.device
    if share_prompts:
        layout: dict[str, Any] = {"posttrain_groups": tuple(groups)}
    else:
        ends = [0]
        for prefix, (branch,) in groups:
            ends.append(ends[-1] + prefix + branch)
        layout = {"posttrain_bounds": tuple(ends)}
    index = torch.tensor([i for row in logit_at for i in row], dtype=torch.long, device=device)
    flat, stats = packed_logps(
        model,
        torch.tensor([ids], device=device),
        torch.tensor([positions], device=device),
        torch.tensor([t for row in targets for t in row], dtype=torch.long, device=device),
        positions=index,
        temperature=temperature if temperature > 0 else 1.0,
        with_entropy=with_entropy,
        return_hidden=return_hidden,
        **layout,
    )
    sub_mask = rollouts.mask[rows]
    out = torch.zeros(len(rows), rollouts.mask.shape[1], dtype=flat.dtype, device=flat.device).masked_scatter(
        sub_mask, flat
    )
    extra = (stats["hidden"],) if return_hidden else ()
    if not with_entropy:
        return (out, *extra) if extra else out
    return (out, torch.zeros_like(out).masked_scatter(sub_mask, stats["entropy"]), *extra)
