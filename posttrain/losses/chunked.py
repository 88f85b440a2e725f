"""Log-probabilities of chosen tokens from final hidden states, through the output head a chunk of tokens at a time.

Legend: N tokens, H hidden size, V vocabulary, C tokens per chunk.

Taking ``model(...).logits`` materialises all (N, V) logits at once: with SmolLM2's 49,152-token vocabulary a
packed batch of 8 x 256 tokens is 2048 x 49152 fp32 = 403 MB, and the log-softmax's backward needs as much
again. Here each chunk of C tokens goes through the head, the log-softmax and the pick of the target, under
``torch.utils.checkpoint``: the forward keeps only the chunk's input and its (C,) results, and the backward
recomputes that one chunk's logits, so the peak holds one chunk's logits, never all of them. The price is one
more head matmul per training chunk (recomputed in the backward); forwards without gradient pay nothing, and
calls whose logits are small in all (``SMALL_LOGITS_BYTES``) keep them instead.

    >>> import torch
    >>> hidden, weight = torch.randn(5, 4), torch.randn(7, 4)
    >>> logps, stats = chunked_token_logps(hidden, weight, torch.tensor([0, 1, 2, 3, 4]), chunk_size=2)
    >>> full = torch.log_softmax(hidden @ weight.T, -1)[torch.arange(5), torch.tensor([0, 1, 2, 3, 4])]
    >>> torch.allclose(logps, full, atol=1e-6), stats["argmax"].shape
    (True, torch.Size([5]))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Tokens per chunk, chosen by measurement: one SFT step (forward, loss, backward, AdamW) of a SmolLM2-135M-shaped
# model (vocabulary 49,152) on 8 x 256 packed tokens, fp32, 2 CPU threads, median peak RSS / step time: full
# logits 7,743 MiB / 17.6 s; chunks of 128, 256, 512, 1024, 2048 tokens 6,809, 6,610, 6,730, 7,321, 8,027 MiB /
# 16.5, 16.4, 16.5, 18.7, 19.9 s. One chunk of 256 tokens is 256 x 49152 fp32 = 48 MiB of logits.
CHUNK_TOKENS = 256
# Below this many bytes of fp32 logits for the whole call (e.g. 512 tokens x 49,152 = 96 MiB: a GRPO step's
# 8 completions of 64 tokens), a training forward keeps each chunk's logits for the backward instead of
# recomputing them. Measured on SmolLM2-135M, bf16, 2 CPU threads: the recomputation (head matmul, upcast,
# log-sum-exp) cost ~0.13 s per 256-token chunk.
SMALL_LOGITS_BYTES = 128 * 2**20

Head = Callable[[Tensor], Tensor] | Tensor | None


def chunked_token_logps(
    hidden: Tensor,
    head: Head,
    targets: Tensor,
    *,
    chunk_size: int = CHUNK_TOKENS,
    scale: float = 1.0,
    softcap: float = 0.0,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """log softmax(logits)[target] per token, with logits = softcap(head(hidden) x scale) / temperature.

    Args: hidden (..., H) final hidden states (any leading shape, e.g. (1, S, H)); head: the output layer (a
    module or callable (n, H) -> (n, V)), its (V, H) weight, or None when ``hidden`` already holds logits;
    targets (...) token ids; ``scale`` and ``softcap`` (0 = none) reproduce models that transform their logits
    (Cohere, Granite: scale; Gemma 2/3: ``cap * tanh(logits / cap)``), ``temperature`` the sampling one.
    The log-softmax is taken in fp32 (fp64 stays fp64) whatever the head's dtype: under bf16 autocast the head's
    matmul runs in bf16 and its output is upcast per chunk.
    Returns (logps (...) fp32, with gradient; stats: "argmax" (...) the top token, and with ``with_entropy``
    "entropy" (...) fp32, both detached).
    """
    lead = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    project = _projection(head)

    done: set[int] = set()

    def chunk(h: Tensor, t: Tensor, index: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if not softcap:
            first = index not in done
            done.add(index)
            logps, top, entropy = TargetLogSoftmax.apply(project(h), t, scale, temperature, with_entropy and first)
            return logps, (top if first else None), entropy
        logits = _logits(project(h), scale, softcap, temperature)
        lse = torch.logsumexp(logits, dim=-1)
        logps = torch.gather(logits, -1, t[:, None]).squeeze(-1) - lse
        if index in done:  # the backward's recomputation: only what the gradient needs (the stats are kept)
            return logps, None, None
        done.add(index)
        with torch.no_grad():
            top = logits.argmax(-1)
            entropy = None
            if with_entropy:
                logp_all = logits - lse[:, None]
                entropy = -logp_all.exp().mul_(logp_all).sum(-1)  # one (C, V) temporary fewer
        return logps, top, entropy

    # Only a forward that builds a graph needs the checkpoint (without gradient the chunk's logits die with it), and
    # only when all the logits would be large: below SMALL_LOGITS_BYTES the backward keeps them and skips a second
    # head matmul and log-softmax per chunk.
    small = flat_targets.numel() * _vocab_size(head, hidden) * 4 <= SMALL_LOGITS_BYTES
    checkpointed = torch.is_grad_enabled() and not small
    run = (lambda *a: checkpoint(chunk, *a, use_reentrant=False)) if checkpointed else chunk
    pieces = zip(flat_hidden.split(chunk_size), flat_targets.split(chunk_size))
    parts = [run(h, t, i) for i, (h, t) in enumerate(pieces)]
    logps = torch.cat([p[0] for p in parts]).view(lead)
    stats = {"argmax": torch.cat([p[1] for p in parts]).view(lead)}
    if with_entropy:
        stats["entropy"] = torch.cat([p[2] for p in parts]).view(lead)
    return logps, stats


def chunked_divergence(
    hidden: Tensor,
    head: Head,
    teacher: Callable[[int, int], tuple[Tensor, Tensor | None]],
    divergence: Callable[[Tensor, Tensor], Tensor],
    *,
    chunk_size: int = CHUNK_TOKENS,
    scale: float = 1.0,
    softcap: float = 0.0,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-token divergence between the student's distribution (``hidden`` through ``head``, as in
    :func:`chunked_token_logps`) and a teacher's, a chunk of tokens at a time.

    ``teacher(start, stop)`` gives the teacher at tokens [start, stop): (log-distribution (c, V), None), or with a
    top-K cache (log-probs over K+1 bins (c, K+1), token ids (c, K)), and then the student is coarsened to the
    same bins (``posttrain.losses.distill.topk_bins``). It is called without gradient, and again in the
    backward's recomputation. ``divergence(student_logps, teacher_logps) -> (c,)``.
    Returns (per-token divergence (n,) fp32 with gradient, the student's argmax (n,) detached).

    >>> import torch
    >>> from posttrain.losses.distill import forward_kl
    >>> h, w, t = torch.randn(5, 4), torch.randn(7, 4), torch.log_softmax(torch.randn(5, 7), -1)
    >>> kl, _ = chunked_divergence(h, w, lambda a, b: (t[a:b], None), forward_kl, chunk_size=2)
    >>> torch.allclose(kl, forward_kl(torch.log_softmax(h @ w.T, -1), t), atol=1e-6)
    True
    """
    from posttrain.losses.distill import topk_bins

    flat = hidden.reshape(-1, hidden.shape[-1])
    project = _projection(head)

    def chunk(h: Tensor, start: int) -> tuple[Tensor, Tensor]:
        logits = _logits(project(h), scale, softcap, temperature)
        with torch.no_grad():
            teacher_logps, indices = teacher(start, start + len(h))
            top = logits.argmax(-1)
        student = torch.log_softmax(logits, -1) if indices is None else topk_bins(logits, indices)
        return divergence(student, teacher_logps.to(student.dtype)), top

    run = (lambda h, i: checkpoint(chunk, h, i, use_reentrant=False)) if torch.is_grad_enabled() else chunk
    parts = [run(h, i * chunk_size) for i, h in enumerate(flat.split(chunk_size))]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def head_log_softmax(
    hidden: Tensor, head: Head, *, scale: float = 1.0, softcap: float = 0.0, temperature: float = 1.0
) -> Tensor:
    """log softmax over the vocabulary of ``hidden`` (n, H) through ``head`` (n, V), fp32: for a few rows at a
    time (a teacher's chunk), never a whole batch."""
    return torch.log_softmax(_logits(_projection(head)(hidden), scale, softcap, temperature), -1)


def _logits(logits: Tensor, scale: float, softcap: float, temperature: float) -> Tensor:
    """The head's output as the sampler sees it: fp32 (fp64 kept), scaled, soft-capped, divided by temperature."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


class TargetLogSoftmax(torch.autograd.Function):
    """log softmax(logits x scale / temperature)[target] per row, in fp32 (fp64 kept), with the row's top token and
    (``with_entropy``) the distribution's entropy: bitwise what autograd computes through :func:`_logits`,
    ``torch.logsumexp`` and ``torch.gather`` (same operations, same order, so every result and gradient is
    identical), with fewer (C, V) temporaries. Autograd's backward makes a zero-filled tensor for the gather,
    ``exp(x - lse)`` again, their product, their sum, and one per scale and temperature; here the forward keeps
    ``exp(x - lse)`` and the backward overwrites it in place. On a CPU each fresh 48 MiB temporary also costs
    ~15 ms of page faults before any arithmetic (measured). tests/test_memory.py checks bitwise equality.

        >>> logits, t = torch.randn(3, 5), torch.tensor([0, 4, 2])
        >>> logps, top, entropy = TargetLogSoftmax.apply(logits, t, 1.0, 1.0, True)
        >>> ref = torch.log_softmax(logits, -1)
        >>> torch.allclose(logps, ref[torch.arange(3), t]), torch.equal(top, logits.argmax(-1))
        (True, True)
        >>> torch.allclose(entropy, -(ref.exp() * ref).sum(-1))
        True
    """

    @staticmethod
    def forward(ctx: Any, raw: Tensor, targets: Tensor, scale: float, temperature: float, with_entropy: bool) -> Any:
        x = _logits(raw, scale, 0.0, temperature)
        lse = torch.logsumexp(x, dim=-1)
        logps = torch.gather(x, -1, targets[:, None]).squeeze(-1) - lse
        top = x.argmax(-1)
        # x - lse, into x when x is our own copy (an upcast or a scaled one), else a new tensor
        shifted = x.sub_(lse[:, None]) if x is not raw else x - lse[:, None]
        exps = shifted.exp()
        entropy = -shifted.mul_(exps).sum(-1) if with_entropy else None  # shifted is not needed after this
        ctx.save_for_backward(exps, targets)
        ctx.scale, ctx.temperature, ctx.dtype = scale, temperature, raw.dtype
        ctx.mark_non_differentiable(top)
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logps, top, entropy

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Any) -> Any:
        exps, targets = ctx.saved_tensors
        # autograd's: logsumexp's (-grad) * exp(x - lse), plus gather's grad at the target, then the temperature's
        # and the scale's products, then the cast back to the head's dtype. The graph may be run backward again
        # (retain_graph): then the saved exponentials must stay, so the first product goes into a new tensor.
        out = torch.mul(-grad[:, None], exps)
        out.scatter_add_(-1, targets[:, None], grad[:, None])
        if ctx.temperature != 1.0:
            out.div_(ctx.temperature)
        if ctx.scale != 1.0:
            out.mul_(ctx.scale)
        return out.to(ctx.dtype), None, None, None, None


def _vocab_size(head: Head, hidden: Tensor) -> int:
    """The number of logits per token ``head`` makes (``hidden``'s last size when it already holds logits)."""
    if head is None:
        return hidden.shape[-1]
    weight = head if isinstance(head, Tensor) else getattr(head, "weight", None)
    return weight.shape[0] if isinstance(weight, Tensor) else getattr(head, "out_features", 1 << 20)


def _projection(head: Head) -> Callable[[Tensor], Tensor]:
    if head is None:
        return lambda h: h
    if isinstance(head, Tensor):
        return lambda h: F.linear(h, head)
    return head
