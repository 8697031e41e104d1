"""The training sampler: ratio-mixed, with replacement, distributed and resumable.

Each epoch, entry ``j`` (of size ``n_j``) contributes ``int(samples * ratios[j])`` indices drawn
uniformly *with replacement* (SPEC §1: ``ratios`` sets both epoch length and mix). The draws of
all entries are concatenated (as offsets into a ``ConcatDataset``) and shuffled. The epoch's
order depends only on ``(seed, epoch)``, so every rank computes the same list and takes the
disjoint share ``order[rank::world_size]`` (the list is first cut to a multiple of the world
size, so shares are equal and nothing is counted twice). ``state_dict`` records the epoch and
how many indices this rank has handed out; a sampler restored from it continues the stream
exactly where it stopped.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def epoch_counts(samples: int, ratios: Sequence[float]) -> list[int]:
    """Items each entry contributes per epoch."""
    return [int(samples * r) for r in ratios]


class MixedEpochSampler(Sampler[int]):
    def __init__(self, sizes: Sequence[int], ratios: Sequence[float], samples: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(sizes) != len(ratios):
            raise ValueError(f"{len(ratios)} ratios for {len(sizes)} datasets")
        if any(n <= 0 for n in sizes):
            raise ValueError(f"every dataset needs at least one item, got sizes {list(sizes)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sizes = list(sizes)
        self.counts = epoch_counts(samples, ratios)
        if sum(self.counts) < world_size:
            raise ValueError(f"data.samples x ratios gives {sum(self.counts)} items per epoch, fewer than "
                             f"the {world_size} processes; raise data.samples")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.start = 0  # indices of this rank's share already handed out in this epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The whole epoch's shuffled list of ConcatDataset indices (identical on every rank)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        offsets = torch.tensor([0] + self.sizes[:-1]).cumsum(0).tolist()
        parts = [torch.randint(n, (k,), generator=g) + off for n, k, off in zip(self.sizes, self.counts, offsets)]
        order = torch.cat(parts)[torch.randperm(sum(self.counts), generator=g)]
        return order[: len(order) - len(order) % self.world_size]

    def share_length(self) -> int:
        return sum(self.counts) // self.world_size

    def __len__(self) -> int:
        return self.share_length() - self.start

    def __iter__(self) -> Iterator[int]:
        share = self.epoch_order(self.epoch)[self.rank::self.world_size].tolist()
        start, self.start = self.start, 0  # a resumed position applies to one pass only
        for position in range(start, len(share)):
            yield share[position]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def state_dict(self, consumed: int) -> dict:
        """State after ``consumed`` indices of this rank's share of the current epoch."""
        return {"epoch": self.epoch, "consumed": int(consumed), "seed": self.seed,
                "world_size": self.world_size, "counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or list(state["counts"]) != self.counts or state["world_size"] != self.world_size:
            raise ValueError("the checkpoint's data stream differs from this run's (seed, data.samples, "
                             "data.ratios or number of processes changed); resume with the same settings")
        self.epoch, self.start = int(state["epoch"]), int(state["consumed"])
