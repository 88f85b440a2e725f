"""Padding-free batches and a resumable sampler.

A batch of sequences is packed into one row: tokens laid end to end, ``position_ids`` restarting at 0 for each
sequence. ``transformers`` reads the restarts as sequence boundaries and builds a block-diagonal causal mask,
so no sequence attends to another and no compute is spent on padding.

Legend: S = total tokens of the packed row.

    >>> from posttrain.data.encode import Example
    >>> b = pack([Example([5, 6, 7], [False, True, True]), Example([8, 9], [False, True])])
    >>> b.input_ids.tolist(), b.position_ids.tolist()
    ([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]])
    >>> b.targets.tolist(), b.target_mask.tolist()     # position t predicts token t+1 of the same sequence
    ([[6, 7, 0, 9, 0]], [[True, True, False, True, False]])
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from posttrain.data.encode import Example
from posttrain.errors import TrainingError


@dataclass
class PackedBatch:
    """input_ids, position_ids, targets (1, S) long; target_mask (1, S) bool; seq_ids (1, S) long;
    bounds = (0, end_1, ..., S), where each packed sequence ends."""

    input_ids: Tensor
    position_ids: Tensor
    targets: Tensor
    target_mask: Tensor
    seq_ids: Tensor
    bounds: tuple[int, ...]

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch on ``device``."""
        return replace(
            self,
            **{
                k: getattr(self, k).to(device)
                for k in ("input_ids", "position_ids", "targets", "target_mask", "seq_ids")
            },
        )

    @property
    def num_target_tokens(self) -> int:
        return int(self.target_mask.sum())

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def pack(examples: list[Example]) -> PackedBatch:
    """Pack examples into one padding-free row (see module docstring)."""
    ids, pos, tgt, tmask, seq, bounds = [], [], [], [], [], [0]
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        bounds.append(bounds[-1] + n)
        ids += ex.input_ids
        pos += range(n)
        tgt += ex.input_ids[1:] + [0]
        tmask += ex.loss_mask[1:] + [False]
        seq += [i] * n
    return PackedBatch(
        input_ids=torch.tensor([ids]),
        position_ids=torch.tensor([pos]),
        targets=torch.tensor([tgt]),
        target_mask=torch.tensor([tmask]),
        seq_ids=torch.tensor([seq]),
        bounds=tuple(bounds),
    )


class ResumableSampler:
    """Shuffled epochs of example indices whose position is two integers (epoch, offset).

    Each epoch's order depends only on (seed, epoch), so restoring the position restores the exact stream.

        >>> s = ResumableSampler(5, seed=0)
        >>> first = s.take(3); state = s.state_dict(); rest = s.take(4)
        >>> s2 = ResumableSampler(5, seed=0); s2.load_state_dict(state); s2.take(4) == rest
        True
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool = True):
        if size <= 0:
            raise ValueError("cannot sample from zero examples")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._epoch_order()
            out.append(self._order[self.offset])
            self.offset += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position saved by ``state_dict``; a ``TrainingError`` if it was saved over other data (a
        different number of examples would be a different stream, and silently so)."""
        size, offset = int(state.get("size", self.size)), int(state["offset"])
        if size != self.size or not 0 <= offset <= self.size:
            was = f"over {size} rows" if "size" in state else f"at row {offset} of an epoch"
            raise TrainingError(
                f"resume: the checkpoint's sampler was {was}, the data now has {self.size}; resume with the same data"
            )
        self.epoch, self.offset = int(state["epoch"]), offset
        self._order = self._epoch_order()
